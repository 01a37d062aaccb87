"""Job configuration: data, optimizer, mesh, init, training runs and recipes of stages, from YAML.

The model's own configuration (ModelConfig, presets) is in solarjax.modelconfig, at the bottom of
the package; this module sits above the objectives, whose names it checks.

It is one module because the YAML schema is one place: every section, its checks and how a
recipe's stages merge them read together, and a new option is a field here and nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from solarjax.corpus import builtin_domain
from solarjax.errors import ConfigError  # noqa: F401  (solarjax.config.ConfigError, as before)
from solarjax.modelconfig import PRESETS, ModelConfig, build, preset  # noqa: F401  (PRESETS, preset: as before)
from solarjax.objectives import OBJECTIVES, DPOConfig


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


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup and decay (solarjax/optim.py)."""
    learning_rate: float = 3e-4
    schedule: str = "cosine"  # cosine | linear | constant, after the warmup
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final learning rate / peak
    weight_decay: float = 0.1  # not applied to norm scales and biases
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global norm; 0 disables

    def __post_init__(self):
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        for name in ("learning_rate", "eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"optim.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("warmup_steps",):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"optim.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        for name in ("min_lr_ratio", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"optim.{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"optim.{name} must be >= 0, got {getattr(self, name)!r}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all remaining devices
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where the starting weights come from: random (from=None) or an HF dir / solarjax checkpoint,
    optionally grown (upscale: {n, m} for depth up-scaling, {layers: "0:24,8:32"} for a plan,
    {expand: k} for block expansion; zero_new: true starts a plan's new layers as identities)."""
    source: str | None = None  # YAML key "from"
    upscale: dict | None = None
    seed: int = 0

    def __post_init__(self):
        if self.upscale is not None:
            if not isinstance(self.upscale, dict):
                raise ConfigError(f"init.upscale must be a mapping like {{expand: 4}} or {{n: 32, m: 8}}, "
                                  f"got {self.upscale!r}")
            unknown = sorted(set(self.upscale) - {"n", "m", "layers", "expand", "zero_new"})
            if unknown:
                raise ConfigError(f"init.upscale: unknown key {unknown[0]!r} (known: expand, layers, m, n, zero_new)")
            from solarjax.upscale import UpscaleError, UpscaleSpec  # here: upscale imports this module
            try:  # what needs no base depth: the keys' combination and types
                UpscaleSpec(**self.upscale).check()
            except UpscaleError as e:
                raise ConfigError(f"init.upscale: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig | None  # None: taken from init.from
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    init: InitConfig = InitConfig()
    objective: str = "lm"  # lm (next token) | sft (assistant tokens) | dpo (preference pairs): objectives.py
    # One section per objective with options, named after it, of its Objective.options class.
    dpo: DPOConfig = DPOConfig()
    run_dir: str = "runs/demo"
    steps: int = 100
    global_batch: int = 8
    log_every: int = 10
    eval_every: int = 50  # 0: never
    eval_batches: int = 2  # held-out batches per eval; 0: every window (always so at step 0 and the last)
    sample_prompts: tuple[str, ...] = ()  # at each eval, greedy completions of these are logged
    sample_tokens: int = 32
    # Tasks scored at each eval, as `python -m solarjax.evaluate --tasks` takes them (e.g.
    # builtin_next_line, arc_challenge=DIR); metrics.jsonl gets task/TASK/METRIC keys (task/builtin_next_line/acc).
    eval_tasks: tuple[str, ...] = ()
    eval_tasks_limit: int | None = None  # documents per task; None: all
    # Steps between task scorings (a multiple of eval_every); 0: only before the first step and
    # after the last (all a recipe's summary reads); None: at every eval.
    eval_tasks_every: int | None = None
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    # Tokens per device in one step of the chunked vocabulary loss (solarjax.loss); None: 256 on
    # CPU, 4096 on accelerators. Fewer: less memory for logits, more, shorter steps.
    loss_chunk_tokens: int | None = None
    microbatches: int = 1  # gradient accumulation: the global batch in this many sequential groups
    # What trains: all | new_layers (the layers init.upscale added) | layer ranges of the (grown)
    # model, "8:12,20:24". Embeddings, final norm and head train only under all; the rest is frozen.
    trainable: str = "all"
    # JAX's persistent compilation cache (solarjax.compile_cache): None: $JAX_COMPILATION_CACHE_DIR,
    # else data.cache_dir/xla; "": off. Programs compiled once are read back by later stages and restarts.
    compile_cache_dir: str | None = None
    model_runtime: dict = dataclasses.field(default_factory=dict)  # with init.from: dtype/param_dtype/remat
    # Model fields the YAML may set alongside init.from: how to run, not what the model is.
    RUNTIME_MODEL_KEYS = ("dtype", "param_dtype", "remat", "attention")

    def __post_init__(self):
        for name in ("steps", "global_batch", "log_every", "sample_tokens", "checkpoint_every",
                     "keep_checkpoints", "microbatches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.eval_batches, int) or isinstance(self.eval_batches, bool) or self.eval_batches < 0:
            raise ConfigError(f"eval_batches must be 0 (every held-out window) or a positive integer, "
                              f"got {self.eval_batches!r}")
        if self.loss_chunk_tokens is not None and (not isinstance(self.loss_chunk_tokens, int)
                                                   or isinstance(self.loss_chunk_tokens, bool)
                                                   or self.loss_chunk_tokens < 1):
            raise ConfigError(f"loss_chunk_tokens must be null or a positive integer, got {self.loss_chunk_tokens!r}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            raise ConfigError(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        prompts = (self.sample_prompts,) if isinstance(self.sample_prompts, str) else tuple(self.sample_prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"sample_prompts[{i}] must be a non-empty string, got {prompt!r}")
        object.__setattr__(self, "sample_prompts", prompts)
        tasks = (self.eval_tasks,) if isinstance(self.eval_tasks, str) else tuple(self.eval_tasks)
        for i, task in enumerate(tasks):
            if not isinstance(task, str) or not task.strip():
                raise ConfigError(f"eval_tasks[{i}] must be a task name or path, got {task!r}")
        object.__setattr__(self, "eval_tasks", tasks)
        if self.eval_tasks_limit is not None and (not isinstance(self.eval_tasks_limit, int)
                                                  or isinstance(self.eval_tasks_limit, bool) or self.eval_tasks_limit < 1):
            raise ConfigError(f"eval_tasks_limit must be null or a positive integer, got {self.eval_tasks_limit!r}")
        every = self.eval_tasks_every
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 0
                                  or (every and self.eval_every and every % self.eval_every)):
            raise ConfigError(f"eval_tasks_every must be null, 0 or a positive multiple of eval_every "
                              f"({self.eval_every}), got {every!r}")
        if self.compile_cache_dir is not None and not isinstance(self.compile_cache_dir, str):
            raise ConfigError(f"compile_cache_dir must be a directory (or \"\" for none), got {self.compile_cache_dir!r}")
        if self.model is None and self.init.source is None:
            raise ConfigError("give a model (model.preset or its fields) or init.from")
        from solarjax.upscale import UpscaleError, parse_trainable  # here: upscale imports this module
        try:
            parse_trainable(self.trainable)
        except UpscaleError as e:
            raise ConfigError(str(e)) from None
        if self.trainable == "new_layers" and not self.init.upscale:
            raise ConfigError("trainable: new_layers names the layers a growth adds, and init.upscale is not set; "
                              "give init.upscale (e.g. {expand: 4}) or layer ranges like \"6:8\"")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")

    @property
    def objective_options(self):
        """The objective's own section (DPOConfig for dpo), or None for one without options."""
        return getattr(self, self.objective) if OBJECTIVES[self.objective].options else None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["data"] = self.data.to_dict()  # sources and schedule as YAML writes them, not as dataclasses
        d["init"]["from"] = d["init"].pop("source")
        runtime = d.pop("model_runtime")
        d["model"] = runtime if self.model is None else self.model.to_dict()  # head_dim as given
        return d


def train_config_from_dict(d: dict) -> TrainConfig:
    d = dict(d or {})
    sections = {"data": DataConfig, "optim": OptimConfig, "mesh": MeshConfig,
                **{name: o.options for name, o in OBJECTIVES.items() if o.options}}
    kwargs = {name: build(cls, d.pop(name) or {}, name) for name, cls in sections.items() if name in d}
    init = dict(d.pop("init", None) or {})
    if "from" in init:
        init["source"] = init.pop("from")
    kwargs["init"] = build(InitConfig, init, "init")
    model = dict(d.pop("model", None) or {})
    name = model.pop("preset", None)
    if kwargs["init"].source is not None:
        taken = sorted(set(model) - set(TrainConfig.RUNTIME_MODEL_KEYS))
        if name is not None or taken:
            raise ConfigError(f"model.{name and 'preset' or taken[0]} is taken from init.from; only "
                              f"{', '.join(TrainConfig.RUNTIME_MODEL_KEYS)} may be set beside it")
        kwargs["model"] = None
        kwargs["model_runtime"] = model
    elif name is not None:
        kwargs["model"] = preset(name).replace(**model)
    else:
        kwargs["model"] = ModelConfig.from_dict(model)
    return build(TrainConfig, {**d, **kwargs}, "config")


def load_train_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file plus dotted overrides like optim.learning_rate=1e-4 (values parsed as YAML)."""
    d = load_config_dict(path, overrides)
    if "stages" in d:
        raise ConfigError(f"{path}: a recipe of stages; load it with load_job")
    try:
        return train_config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_job(path: str | Path, overrides: list[str] = ()) -> "TrainConfig | RecipeConfig":
    """What train.py runs: one training run, or a recipe when the YAML has `stages`."""
    d = load_config_dict(path, overrides)
    try:
        return recipe_config_from_dict(d) if "stages" in d else train_config_from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def load_config_dict(path: str | Path, overrides: list[str] = ()) -> dict:
    import yaml
    try:
        d = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(d).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.learning_rate=1e-4)")
        node = d
        *parents, leaf = key.split(".")
        stages = d.get("stages")
        if len(parents) > 1 and parents[0] == "stages" and isinstance(stages, dict) and parents[1] not in stages:
            # setting a key inside a stage that does not exist: a typo would otherwise add a stage
            raise ConfigError(f"override {item!r}: {parents[1]!r} is not a stage of {path} "
                              f"(stages: {', '.join(map(str, stages))})")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(value)
    return d


# ---------------------------------------------------------------------------------------------
# Recipes: stages of training in one run directory (solarjax/recipe.py runs them)


@dataclasses.dataclass(frozen=True)
class StageConfig:
    name: str
    train: TrainConfig  # run_dir is the recipe's run_dir/name; init.from an earlier stage is its final/
    from_stage: str | None = None  # the earlier stage whose final parameters init.from names
    match_flops: str | None = None  # steps chosen so that this stage's model FLOPs equal that stage's


@dataclasses.dataclass(frozen=True)
class RecipeConfig:
    run_dir: str
    stages: tuple[StageConfig, ...]
    export: str | None = None  # a stage whose final parameters are written as an HF directory to run_dir/hf

    def stage(self, name: str) -> StageConfig:
        return next(s for s in self.stages if s.name == name)


STAGE_KEYS = ("match_flops",)  # keys of a stage that are not TrainConfig keys


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _looks_like_a_stage(source) -> bool:
    """A bare name (no path separator) that is not a directory: a stage name, likely mistyped. Paths
    and hub names (org/model) contain a separator."""
    return isinstance(source, str) and source.isidentifier() and not Path(source).exists()


def recipe_config_from_dict(d: dict) -> RecipeConfig:
    """Top-level keys are every stage's defaults; each stage overrides them and sets its own `init`.
    `init.from: NAME` of an earlier stage starts from that stage's final
    parameters, taking the model from it; `match_flops: NAME` sets steps to equal NAME's model FLOPs."""
    d = dict(d)
    stages, export = d.pop("stages"), d.pop("export", None)
    run_dir = d.pop("run_dir", TrainConfig.run_dir)
    if "init" in d:  # one place per stage, so an override can't be shadowed by a stage's own init
        raise ConfigError("init: in a recipe each stage sets its own init (e.g. stages.upscaled.init.from=DIR)")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError("stages must be a mapping of stage names to their settings, e.g. "
                          "{base: {steps: 100}, upscaled: {init: {from: base, upscale: {n: 8, m: 2}}}}")
    built: list[StageConfig] = []
    for name, over in stages.items():
        where = f"stages.{name}"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"stage name {name!r} must be a plain identifier (letters, digits, _)")
        if not isinstance(over or {}, dict):
            raise ConfigError(f"{where} must be a mapping, got {over!r}")
        over = dict(over or {})
        if "run_dir" in over:
            raise ConfigError(f"{where}.run_dir: a stage runs in {run_dir}/{name}; set run_dir at the top")
        extra = {k: over.pop(k) for k in STAGE_KEYS if k in over}
        merged = _merge(d, {k: v for k, v in over.items() if k != "init"})
        init = dict(over.get("init") or {})
        earlier = [s.name for s in built]
        from_stage = init.get("from") if init.get("from") in earlier else None
        if init.get("from") in list(stages)[len(built):]:
            raise ConfigError(f"{where}.init.from: stage {init['from']!r} does not run before {name!r} "
                              f"(order: {', '.join(stages)})")
        if from_stage is not None:
            init["from"] = str(Path(run_dir) / from_stage / "final")
        elif _looks_like_a_stage(init.get("from")):
            raise ConfigError(f"{where}.init.from: {init['from']!r} is neither a stage of this recipe "
                              f"(stages: {', '.join(stages)}) nor an existing directory")
        for section in (n for n, o in OBJECTIVES.items() if o.reference):  # dpo.reference: a stage, like init.from
            reference = (merged.get(section) or {}).get("reference")
            if reference in list(stages)[len(built):]:
                raise ConfigError(f"{where}.{section}.reference: stage {reference!r} does not run before {name!r}")
            if reference in earlier:  # a stage's final parameters, like init.from
                merged[section] = {**merged[section], "reference": str(Path(run_dir) / reference / "final")}
            elif _looks_like_a_stage(reference):
                raise ConfigError(f"{where}.{section}.reference: {reference!r} is neither a stage of this recipe "
                                  f"(stages: {', '.join(stages)}) nor an existing directory")
        if init.get("from") is not None:  # the model comes from there: keep only how it runs
            model = merged.get("model") or {}
            merged["model"] = {k: v for k, v in model.items() if k in TrainConfig.RUNTIME_MODEL_KEYS}
        match = extra.get("match_flops")
        if match is not None and match not in earlier:
            raise ConfigError(f"{where}.match_flops: {match!r} is not a stage that runs before {name!r} "
                              f"(stages: {', '.join(stages)})")
        try:
            train = train_config_from_dict({**merged, "init": init, "run_dir": str(Path(run_dir) / name)})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        built.append(StageConfig(name, train, from_stage, match))
    if export is not None and export not in stages:
        raise ConfigError(f"export: {export!r} is not a stage (stages: {', '.join(stages)})")
    return RecipeConfig(str(run_dir), tuple(built), export)
