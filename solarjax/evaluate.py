"""Task scoring as lm-evaluation-harness does it (SOLAR's H6: ARC, HellaSwag, MMLU, TruthfulQA mc2,
Winogrande, GSM8K), on the sharded model, plus a built-in task that runs offline.

  python -m solarjax.evaluate (--ckpt DIR | --hf DIR) --tasks T1,T2 [--num-fewshot K] [--limit N]
      [--batch-size B] [--max-gen-tokens N] [--mesh D,F,T] [--tokenizer PATH] [--format text|json]
      [--log-items FILE]

A task is NAME=PATH (a local copy of the hub dataset: its files, jsonl/json/parquet, in the hub
layout), NAME alone (the hub, where reachable; `builtin_next_line` needs nothing), or the path of a
generic multiple-choice jsonl (`context`, `choices`, `gold`), scored 0-shot. NAMES lists the tasks.

Scoring rules (docs/architecture.md, "Evaluation", says what matches the harness and what does not):
  - each choice's log-likelihood is the sum over its tokens as the continuation of the few-shot
    context, with the target delimiter " " between them; the continuation's tokens are those of the
    joint encoding past the context's (the harness's _encode_pair, trailing spaces of the context
    moved into the continuation); acc = argmax of the sums, acc_norm = argmax of sum / len(choice);
  - truthfulqa_mc2: the normalized probability mass of the true answers; winogrande: the option
    fills the blank in the context and the shared rest of the sentence is scored;
  - gsm8k: greedy generation until "Question:" or the model's EOS, the answer extracted by the
    harness's strict ("#### N") and flexible (last number) regexes and compared after its cleaning;
  - few-shot examples drawn from the train (MMLU: dev, first k) split with random.Random(1234)
    in eval-document order, as the harness draws them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import re
import sys
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from solarjax.checkpoint import add_model_arguments, load_for_cli
from solarjax.corpus import default_corpus_files
from solarjax.modelconfig import ModelConfig
from solarjax.model import Decoder
from solarjax.sharding import global_from_host, host_value, make_mesh
from solarjax.errors import SolarjaxError, cli

FEWSHOT_SEED = 1234  # the harness's default fewshot_random_seed
FEWSHOT_DELIMITER = "\n\n"


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


# ---------------------------------------------------------------------------------------------
# Contexts and tokens, by the harness's rules


def fewshot_prefixes(task: Task) -> list[str]:
    """Per eval doc: the description and the solved few-shot examples, each followed by "\\n\\n".
    One random.Random(FEWSHOT_SEED) draws for the docs in order, as the harness's sampler does."""
    if task.num_fewshot == 0:
        return [task.description] * len(task.docs)
    rnd, k, spec = random.Random(FEWSHOT_SEED), task.num_fewshot, task.spec
    out = []
    for doc in task.docs:
        if spec.first_n:
            shots = task.pool[:k]
        elif spec.draw_extra:
            shots = [s for s in rnd.sample(task.pool, k + 1) if s.raw != doc.raw][:k]
        else:
            shots = rnd.sample(task.pool, k)
        out.append(task.description + "".join(s.example(spec.delimiter) + FEWSHOT_DELIMITER for s in shots))
    return out


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split: trailing whitespace of the context joins the continuation; the context
    is encoded alone and with the continuation, and the continuation's tokens are the joint
    encoding's past the context's. An empty context is the BOS (or EOS) token alone."""
    if not context:
        cont = tokenizer.encode(continuation, bos=False, eos=False)
        prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        return ([prefix], cont) if cont[:1] != [prefix] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    # The harness adds no special tokens to a string that already starts with the BOS text.
    bos = False if context.startswith(tokenizer.special_tokens.get("bos_token") or "\0") else None
    whole = tokenizer.encode(context + continuation, bos=bos, eos=False)
    ctx = tokenizer.encode(context, bos=bos, eos=False)
    return ctx, whole[len(ctx):]


# ---------------------------------------------------------------------------------------------
# Batched scoring on the mesh


@functools.partial(jax.jit, static_argnums=0)
def _score(config: ModelConfig, params, tokens_BT, starts_B, targets_BC, mask_BC):
    """Summed log-probabilities of each row's continuation [B], and whether every continuation token
    is the argmax (the harness's is_greedy). A row's continuation is predicted at positions
    starts[b] .. starts[b] + C - 1 (masked to its length): only those hidden states are projected
    onto the vocabulary, so no [B, T, V] logits are made. Rows are right-padded: attention is causal,
    so the padding after a row's tokens changes none of their logits."""
    x_BTD, head_DV = Decoder(config).apply({"params": params}, tokens_BT, hidden=True)
    C = targets_BC.shape[1]
    at_BC = jnp.minimum(starts_B[:, None] + jnp.arange(C), tokens_BT.shape[1] - 1)
    x_BCD = jnp.take_along_axis(x_BTD, at_BC[..., None], axis=1)
    logits_BCV = jnp.einsum("BCD,DV->BCV", x_BCD, head_DV, preferred_element_type=jnp.float32)
    logp_BCV = jax.nn.log_softmax(logits_BCV, axis=-1)
    target_logp_BC = jnp.take_along_axis(logp_BCV, targets_BC[..., None], axis=-1)[..., 0]
    greedy_BC = jnp.argmax(logits_BCV, axis=-1) == targets_BC
    return jnp.where(mask_BC, target_logp_BC, 0.0).sum(-1), (greedy_BC | ~mask_BC).all(-1)


def _bucket(n: int, cap: int) -> int:
    """Lengths round up to 32, 64, 128, ... (at most cap): one compile each."""
    return min(max(32, 1 << (n - 1).bit_length()), cap)


class Scorer:
    """Log-likelihoods of (context tokens, continuation tokens) pairs in padded batches of
    `batch_size` rows per length bucket, on `mesh`'s devices (rows over data x fsdp)."""

    def __init__(self, config: ModelConfig, params, mesh, batch_size: int = 8):
        rows = mesh.shape["data"] * mesh.shape["fsdp"]
        self.config, self.params, self.mesh = config, params, mesh
        self.batch_size = -(-batch_size // rows) * rows  # whole rows per device
        self.sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # rows; any rank
        self.compiled: dict[tuple[int, int], object] = {}  # (T, C) -> the compiled _score
        self.stats = {"scored_tokens": 0, "score_s": 0.0, "compile_s": 0.0, "generated_tokens": 0, "generate_s": 0.0}

    def _compiled(self, T: int, C: int):
        if (T, C) not in self.compiled:
            t0 = time.perf_counter()
            spec = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=self.sharding)  # noqa: E731
            B = self.batch_size
            self.compiled[T, C] = _score.lower(self.config, self.params, spec(B, T), spec(B), spec(B, C),
                                               spec(B, C, dtype=jnp.bool_)).compile()
            self.stats["compile_s"] += time.perf_counter() - t0
        return self.compiled[T, C]

    def loglikelihoods(self, pairs: list[tuple[list[int], list[int]]], desc: str = "") -> list[tuple[float, bool]]:
        L = self.config.max_position_embeddings
        rows = []
        for ctx, cont in pairs:
            if len(cont) > L:
                raise TaskError(f"a continuation of {len(cont)} tokens is longer than the model's {L} positions")
            whole = (ctx + cont)[-(L + 1):]  # left-truncated to the model's length, as the harness does
            rows.append((whole, len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: memory fails early
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        B = self.batch_size
        with tqdm(total=len(rows), desc=desc, unit="req", disable=None, leave=False) as bar:
            i = 0
            while i < len(order):
                T = _bucket(len(rows[order[i]][0]) - 1, L)
                group = [j for j in order[i:i + B] if _bucket(len(rows[j][0]) - 1, L) == T]
                C = _bucket(max(rows[j][1] for j in group), T)  # most continuations are short: one C per T
                tokens, starts = np.zeros((B, T), np.int32), np.zeros((B,), np.int32)
                targets, mask = np.zeros((B, C), np.int32), np.zeros((B, C), bool)
                for r, j in enumerate(group):
                    whole, n_cont = rows[j]
                    n = len(whole) - 1
                    tokens[r, :n] = whole[:-1]
                    starts[r] = n - n_cont
                    targets[r, :n_cont], mask[r, :n_cont] = whole[n - n_cont + 1:], True
                fn = self._compiled(T, C)
                t0 = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    sums, greedy = fn(self.params, *(global_from_host(a, self.sharding) for a in (tokens, starts, targets, mask)))
                sums, greedy = host_value(sums), host_value(greedy)
                self.stats["score_s"] += time.perf_counter() - t0
                self.stats["scored_tokens"] += int(sum(len(rows[j][0]) - 1 for j in group))
                for r, j in enumerate(group):
                    out[j] = (float(sums[r]), bool(greedy[r]))
                i += len(group)
                bar.update(len(group))
        return out

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], desc: str = "") -> list[list[int]]:
        """Greedy completions (the sampler), longest prompts first, `batch_size` at a time."""
        from solarjax.sample import Sampling, generate
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        out: list[list[int] | None] = [None] * len(prompts)
        with tqdm(total=len(prompts), desc=desc, unit="req", disable=None, leave=False) as bar:
            for s in range(0, len(order), self.batch_size):
                group = order[s:s + self.batch_size]
                t0 = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    results = generate(self.config, self.params, [prompts[j] for j in group],
                                       Sampling(max_new_tokens=max_new_tokens), eos_ids)
                self.stats["generate_s"] += time.perf_counter() - t0  # compile included: one per bucket
                for j, r in zip(group, results):
                    out[j] = r["token_ids"]
                    self.stats["generated_tokens"] += len(r["token_ids"])
                bar.update(len(group))
        return out


# ---------------------------------------------------------------------------------------------
# Metrics


def mc2(logprobs: list[float], labels) -> float:
    """TruthfulQA mc2: the probability mass of the true answers, normalized over all answers
    (softmax of the summed log-likelihoods; shifted by the max, which the harness's exp/sum
    does not do, so that very long answers do not underflow to 0/0)."""
    ll = np.asarray(logprobs, np.float64)
    p = np.exp(ll - ll.max())
    return float(p[np.asarray(labels) == 1].sum() / p.sum())


GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")  # gsm8k.yaml's `until`; the model's EOS text is added
_GSM8K_IGNORE = (",", "\\$", "(?s).*#### ", "\\.$")


def extract_answer(completion: str, flexible: bool = False) -> str:
    """The harness's gsm8k filters: strict takes the first "#### N"; flexible the last number-like
    match. "[invalid]" when nothing matches."""
    matches = (GSM8K_FLEXIBLE if flexible else GSM8K_STRICT).findall(completion)
    if not matches:
        return "[invalid]"
    m = matches[-1] if flexible else matches[0]
    if isinstance(m, tuple):
        m = next((g for g in m if g), "[invalid]")
    return m.strip()


def gsm8k_clean(text: str) -> str:
    """exact_match's normalisation in gsm8k.yaml: drop commas, dollars, everything through "#### ",
    a final period; lower case."""
    for pattern in _GSM8K_IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def cut_at_stop(text: str, stops) -> str:
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


# ---------------------------------------------------------------------------------------------
# Running tasks


def run_task(task: Task, scorer: Scorer, tokenizer, items: list | None = None, limit: int | None = None,
             max_gen_tokens: int = 256) -> dict:
    """Scores one Task; returns {metric: mean, "n": docs}, appending per-item records to `items`."""
    docs = task.docs[:limit] if limit else task.docs
    task = dataclasses.replace(task, docs=docs)
    prefixes = fewshot_prefixes(task)
    spec = task.spec
    if "exact_match" in spec.metrics:
        return _run_generative(task, prefixes, scorer, tokenizer, items, max_gen_tokens)
    pairs, owners = [], []
    for d, (doc, prefix) in enumerate(zip(docs, prefixes)):
        for context, continuation in doc.requests(prefix, spec.delimiter):
            pairs.append(encode_pair(tokenizer, context, continuation))
            owners.append(d)
    scores = scorer.loglikelihoods(pairs, desc=task.name)
    per_doc: list[list[float]] = [[] for _ in docs]
    for d, (ll, _) in zip(owners, scores):
        per_doc[d].append(ll)
    totals = {m: 0.0 for m in spec.metrics}
    for index, (doc, lls) in enumerate(zip(docs, per_doc)):
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(np.asarray(lls) / np.asarray(doc.norm_lengths(), np.float64)))
        item = {"task": task.name, "index": index, "logprobs": lls, "pred": pred, "pred_norm": pred_norm,
                "gold": doc.gold}
        values = {"acc": float(pred == doc.gold), "acc_norm": float(pred_norm == doc.gold)}
        if "mc2" in spec.metrics:
            values["mc2"] = item["mc2"] = mc2(lls, doc.labels)
            item["labels"] = list(doc.labels)
        for m in spec.metrics:
            totals[m] += values[m]
        if items is not None:
            items.append(item)
    return {**{m: v / max(len(docs), 1) for m, v in totals.items()}, "n": len(docs)}


def _run_generative(task, prefixes, scorer, tokenizer, items, max_gen_tokens) -> dict:
    L = scorer.config.max_position_embeddings
    if max_gen_tokens >= L:
        raise TaskError(f"--max-gen-tokens {max_gen_tokens} must be below the model's {L} positions")
    prompts = []
    for doc, prefix in zip(task.docs, prefixes):
        ids = tokenizer.encode(prefix + doc.query, eos=False)
        prompts.append(ids[-(L - max_gen_tokens):])  # left-truncated as the harness does
    outputs = scorer.generate(prompts, max_gen_tokens, tokenizer.eos_ids, desc=task.name)
    eos_text = tokenizer.special_tokens.get("eos_token")
    stops = (*GSM8K_STOP, *([eos_text] if eos_text else []))
    strict = flexible = 0
    for index, (doc, ids) in enumerate(zip(task.docs, outputs)):
        completion = cut_at_stop(tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids],
                                                  skip_special_tokens=True), stops)
        extracted, extracted_flexible = extract_answer(completion), extract_answer(completion, flexible=True)
        gold = gsm8k_clean(doc.gold)
        ok, ok_flexible = gsm8k_clean(extracted) == gold, gsm8k_clean(extracted_flexible) == gold
        strict, flexible = strict + ok, flexible + ok_flexible
        if items is not None:
            items.append({"task": task.name, "index": index, "completion": completion, "extracted": extracted,
                          "extracted_flexible": extracted_flexible, "gold": doc.gold, "exact_match": float(ok),
                          "exact_match_flexible": float(ok_flexible)})
    n = max(len(task.docs), 1)
    return {"exact_match": strict / n, "exact_match_flexible": flexible / n, "n": len(task.docs)}


def evaluate(config: ModelConfig, params, tokenizer, tasks: list[Task], mesh=None, batch_size: int = 8,
             limit: int | None = None, max_gen_tokens: int = 256, items: list | None = None) -> dict:
    """{"results": {task: {metric: value, "n": docs}}, "timing": {...}} for Tasks from load_task.
    MMLU's subjects are reported together as "mmlu": acc over all questions (the harness's group,
    weighted by size) and acc_subject_mean (the Open LLM Leaderboard v1's mean over subjects)."""
    mesh = mesh if mesh is not None else make_mesh()
    scorer = Scorer(config, params, mesh, batch_size)
    results, groups = {}, {}
    for task in tasks:
        r = run_task(task, scorer, tokenizer, items, limit, max_gen_tokens)
        if task.group:
            groups.setdefault(task.group, {})[task.name] = r
        else:
            results[task.name] = r
    for group, members in groups.items():
        n = sum(r["n"] for r in members.values())
        results[group] = {"acc": sum(r["acc"] * r["n"] for r in members.values()) / max(n, 1),
                          "acc_subject_mean": float(np.mean([r["acc"] for r in members.values()])), "n": n,
                          "subjects": {k.removeprefix(group + "_"): r["acc"] for k, r in members.items()}}
    s = scorer.stats
    timing = {"compile_s": s["compile_s"], "score_s": s["score_s"], "scored_tokens": s["scored_tokens"],
              "tokens_per_s": s["scored_tokens"] / s["score_s"] if s["score_s"] else None,
              "batch_size": scorer.batch_size}
    if s["generated_tokens"]:
        timing.update(generate_s=s["generate_s"], generated_tokens=s["generated_tokens"],
                      generated_tokens_per_s=s["generated_tokens"] / s["generate_s"])
    return {"results": results, "timing": timing}


# ---------------------------------------------------------------------------------------------
# CLI


def _parser():
    p = argparse.ArgumentParser(prog="python -m solarjax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, mesh_help="data,fsdp,tensor sizes (-1: the remaining devices)")
    p.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(NAMES)} (NAME=PATH for a local "
                   f"copy), or a jsonl path with context/choices/gold")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples for every task (default: "
                   "each task's H6 setting: arc 25, hellaswag 10, mmlu 5, truthfulqa 0, winogrande 5, gsm8k 5)")
    p.add_argument("--limit", type=int, default=None, help="score the first N documents of each task (of each "
                   "MMLU subject)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch (rounded up to the mesh's data x fsdp)")
    p.add_argument("--max-gen-tokens", type=int, default=256, help="generative tasks: tokens per answer")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--log-items", help="write one JSON line per scored item to this file")
    return p


def _format_text(out: dict) -> str:
    lines = [f"{'task':24} {'metric':22} {'value':>8} {'n':>6}", "-" * 63]
    for task, r in out["results"].items():
        for metric, value in r.items():
            if metric not in ("n", "subjects"):
                lines.append(f"{task:24} {metric:22} {value:8.4f} {r['n']:6d}")
    t = out["config"]["timing"]
    if t["tokens_per_s"]:
        lines.append(f"scored {t['scored_tokens']:,} tokens at {t['tokens_per_s']:,.0f} tokens/s "
                     f"(compile {t['compile_s']:.1f} s)")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    for name, value in (("--limit", args.limit), ("--batch-size", args.batch_size),
                        ("--max-gen-tokens", args.max_gen_tokens)):
        if value is not None and value < 1:
            raise TaskError(f"{name} must be a positive integer, got {value}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise TaskError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    entries = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not entries:
        raise TaskError("--tasks names no task")
    tasks = [t for entry in entries for t in load_task(entry, args.num_fewshot)]
    path, mesh, config, params, tokenizer = load_for_cli(args)
    items = [] if args.log_items else None
    t0 = time.perf_counter()
    out = evaluate(config, params, tokenizer, tasks, mesh, args.batch_size, args.limit, args.max_gen_tokens, items)
    out["config"] = {"model": str(path), "tokenizer": str(tokenizer.path), "tasks": entries,
                     "num_fewshot": {t.group or t.name: t.num_fewshot for t in tasks}, "limit": args.limit,
                     "batch_size": args.batch_size, "max_gen_tokens": args.max_gen_tokens,
                     "fewshot_seed": FEWSHOT_SEED, "mesh": dict(mesh.shape), "devices": jax.device_count(),
                     "backend": jax.default_backend(), "seconds": time.perf_counter() - t0,
                     "timing": out.pop("timing")}
    if args.log_items:
        with open(args.log_items, "w") as f:
            for item in items:
                f.write(json.dumps(item) + "\n")
    print(json.dumps(out, indent=2) if args.format == "json" else _format_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
