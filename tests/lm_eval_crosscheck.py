"""Cross-check solarjax.cli.evaluate against lm-evaluation-harness itself (HF backend), on one tiny random
model and the tiny local task files of tests/eval_tasks.py. Not part of the pytest suite (lm-eval
is a heavy install); run by hand where lm-eval is installed:

  pip install lm-eval && PYTHONPATH=.:tests python tests/lm_eval_crosscheck.py [WORKDIR]

The harness's own task yamls are included and only their data source is replaced by the local
files, so the prompts, few-shot draws and metrics are the harness's. Prints, per task, the largest
difference of per-choice log-likelihoods and whether predictions, metrics (and for gsm8k the
completions) agree; exits 1 on any disagreement.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

SHOTS = {"arc_challenge": 3, "hellaswag": 2, "mmlu": 2, "truthfulqa_mc2": 0, "winogrande": 3, "gsm8k": 2}
GEN_TOKENS = 24


def main(work: Path) -> int:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import eval_tasks
    from hf_models import make_hf_model, make_mistral_tokenizer_json, save_hf_model

    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    if not (model_dir / "config.json").exists():
        save_hf_model(make_hf_model("mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                                    max_position_embeddings=1024, initializer_range=0.5), model_dir)
        make_mistral_tokenizer_json(model_dir)
    dirs = eval_tasks.write_all(work / "data")
    harness = Path(lm_eval.__file__).parent / "tasks"
    yamls = work / "yamls"
    yamls.mkdir(exist_ok=True)
    base = {"arc_challenge": "arc/arc_challenge.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
            "mmlu": "mmlu/default/mmlu_abstract_algebra.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml",
            "winogrande": "winogrande/default.yaml", "gsm8k": "gsm8k/gsm8k.yaml"}
    splits = {"arc_challenge": ("ARC-Challenge", {"train": "train", "test": "test"}),
              "hellaswag": ("data", {"train": "train", "validation": "validation"}),
              "mmlu": ("abstract_algebra", {"dev": "dev", "test": "test"}),
              "truthfulqa_mc2": ("multiple_choice", {"validation": "validation"}),
              "winogrande": ("winogrande_xl", {"train": "train", "validation": "validation"}),
              "gsm8k": ("main", {"train": "train", "test": "test"})}
    for name, rel in base.items():
        folder, names = splits[name]
        files = {split: str(next((dirs[name] / folder).glob(f"{stem}*.jsonl"))) for split, stem in names.items()}
        lines = [f"include: {harness / rel}", f"task: local_{name}", "dataset_path: json", "dataset_name: null",
                 "dataset_kwargs:", "  data_files:"] + [f"    {k}: {v}" for k, v in files.items()]
        lines.append(f"num_fewshot: {SHOTS[name]}")
        if name == "gsm8k":
            lines += ["generation_kwargs:", "  until: ['Question:', '</s>', '<|im_end|>']", "  do_sample: false",
                      "  temperature: 0.0", f"  max_gen_toks: {GEN_TOKENS}"]
        (yamls / f"local_{name}.yaml").write_text("\n".join(lines) + "\n")

    lm = HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=[f"local_{n}" for n in base], log_samples=True,
                                  task_manager=TaskManager(include_path=str(yamls)))
    # gsm8k logs each document once per filter (strict-match, flexible-extract); the response is the same.
    theirs = {n: sorted({s["doc_id"]: s for s in out["samples"][f"local_{n}"]}.values(), key=lambda s: s["doc_id"])
              for n in base}

    failures = 0
    for name in base:
        task_arg = f"{name}={dirs[name]}"
        items = work / f"items_{name}.jsonl"
        cmd = [sys.executable, "-m", "solarjax.cli.evaluate", "--hf", str(model_dir), "--tasks", task_arg,
               "--num-fewshot", str(SHOTS[name]), "--format", "json", "--log-items", str(items),
               "--max-gen-tokens", str(GEN_TOKENS)]
        if name == "mmlu":  # the harness's local task is one subject
            sub = work / "data" / "mmlu_one"
            sub.mkdir(exist_ok=True)
            if not (sub / "abstract_algebra").exists():
                (sub / "abstract_algebra").symlink_to(dirs["mmlu"] / "abstract_algebra")
            cmd[cmd.index(task_arg)] = f"mmlu={sub}"
        ours_out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        ours = [json.loads(l) for l in items.read_text().splitlines()]
        ours_metrics = ours_out["results"][name]
        t = theirs[name]
        assert len(t) == len(ours), (name, len(t), len(ours))
        if name == "gsm8k":
            same = [o["completion"] == s["resps"][0][0] for o, s in zip(ours, t)]
            res = out["results"]["local_gsm8k"]
            em = (res["exact_match,strict-match"], res["exact_match,flexible-extract"])
            same.append(em == (ours_metrics["exact_match"], ours_metrics["exact_match_flexible"]))
            print(f"{name}: completions equal {sum(same[:-1])}/{len(t)}; exact_match strict/flexible: harness "
                  f"{em}, ours {(ours_metrics['exact_match'], ours_metrics['exact_match_flexible'])}")
            for o, s in zip(ours, t):
                if o["completion"] != s["resps"][0][0]:
                    print("  ours  ", repr(o["completion"]), "\n  theirs", repr(s["resps"][0][0]))
            failures += not all(same)
            continue
        diff, agree = 0.0, True
        for o, s in zip(ours, t):
            ll = [r[0][0] for r in s["resps"]]
            diff = max(diff, float(np.max(np.abs(np.asarray(o["logprobs"]) - np.asarray(ll)))))
            if name == "truthfulqa_mc2":
                agree &= abs(o["mc2"] - s["acc"]) < 1e-4
            else:
                agree &= o["pred"] == int(np.argmax(ll)) and s["acc"] == float(o["pred"] == o["gold"])
                if "acc_norm" in s:
                    agree &= s["acc_norm"] == float(o["pred_norm"] == o["gold"])
        key = "mc2" if name == "truthfulqa_mc2" else "acc"
        their_metric = out["results"][f"local_{name}"]["acc,none"]
        agree &= abs(ours_metrics[key] - their_metric) < 1e-6 or name == "truthfulqa_mc2"
        print(f"{name}: max |logprob difference| {diff:.2e}, predictions and metrics agree: {agree} "
              f"(ours {key} {ours_metrics[key]:.4f}, harness acc {their_metric:.4f})")
        failures += (not agree) or diff > 1e-3
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="lmeval-"))))
