"""The data section of a job's config: sources (named, weighted, streaming), the mixture's schedule,
held-out sets, the tokenizer and the token cache, with every check of their values."""

from __future__ import annotations

import dataclasses
import math

from solarjax.data.corpus import builtin_domain
from solarjax.errors import ConfigError

SOURCE_KEYS = ("name", "path", "weight", "text_field", "streaming")  # of a data.sources mapping (README: Mixtures)


IMPLICIT_SOURCE = "train"  # the name of the plain (unnamed) entries of data.sources, taken as one source


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """One named source of a mixture: `path` takes what a plain data.sources entry takes (files,
    globs, save_to_disk directories, hub names); weights are relative; text_field None: data.text_field."""
    name: str
    path: tuple[str, ...]
    weight: float = 1.0
    text_field: str | None = None
    streaming: bool = False  # tokenized on the fly by a background thread (data.StreamedWindows), not cached

    def to_dict(self) -> dict:
        d = {"name": self.name, "path": list(self.path), "weight": self.weight}
        d = d if self.text_field is None else {**d, "text_field": self.text_field}
        return {**d, "streaming": True} if self.streaming else d


@dataclasses.dataclass(frozen=True)
class MixtureStep:
    """From `step` on, these weights (sources not named keep theirs)."""
    step: int
    weights: tuple[tuple[str, float], ...]


def _weight(value, where: str) -> float:
    """A weight >= 0: a number, or a string that reads as one ("1e-4", which YAML 1.1 leaves a string)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def _paths(value, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a path, glob or dataset name, or a list of them, got {value!r}")
    return tuple(value)


def _source(entry, where: str, name: str | None = None, keys=SOURCE_KEYS) -> SourceConfig:
    """A SourceConfig from a mapping {name, path, weight, text_field} (name given by the caller for
    data.validation's mapping form, whose values may also be a path or a list of paths)."""
    if isinstance(entry, SourceConfig):
        return entry
    if name is not None and not isinstance(entry, dict):
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a path or a mapping {{name, path, weight, text_field}}, got {entry!r}")
    entry = dict(entry) if name is None else {"name": name, **entry}
    unknown = sorted(set(entry) - set(keys))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")
    if not isinstance(entry.get("name"), str) or not entry["name"] or "/" in entry["name"]:
        raise ConfigError(f"{where}.name must be a non-empty name without '/', got {entry.get('name')!r}")
    where = f"{where} ({entry['name']})"
    if "path" not in entry:
        raise ConfigError(f"{where}: no path")
    text_field = entry.get("text_field")
    if text_field is not None and (not isinstance(text_field, str) or not text_field):
        raise ConfigError(f"{where}.text_field must name a column, got {text_field!r}")
    streaming = entry.get("streaming", False)
    if not isinstance(streaming, bool):
        raise ConfigError(f"{where}.streaming must be true or false, got {streaming!r}")
    return SourceConfig(entry["name"], _paths(entry["path"], f"{where}.path"),
                        _weight(entry.get("weight", 1.0), f"{where}.weight"), text_field, streaming)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it becomes batches (solarjax/data.py).

    sources: plain entries (paths, globs, directories, hub names) are one source named `train`;
    mappings {name, path, weight, text_field} are named sources of a weighted mixture.
    validation: a list of paths (one held-out set), or a mapping name -> paths (one per name)."""
    sources: tuple[str | SourceConfig, ...] = ()  # () = built-in corpus
    text_field: str = "text"  # column holding the text, for json/csv/parquet/saved datasets
    validation: tuple[str, ...] | tuple[SourceConfig, ...] = ()  # its own sources, or ...
    validation_fraction: float = 0.0  # ... a held-out share of the documents (of each named source)
    mixture_schedule: tuple[MixtureStep, ...] = ()  # [{step, weights: {name: weight}}]: from step on
    tokenizer: str | None = None  # tokenizer.json, .model, or a directory with one; None = init.from's, else Mistral's
    seq_len: int = 512
    cache_dir: str = "~/.cache/solarjax/tokens"
    num_proc: int = 2  # tokenizer processes
    seed: int = 0
    add_bos: bool | None = None  # None: as the tokenizer does (tokenizer.json's post-processor / add_bos_token)
    add_eos: bool = True
    chat_template: str | None = None  # a jinja file for sft/dpo records, over the tokenizer's own template

    def __post_init__(self):
        sources = (self.sources,) if isinstance(self.sources, (str, dict)) else self.sources
        if not isinstance(sources, (list, tuple)):
            raise ConfigError(f"data.sources must be a list of paths, globs, dataset names or "
                              f"{{name, path, weight}} mappings, got {sources!r}")
        built = []
        for i, entry in enumerate(sources):
            if isinstance(entry, str) and entry:
                built.append(entry)
            else:
                built.append(_source(entry, f"data.sources[{i}]"))
        object.__setattr__(self, "sources", tuple(built))
        names = [s.name for s in self.named_sources()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            extra = (f" (plain entries are the source {IMPLICIT_SOURCE!r})" if twice[0] == IMPLICIT_SOURCE
                     and any(isinstance(s, str) for s in self.sources) else "")
            raise ConfigError(f"data.sources: two sources are named {twice[0]!r}{extra}")
        object.__setattr__(self, "validation", self._held_out(self.validation))
        for where, sets in (("data.sources", self.named_sources()), ("data.validation", self.validation)):
            for s in sets:
                for path in s.path if isinstance(s, SourceConfig) else (s,):
                    builtin_domain(path, where + (f" ({s.name})" if isinstance(s, SourceConfig) and s.name else ""))
        object.__setattr__(self, "mixture_schedule", self._schedule(self.mixture_schedule, names))
        for step, weights in self.weights_by_step():
            if not any(w > 0 for w in weights.values()):
                at = "data.sources" if step == 0 else f"data.mixture_schedule (step {step})"
                raise ConfigError(f"{at}: every weight is 0 from step {step} on; at least one source needs a weight > 0")
        if not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be an integer >= 2, got {self.seq_len!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"data.validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        streamed = [s.name for s in self.named_sources() if s.streaming]
        if streamed and self.validation_fraction:
            raise ConfigError(f"data.validation_fraction: source {streamed[0]!r} is streaming and has no documents to "
                              f"hold out up front; give data.validation sets instead")
        if self.validation and self.validation_fraction:
            raise ConfigError("give data.validation sources or data.validation_fraction, not both")
        if not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be a positive integer, got {self.num_proc!r}")
        if not self.text_field:
            raise ConfigError("data.text_field must name a column")

    @staticmethod
    def _held_out(value) -> tuple:
        """Plain paths (one unnamed set) or named sets: a mapping name -> path(s) or {path, text_field},
        or a list of {name, path, text_field} mappings."""
        if isinstance(value, str):
            return (value,)
        if isinstance(value, dict):
            return tuple(_source(v, f"data.validation.{k}", name=str(k), keys=("name", "path", "text_field"))
                         for k, v in value.items())
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"data.validation must be a list of paths or a mapping of names to paths, got {value!r}")
        if all(isinstance(v, str) for v in value):
            return tuple(value)
        if any(isinstance(v, str) for v in value):
            raise ConfigError("data.validation: give plain paths (one held-out set) or named sets, not both")
        sets = tuple(_source(v, f"data.validation[{i}]", keys=("name", "path", "text_field"))
                     for i, v in enumerate(value))
        names = [s.name for s in sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"data.validation: the name {twice[0]!r} is given twice")
        return sets

    @staticmethod
    def _schedule(value, names: list[str]) -> tuple[MixtureStep, ...]:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"data.mixture_schedule must be a list of {{step, weights}}, got {value!r}")
        out, last = [], 0
        for i, entry in enumerate(value):
            where = f"data.mixture_schedule[{i}]"
            if isinstance(entry, MixtureStep):
                entry = {"step": entry.step, "weights": dict(entry.weights)}
            if not isinstance(entry, dict):
                raise ConfigError(f"{where} must be a mapping {{step, weights}}, got {entry!r}")
            unknown = sorted(set(entry) - {"step", "weights"})
            if unknown:
                raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: step, weights)")
            step, weights = entry.get("step"), entry.get("weights")
            if not isinstance(step, int) or isinstance(step, bool) or step < 1:
                raise ConfigError(f"{where}.step must be a positive integer, got {step!r}")
            if step <= last:
                raise ConfigError(f"{where}.step {step} is out of order: steps must increase (the one before "
                                  f"is {last})")
            if not isinstance(weights, dict) or not weights:
                raise ConfigError(f"{where}.weights must be a mapping of source names to weights, got {weights!r}")
            for name in weights:
                if name not in names:
                    raise ConfigError(f"{where}.weights: {name!r} is not a source (sources: {', '.join(names)})")
            out.append(MixtureStep(step, tuple((n, _weight(w, f"{where}.weights.{n}")) for n, w in weights.items())))
            last = step
        return tuple(out)

    def named_sources(self) -> list[SourceConfig]:
        """Every source by name, in order: the plain entries together (or the built-in corpus, with
        no entries) as one source named `train` of weight 1, where the first of them stands."""
        plain = tuple(s for s in self.sources if isinstance(s, str))
        out, placed = [], False
        for s in self.sources or ("",):
            if isinstance(s, SourceConfig):
                out.append(s)
            elif not placed:
                out.append(SourceConfig(IMPLICIT_SOURCE, plain))  # path () = the built-in corpus
                placed = True
        return out

    def weights_by_step(self) -> list[tuple[int, dict[str, float]]]:
        """[(0, the sources' weights), (step, weights from then on), ...] as the schedule sets them."""
        weights = {s.name: s.weight for s in self.named_sources()}
        out = [(0, dict(weights))]
        for change in self.mixture_schedule:
            weights.update(dict(change.weights))
            out.append((change.step, dict(weights)))
        return out

    @property
    def named_validation(self) -> bool:
        """Whether held-out loss is reported per name: named validation sets, or validation_fraction
        of named sources."""
        return (bool(self.validation) and isinstance(self.validation[0], SourceConfig)) or (
            bool(self.validation_fraction) and any(isinstance(s, SourceConfig) for s in self.sources))

    def to_dict(self) -> dict:
        """As YAML gives it (reads back through train_config_from_dict)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["sources"] = [s.to_dict() if isinstance(s, SourceConfig) else s for s in self.sources]
        d["validation"] = ({s.name: {"path": list(s.path), **({"text_field": s.text_field} if s.text_field else {})}
                            for s in self.validation} if self.validation and isinstance(self.validation[0], SourceConfig)
                           else list(self.validation))
        d["mixture_schedule"] = [{"step": m.step, "weights": dict(m.weights)} for m in self.mixture_schedule]
        return d
