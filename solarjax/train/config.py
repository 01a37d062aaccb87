"""A job's configuration: optimizer, mesh, init, training runs and recipes of stages, from YAML.

The model's own configuration (ModelConfig, presets) is solarjax.model.config and the data section
solarjax.data.config, on the floors below; this module checks the objectives' names and options.

It is one module because the rest of the YAML schema is one place: every section, its checks and
how a recipe's stages merge them read together, and a new option is a field here and nothing else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from solarjax.data.config import DataConfig
from solarjax.errors import ConfigError, require_positive_ints
from solarjax.model.config import ModelConfig, build, preset
from solarjax.train.objectives import OBJECTIVES, DPOConfig
from solarjax.weights.upscale import UpscaleError, UpscaleSpec, parse_trainable


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
    # Tokens per device in one step of the chunked vocabulary loss (solarjax.train.loss); None: 256 on
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
        require_positive_ints(self, ("steps", "global_batch", "log_every", "sample_tokens", "checkpoint_every",
                                     "keep_checkpoints", "microbatches"))
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
