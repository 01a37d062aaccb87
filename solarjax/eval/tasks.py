"""The evaluation tasks: SOLAR's H6 (ARC, HellaSwag, MMLU, TruthfulQA mc2, Winogrande, GSM8K) with
each record turned into a document as lm-evaluation-harness does it, a generic multiple-choice
jsonl, and a built-in task that runs offline; and their data, from local copies in the hub layout,
the hub, or files. `load_task` makes the Tasks that solarjax.eval.scoring scores.

It is one module because a task is its record parser, its TaskSpec and how its splits are found,
which change together when a task is added.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Callable

import numpy as np

from solarjax.data.corpus import default_corpus_files
from solarjax.errors import SolarjaxError


class TaskError(SolarjaxError):
    """A task name, file or field is wrong; the message names it."""


# ---------------------------------------------------------------------------------------------
# Documents: each task turns a raw record into a Doc (the harness's doc_to_text/choice/target)


@dataclasses.dataclass(frozen=True)
class Doc:
    query: str | tuple[str, ...]  # the prompt; Winogrande: one per option (the option fills the blank)
    choices: tuple[str, ...]  # what is scored after the delimiter; Winogrande: the sentence's rest, once
    gold: int | str  # index of the right choice; generative: the reference answer
    labels: tuple[int, ...] = ()  # truthfulqa_mc2: 1 for each true choice
    raw: dict | None = None  # the record, for the harness's "few-shot example equal to the eval doc" check

    def example(self, delimiter: str) -> str:
        """This document as a solved few-shot example (without the few-shot delimiter)."""
        if isinstance(self.gold, str):
            return self.query + delimiter + self.gold
        if isinstance(self.query, tuple):
            return self.query[self.gold] + delimiter + self.choices[0]
        return self.query + delimiter + self.choices[self.gold]

    def requests(self, prefix: str, delimiter: str) -> list[tuple[str, str]]:
        """(context, continuation) per choice."""
        if isinstance(self.query, tuple):
            return [(prefix + q, delimiter + self.choices[0]) for q in self.query]
        return [(prefix + self.query, delimiter + c) for c in self.choices]

    def norm_lengths(self) -> list[int]:
        """The harness's acc_norm divisor: len() of each doc_to_choice string (for Winogrande, the
        option-filled sentence starts)."""
        return [len(c) for c in (self.query if isinstance(self.query, tuple) else self.choices)]


class _Fields:
    """Field access on one record that names the file, the record and the field when it fails."""

    def __init__(self, record, where: str):
        self.record, self.where = record, where
        if not isinstance(record, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")

    def fail(self, field: str, why: str):
        raise TaskError(f"{self.where}: field {field!r} {why}")

    def get(self, field: str, kind=str):
        """record[field] (dotted: 'choices.text'), checked to be `kind` (or a list of str when kind is list)."""
        value = self.record
        for part in field.split("."):
            if not isinstance(value, dict) or part not in value:
                self.fail(field, "is missing")
            value = value[part]
        if kind in (list, "ints"):
            want = str if kind is list else int
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if (not isinstance(value, (list, tuple)) or not value
                    or not all(isinstance(v, want) and v != "" and not isinstance(v, bool) for v in value)):
                self.fail(field, f"must be a non-empty list of {'non-empty strings' if want is str else 'integers'}, "
                                 f"got {value!r}")
            return list(value)
        if kind is int:
            if isinstance(value, (np.integer, str)) and str(value).strip().lstrip("-").isdigit():
                value = int(value)
            if not isinstance(value, int) or isinstance(value, bool):
                self.fail(field, f"must be an integer, got {value!r}")
            return value
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {value!r}")
        return value


def _arc(f: _Fields) -> Doc:
    labels, texts = f.get("choices.label", list), f.get("choices.text", list)
    key = f.get("answerKey")
    if key not in labels:
        f.fail("answerKey", f"is {key!r}, not one of choices.label {labels}")
    if len(labels) != len(texts):
        f.fail("choices.text", f"has {len(texts)} entries but choices.label has {len(labels)}")
    return Doc(f"Question: {f.get('question')}\nAnswer:", tuple(texts), labels.index(key))


def _hellaswag_clean(text: str) -> str:  # the harness's hellaswag preprocess
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(f: _Fields) -> Doc:
    endings = f.get("endings", list)
    label = f.get("label", int)
    if not 0 <= label < len(endings):
        f.fail("label", f"is {label}, outside the {len(endings)} endings")
    ctx = f.get("ctx_a") + " " + f.get("ctx_b").capitalize()
    return Doc(_hellaswag_clean(f.get("activity_label") + ": " + ctx), tuple(_hellaswag_clean(e) for e in endings),
               label)


def _mmlu(f: _Fields) -> Doc:
    choices = f.get("choices", list)
    if len(choices) != 4:
        f.fail("choices", f"must have 4 entries (A-D), got {len(choices)}")
    answer = f.get("answer", int)
    if not 0 <= answer < 4:
        f.fail("answer", f"is {answer}, not an index 0-3")
    text = f.get("question").strip() + "".join(f"\n{l}. {c}" for l, c in zip("ABCD", choices)) + "\nAnswer:"
    return Doc(text, ("A", "B", "C", "D"), answer)


TRUTHFULQA_PROMPT = (  # the harness's fixed QA primer (truthfulqa_mc1.yaml), before every question
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def _truthfulqa_mc2(f: _Fields) -> Doc:
    choices = f.get("mc2_targets.choices", list)
    labels = f.get("mc2_targets.labels", "ints")
    if len(labels) != len(choices) or not set(labels) <= {0, 1} or 1 not in labels:
        f.fail("mc2_targets.labels", f"must be one 0/1 per choice ({len(choices)}) with at least one 1, got {labels}")
    return Doc(TRUTHFULQA_PROMPT + "\n\nQ: " + f.get("question") + "\nA:", tuple(choices), 0,
               tuple(int(l) for l in labels))


def _winogrande(f: _Fields) -> Doc:
    sentence = f.get("sentence")
    if "_" not in sentence:
        f.fail("sentence", "has no blank '_'")
    answer = f.get("answer")
    if answer not in ("1", "2"):
        f.fail("answer", f"is {answer!r}, expected '1' or '2'")
    blank = sentence.index("_")
    options = (sentence[:blank] + f.get("option1"), sentence[:blank] + f.get("option2"))
    return Doc(options, (sentence[blank + 1:].strip(),), int(answer) - 1)


def _gsm8k(f: _Fields) -> Doc:
    answer = f.get("answer")
    if not re.search(r"#### \S", answer):
        f.fail("answer", f"has no final '#### <number>' line: {answer[-60:]!r}")
    return Doc(f"Question: {f.get('question')}\nAnswer:", (), answer)


def _generic(f: _Fields) -> Doc:
    choices = f.get("choices", list)
    gold = f.get("gold", int)
    if not 0 <= gold < len(choices):
        f.fail("gold", f"is {gold}, outside the {len(choices)} choices")
    return Doc(f.get("context"), tuple(choices), gold)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    parse: Callable[[_Fields], Doc]
    hub: tuple[str, str | None]  # dataset path and config name on the hub (the local layout follows it)
    eval_split: str
    fewshot_split: str | None
    num_fewshot: int  # the Open LLM Leaderboard v1 (H6) setting
    metrics: tuple[str, ...]
    first_n: bool = False  # MMLU: the first k dev examples, not a random draw
    # The harness draws k+1 and drops the eval doc when its config's fewshot_split equals its
    # test_split; for tasks with neither set (hellaswag, winogrande) that is None == None, so it does.
    draw_extra: bool = False
    delimiter: str = " "


TASKS: dict[str, TaskSpec] = {
    "arc_challenge": TaskSpec(_arc, ("allenai/ai2_arc", "ARC-Challenge"), "test", "train", 25, ("acc", "acc_norm")),
    "arc_easy": TaskSpec(_arc, ("allenai/ai2_arc", "ARC-Easy"), "test", "train", 25, ("acc", "acc_norm")),
    "hellaswag": TaskSpec(_hellaswag, ("Rowan/hellaswag", None), "validation", "train", 10, ("acc", "acc_norm"),
                          draw_extra=True),
    "mmlu": TaskSpec(_mmlu, ("cais/mmlu", "all"), "test", "dev", 5, ("acc",), first_n=True),
    "truthfulqa_mc2": TaskSpec(_truthfulqa_mc2, ("truthfulqa/truthful_qa", "multiple_choice"), "validation", None, 0,
                               ("mc2",)),
    "winogrande": TaskSpec(_winogrande, ("allenai/winogrande", "winogrande_xl"), "validation", "train", 5, ("acc",),
                           draw_extra=True),
    "gsm8k": TaskSpec(_gsm8k, ("openai/gsm8k", "main"), "test", "train", 5, ("exact_match", "exact_match_flexible")),
}
BUILTIN = "builtin_next_line"
GENERIC = TaskSpec(_generic, ("", None), "", None, 0, ("acc", "acc_norm"))
NAMES = (*TASKS, BUILTIN)


# ---------------------------------------------------------------------------------------------
# Task data: local files in the hub layout, the hub, the generic jsonl, the built-in task

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


def read_records(path: Path) -> list[dict]:
    """Records of one jsonl/json/parquet file; a bad line names the file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise TaskError(f"{path}: not a readable parquet file ({e})") from None
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot be read ({e})") from None
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None  # a .json file that holds JSON lines
        if isinstance(value, list):
            return value
        if isinstance(value, dict):
            for key in ("data", "rows", "examples"):  # {"data": [...]}, as some exports write it
                if isinstance(value.get(key), list):
                    return value[key]
            return [value]
    records = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise TaskError(f"{path} line {i}: not valid JSON ({e.msg})") from None
    return records


def _split_files(root: Path, split: str) -> list[Path]:
    """Files of `split` under root: names like test.jsonl, test-00000-of-00001.parquet,
    hellaswag_val.jsonl, or any data file in a folder named after the split."""
    names = {split, "val"} if split == "validation" else {split}

    def is_data(p: Path) -> bool:
        return p.is_file() and p.suffix in DATA_EXTENSIONS

    found = [p for p in root.iterdir() if is_data(p) and names & set(re.split(r"[-_.]", p.stem))]
    if (root / split).is_dir():
        found += [p for p in (root / split).iterdir() if is_data(p)]
    return sorted(found)


def _find_split(directory: Path, config: str | None, split: str) -> list[Path] | None:
    for root in (directory / config if config else None, directory, directory / "data", directory / "default"):
        if root is not None and root.is_dir():
            files = _split_files(root, split)
            if files:
                return files
    return None


def _load_split(name: str, spec: TaskSpec, source: Path | None, split: str) -> list[tuple[dict, str]]:
    """(record, where) of one split: from `source` (a local copy of the hub dataset) or from the hub."""
    if source is None:
        try:
            import datasets
            records = list(datasets.load_dataset(spec.hub[0], spec.hub[1], split=split))
            return [(r, f"{spec.hub[0]} {split} record {i + 1}") for i, r in enumerate(records)]
        except Exception as e:  # offline, or a name the hub does not know
            raise TaskError(f"task {name}: cannot load {spec.hub[0]} ({spec.hub[1]}) split {split} from the hub "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); give a local copy "
                            f"as {name}=PATH") from None
    files = _find_split(source, spec.hub[1], split)
    if files is None:
        raise TaskError(f"{source}: no {split} file for task {name} (looked for {split}*.jsonl/.json/.parquet in "
                        f"{source}{'/' + spec.hub[1] if spec.hub[1] else ''}, {source} and {source}/data)")
    return [r for f in files for r in _tag(read_records(f), f)]


def _tag(records: list, path: Path) -> list:
    return [(r, f"{path} record {i + 1}") for i, r in enumerate(records)]


def _docs(spec: TaskSpec, tagged: list) -> list[Doc]:
    out = []
    for record, where in tagged:
        doc = spec.parse(_Fields(record, where))
        out.append(dataclasses.replace(doc, raw=record))
    return out


@dataclasses.dataclass
class Task:
    """One scored unit: its eval docs, few-shot pool and settings. MMLU is one Task per subject."""
    name: str
    spec: TaskSpec
    docs: list[Doc]
    pool: list[Doc]
    num_fewshot: int
    description: str = ""
    group: str | None = None  # "mmlu" for its subjects


def load_task(arg: str, num_fewshot: int | None = None) -> list[Task]:
    """The Tasks of one --tasks entry: NAME, NAME=PATH, or a generic jsonl path."""
    name, _, path = arg.partition("=")
    name = name.strip()
    if name not in NAMES:
        p = Path(arg)
        if p.suffix in DATA_EXTENSIONS and p.exists():
            return [_generic_task(p, num_fewshot)]
        if p.suffix in DATA_EXTENSIONS or "/" in arg:
            raise TaskError(f"{arg}: no such file")
        raise TaskError(f"unknown task {name!r}; known: {', '.join(NAMES)}, NAME=PATH for local files, or the path "
                        f"of a jsonl with context/choices/gold")
    if name == BUILTIN:
        if path:
            raise TaskError(f"{BUILTIN} is made from the built-in corpus and takes no path")
        k = 0 if num_fewshot is None else num_fewshot
        if k:
            raise TaskError(f"{BUILTIN} is scored 0-shot; --num-fewshot {k} is refused")
        # The context ends with a newline, which the harness's rule moves into the continuation.
        return [Task(BUILTIN, dataclasses.replace(GENERIC, delimiter=""), builtin_docs(), [], 0)]
    spec = TASKS[name]
    source = Path(path) if path else None
    if source is not None and not source.is_dir():
        raise TaskError(f"{name}={path}: not a directory (give a local copy of {spec.hub[0]})")
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    if k and spec.fewshot_split is None:
        raise TaskError(f"task {name} has no few-shot split (the harness scores it 0-shot); --num-fewshot {k} "
                        f"is refused")
    if name == "mmlu":
        return _mmlu_tasks(spec, source, k)
    docs = _docs(spec, _load_split(name, spec, source, spec.eval_split))
    pool = _docs(spec, _load_split(name, spec, source, spec.fewshot_split)) if k else []
    _check_pool(name, pool, k, spec)
    return [Task(name, spec, docs, pool, k)]


def _check_pool(name: str, pool: list, k: int, spec: TaskSpec):
    if len(pool) < k + spec.draw_extra:
        raise TaskError(f"task {name}: {k}-shot needs {k + spec.draw_extra} few-shot examples, the "
                        f"{spec.fewshot_split} split has {len(pool)}")


def _mmlu_tasks(spec: TaskSpec, source: Path | None, k: int) -> list[Task]:
    """One task per subject, few-shot from that subject's dev split, as the harness's mmlu group.
    A local copy is either cais/mmlu's layout (one folder per subject, or all/) or split files whose
    records carry `subject`."""
    if source is not None and _find_split(source, None, spec.eval_split) is None:
        subjects = [d for d in sorted(source.iterdir()) if d.is_dir() and d.name not in ("all", "auxiliary_train")
                    and _find_split(d, None, spec.eval_split)]
        if not subjects and (source / "all").is_dir():
            source = source / "all"
        elif not subjects:
            raise TaskError(f"{source}: no test file for task mmlu (looked for test*.jsonl/.json/.parquet in it, "
                            f"in all/ and in one folder per subject)")
        else:
            tasks = []
            for d in subjects:
                tasks += _mmlu_group(spec, d, k, default_subject=d.name)
            return tasks
    return _mmlu_group(spec, source, k, default_subject=source.name if source else None)


def _mmlu_group(spec, source, k, default_subject) -> list[Task]:
    spec_local = dataclasses.replace(spec, hub=(spec.hub[0], None) if source is not None else spec.hub)
    test = _load_split("mmlu", spec_local, source, spec.eval_split)
    dev = _load_split("mmlu", spec_local, source, spec.fewshot_split) if k else []

    def by_subject(tagged):
        groups: dict[str, list] = {}
        for record, where in tagged:
            subject = record.get("subject") if isinstance(record, dict) else None
            subject = subject or default_subject
            if not subject:
                raise TaskError(f"{where}: field 'subject' is missing (needed to pick few-shot examples)")
            groups.setdefault(subject, []).append((record, where))
        return groups

    test_groups, dev_groups = by_subject(test), by_subject(dev)
    tasks = []
    for subject, tagged in sorted(test_groups.items()):
        pool = _docs(spec, dev_groups.get(subject, []))
        _check_pool(f"mmlu ({subject})", pool, k, spec)
        description = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        tasks.append(Task(f"mmlu_{subject}", spec, _docs(spec, tagged), pool, k, description, group="mmlu"))
    return tasks


def _generic_task(path: Path, num_fewshot: int | None) -> Task:
    if num_fewshot:
        raise TaskError(f"{path}: a generic multiple-choice file is scored 0-shot; --num-fewshot {num_fewshot} is "
                        f"refused")
    return Task(path.stem, GENERIC, _docs(GENERIC, _tag(read_records(path), path)), [], 0)


def builtin_docs(n: int = 200, seed: int = 0) -> list[Doc]:
    """The built-in task: from the built-in corpus (the standard library's modules), the first
    lines of a function, and its real next line among 3 lines drawn from other functions (re-indented
    alike). Fixed by the seed and the Python version; the corpus is also the demo's training data,
    so this measures how well a model has learned it, not generalization."""
    candidates = []
    for path in default_corpus_files():
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"( *)def \w+\(.*\):$", line)
            if not m:
                continue
            body = [l for l in lines[i + 1:i + 12] if l.strip()]
            indent = len(m.group(1))
            shown = 1 + (i % 3)  # 1-3 body lines shown
            if len(body) <= shown or any(len(l) - len(l.lstrip()) <= indent for l in body[:shown + 1]):
                continue
            answer = body[shown]
            if not 8 <= len(answer.strip()) <= 72 or '"""' in answer or any(len(l) > 100 for l in body[:shown]):
                continue
            candidates.append(("\n".join([line] + body[:shown]) + "\n", answer))
    rng = random.Random(seed)
    chosen = rng.sample(candidates, min(n, len(candidates)))
    docs = []
    for context, answer in chosen:
        pad = answer[:len(answer) - len(answer.lstrip())]
        others = set()
        while len(others) < 3:
            other = rng.choice(candidates)[1].strip()
            if other != answer.strip():
                others.add(pad + other)
        choices = [answer] + sorted(others)
        rng.shuffle(choices)
        docs.append(Doc(context, tuple(choices), choices.index(answer)))
    return docs
