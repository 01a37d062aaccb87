"""The batches: named sources dealt into each step's rows at their weights (one source is a
mixture of one), a pure function of the step."""

from __future__ import annotations

import math
import zlib
from fractions import Fraction

import numpy as np

from solarjax.data.config import IMPLICIT_SOURCE, DataConfig
from solarjax.data.packing import stack_sequences
from solarjax.data.sources import DataError
from solarjax.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Mixtures: named sources at weights, dealt rows step by step


def exact_weights(weights) -> list[int]:
    """Integer weights in the exact ratio of `weights` as written: each float is read as the
    decimal it prints as (0.1 is 1/10, not the binary double nearest it), so 0.6/0.3/0.1 and 6/3/1
    are the same mixture [6, 3, 1] and deal the same rows. A non-finite or negative weight, or all
    zero, is refused."""
    fractions = []
    for w in weights:
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise DataError(f"mixture weight {w!r} must be a finite number >= 0")
        fractions.append(Fraction(repr(w)))
    if not any(fractions):
        raise DataError(f"mixture weights {list(weights)} are all 0: some source must have a weight")
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    g = math.gcd(*ints)
    return [i // g for i in ints]


def seats(weights, rows: int) -> np.ndarray:
    """How many of the first `rows` rows of a mixture each source gets: Sainte-Laguë's divisor
    method in closed form, in exact integer arithmetic (no float noise breaks a tie, and any ratio
    of weights is dealt exactly). Row seats are ordered by the key (2j+1)/w_s ascending (source s's
    (j+1)-th row), ties to the lower source index, and the first `rows` of that one fixed order are
    taken, so the count per source never falls as `rows` grows (no Alabama paradox: per-step
    differences are >= 0) and stays within about one row of rows * w_s / sum(w). int64 [S]."""
    w = exact_weights(weights)
    out = np.zeros(len(w), np.int64)
    if rows <= 0:
        return out
    active = [s for s in range(len(w)) if w[s]]

    # Seats of source s whose key is <= a/b (or < a/b): the j >= 0 with (2j+1) * b <= a * w_s.
    def at_most(a: int, b: int) -> list[int]:
        return [(a * w[s] + b) // (2 * b) for s in range(len(w))]

    def below(a: int, b: int) -> list[int]:
        return [(a * w[s] + b - 1) // (2 * b) for s in range(len(w))]

    # The threshold key: the smallest key with `rows` seats at or below it. For each source, the
    # first of its own keys that gets there (its rows-th key always does), then the least of those.
    threshold = None
    for s in active:
        lo, hi = 0, rows - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if sum(at_most(2 * mid + 1, w[s])) >= rows:
                hi = mid
            else:
                lo = mid + 1
        key = Fraction(2 * lo + 1, w[s])
        threshold = key if threshold is None else min(threshold, key)
    a, b = threshold.numerator, threshold.denominator
    strictly, upto = below(a, b), at_most(a, b)
    need = rows - sum(strictly)
    for s in range(len(w)):  # seats tied at the threshold key: lower source index first
        take = min(upto[s] - strictly[s], need)
        out[s] = strictly[s] + take
        need -= take
    return out


class Mixture:
    """Global batch k of a mixture of sources (one source is a mixture of one), each packed into
    windows on its own.

    The schedule is [(start step, weights), ...]. Within the segment that holds step k, the first
    G * (k - start + 1) rows are dealt to the sources by `seats` (a closed form of the step), and
    step k takes the difference from step k-1: rounding is carried forward, never re-drawn, so over
    many steps each source's share of rows matches its weight to within a row. Source s's u-th row
    overall (u counts every earlier segment's rows too) is window perm_{s,e}[i], (e, i) =
    divmod(u, its windows): its own seeded permutation per epoch, wrapping around on its own. Rows
    of a step are in source order; this process builds rows [p*G/P, (p+1)*G/P). All of it is a pure
    function of (seed, schedule, k): resume needs only k, and P processes build one process's batch."""

    def __init__(self, names: list[str], packed: list, schedule: list[tuple[int, list[float]]],
                 global_batch: int, seed: int, process_index: int = 0, process_count: int = 1):
        if global_batch < 1 or global_batch % process_count:
            raise DataError(f"global batch {global_batch} must be a positive multiple of the process count "
                            f"{process_count}")
        self.names, self.packed, self.schedule = list(names), list(packed), [(int(a), list(w)) for a, w in schedule]
        cached = [(name, len(p)) for name, p in zip(self.names, self.packed) if not p.streaming]
        for name, n in cached:
            if n == 0 and any(w[self.names.index(name)] for _, w in self.schedule):
                raise DataError(f"source {name} has no windows to train on (no document or record left in it), "
                                f"but a mixture weight for it is > 0")
        if len(cached) == len(self.names) and sum(n for _, n in cached) < global_batch:
            raise DataError(f"the data has {sum(n for _, n in cached)} sequences of {self.packed[0].seq_len} "
                            f"tokens, fewer than one global batch of {global_batch}")
        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._drawn_cache: tuple[int, np.ndarray] | None = None
        self._marks: dict[int, dict[str, list[int]]] = {}  # step -> its streams' positions (positions())

    def __iter__(self):
        return self.iterate(0)

    def iterate(self, start_step: int = 0):
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def _segment(self, step: int) -> int:
        return max(i for i, (a, _) in enumerate(self.schedule) if a <= step)

    def drawn(self, step: int) -> np.ndarray:
        """Rows each source gave to steps 0 .. step-1, int64 [S]."""
        if self._drawn_cache is not None and self._drawn_cache[0] == step:
            return self._drawn_cache[1].copy()
        G, total = self.global_batch, np.zeros(len(self.names), np.int64)
        for i, (start, weights) in enumerate(self.schedule):
            if start >= step:
                break
            end = min(step, self.schedule[i + 1][0]) if i + 1 < len(self.schedule) else step
            total += seats(weights, G * (end - start))
        self._drawn_cache = (step, total)
        return total.copy()

    def dealt(self, step: int) -> np.ndarray:
        """Rows of global batch `step` from each source, int64 [S] summing to the global batch."""
        start, weights = self.schedule[self._segment(step)]
        G = self.global_batch
        return seats(weights, G * (step - start + 1)) - seats(weights, G * (step - start))

    def _window(self, s: int, u: int) -> int:
        if getattr(self.packed[s], "streaming", False):  # in stream order; its windows' count is unknown
            return u
        n = len(self.packed[s])
        epoch, i = divmod(u, n)
        key = (s, epoch)
        if key not in self._perms:
            salt = [] if self.names[s] == IMPLICIT_SOURCE else [zlib.crc32(self.names[s].encode())]
            self._perms = {k: v for k, v in self._perms.items() if k[0] != s or k[1] >= epoch - 1}
            self._perms[key] = np.random.default_rng([self.seed, *salt, epoch]).permutation(n)
        return int(self._perms[key][i])

    def global_rows(self, step: int) -> list[tuple[int, int]]:
        """(source index, window) of every row of global batch `step`, in source order."""
        first, counts = self.drawn(step), self.dealt(step)
        self._drawn_cache = (step + 1, first + counts)  # the loop asks for the next step next
        return [(s, self._window(s, int(first[s]) + r)) for s in range(len(self.names)) for r in range(int(counts[s]))]

    def rows(self, step: int) -> list[tuple[int, int]]:
        local = self.global_batch // self.process_count
        return self.global_rows(step)[self.process_index * local:(self.process_index + 1) * local]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `step`: tokens, segment_ids, positions (and an
        objective's masks), [G/P, T] int32. A streaming source's windows are read in order by every
        process (each keeps only its own rows)."""
        local = self.global_batch // self.process_count
        lo, seqs, first = self.process_index * local, [], self.drawn(step)
        marks = {}  # streaming source -> where its first window of this step starts
        for i, (s, w) in enumerate(self.global_rows(step)):  # in order: a stream is read forwards
            streaming = getattr(self.packed[s], "streaming", False)
            if lo <= i < lo + local:
                seqs.append(self.packed[s].sequence(w))
            elif streaming:
                self.packed[s].sequence(w)  # another process's row: read past it
            if streaming and s not in marks:  # now, while the stream still knows it
                marks[s] = self.packed[s].position(w)
        self._marks[step] = self._mark(first, marks)
        for old in [k for k in self._marks if k < step - 8]:  # a checkpoint asks for a step just built
            del self._marks[old]
        return stack_sequences(seqs)

    def _mark(self, first: np.ndarray, marks: dict[int, list[int] | None]) -> dict[str, list[int]]:
        """{name: [window, pass, document, token]} where each streaming source's window first[s]
        starts: from `marks`, else (no row of it yet in this step) as the stream knows it."""
        out = {}
        for s, (name, packed) in enumerate(zip(self.names, self.packed)):
            if getattr(packed, "streaming", False):
                pos = marks[s] if s in marks else packed.position(int(first[s]))
                if pos is not None:
                    out[name] = [int(first[s]), *pos]
        return out

    def positions(self, step: int) -> dict[str, list[int]]:
        """For the checkpoint of `step`: where each streaming source's next window (the first that
        step `step` draws) starts, [window, pass, document, token], recorded when that step's batch
        was built (however many windows it read); a source not read that far is left out."""
        if step in self._marks:
            return self._marks[step]
        return self._mark(self.drawn(step), {})  # the last step: no batch after it was built

    def seek(self, positions: dict[str, list[int]]) -> None:
        for name, packed in zip(self.names, self.packed):
            if name in positions and getattr(packed, "streaming", False):
                packed.seek(positions[name][0], positions[name][1:])

    def close(self) -> None:
        """Stops streaming sources' reader threads (a later batch starts them again where they were)."""
        for packed in self.packed:
            if getattr(packed, "streaming", False):
                packed.close()


def check_mixture_resume(previous: DataConfig, cfg: DataConfig, resume_step: int, run_dir) -> None:
    """The batches of steps before resume_step were dealt with `previous`'s weights (the run's
    config.json), and the dealing carries its rounding forward, so other weights there would deal the
    steps after differently from a straight run. Refuses that, naming the first step that differs;
    weights from resume_step on may change freely (a source missing on one side weighs 0)."""
    def at(c: DataConfig, step: int) -> dict[str, Fraction]:  # exactly as seats() deals them
        weights = [w for s, w in c.weights_by_step() if s <= step][-1]
        exact = exact_weights(list(weights.values()))
        return {n: Fraction(w, sum(exact)) for n, w in zip(weights, exact) if w}

    changes = sorted({s for s, _ in previous.weights_by_step()} | {s for s, _ in cfg.weights_by_step()})
    for step in (s for s in changes if s < resume_step):
        old, new = at(previous, step), at(cfg, step)
        if old != new:
            show = lambda w: ", ".join(f"{n} {float(v):.4g}" for n, v in w.items())
            raise ConfigError(f"data: {run_dir} trained step {step} on the mixture {show(old)}, and this config "
                              f"gives {show(new)} there, which would change the batches of every step after. Keep "
                              f"the weights before step {resume_step} and add a data.mixture_schedule entry "
                              f"{{step: {resume_step}, weights: ...}} for the new ones")
