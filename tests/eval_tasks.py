"""Tiny task files in the hub datasets' layouts (made-up records), for tests/test_evaluate.py and
tests/lm_eval_crosscheck.py."""

from __future__ import annotations

import json
from pathlib import Path

ANIMALS = ["cat", "dog", "owl", "fox", "eel", "yak", "ant", "bee"]
COLORS = ["red", "light blue", "green", "a very dark shade of black"]  # lengths differ: acc_norm differs from acc


def _jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def arc(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        a = ANIMALS[(i + seed) % 8]
        labels = ["1", "2", "3", "4"] if i % 3 == 2 else ["A", "B", "C", "D"]  # ARC has both kinds
        texts = [f"the {a} is {c}" for c in COLORS]
        out.append({"id": f"q{seed}-{i}", "question": f"What color is the {a} number {i}?",
                    "choices": {"text": texts, "label": labels}, "answerKey": labels[(i * 3 + seed) % 4]})
    return out


def hellaswag(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        a = ANIMALS[(i + seed) % 8]
        out.append({"ind": i, "activity_label": f"Walking a {a}", "ctx_a": f"A person walks the {a} [title] outside.",
                    "ctx_b": f"then the {a}", "ctx": "", "split": "val", "split_type": "indomain",
                    "endings": ["runs [step] away  fast.", "sits down.", f"eats some {COLORS[i % 4]} food.",
                                "jumps over the fence."],
                    "label": str((i + seed) % 4), "source_id": f"s{i}"})
    return out


def mmlu(subject: str, n: int, seed: int) -> list[dict]:
    return [{"question": f"  In {subject.replace('_', ' ')}, which is item {i + seed}?  ",
             "subject": subject, "choices": [f"item {i + seed + k}" for k in range(4)], "answer": (i + seed) % 4}
            for i in range(n)]


def truthfulqa(n: int) -> list[dict]:
    out = []
    for i in range(n):
        a = ANIMALS[i % 8]
        # answers of about one length, so the probability mass spreads over them
        choices = [f"A {a} has four legs.", f"A {a} has {i + 2} heads.", f"A {a} has some legs.",
                   f"A {a} can fly to the moon."][: 3 + i % 2]
        labels = ([1, 0, 0, 0] if i % 2 == 0 else [0, 1, 1, 0])[: len(choices)]  # which are true varies
        out.append({"question": f"How many legs does a {a} have?",
                    "mc1_targets": {"choices": choices, "labels": [1] + [0] * (len(choices) - 1)},
                    "mc2_targets": {"choices": choices, "labels": labels}})
    return out


def winogrande(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        a, b = ANIMALS[(i + seed) % 8], ANIMALS[(i + seed + 3) % 8]
        out.append({"sentence": f"The {a} chased the {b} because _ was {'hungry' if i % 2 else 'scared'}.",
                    "option1": f"the {a}", "option2": f"the {b}", "answer": str(1 + (i + seed) % 2)})
    return out


def gsm8k(n: int, seed: int) -> list[dict]:
    out = []
    for i in range(n):
        x, y = 3 + i + seed, 4 + 2 * i
        out.append({"question": f"Tom has {x} apples and buys {y} more. How many apples does he have?",
                    "answer": f"Tom has {x} + {y} = <<{x}+{y}={x + y}>>{x + y} apples.\n#### {x + y:,}"})
    return out


def write_all(root: Path) -> dict[str, Path]:
    """One directory per task, in its hub dataset's layout (config folder, split-named files)."""
    d = {}
    d["arc_challenge"] = root / "ai2_arc"
    _jsonl(d["arc_challenge"] / "ARC-Challenge" / "train-00000-of-00001.jsonl", arc(8, 0))
    _jsonl(d["arc_challenge"] / "ARC-Challenge" / "test-00000-of-00001.jsonl", arc(5, 1))
    d["hellaswag"] = root / "hellaswag"
    _jsonl(d["hellaswag"] / "data" / "train.jsonl", hellaswag(8, 0))
    _jsonl(d["hellaswag"] / "data" / "validation.jsonl", hellaswag(4, 1))
    d["mmlu"] = root / "mmlu"
    for s, subject in enumerate(("abstract_algebra", "world_religions")):
        _jsonl(d["mmlu"] / subject / "dev-00000-of-00001.jsonl", mmlu(subject, 5, s))
        _jsonl(d["mmlu"] / subject / "test-00000-of-00001.jsonl", mmlu(subject, 3, 10 + s))
    d["truthfulqa_mc2"] = root / "truthful_qa"
    _jsonl(d["truthfulqa_mc2"] / "multiple_choice" / "validation-00000-of-00001.jsonl", truthfulqa(4))
    d["winogrande"] = root / "winogrande"
    _jsonl(d["winogrande"] / "winogrande_xl" / "train-00000-of-00001.jsonl", winogrande(8, 0))
    _jsonl(d["winogrande"] / "winogrande_xl" / "validation-00000-of-00001.jsonl", winogrande(4, 1))
    d["gsm8k"] = root / "gsm8k"
    _jsonl(d["gsm8k"] / "main" / "train-00000-of-00001.jsonl", gsm8k(6, 0))
    _jsonl(d["gsm8k"] / "main" / "test-00000-of-00001.jsonl", gsm8k(3, 7))
    return d
