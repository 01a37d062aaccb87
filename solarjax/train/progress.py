"""What a person sees while a run trains: one progress line per run on stderr.

On a terminal, a tqdm bar (step/total, elapsed, ETA) whose postfix shows the last logged loss, lr,
tokens/s and eval loss. Elsewhere (CI logs, files, pipes), one plain line per log step instead of
carriage-return redraws. Every eval also gets one summary line. `set_quiet(True)` (train.py
--quiet) prints none of it; stage headers, the model line and samples are printed either way.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    h, m = divmod(minutes, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def eval_summary(result: dict) -> str:
    """`loss 4.9123 (code 4.81, prose 5.02)`: the mean held-out loss, then each named source's."""
    per_source = [(k.removeprefix("eval_loss/"), v) for k, v in result.items() if k.startswith("eval_loss/")]
    text = f"loss {result['eval_loss']:.4f}"
    if per_source:
        text += " (" + ", ".join(f"{name} {v:.4f}" for name, v in per_source) + ")"
    return text


class Progress:
    """`upcoming`: {kind: steps} of the work besides training steps that the run will do after
    those steps (eval, tasks, samples, checkpoint), which `spent` times as it happens: the time
    left is the steps left at the steady step time (`steady`: measured without the first step,
    whose compile it would count, and without that work) plus each kind's upcoming occurrences at
    its latest measured duration."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool = True, stream=None,
                 upcoming: dict[str, list[int]] | None = None):
        self.name, self.total, self.initial = name, total, initial
        self.stream = stream or sys.stderr
        self.enabled = enabled and not _quiet
        self.tty = self.enabled and self.stream.isatty()
        self.started = time.perf_counter()
        self.step = initial
        self.last_eval = None
        self.upcoming = upcoming or {}
        self.durations: dict[str, float] = {}
        self.steady: float | None = None  # seconds per training step
        # No tqdm rate or ETA: they would count compiles and evals as steps ("left" in the postfix).
        self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", file=self.stream, dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]") if self.tty else None

    def spent(self, kind: str, seconds: float) -> None:
        """Work of `kind` took `seconds` (its latest duration estimates the next ones)."""
        self.durations[kind] = seconds

    def left(self, step: int) -> float | None:
        """Seconds left after `step`, or None before a steady step time is known."""
        if self.steady is None:
            return None
        work = sum(self.durations.get(kind, 0.0) * sum(s > step for s in steps) for kind, steps in self.upcoming.items())
        return (self.total - step) * self.steady + work

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def log(self, step: int, record: dict) -> None:
        """A log step: the postfix on a terminal, one line elsewhere."""
        if not self.enabled:
            return
        fields = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
                  "tok/s": f"{record['tokens_per_s']:,.0f}"}
        if self.last_eval is not None:
            fields["eval"] = f"{self.last_eval:.4f}"
        if self.bar is not None:
            left = self.left(step)
            if left is not None:  # tqdm's own ETA would count compiles and evals as steps
                fields["left"] = _clock(left)
            self.bar.set_postfix(fields, refresh=False)
            return
        elapsed = time.perf_counter() - self.started
        left = self.left(step)
        print(f"{self.name}: step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in fields.items())
              + f" | {_clock(elapsed)} elapsed, " + ("? left" if left is None else f"{_clock(left)} left"),
              file=self.stream, flush=True)

    def eval(self, step: int, result: dict) -> None:
        self.last_eval = result["eval_loss"]
        if self.enabled:
            same = f" (the same parameters' eval: {result['inherited_from']})" if "inherited_from" in result else ""
            self.write(f"{self.name}: eval at step {step}: {eval_summary(result)}{same}")

    def write(self, text: str) -> None:
        """A message that must not be torn by the bar (printed even when quiet: samples)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
