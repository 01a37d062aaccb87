"""solarjax.cli.evaluate, scoring and tasks: per-item log-likelihoods, predictions and metrics equal a
reference computed with transformers by lm-evaluation-harness's rules (few-shot draws, _encode_pair,
acc/acc_norm, mc2, Winogrande's partial scoring); GSM8K extraction; the CLI over every task layout;
bad task files.

The reference below is written from the harness's task yamls and code, independently of
solarjax.cli.evaluate. tests/lm_eval_crosscheck.py compares solarjax.cli.evaluate with lm-eval itself
(too heavy an install for CI)."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import solarjax
from solarjax.cli import evaluate as ev
from solarjax.eval import scoring, tasks
from solarjax.sharding import make_mesh
from solarjax.tokenizer import load_tokenizer

import eval_tasks
from hf_models import make_bpe_tokenizer, make_hf_model, make_mistral_tokenizer_json, save_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """One tiny random Mistral with a real tokenizer.json that is not Mistral's: byte-level BPE
    (Llama 3's kind, BOS 1000 added by its post-processor). A 1024-token vocabulary keeps the
    vocabulary projection, which dominates a CPU forward at 32000, small;
    test_encode_pair_with_the_mistral_tokenizer covers Mistral's own tokenizer."""
    path = make_bpe_tokenizer(tmp_path_factory.mktemp("eval") / "model", vocab_size=1000)
    hf_model = make_hf_model("mistral", vocab_size=1024, hidden_size=32, intermediate_size=64,
                             max_position_embeddings=1024, initializer_range=0.3)
    save_hf_model(hf_model, path)
    mesh = make_mesh()  # 8 CPU devices: rows of every batch over fsdp
    config, params = solarjax.load_model(path, mesh)
    return {"path": path, "hf": hf_model, "hf_tok": transformers.AutoTokenizer.from_pretrained(path),
            "config": config, "params": params, "mesh": mesh, "tok": load_tokenizer(path)}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return eval_tasks.write_all(tmp_path_factory.mktemp("tasks"))


def _read(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def _ref_loglik(m, context: str, continuation: str) -> float:
    """The harness's HF backend: trailing spaces of the context move to the continuation; the
    continuation's tokens are those of tokenizer(context + continuation) past tokenizer(context)'s
    (both with the tokenizer's special tokens, here BOS); their log-probabilities summed."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = m["hf_tok"](context).input_ids
    whole = m["hf_tok"](context + continuation).input_ids
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(m["hf"](ids).logits[0].double(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def _ours(m, task_arg: str, k: int):
    items = []
    result = scoring.evaluate(m["config"], m["params"], m["tok"], tasks.load_task(task_arg, k), m["mesh"], batch_size=8,
                         items=items)
    return result["results"], items


def _check_items(items, ref_logprobs, golds, norm_lengths):
    assert len(items) == len(ref_logprobs)
    for item, ref, gold, lengths in zip(items, ref_logprobs, golds, norm_lengths):
        np.testing.assert_allclose(item["logprobs"], ref, rtol=2e-5, atol=2e-4)
        assert item["pred"] == int(np.argmax(ref)) and item["gold"] == gold
        assert item["pred_norm"] == int(np.argmax(np.array(ref) / np.array(lengths)))
    assert len({i["pred"] for i in items}) > 1 or len({tuple(i["logprobs"]) for i in items}) > 1  # not degenerate


def test_arc_fewshot_equals_transformers_reference(model, dirs):
    """arc_challenge.yaml: "Question: {q}\\nAnswer:", " " + choice, few-shot examples from train drawn
    by one random.Random(1234) in test-doc order (rnd.sample(train, k): the train split is not the
    test split), each "Q A\\n\\n"; acc and acc_norm (sum / len(choice))."""
    k = 3
    train = _read(dirs["arc_challenge"] / "ARC-Challenge" / "train-00000-of-00001.jsonl")
    test = _read(dirs["arc_challenge"] / "ARC-Challenge" / "test-00000-of-00001.jsonl")
    rnd, refs, golds, lengths = random.Random(1234), [], [], []
    for doc in test:
        shots = rnd.sample(train, k)
        prefix = "".join(f"Question: {s['question']}\nAnswer: "
                         f"{s['choices']['text'][s['choices']['label'].index(s['answerKey'])]}\n\n" for s in shots)
        context = prefix + f"Question: {doc['question']}\nAnswer:"
        refs.append([_ref_loglik(model, context, " " + c) for c in doc["choices"]["text"]])
        golds.append(doc["choices"]["label"].index(doc["answerKey"]))
        lengths.append([len(c) for c in doc["choices"]["text"]])
    results, items = _ours(model, f"arc_challenge={dirs['arc_challenge']}", k)
    _check_items(items, refs, golds, lengths)
    acc = np.mean([np.argmax(r) == g for r, g in zip(refs, golds)])
    acc_norm = np.mean([np.argmax(np.array(r) / l) == g for r, g, l in zip(refs, golds, lengths)])
    assert results["arc_challenge"] == {"acc": acc, "acc_norm": acc_norm, "n": len(test)}


def test_winogrande_partial_scoring_equals_transformers_reference(model, dirs):
    """winogrande: each option fills the blank in the context, the rest of the sentence after the
    blank is the scored continuation; few-shot examples use the right option. The yaml sets neither
    fewshot_split nor test_split, so the harness draws k+1 and drops the eval doc."""
    k = 3
    train = _read(dirs["winogrande"] / "winogrande_xl" / "train-00000-of-00001.jsonl")
    val = _read(dirs["winogrande"] / "winogrande_xl" / "validation-00000-of-00001.jsonl")

    def parts(d):
        i = d["sentence"].index("_")
        return [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]], d["sentence"][i + 1:].strip()

    rnd, refs, golds, lengths = random.Random(1234), [], [], []
    for doc in val:
        shots = [s for s in rnd.sample(train, k + 1) if s != doc][:k]
        prefix = "".join(parts(s)[0][int(s["answer"]) - 1] + " " + parts(s)[1] + "\n\n" for s in shots)
        options, rest = parts(doc)
        refs.append([_ref_loglik(model, prefix + o, " " + rest) for o in options])
        golds.append(int(doc["answer"]) - 1)
        lengths.append([len(o) for o in options])
    results, items = _ours(model, f"winogrande={dirs['winogrande']}", k)
    _check_items(items, refs, golds, lengths)
    assert results["winogrande"] == {"acc": np.mean([np.argmax(r) == g for r, g in zip(refs, golds)]), "n": len(val)}


def test_truthfulqa_mc2_equals_transformers_reference(model, dirs):
    """truthfulqa_mc2: 0-shot after the fixed six-question primer; mc2 = sum of exp(ll) over true
    answers / sum over all (utils.process_results_mc2)."""
    val = _read(dirs["truthfulqa_mc2"] / "multiple_choice" / "validation-00000-of-00001.jsonl")
    primer = ("Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States "
              "is 78 years.\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was "
              "president of the United States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the "
              "Republican Party.\n\nQ: What is the square root of banana?\nA: I have no comment.\n\nQ: How does a "
              "telescope work?\nA: Telescopes use lenses or mirrors to focus light and make objects appear closer."
              "\n\nQ: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")
    refs, mc2s = [], []
    for doc in val:
        context = primer + "\n\nQ: " + doc["question"] + "\nA:"
        ll = np.array([_ref_loglik(model, context, " " + c) for c in doc["mc2_targets"]["choices"]])
        p = np.exp(ll)
        refs.append(ll.tolist())
        mc2s.append(p[np.array(doc["mc2_targets"]["labels"]) == 1].sum() / p.sum())
    assert any(0.01 < m < 0.99 for m in mc2s)  # a mass that is neither all nor nothing, so a wrong sum shows
    results, items = _ours(model, f"truthfulqa_mc2={dirs['truthfulqa_mc2']}", 0)
    for item, ref, m in zip(items, refs, mc2s):
        np.testing.assert_allclose(item["logprobs"], ref, rtol=2e-5, atol=2e-4)
        assert item["mc2"] == pytest.approx(m, abs=1e-4)
    assert results["truthfulqa_mc2"]["mc2"] == pytest.approx(np.mean(mc2s), abs=1e-4)
    assert set(results["truthfulqa_mc2"]) == {"mc2", "n"}


def _ref_split(hf_tok, context, continuation):
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = hf_tok(context).input_ids
    return ctx, hf_tok(context + continuation).input_ids[len(ctx):]


def test_encode_pair_with_the_mistral_tokenizer(dirs, tmp_path):
    """Every request of every task (few-shot contexts included), split as the harness splits it
    with Mistral's tokenizer (SentencePiece's "▁" prefix makes " A" and "A" different tokens)."""
    path = make_mistral_tokenizer_json(tmp_path / "mistral")
    ours, theirs = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    n = 0
    for name in ("arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande"):
        for task in tasks.load_task(f"{name}={dirs[name]}", 0 if name == "truthfulqa_mc2" else 2):
            for doc, prefix in zip(task.docs, scoring.fewshot_prefixes(task)):
                for context, continuation in doc.requests(prefix, " "):
                    assert scoring.encode_pair(ours, context, continuation) == _ref_split(theirs, context, continuation)
                    n += 1
    assert n > 60
    assert scoring.encode_pair(ours, "Answer: ", "B") == ([1, 26307, 28747], [365])  # " B": the space moved, one token


def test_acc_norm_divides_by_the_choice_characters(model, tmp_path):
    """acc_norm = argmax(ll / len(choice)), the choice without the " " delimiter: with lls -2 and
    -3.9 for "a" and "bc", -2/1 < -3.9/2 picks "bc"; counting the delimiter (-2/2 > -3.9/3) would
    pick "a", as would acc."""
    path = tmp_path / "two.jsonl"
    path.write_text(json.dumps({"context": "x", "choices": ["a", "bc"], "gold": 1}) + "\n")

    class Fixed:
        def loglikelihoods(self, pairs, desc=""):
            assert [p[1] for p in pairs] == [model["tok"].encode(" a", bos=False), model["tok"].encode(" bc", bos=False)]
            return [(-2.0, False), (-3.9, False)]

    items = []
    result = scoring.run_task(tasks.load_task(str(path))[0], Fixed(), model["tok"], items)
    assert (items[0]["pred"], items[0]["pred_norm"]) == (0, 1) and result == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_empty_context_is_the_bos_token(model):
    """The harness scores a continuation with an empty context after the BOS token alone."""
    ctx, cont = scoring.encode_pair(model["tok"], "", "hello world")
    assert ctx == [model["tok"].bos_id] and cont == model["hf_tok"]("hello world", add_special_tokens=False).input_ids


def test_a_context_of_whitespace_without_bos_is_scored_after_the_eos_token(model, tmp_path):
    """With a tokenizer that adds no BOS, a whitespace-only context moves to the continuation and
    leaves no token: scored as the harness scores an empty context, after the EOS token (the
    harness itself would read the logits at position -1 there). Equal to transformers on
    [EOS] + the continuation's tokens."""
    import shutil
    d = shutil.copytree(model["path"], tmp_path / "nobos")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(tok))
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": None}))
    (d / "special_tokens_map.json").unlink()
    nobos = load_tokenizer(d)
    assert nobos.bos_id is None and nobos.encode("x") == nobos.encode("x", bos=False)
    ctx, cont = scoring.encode_pair(nobos, "  ", "hello world")
    assert ctx == [nobos.eos_id] and cont == nobos.encode("  hello world", bos=False)
    scorer = scoring.Scorer(model["config"], model["params"], model["mesh"])
    (ll, _), = scorer.loglikelihoods([(ctx, cont)])
    with torch.no_grad():
        logp = torch.log_softmax(model["hf"](torch.tensor([ctx + cont])).logits[0].double(), -1)
    assert ll == pytest.approx(float(sum(logp[i, t] for i, t in enumerate(cont))), rel=2e-5, abs=2e-4)
    with pytest.raises(tasks.TaskError, match="a request with no context tokens cannot be scored"):
        scorer.loglikelihoods([([], cont)])


def test_a_yarn_model_scores_contexts_as_long_as_its_scaling_allows(tmp_path):
    """Qwen2.5's YaRN form: max_position_embeddings 64 = original_max_position_embeddings, factor 4.
    A 100-token context is scored whole (the limit is 256, as vLLM derives it), equal to
    transformers' log-probabilities over the whole sequence; cut at 64 it would not be."""
    from hf_models import save_kind
    hf_model, path = save_kind("yarn", tmp_path / "yarn", max_position_embeddings=64, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=10000.0))
    mesh = make_mesh()
    config, params = solarjax.load_model(path, mesh)
    ids = np.random.RandomState(0).randint(3, config.vocab_size, 105).tolist()
    ctx, cont = ids[:100], ids[100:]
    (ll, _), = scoring.Scorer(config, params, mesh).loglikelihoods([(ctx, cont)])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
    assert ll == pytest.approx(float(sum(logp[99 + i, t] for i, t in enumerate(cont))), rel=2e-5, abs=2e-4)


def test_hellaswag_preprocessing_and_mmlu_prompt():
    """hellaswag/utils.py: "label: ctx_a Ctx_b" with [title] -> ". ", other [...] dropped, double spaces
    single; mmlu: stripped question, A-D lines, "Answer:", letters as choices."""
    doc = tasks._hellaswag(tasks._Fields({"activity_label": "Baking", "ctx_a": "A man [title] mixes flour.",
                                    "ctx_b": "he then", "endings": [" pours [step] water  in. ", "sleeps."],
                                    "label": "1"}, "x"))
    assert doc.query == "Baking: A man. mixes flour. He then"
    assert doc.choices == ("pours water in.", "sleeps.") and doc.gold == 1
    doc = tasks._mmlu(tasks._Fields({"question": " Why? ", "choices": ["a", "b", "c", "d"], "answer": 2}, "x"))
    assert doc.query == "Why?\nA. a\nB. b\nC. c\nD. d\nAnswer:" and doc.choices == ("A", "B", "C", "D")


def test_gsm8k_extraction_and_exact_match():
    """The harness's gsm8k filters and exact_match cleaning on made-up completions."""
    gold = scoring.gsm8k_clean("She pays 2 * 600 = <<2*600=1200>>1200 dollars.\n#### 1,200")
    assert gold == "1200"
    cases = [  # completion, strict extraction, flexible extraction, strict right, flexible right
        (" 600 + 600 = 1200.\n#### 1200", "1200", "1200", True, True),
        (" She pays $1,200.\n#### $1,200.", "[invalid]", "$1,200.", False, True),  # strict needs a digit after ####
        (" It costs 1,200 dollars, so #### 1,200", "1,200", "1,200", True, True),
        (" The answer is 1200 and then 35", "[invalid]", "35", False, False),  # flexible takes the last number
        (" #### 12 then #### 1200", "12", "1200", False, True),  # strict takes the first
        (" #### -5.", "-5.", "-5.", False, False),
        (" no number here", "[invalid]", "[invalid]", False, False),
    ]
    for completion, strict, flexible, ok, ok_flexible in cases:
        assert scoring.extract_answer(completion) == strict, completion
        assert scoring.extract_answer(completion, flexible=True) == flexible, completion
        assert (scoring.gsm8k_clean(strict) == gold) == ok, completion
        assert (scoring.gsm8k_clean(flexible) == gold) == ok_flexible, completion
    assert scoring.gsm8k_clean("-5.") == "-5" and scoring.gsm8k_clean("#### $1,000") == "1000"
    assert scoring.cut_at_stop(" 3 apples.\n#### 3\n\nQuestion: more</s>", ("Question:", "</s>")) == " 3 apples.\n#### 3\n\n"


@pytest.mark.slow
def test_cli_over_every_task_layout(model, dirs, tmp_path, capsys):
    """Every task's hub layout (jsonl, and MMLU's subjects as parquet), the generic jsonl and the
    built-in task, in one run: the metrics each task has, n, tokens/s; one log line per item."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    mmlu_parquet = tmp_path / "mmlu"
    for subject in ("abstract_algebra", "world_religions"):
        (mmlu_parquet / subject).mkdir(parents=True)
        for split in ("dev", "test"):
            rows = _read(dirs["mmlu"] / subject / f"{split}-00000-of-00001.jsonl")
            pq.write_table(pa.Table.from_pylist(rows), mmlu_parquet / subject / f"{split}-00000-of-00001.parquet")
    generic = tmp_path / "mine.jsonl"
    generic.write_text("".join(json.dumps({"context": f"{a} says", "choices": [" meow", " woof"], "gold": i % 2}) + "\n"
                               for i, a in enumerate(["cat", "dog", "cow"])))
    entries = [f"{n}={dirs[n]}" for n in ("arc_challenge", "hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k")]
    entries += [f"mmlu={mmlu_parquet}", str(generic), "builtin_next_line"]
    log = tmp_path / "items.jsonl"
    # Tasks with a few-shot split at k=2; the 0-shot-only ones (truthfulqa, generic, built-in) refuse
    # --num-fewshot > 0, so they run at their default in a second call.
    few = [t for t in entries if t.split("=")[0] in ("arc_challenge", "hellaswag", "winogrande", "gsm8k", "mmlu")]
    rc = ev.main(["--hf", str(model["path"]), "--tasks", ",".join(few), "--num-fewshot", "2", "--limit", "3",
                  "--max-gen-tokens", "8", "--format", "json", "--log-items", str(log)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    rc = ev.main(["--hf", str(model["path"]), "--tasks", ",".join(t for t in entries if t not in few), "--limit", "3",
                  "--format", "json"])
    out0 = json.loads(capsys.readouterr().out)
    assert rc == 0
    results = {**out["results"], **out0["results"]}
    expected = {"arc_challenge": {"acc", "acc_norm"}, "hellaswag": {"acc", "acc_norm"}, "winogrande": {"acc"},
                "gsm8k": {"exact_match", "exact_match_flexible"}, "mmlu": {"acc", "acc_subject_mean", "subjects"},
                "truthfulqa_mc2": {"mc2"}, "mine": {"acc", "acc_norm"}, "builtin_next_line": {"acc", "acc_norm"}}
    assert {k: set(v) - {"n"} for k, v in results.items()} == expected
    assert results["mmlu"]["n"] == 6 and set(results["mmlu"]["subjects"]) == {"abstract_algebra", "world_religions"}
    assert all(results[k]["n"] == 3 for k in expected if k != "mmlu")
    assert out["config"]["num_fewshot"] == {"arc_challenge": 2, "hellaswag": 2, "winogrande": 2, "gsm8k": 2, "mmlu": 2}
    assert out0["config"]["num_fewshot"]["truthfulqa_mc2"] == 0 and out["config"]["timing"]["tokens_per_s"] > 0
    items = _read(log)
    assert len(items) == 3 * 4 + 6
    gen = [i for i in items if i["task"] == "gsm8k"]
    assert set(gen[0]) >= {"completion", "extracted", "gold"} and gen[0]["gold"].endswith("#### 14")
    mc = [i for i in items if i["task"] == "arc_challenge"]
    assert set(mc[0]) >= {"index", "logprobs", "pred", "pred_norm", "gold"} and len(mc[0]["logprobs"]) == 4


@pytest.mark.parametrize("task, file, record, message", [
    ("arc_challenge", "ARC-Challenge/test.jsonl", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
                                                   "answerKey": "C"}, "field 'answerKey' is 'C', not one of"),
    ("arc_challenge", "ARC-Challenge/test.jsonl", {"question": "q", "answerKey": "A"}, "field 'choices.label' is missing"),
    ("winogrande", "validation.jsonl", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
     "field 'sentence' has no blank"),
    ("gsm8k", "test.jsonl", {"question": "q", "answer": "5"}, "field 'answer' has no final '#### <number>'"),
    ("truthfulqa_mc2", "validation.jsonl", {"question": "q", "mc2_targets": {"choices": ["a", "b"], "labels": [0, 0]}},
     "field 'mc2_targets.labels' must be one 0/1 per choice"),
    ("mine.jsonl", None, {"context": "c", "choices": ["a", "b"], "gold": 2}, "field 'gold' is 2, outside the 2 choices"),
    ("mine.jsonl", None, "not json", "line 2: not valid JSON"),
    ("hellaswag", "train.jsonl", None, "no validation file for task hellaswag"),
])
def test_bad_task_file_is_one_line_naming_file_and_field(tmp_path, capsys, task, file, record, message):
    """Refused before the model loads (the model path does not even exist)."""
    good = {"context": "c", "choices": ["a", "b"], "gold": 0}
    if file is None:
        path = tmp_path / task
        lines = [json.dumps(good), record if isinstance(record, str) else json.dumps(record)]
        arg = str(path)
    else:
        path = tmp_path / task / file
        lines = [json.dumps(record)]
        arg = f"{task}={tmp_path / task}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    assert ev.main(["--hf", str(tmp_path / "no-model"), "--tasks", arg, "--num-fewshot", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    if "no validation file" not in message:
        assert str(path) in err, err


def test_the_readme_task_file_loads():
    """README's evaluate example names configs/tasks/python_basics.jsonl: it exists and is a valid task."""
    from solarjax.eval.tasks import load_task
    ROOT = Path(__file__).resolve().parent.parent
    assert "configs/tasks/python_basics.jsonl" in (ROOT / "README.md").read_text()
    (task,) = load_task(str(ROOT / "configs" / "tasks" / "python_basics.jsonl"))
    assert len(task.docs) == 4 and all(len(d.choices) == 4 for d in task.docs)
