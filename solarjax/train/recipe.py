"""Recipes: stages of training that run in order inside one run directory.

SOLAR's claim is comparative, so its recipe is too: `base` (pretrained here, or from an HF
directory), `upscaled` (base's final parameters grown by depth up-scaling and trained on), and
controls (base trained on without growing: `control` for the same tokens, `control_equal_flops`
for the up-scaled arm's model FLOPs). Each stage is an ordinary Trainer run in run_dir/<stage>
(checkpoints, metrics.jsonl, TensorBoard events, final/), so stopping and resuming work per stage as
for any run; a finished stage leaves done.json and is skipped when the command runs again. All
stages read the same data config: the same held-out set, and, with the same data.seed, the same
batch order. At the end: summary.json, a printed table, curves.png and, with `export`, run_dir/hf.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from solarjax.model.config import ModelConfig
from solarjax.model.decoder import param_count
from solarjax.train.config import RecipeConfig, StageConfig
from solarjax.train.plan import RunPlan, saved_model_config
from solarjax.train.rundir import lock_run_dir
from solarjax.train.topology import model_flops_per_token
from solarjax.train.trainer import Trainer, read_metrics
from solarjax.weights import checkpoint as ckpt_lib, hf

DONE_FILE = "done.json"
WINDOWS_FILE = "window_losses.npz"  # a finished stage's loss per held-out window, for the paired comparison
# The stages whose losses make SOLAR's claim, by name: (summary key, stage, which eval).
CLAIM_KEYS = (("base_loss", "base", "final"), ("upscaled_loss_at_init", "upscaled", "at_init"),
              ("upscaled_loss_final", "upscaled", "final"), ("base_continued_loss_final", "control", "final"),
              ("base_continued_equal_flops_loss_final", "control_equal_flops", "final"))


def stage_train_config(recipe: RecipeConfig, stage: StageConfig):
    """The stage's TrainConfig with `match_flops` resolved against the earlier stage it names."""
    cfg = stage.train
    if stage.match_flops is None:
        return cfg
    ref = recipe.stage(stage.match_flops).train
    ref_flops = RunPlan.resolve(ref).flops_per_token * ref.steps * _tokens_per_step(ref)
    own = RunPlan.resolve(cfg).flops_per_token * _tokens_per_step(cfg)
    return dataclasses.replace(cfg, steps=max(1, round(ref_flops / own)))


def _tokens_per_step(cfg) -> int:
    return cfg.global_batch * cfg.data.seq_len


def run_recipe(recipe: RecipeConfig, mesh=None) -> dict | None:
    """Runs the stages in order (skipping finished ones); returns the summary, or None when a stage
    was stopped (SIGTERM/Ctrl-C) before its last step: the same command resumes it. The recipe's
    run directory is locked for the whole job (each stage's Trainer locks its own as well)."""
    lock = lock_run_dir(recipe.run_dir)
    try:
        return _run_stages(recipe, mesh)
    finally:
        if lock is not None:
            lock.release()


def _run_stages(recipe: RecipeConfig, mesh) -> dict | None:
    for i, stage in enumerate(recipe.stages):
        cfg = stage_train_config(recipe, stage)
        stage_dir = Path(cfg.run_dir)
        done = stage_dir / DONE_FILE
        if done.is_file() and json.loads(done.read_text())["steps"] == cfg.steps:
            print(f"stage {i + 1}/{len(recipe.stages)} {stage.name}: finished earlier, skipped", file=sys.stderr)
            continue
        print(f"stage {i + 1}/{len(recipe.stages)} {stage.name}: {_describe(stage, cfg)}", file=sys.stderr)
        start = time.perf_counter()
        trainer = Trainer(cfg, mesh, eval_ends=True, initial_eval=_inherited_eval(recipe, stage, cfg))
        trainer.run()
        if int(trainer.state["step"]) < cfg.steps:
            return None
        _save_window_losses(trainer, stage_dir)
        if jax.process_index() == 0:
            done.write_text(json.dumps({"steps": cfg.steps, "seconds": time.perf_counter() - start}) + "\n")
        del trainer
    for name in _paired_stages(recipe):  # finished by an earlier version, which kept no window losses
        cfg = stage_train_config(recipe, recipe.stage(name))
        if not (Path(cfg.run_dir) / WINDOWS_FILE).is_file():
            _save_window_losses(Trainer(cfg, mesh), Path(cfg.run_dir))
    if jax.process_index() != 0:
        return None
    summary = summarize(recipe)
    summary.update(paired_differences(recipe))
    root = Path(recipe.run_dir)
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(summary), file=sys.stderr)
    plot_curves(summary, root / "curves.png")
    if recipe.export is not None:
        export_hf(recipe, root / "hf")
    return summary


def _inherited_eval(recipe: RecipeConfig, stage: StageConfig, cfg) -> dict | None:
    """The eval before a stage's first step when it is the last eval of the stage it continues:
    the same parameters (no growth), held-out data, tasks, objective and model (dtype and all).
    The controls of SOLAR's recipe start so from base: scoring base again would give its numbers."""
    if stage.from_stage is None or cfg.init.upscale:
        return None
    parent = stage_train_config(recipe, recipe.stage(stage.from_stage))
    same = ("data", "eval_tasks", "eval_tasks_limit", "objective")
    if any(getattr(parent, k) != getattr(cfg, k) for k in same):
        return None
    if RunPlan.resolve(parent, saved=saved_model_config(parent.run_dir)).model_config != RunPlan.resolve(cfg).model_config:
        return None
    last = [r for r in read_metrics(Path(parent.run_dir) / "metrics.jsonl")
            if r["step"] == parent.steps and "eval_loss" in r]
    if not last:
        return None
    return {**{k: v for k, v in last[-1].items() if k != "step"}, "inherited_from": f"{stage.from_stage} at step {parent.steps}"}


def _describe(stage: StageConfig, cfg) -> str:
    start = f"from stage {stage.from_stage}" if stage.from_stage else (
        f"from {cfg.init.source}" if cfg.init.source else "from scratch")
    grow = f", up-scaled {cfg.init.upscale}" if cfg.init.upscale else ""
    grow += f", trainable {cfg.trainable}" if cfg.trainable != "all" else ""
    flops = f" (model FLOPs of {stage.match_flops})" if stage.match_flops else ""
    return f"{start}{grow}; {cfg.steps} steps{flops} -> {cfg.run_dir}"


def summarize(recipe: RecipeConfig) -> dict:
    """Every stage's evals, tokens and model FLOPs from its metrics.jsonl, and the claim's numbers."""
    stages = {}
    for stage in recipe.stages:
        cfg = stage_train_config(recipe, stage)
        stage_dir = Path(cfg.run_dir)
        config = ModelConfig.load(stage_dir / ckpt_lib.CONFIG_FILE)
        records = read_metrics(stage_dir / "metrics.jsonl")
        flops_per_token = model_flops_per_token(config, cfg.data.seq_len)
        tokens_per_step = _tokens_per_step(cfg)
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        # Every eval metric of the objective (dpo: reward accuracy, margin, ...) at the first and last eval.
        eval_records = [{k: v for k, v in r.items() if k.startswith("eval_")} for r in records if "eval_loss" in r]
        # Held-out loss of each named set (eval_loss/NAME) before the stage's first step and after its last.
        by_source = {r["step"]: {k.removeprefix("eval_loss/"): v for k, v in r.items() if k.startswith("eval_loss/")}
                     for r in records if "eval_loss" in r}
        samples = [r["samples"] for r in records if "samples" in r]
        tasks = {r["step"]: {k.removeprefix("task/"): v for k, v in r.items() if k.startswith("task/")}
                 for r in records if any(k.startswith("task/") for k in r)}
        done = json.loads((stage_dir / DONE_FILE).read_text())
        stages[stage.name] = {
            # an earlier stage's name, a directory's name (init.from a path), or None (from scratch)
            "from": stage.from_stage or (cfg.init.source and Path(cfg.init.source).name),
            "objective": cfg.objective, "upscale": cfg.init.upscale, "trainable": cfg.trainable,
            "layers": config.num_layers,
            "parameters": param_count(config), "steps": cfg.steps, "tokens": cfg.steps * tokens_per_step,
            "flops_per_token": flops_per_token, "flops": cfg.steps * tokens_per_step * flops_per_token,
            "eval_loss_at_init": next((loss for step, loss in evals if step == 0), None),
            "eval_loss_final": next((loss for step, loss in evals if step == cfg.steps), None),
            "eval_curve": [{"step": step, "tokens": step * tokens_per_step,
                            "flops": step * tokens_per_step * flops_per_token, "eval_loss": loss}
                           for step, loss in evals],
            "eval_loss_by_source_at_init": by_source.get(0) or None,
            "eval_loss_by_source_final": by_source.get(cfg.steps) or None,
            "eval_first": eval_records[0] if eval_records else {}, "eval_last": eval_records[-1] if eval_records else {},
            "tasks_at_init": tasks.get(0), "tasks_final": tasks.get(cfg.steps),
            "samples": samples[-1] if samples else [], "seconds": done.get("seconds"),
        }
    summary = {}
    for key, name, which in CLAIM_KEYS:
        if name in stages:
            summary[key] = stages[name][f"eval_loss_{which}"]
    if "upscaled_loss_final" in summary:
        for key, arm in (("equal_tokens", "base_continued_loss_final"),
                         ("equal_flops", "base_continued_equal_flops_loss_final")):
            if summary.get(arm) is not None and summary["upscaled_loss_final"] is not None:
                summary[f"upscaled_ahead_at_{key}"] = summary["upscaled_loss_final"] < summary[arm]
    summary["stages"] = stages
    return summary


def format_table(summary: dict) -> str:
    rows = [("stage", "from", "objective", "layers", "params", "tokens", "model FLOPs", "eval loss at init",
             "final eval loss")]
    for name, s in summary["stages"].items():
        grown = f"{s['from']} ({_growth(s['upscale'])})" if s["upscale"] else s["from"] or "scratch"
        if s.get("trainable", "all") != "all":
            grown += f", trains {s['trainable']}"
        rows.append((name, grown, s["objective"], str(s["layers"]), f"{s['parameters'] / 1e6:.2f}M",
                     f"{s['tokens'] / 1e6:.2f}M", f"{s['flops']:.3g}", _num(s["eval_loss_at_init"]),
                     _num(s["eval_loss_final"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for name, s in summary["stages"].items():  # an objective's own held-out metrics, first -> last eval
        extra = [k for k in s["eval_last"] if k not in ("eval_loss", "eval_perplexity") and not k.startswith("eval_loss/")]
        if extra:
            lines.append(f"{name}: " + ", ".join(f"{k[5:]} {_num(s['eval_first'].get(k))} -> {_num(s['eval_last'][k])}"
                                                 for k in extra))
    for name, s in summary["stages"].items():  # forgetting as a number: each held-out set, init -> end
        init, final = s.get("eval_loss_by_source_at_init") or {}, s.get("eval_loss_by_source_final") or {}
        if init or final:
            lines.append(f"{name} held-out loss by source: " + ", ".join(
                f"{src} {_num(init.get(src))} -> {_num(final.get(src))}" for src in dict.fromkeys([*init, *final])))
    up = summary.get("upscaled_loss_final")
    for key, arm, what in (("base_continued_loss_final", "control", "equal tokens"),
                           ("base_continued_equal_flops_loss_final", "control_equal_flops", "equal model FLOPs")):
        if up is not None and summary.get(key) is not None:
            ahead = "ahead" if up < summary[key] else "NOT ahead"
            line = (f"at {what}: upscaled {up:.4f} vs {arm} {summary[key]:.4f} "
                    f"({up - summary[key]:+.4f}: up-scaled {ahead}")
            interval = (summary.get("paired_interval") or {}).get(f"upscaled - {arm}")
            if interval is not None:
                line += f"; 95% paired interval {interval[0]:+.4f} .. {interval[1]:+.4f}"
            lines.append(line + ")")
    for pair, d in (summary.get("paired_difference") or {}).items():  # the other arms' (llama_pro)
        if not pair.startswith("upscaled - "):
            lo, hi = summary["paired_interval"][pair]
            lines.append(f"{pair}: {d:+.4f} nats (95% paired interval {lo:+.4f} .. {hi:+.4f})")
    metrics = sorted({m for s in summary["stages"].values() for m in (s.get("tasks_final") or {})})
    for metric in metrics:  # eval_tasks: each stage's value before its first step -> after its last
        lines.append(f"{metric}: " + "; ".join(
            f"{name} {_num((s.get('tasks_at_init') or {}).get(metric))} -> {_num((s.get('tasks_final') or {}).get(metric))}"
            for name, s in summary["stages"].items()))
    return "\n".join(lines)


def _growth(upscale: dict) -> str:
    if "expand" in upscale:
        return f"expand {upscale['expand']}"
    zero = ", zero_new" if upscale.get("zero_new") else ""
    return (f"layers {upscale['layers']}" if "layers" in upscale else "DUS") + zero


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


# The comparisons whose paired intervals a recipe reports: (arm, control), when both stages exist.
PAIRS = (("upscaled", "control"), ("upscaled", "control_equal_flops"),
         # configs/llama_pro.yaml: block expansion (the copies trained, then everything) against both,
         # at equal tokens (pro_new alone has had half of them)
         ("pro_all", "control"), ("pro_all", "upscaled"))
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def _pairs(recipe: RecipeConfig) -> list[tuple[str, str]]:
    names = {s.name: s for s in recipe.stages}
    return [(a, b) for a, b in PAIRS if a in names and b in names
            and stage_train_config(recipe, names[a]).objective == stage_train_config(recipe, names[b]).objective == "lm"]


def _paired_stages(recipe: RecipeConfig) -> list[str]:
    return sorted({s for pair in _pairs(recipe) for s in pair})


def _save_window_losses(trainer: Trainer, stage_dir: Path) -> None:
    """stage_dir/window_losses.npz: the stage's final parameters' loss and tokens on every held-out
    window (Trainer.window_losses, on the job's mesh; every process takes part, process 0 writes)."""
    scores = trainer.window_losses()
    if not scores or jax.process_index() != 0:
        return
    tmp = stage_dir / f".{WINDOWS_FILE}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
        np.savez(f, **{f"{key}:{name}": value for name, arrays in scores.items() for key, value in arrays.items()})
    tmp.replace(stage_dir / WINDOWS_FILE)


def read_window_losses(stage_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(loss, tokens) per held-out window of a stage, every named set's windows in order."""
    with np.load(stage_dir / WINDOWS_FILE) as saved:
        sets = [k.split(":", 1)[1] for k in saved.files if k.startswith("loss:")]
        return (np.concatenate([saved[f"loss:{n}"] for n in sets]).astype(np.float64),
                np.concatenate([saved[f"tokens:{n}"] for n in sets]).astype(np.float64))


def paired_differences(recipe: RecipeConfig) -> dict:
    """Each PAIRS arm's final held-out loss minus its control's, over the held-out windows both
    stages were scored on at their last step (window_losses.npz: through each stage's own tokenizer,
    data and sharded eval step), with a 95% interval from a paired bootstrap over the windows:
    {"paired_difference": {"upscaled - control": d}, "paired_interval": {...: [low, high]},
    "paired_windows": N}. Empty without a held-out set or an lm pair; a pair whose stages were
    scored on different windows is left out, with a note."""
    scores = {name: read_window_losses(Path(stage_train_config(recipe, recipe.stage(name)).run_dir))
              for name in _paired_stages(recipe)
              if (Path(stage_train_config(recipe, recipe.stage(name)).run_dir) / WINDOWS_FILE).is_file()}
    out = {"paired_difference": {}, "paired_interval": {}}
    for a, b in _pairs(recipe):
        if a not in scores or b not in scores:
            continue
        (nll_a, count), (nll_b, count_b) = scores[a], scores[b]
        if not np.array_equal(count, count_b):
            print(f"note: no paired comparison of {a} and {b}: their held-out windows differ "
                  f"({len(count)} vs {len(count_b)} windows, {count.sum():.0f} vs {count_b.sum():.0f} tokens)",
                  file=sys.stderr)
            continue
        difference, interval = paired_bootstrap(nll_a, nll_b, count)
        out["paired_difference"][f"{a} - {b}"] = difference
        out["paired_interval"][f"{a} - {b}"] = interval
        out["paired_windows"] = len(count)
    return out if out["paired_difference"] else {}


def paired_bootstrap(nll_a: np.ndarray, nll_b: np.ndarray, count: np.ndarray) -> tuple[float, list[float]]:
    """A's mean loss minus B's over the same windows, and the 2.5/97.5 percentiles of that difference
    over BOOTSTRAP_RESAMPLES resamples of the windows (each resample scores both arms on the same ones)."""
    difference = float((nll_a.sum() - nll_b.sum()) / count.sum())
    picks = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(count), (BOOTSTRAP_RESAMPLES, len(count)))
    boot = (nll_a[picks].sum(1) - nll_b[picks].sum(1)) / count[picks].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return difference, [float(low), float(high)]


def plot_curves(summary: dict, path: Path) -> None:
    """Eval loss of every continued lm stage against its tokens and its model FLOPs (base's end
    dashed; the y-range leaves out an up-scaled model's jump at init, which the legend states), and,
    with a `control` stage, each stage's loss minus the control's at the same tokens, zero marked,
    with the paired 95% interval of the final difference. sft/dpo losses are other quantities: no plot."""
    continued = {n: s for n, s in summary["stages"].items() if s["from"] and s["objective"] == "lm"}
    if not continued:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    control = continued.get("control")
    fig, axes = plt.subplots(1, 3 if control else 2, figsize=(15 if control else 10, 4.2))
    base = summary.get("base_loss")
    later = [p["eval_loss"] for s in continued.values() for p in s["eval_curve"] if p["step"] > 0]
    if not later:  # no held-out set: nothing to draw
        return
    low, high = min(later + [base or later[0]]), max(later + [base or later[0]])
    pad = (high - low) * 0.08 or 0.01
    color = {name: f"C{i}" for i, name in enumerate(continued)}  # one color per stage in every panel
    for name, s in continued.items():
        points, at_init = s["eval_curve"], s["eval_loss_at_init"]
        label = name if at_init is None or at_init <= high + pad else f"{name} (at init {at_init:.3f}, above)"
        for ax, x, unit in zip(axes[:2], ("tokens", "flops"), (1e6, 1e12)):
            before = _spent_before(summary, name, x)
            ax.plot([(before + p[x]) / unit for p in points], [p["eval_loss"] for p in points], marker="o",
                    markersize=3, label=label, color=color[name])
    for ax, label in zip(axes[:2], ("continued training: million tokens", "continued training: model TFLOPs")):
        if base is not None:
            ax.axhline(base, color="gray", linestyle="--", linewidth=1, label="base, end of pretraining")
        ax.set_ylim(low - pad, high + pad)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out loss (nats)")
    axes[0].legend(fontsize=8)
    if control:
        ax = axes[2]
        # By tokens since the base; an eval at a stage's first or last step scores every held-out
        # window, the others a subset: only like with like is compared.
        def whole(p, stage):
            return p["step"] in (0, stage["steps"])
        reference = {p["tokens"]: (p["eval_loss"], whole(p, control)) for p in control["eval_curve"]}
        ax.axhline(0, color="black", linewidth=1)
        for name, s in continued.items():
            if name == "control":
                continue
            before = _spent_before(summary, name, "tokens")
            points = [(before + p["tokens"], p["eval_loss"] - reference[before + p["tokens"]][0])
                      for p in s["eval_curve"] if p["step"] > 0 and before + p["tokens"] in reference
                      and reference[before + p["tokens"]][1] == whole(p, s)]
            ax.plot([t / 1e6 for t, _ in points], [d for _, d in points],
                    marker="o", markersize=3, label=f"{name} - control", color=color[name])
        for pair, (lo, hi) in (summary.get("paired_interval") or {}).items():
            arm, other = pair.split(" - ")
            if other == "control" and arm in continued:
                d = summary["paired_difference"][pair]
                total = _spent_before(summary, arm, "tokens") + continued[arm]["tokens"]
                ax.errorbar([total / 1e6], [d], yerr=[[d - lo], [hi - d]], color="black",
                            capsize=4, fmt="s", markersize=4,
                            label=f"{pair}, all held-out windows: {d:+.4f} [{lo:+.4f}, {hi:+.4f}]")
        ax.set_xlabel("continued training: million tokens")
        ax.set_ylabel("held-out loss minus the control's (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Depth up-scaling vs. continuing the base (same data, same held-out set)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _spent_before(summary: dict, name: str, key: str) -> float:
    """The tokens or model FLOPs (`key`) a stage's arm spent before it, in continued stages it
    follows (configs/llama_pro.yaml: pro_all after pro_new); 0 for a stage that starts from base."""
    stages = summary["stages"]
    earlier = stages.get(stages[name]["from"])
    if earlier is None or not earlier["from"]:
        return 0
    return earlier[key] + _spent_before(summary, stages[name]["from"], key)


def export_hf(recipe: RecipeConfig, out: Path) -> None:
    """run_dir/hf: the exported stage's final parameters as an HF directory with the tokenizer."""
    if jax.process_count() > 1:
        print(f"note: export to {out} runs in one process; run convert_weights.py jax-to-hf on "
              f"{recipe.run_dir}/{recipe.export}/final", file=sys.stderr)
        return
    final = Path(recipe.run_dir) / recipe.export / "final"
    config, params = ckpt_lib.load_params(final)
    hf.save_hf(config, params, out, tokenizer_dir=final, overwrite=True)
    print(f"exported stage {recipe.export} to {out}", file=sys.stderr)
