"""Data mixtures: named sources at weights, a schedule of weights, held-out loss per source.

The dealing of rows to sources is tested directly (cheap: no model); the trainer tests use the
tiny model of test_train.py on two small "domains" with different vocabularies."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import solarjax
from solarjax import data
from solarjax.data import cache as data_cache
from solarjax.data.config import DataConfig, SourceConfig
from solarjax.data.mixture import Mixture, seats
from solarjax.errors import ConfigError, SolarjaxError
from solarjax.train.config import load_train_config, recipe_config_from_dict, train_config_from_dict
from solarjax.train.step import loss_and_count
from solarjax.train.trainer import Trainer, _TensorBoard, read_metrics

from killing import sigkill_after_checkpoint
from test_train import TINY

ROOT = Path(__file__).resolve().parent.parent


class _Windows:
    """A stand-in for PackedSequences: window i is the row [source, i, ...]."""
    streaming = False

    def __init__(self, source: int, n: int, seq_len: int = 4):
        self.source, self.n, self.seq_len = source, n, seq_len

    def __len__(self):
        return self.n

    def sequence(self, i):
        t = np.full(self.seq_len, i, np.int32)
        t[0] = self.source
        return t, np.ones(self.seq_len, np.int32), np.arange(self.seq_len, dtype=np.int32)


def _mixture(weights, schedule=(), sizes=None, G=8, seed=0, p=0, P=1):
    names = [f"s{i}" for i in range(len(weights))]
    packed = [_Windows(i, n) for i, n in enumerate(sizes or [50] * len(weights))]
    return Mixture(names, packed, [(0, list(weights)), *schedule], G, seed, p, P)


def _no_data(*args, **kwargs):
    raise AssertionError("the data was loaded before a refusal that needs none of it")


def _sources_of(mix, step):
    return np.bincount([s for s, _ in mix.global_rows(step)], minlength=len(mix.names))


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.9, 0.1)])
def test_realised_shares_match_the_weights(weights):
    """Over 200 steps the share of rows of each source is its weight within 2% (here within one
    row of the ideal at every step: the rounding is carried forward, not re-drawn)."""
    mix, G = _mixture(weights), 8
    counts = np.zeros(2, np.int64)
    for step in range(200):
        dealt = _sources_of(mix, step)
        assert dealt.sum() == G and (dealt == mix.dealt(step)).all()
        counts += dealt
        ideal = (step + 1) * G * np.asarray(weights)
        assert np.abs(counts - ideal).max() <= 1, (step, counts, ideal)
    shares = counts / counts.sum()
    np.testing.assert_allclose(shares, weights, atol=0.02)
    assert (mix.drawn(200) == counts).all()


def test_dealing_is_house_monotone_for_many_sources():
    """Row counts per step are never negative, whatever the weights (largest remainder would be
    with three or more sources: the Alabama paradox), and a weight of 0 gets no row."""
    for weights in ([0.2, 0.0, 0.5, 0.3], [0.01, 0.99, 0.3], [1, 1, 1], [0.75, 0.25], [3, 5, 7, 11, 13]):
        prev = seats(weights, 0)
        for rows in range(1, 400):
            now = seats(weights, rows)
            assert now.sum() == rows and (now >= prev).all(), (weights, rows)
            assert np.abs(now - rows * np.asarray(weights) / sum(weights)).max() < 1.5
            prev = now
    assert seats([0.2, 0.0, 0.5, 0.3], 10**6)[1] == 0


def test_each_source_has_its_own_epochs():
    """A small source wraps around on its own: each of its epochs draws every window once, in a
    new order, while the large one is still in its first epoch."""
    mix = _mixture((0.5, 0.5), sizes=[12, 1000], G=4, seed=3)
    drawn = [[], []]
    for step in range(12):  # 24 rows of each source: two epochs of the small one
        for s, w in mix.global_rows(step):
            drawn[s].append(w)
    small = drawn[0]
    assert sorted(small[:12]) == list(range(12)) and sorted(small[12:]) == list(range(12))
    assert small[:12] != small[12:]
    assert len(set(drawn[1])) == 24
    batch = mix.batch(0)  # rows in source order; each row built from its source's windows
    np.testing.assert_array_equal(batch["tokens"][:, 0], [0, 0, 1, 1])


def test_processes_split_the_global_batch_of_a_mixture():
    whole = _mixture((0.7, 0.3), G=8)
    parts = [_mixture((0.7, 0.3), G=8, p=p, P=2) for p in (0, 1)]
    for step in (0, 1, 37, 150):
        assert parts[0].rows(step) + parts[1].rows(step) == whole.global_rows(step)
        np.testing.assert_array_equal(np.concatenate([p.batch(step)["tokens"] for p in parts]),
                                      whole.batch(step)["tokens"])


def test_the_schedule_switches_at_its_step_and_a_resume_follows_it():
    """From step 5 on the new weights; a Mixture built fresh at any step (a resume) gives the same
    rows as one that went through every step, before, at and after the switch."""
    schedule = [(5, [0.0, 1.0]), (9, [0.5, 0.5])]
    straight = _mixture((1.0, 0.0), schedule)
    rows = [straight.global_rows(step) for step in range(16)]
    assert all(s == 0 for step in range(5) for s, _ in rows[step])
    assert all(s == 1 for step in range(5, 9) for s, _ in rows[step])
    assert all(_sources_of(straight, step).tolist() == [4, 4] for step in range(9, 16))
    for k in (3, 5, 7, 9, 12):
        resumed = _mixture((1.0, 0.0), schedule)
        assert [resumed.global_rows(step) for step in range(k, 16)] == rows[k:], k
    # Source 1's windows continue where its draws stood at the switch (its 4*8 rows of steps 5..8).
    assert straight.drawn(9).tolist() == [40, 32] and straight.drawn(16).tolist() == [68, 60]


# ---------------------------------------------------------------------------------------------
# Config


BAD = [
    ({"sources": [{"name": "a", "path": "x", "wieght": 1}]}, "data.sources[0]: unknown key 'wieght'"),
    ({"sources": [{"name": "a", "path": "x", "weight": -0.5}]}, "data.sources[0] (a).weight must be a number >= 0, got -0.5"),
    ({"sources": [{"name": "a", "path": "x", "weight": "lots"}]}, "data.sources[0] (a).weight must be a number >= 0, got 'lots'"),
    ({"sources": [{"name": "a", "path": "x", "weight": 0}, {"name": "b", "path": "y", "weight": 0}]},
     "data.sources: every weight is 0 from step 0 on"),
    ({"sources": [{"name": "a", "path": "x"}, {"name": "b", "path": "y"}],
      "mixture_schedule": [{"step": 10, "weights": {"a": 0, "b": 0}}]},
     "data.mixture_schedule (step 10): every weight is 0 from step 10 on"),
    ({"sources": [{"name": "a", "path": "x"}], "mixture_schedule": [{"step": 10, "weights": {"a": 1}},
                                                                     {"step": 5, "weights": {"a": 2}}]},
     "data.mixture_schedule[1].step 5 is out of order"),
    ({"sources": [{"name": "a", "path": "x"}], "mixture_schedule": [{"step": 10, "weights": {"b": 1}}]},
     "data.mixture_schedule[0].weights: 'b' is not a source (sources: a)"),
    ({"sources": [{"name": "a", "path": "x"}], "mixture_schedule": [{"step": 10, "weights": {"a": -1}}]},
     "data.mixture_schedule[0].weights.a must be a number >= 0, got -1"),
    ({"sources": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "data.sources: two sources are named 'a'"),
    ({"sources": ["x", {"name": "train", "path": "y"}]}, "two sources are named 'train' (plain entries are the source"),
    ({"validation": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]},
     "data.validation: the name 'a' is given twice"),
    ({"sources": [{"path": "x"}]}, "data.sources[0].name must be a non-empty name"),
]


@pytest.mark.parametrize("over,message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_mixture_input_is_one_line_naming_it(tmp_path, over, message):
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps({"model": {"preset": "tiny"}, "data": over}))
    with pytest.raises(ConfigError) as e:
        load_train_config(path)
    assert message in str(e.value) and "\n" not in str(e.value) and isinstance(e.value, SolarjaxError)


def test_mixture_config_round_trips_through_config_json():
    d = {"model": {"preset": "tiny"}, "data": {
        "sources": ["plain/", {"name": "code", "path": "c/*.py", "weight": 0.7},
                    {"name": "prose", "path": ["p/"], "weight": "0.3", "text_field": "body"}],
        "mixture_schedule": [{"step": 100, "weights": {"code": 0.5, "prose": 0.5}}],
        "validation": {"code": "held/c", "prose": ["held/p"]}}}
    cfg = train_config_from_dict(d)
    assert [(s.name, s.weight) for s in cfg.data.named_sources()] == [("train", 1.0), ("code", 0.7), ("prose", 0.3)]
    assert cfg.data.weights_by_step()[1] == (100, {"train": 1.0, "code": 0.5, "prose": 0.5})
    again = train_config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# ---------------------------------------------------------------------------------------------
# Data and training


WORDS = {"alpha": "alpha beta gamma delta epsilon zeta eta theta".split(),
         "digits": "one two three four five six seven eight nine".split()}


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Two small languages, each as train files and a held-out folder; `digits` also as jsonl
    records whose text is in a field named body."""
    root = tmp_path_factory.mktemp("domains")
    rng = np.random.RandomState(0)
    for name, words in WORDS.items():
        for split, n in (("train", 16), ("held", 3)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"d{i:02d}.txt").write_text(
                    " ".join(" ".join(words[:rng.randint(3, 8)]) for _ in range(12)))
    with open(root / "digits.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"body": " ".join(WORDS["digits"][:3 + i % 5]) * 4, "id": i}) + "\n")
    return root


def _config(tmp_path, domains, data=None, **over):
    d = {"model": dict(TINY), "data": {"sources": [
            {"name": "alpha", "path": str(domains / "train" / "alpha"), "weight": 0.7},
            {"name": "digits", "path": str(domains / "train" / "digits"), "weight": 0.3}],
            "seq_len": 32, "num_proc": 1, "cache_dir": str(tmp_path.parent / "cache"), **(data or {})},
         "optim": {"learning_rate": 1e-2, "warmup_steps": 2}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
         "run_dir": str(tmp_path / "run"), "steps": 8, "global_batch": 4, "log_every": 2, "eval_every": 4,
         "eval_batches": 1, "checkpoint_every": 4}
    d.update(over)
    return train_config_from_dict(d)


def _mesh():
    return solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def test_each_source_has_its_own_cache_and_text_field(tmp_path, domains, monkeypatch):
    cfg = _config(tmp_path, domains).data
    first = data.load_data(cfg)
    assert list(first.sources) == ["alpha", "digits"] and first.train is None
    assert first.sources["alpha"].cache.path != first.sources["digits"].cache.path
    calls = []
    original = data_cache._Tokenize.__call__
    monkeypatch.setattr(data_cache._Tokenize, "__call__", lambda self, batch: calls.append(self.field) or original(self, batch))
    more = DataConfig(**{**cfg.to_dict(), "sources": [*cfg.to_dict()["sources"], {
        "name": "records", "path": str(domains / "digits.jsonl"), "weight": 0.1, "text_field": "body"}]})
    second = data.load_data(more)
    assert set(calls) == {"body"}  # only the new source was tokenized, from its own field
    assert second.sources["alpha"].cache.path == first.sources["alpha"].cache.path
    assert second.sources["records"].cache.n_docs == 8
    text = second.describe()
    assert text.startswith("3 sources: alpha weight 0.636 (16 documents, ") and "records weight 0.0909 (8 documents" in text


def test_validation_fraction_holds_out_a_share_of_each_source(tmp_path, domains):
    d = data.load_data(_config(tmp_path, domains, data={"validation_fraction": 0.25}).data)
    assert list(d.held_out) == ["alpha", "digits"] and d.validation is None
    for name in d.sources:
        train, held = d.sources[name].doc_ids, d.held_out[name].doc_ids
        assert len(held) == 4 and len(train) == 12 and sorted([*train, *held]) == list(range(16))
        assert d.sources[name].cache.path == d.held_out[name].cache.path
    # Plain sources: one unnamed held-out set, exactly the documents solarjax has always held out.
    plain = data.load_data(DataConfig(sources=(str(domains / "train" / "alpha"),), seq_len=32, num_proc=1,
                                      cache_dir=str(tmp_path.parent / "cache"), validation_fraction=0.25))
    assert list(plain.held_out) == [""] and plain.validation is not None
    held = np.zeros(16, bool)
    held[np.random.default_rng([0, 1]).permutation(16)[:4]] = True
    np.testing.assert_array_equal(plain.validation.doc_ids, np.arange(16)[held])


def test_per_source_eval_losses_equal_an_independent_computation(tmp_path, domains):
    """eval_loss/NAME is each named held-out set's own mean next-token loss, eval_loss the mean over
    all held-out tokens together, each computed here again window by window."""
    validation = {name: str(domains / "held" / name) for name in WORDS}
    trainer = Trainer(_config(tmp_path, domains, data={"validation": validation}, global_batch=16), _mesh())
    result = trainer.evaluate(0)
    assert set(result) == {"eval_loss", "eval_perplexity", "eval_loss/alpha", "eval_loss/digits"}
    params, config = trainer.state["params"], trainer.model_config
    window_loss = jax.jit(lambda p, b: loss_and_count(config, p, b))  # one compile for every [1, T] window
    totals = {}
    for name, val in trainer.data.held_out.items():
        assert len(val) < 16  # fewer windows than a batch: the eval looks at all of them
        loss_sum = count = 0.0
        for i in range(len(val)):
            batch = data.stack_sequences([val.sequence(i)])  # [1, T]
            loss, n = window_loss(params, batch)
            loss_sum, count = loss_sum + float(loss) * float(n), count + float(n)
        totals[name] = (loss_sum, count)
        np.testing.assert_allclose(result[f"eval_loss/{name}"], loss_sum / count, rtol=1e-5)
    np.testing.assert_allclose(result["eval_loss"], sum(s for s, _ in totals.values()) / sum(c for _, c in totals.values()),
                               rtol=1e-5)
    assert result["eval_loss/alpha"] != result["eval_loss/digits"]


def test_tensorboard_tags_of_a_mixture():
    written = []

    class Writer:
        def add_scalar(self, tag, value, step):
            written.append(tag)
    tb = _TensorBoard.__new__(_TensorBoard)
    tb._writer = Writer()
    tb.write({"step": 4, "eval_loss": 1.0, "eval_loss/code": 2.0, "tokens/code": 128, "loss": 3.0})
    assert written == ["eval/loss", "eval/code/loss", "tokens/code", "train/loss"]


def _metrics(run: Path) -> list[dict]:
    timing = {"tokens_per_s", "model_tflops_per_s", "mfu"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run / "metrics.jsonl")]


SCHEDULED = {"mixture_schedule": [{"step": 4, "weights": {"alpha": 0.0, "digits": 1.0}}],
             "validation_fraction": 0.2}


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [False, True], ids=["cached", "streaming"])
def test_a_scheduled_mixture_trains_logs_tokens_per_source_and_resumes_exactly(tmp_path, domains, capsys, streaming,
                                                                                monkeypatch):
    """Weights 0.7/0.3 for steps 0-3, then digits alone: tokens/NAME at each log step follow the
    schedule; a run stopped at step 5, after the switch, and resumed equals a straight run. With
    digits streaming, the resume starts reading the stream where the checkpoint recorded it."""
    scheduled = dict(SCHEDULED)
    if streaming:
        scheduled = {"sources": [{"name": "alpha", "path": str(domains / "train" / "alpha"), "weight": 0.7},
                                 {"name": "digits", "path": str(domains / "train" / "digits"), "weight": 0.3,
                                  "streaming": True}],
                     "mixture_schedule": SCHEDULED["mixture_schedule"],
                     "validation": {name: str(domains / "held" / name) for name in WORDS}}
    straight = Trainer(_config(tmp_path / "a", domains, data=scheduled), _mesh())
    line = capsys.readouterr().err
    assert "mixture: 2 sources: alpha weight 0.7 (" in line and "digits weight 0.3 (" in line
    assert "from step 4: alpha 0, digits 1" in line and "held out: alpha " in line
    straight.run()
    first = Trainer(_config(tmp_path / "b", domains, data=scheduled), _mesh())
    first.run(until=5)  # past the switch: the resumed run must know what steps 0-4 drew from each source
    if not streaming:  # weights edited for steps already taken: refused, naming the step; from step 5 on: fine
        edited = {**scheduled, "mixture_schedule": [{"step": 3, "weights": {"alpha": 0, "digits": 1}}]}
        with pytest.raises(ConfigError, match=r"trained step 3 on the mixture alpha 0\.7, digits 0\.3, and this "
                                              r"config gives digits 1 there.*entry \{step: 5, weights"), \
                monkeypatch.context() as m:
            m.setattr(data, "load_data", _no_data)  # refused before the corpus is tokenized
            Trainer(_config(tmp_path / "b", domains, data=edited), _mesh())
        later = SCHEDULED["mixture_schedule"] + [{"step": 6, "weights": {"alpha": 1, "digits": 1}}]
        Trainer(_config(tmp_path / "b", domains, data={**scheduled, "mixture_schedule": later}), _mesh())._lock.release()
    resumed = Trainer(_config(tmp_path / "b", domains, data=scheduled), _mesh())
    assert int(resumed.state["step"]) == 5
    resumed.run()
    if streaming:
        recorded = json.loads((tmp_path / "b" / "run" / "streams.json").read_text())["5"]["digits"]
        assert recorded[0] == 5 + 4 and resumed.batches.packed[1].started_at == recorded[0]
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    a, b = _metrics(tmp_path / "a" / "run"), _metrics(tmp_path / "b" / "run")
    assert [r for r in b if r["step"] != 5] == a  # b also logged where it stopped
    T = 32
    tokens = {r["step"]: (r["tokens/alpha"], r["tokens/digits"]) for r in a if "loss" in r}
    # Steps 0-3 deal 16 rows 0.7/0.3 (11/5 over the segment, 3/1 at the first step); then digits only.
    assert tokens == {2: (6 * T, 2 * T), 4: (11 * T, 5 * T), 6: (11 * T, 13 * T), 8: (11 * T, 21 * T)}
    evals = [r for r in a if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8] and all({"eval_loss/alpha", "eval_loss/digits"} <= set(r) for r in evals)


def test_a_streaming_source_gives_the_windows_of_its_cache(tmp_path, domains):
    """`streaming: true`: the same documents opened by datasets in streaming mode and tokenized by a
    background thread give the windows a token cache of them gives, in order, pass after pass;
    no more than `ahead` windows ever wait in memory."""
    cached = data.load_data(_config(tmp_path, domains).data).sources["digits"]
    for name, path, field in (("digits", domains / "train" / "digits", None), ("records", domains / "digits.jsonl", "body")):
        src = {"name": name, "path": str(path), "streaming": True, **({"text_field": field} if field else {})}
        d = data.load_data(_config(tmp_path, domains, data={"sources": [src]}).data)
        stream = d.sources[name]
        assert isinstance(stream, data.StreamedWindows) and isinstance(d.batches(4, 0), Mixture)
        stream.ahead = 3
        if name == "records":  # the jsonl's body field against a cache of it
            cached = data.load_data(_config(tmp_path, domains, data={"sources": [{**src, "streaming": False}]}).data).train
        n = len(cached)
        for u in range(2 * n + 3):
            for got, want in zip(stream.sequence(u), cached.sequence(u % n)):
                np.testing.assert_array_equal(got, want)
        assert stream.max_waiting <= 3
        # The producer reads ahead until `ahead` windows wait, and no further (bounded memory); how
        # many wait while the consumer reads depends on timing, so wait here for the queue to fill.
        deadline = time.monotonic() + 20
        while stream._queue.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert stream._queue.qsize() == 3
        stream.close()  # and opened again where it stood (the windows it read lately), not from the start
        np.testing.assert_array_equal(stream.sequence(2 * n + 3)[0], cached.sequence((2 * n + 3) % n)[0])
        assert stream.started_at == 2 * n + 3
        stream.close()


def test_a_streaming_text_file_that_is_not_utf8_is_skipped_as_the_cache_skips_it(tmp_path, capsys):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("one two three four five six seven eight nine ten " * 3)
    (folder / "b.txt").write_bytes(b"caf\xe9 au lait " * 10)
    (folder / "c.txt").write_bytes(b"windows\r\nline endings\r\n" * 6)
    src = {"name": "texts", "path": str(folder)}
    cfg = lambda streaming: _config(tmp_path, tmp_path, data={"sources": [{**src, "streaming": streaming}]}).data
    cached = data.load_data(cfg(False)).train
    stream = data.load_data(cfg(True)).sources["texts"]
    for u in range(2 * len(cached) + 1):
        for got, want in zip(stream.sequence(u), cached.sequence(u % len(cached))):
            np.testing.assert_array_equal(got, want)
    stream.close()
    assert capsys.readouterr().err.count(f"warning: skipped {folder / 'b.txt'} (byte 3): not UTF-8") == 1


def test_a_streaming_source_resumes_from_its_recorded_position(tmp_path, domains):
    """A mixture with a streaming source, rebuilt at step 7 (a resume) and told where the stream
    stood at that step (the checkpoint's record), starts reading there and gives the same batches;
    told nothing, it reads its way from the start, with the same result. Two processes together
    build the same batches."""
    cfg = _config(tmp_path, domains, data={"sources": [
        {"name": "alpha", "path": str(domains / "train" / "alpha"), "weight": 0.5},
        {"name": "digits", "path": str(domains / "train" / "digits"), "weight": 0.5, "streaming": True}]}).data
    straight = data.load_data(cfg).batches(4, seed=0)
    want = [straight.batch(step) for step in range(16)]  # two passes over the digits stream (32 windows)
    record = straight.positions(7)
    assert record["digits"][0] == straight.drawn(7)[1] == 14
    for seek in (True, False):
        resumed = data.load_data(cfg).batches(4, seed=0)
        if seek:
            resumed.seek(json.loads(json.dumps(record)))
        for step in range(7, 16):
            for key, value in resumed.batch(step).items():
                np.testing.assert_array_equal(value, want[step][key])
        assert resumed.packed[1].started_at == (14 if seek else 0)
        resumed.packed[1].close()
    straight.packed[1].close()
    # Two processes: each reads the whole stream in order and keeps its own rows.
    parts = [data.load_data(cfg).batches(4, seed=0, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(10):
        got = [part.batch(step) for part in parts]
        for key in want[step]:
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[step][key])
    for part in parts:
        part.close()


def test_stream_positions_survive_a_step_that_reads_more_windows_than_the_stream_remembers(
        tmp_path, domains, monkeypatch):
    """The position a checkpoint records is taken when the step's batch is built: a stream that
    gives a step more rows than it keeps window starts for (HISTORY) still has one, and a resume
    from it gives the straight run's batches."""
    monkeypatch.setattr(data.StreamedWindows, "HISTORY", 2)
    cfg = _config(tmp_path, domains, data={"sources": [
        {"name": "alpha", "path": str(domains / "train" / "alpha"), "weight": 0.25},
        {"name": "digits", "path": str(domains / "train" / "digits"), "weight": 0.75, "streaming": True}]}).data
    straight = data.load_data(cfg).batches(8, seed=0)  # 6 digits rows a step, 3x HISTORY
    want = [straight.batch(step) for step in range(9)]
    record = straight.positions(5)
    assert record["digits"][0] == straight.drawn(5)[1] == 30
    resumed = data.load_data(cfg).batches(8, seed=0)
    resumed.seek(json.loads(json.dumps(record)))
    for step in range(5, 9):
        for key, value in resumed.batch(step).items():
            np.testing.assert_array_equal(value, want[step][key])
    assert resumed.packed[1].started_at == 30
    for m in (straight, resumed):
        m.close()


def test_equal_mixtures_deal_equally_and_any_ratio_is_dealt_exactly():
    """0.6/0.3/0.1 and 6/3/1 are one mixture: the same rows at every step (float noise once broke
    their ties differently), and the resume check sees them as equal. Weights a hundred orders of
    magnitude apart are dealt (the float bisection never returned)."""
    a, b = _mixture((0.6, 0.3, 0.1)), _mixture((6, 3, 1))
    assert all(a.global_rows(step) == b.global_rows(step) for step in range(60))
    assert seats([0.7, 0.3], 15).tolist() == [11, 4]  # the 11th seat of 0.7 and the 5th of 0.3 tie at 30
    assert seats([1, 1e-300], 10).tolist() == [10, 0]
    assert seats([1e-300, 1], 10).tolist() == [0, 10]
    old = DataConfig(sources=(SourceConfig("a", ("x",), 0.6), SourceConfig("b", ("y",), 0.3),
                              SourceConfig("c", ("z",), 0.1)))
    same = DataConfig(sources=(SourceConfig("a", ("x",), 6), SourceConfig("b", ("y",), 3),
                               SourceConfig("c", ("z",), 1)))
    other = DataConfig(sources=(SourceConfig("a", ("x",), 0.6), SourceConfig("b", ("y",), 0.3),
                                SourceConfig("c", ("z",), 0.1000001)))
    data.check_mixture_resume(old, same, 10, "run")
    with pytest.raises(ConfigError, match="trained step 0 on the mixture"):
        data.check_mixture_resume(old, other, 10, "run")


def test_a_mixture_source_with_no_windows_is_a_data_error():
    with pytest.raises(data.DataError, match="source s1 has no windows to train on"):
        _mixture((0.5, 0.5), sizes=[50, 0])
    _mixture((1.0, 0.0), sizes=[50, 0])  # never drawn: no error


@pytest.mark.slow
def test_a_mixture_run_killed_with_sigkill_resumes_bit_identical(tmp_path, domains):
    """train.py on a scheduled mixture, killed with SIGKILL once it saved step 2 (no handler runs),
    then the same command: every logged number (tokens/NAME, per-source eval losses) and the final
    parameters equal an uninterrupted run's."""
    steps = 24
    over = {"steps": steps, "log_every": 1, "checkpoint_every": 2, "eval_every": 8}
    data_over = {**SCHEDULED, "mixture_schedule": [{"step": 10, "weights": {"alpha": 0.2, "digits": 0.8}}]}
    config = tmp_path / "killed.yaml"
    config.write_text(json.dumps(_config(tmp_path / "killed", domains, data=data_over, **over).to_dict()))
    job = [sys.executable, str(ROOT / "train.py"), "--config", str(config)]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = tmp_path / "killed" / "run"
    at = sigkill_after_checkpoint(job, env, run / "checkpoints", 2, timeout=120)
    assert 2 <= at < steps and not (run / "final").exists()
    with open(tmp_path / "resumed.err", "w") as err:
        resumed = subprocess.Popen(job, stderr=err, env=env)
    try:
        straight = Trainer(_config(tmp_path / "straight", domains, data=data_over, **over), _mesh())
        straight.run()
        resumed.wait(timeout=180)
    finally:
        resumed.kill()
    stderr = (tmp_path / "resumed.err").read_text()
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from its checkpoint of step {at}" in stderr
    expected = _metrics(tmp_path / "straight" / "run")
    assert [r["step"] for r in expected if "loss" in r] == list(range(1, steps + 1))
    assert _metrics(run) == expected
    _, final = solarjax.load_model(run / "final")
    for a, b in zip(jax.tree.leaves(straight.state["params"]), jax.tree.leaves(final), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_recipe_summary_and_table_give_per_source_losses(tmp_path):
    """summary.json's stages carry each held-out set's loss before the first step and after the
    last; the table prints them as `init -> end`, so forgetting is a number."""
    from solarjax.train import recipe as recipe_lib
    from solarjax.weights import checkpoint as ckpt_lib
    rec = recipe_config_from_dict({"run_dir": str(tmp_path), "model": {"preset": "tiny"}, "steps": 4,
                                   "stages": {"base": {}}})
    stage = tmp_path / "base"
    stage.mkdir()
    solarjax.preset("tiny").save(stage / ckpt_lib.CONFIG_FILE)
    rows = [{"step": 0, "eval_loss": 3.0, "eval_loss/code": 2.5, "eval_loss/prose": 3.5},
            {"step": 2, "loss": 2.0}, {"step": 4, "eval_loss": 2.0, "eval_loss/code": 1.0, "eval_loss/prose": 3.75}]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage / recipe_lib.DONE_FILE).write_text(json.dumps({"steps": 4, "seconds": 1.0}))
    summary = recipe_lib.summarize(rec)
    s = summary["stages"]["base"]
    assert s["eval_loss_by_source_at_init"] == {"code": 2.5, "prose": 3.5}
    assert s["eval_loss_by_source_final"] == {"code": 1.0, "prose": 3.75}
    table = recipe_lib.format_table(summary)
    assert "base held-out loss by source: code 2.5000 -> 1.0000, prose 3.5000 -> 3.7500" in table
    assert "loss/code" not in table.replace("held-out loss by source", "")
