"""The data pipeline: tokenizer, token cache, packing, deterministic multi-process batches, errors."""

import json

import numpy as np
import pytest

from solarjax import data
from solarjax.data import cache as data_cache
from solarjax.data.config import DataConfig, SourceConfig
from solarjax.data.corpus import default_corpus_files
from solarjax.data.packing import PackedSequences
from solarjax.data.sources import DataError
from solarjax.errors import ConfigError
from solarjax.tokenizer import TokenizerError, load_tokenizer

SENTENCE = "Depth up-scaling grows a model."


def test_mistral_tokenizer_ids_match_mistral_common():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    tok = load_tokenizer()
    ids = tok.encode(SENTENCE, bos=True, eos=True)
    assert tok.vocab_size == 32000 and ids[0] == 1 and ids[-1] == 2
    assert ids == MistralTokenizer.v1().instruct_tokenizer.tokenizer.encode(SENTENCE, bos=True, eos=True)
    assert tok.decode(ids[1:-1]) == SENTENCE


def _write_docs(tmp_path, docs, name="corpus"):
    folder = tmp_path / name
    folder.mkdir()
    for i, text in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(text)
    return folder


def _cfg(tmp_path, sources, **kw):
    return DataConfig(sources=tuple(str(s) for s in sources), cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.RandomState(0)
    words = "the model grows by depth and keeps training on text from many sources".split()
    docs = [" ".join(rng.choice(words, n)) for n in (3, 40, 7, 200, 1, 25, 90, 12, 60, 5)]
    return _write_docs(tmp_path, docs), docs


def test_packing_loses_and_duplicates_no_token(corpus, tmp_path):
    folder, docs = corpus
    d = data.load_data(_cfg(tmp_path, [folder], seq_len=32))
    tok = d.tokenizer
    expected = np.concatenate([tok.encode(t, bos=True, eos=True) for t in docs])  # files load in sorted order
    packed = d.train
    seqs = [packed.sequence(i) for i in range(len(packed))]
    got = np.concatenate([t[s > 0] for t, s, _ in seqs])
    np.testing.assert_array_equal(got, expected)
    assert len(packed) == -(-len(expected) // 32)
    # The 200-word document is longer than seq_len: split over windows, not dropped.
    assert max(len(tok.encode(t)) for t in docs) > 32


def test_segments_and_positions_restart_at_document_boundaries(tmp_path):
    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    tokens = np.arange(1, 24, dtype=np.uint16)  # docs of 5, 10, 8 tokens
    tokens.tofile(cache_dir / "tokens.bin")
    np.save(cache_dir / "offsets.npy", np.array([0, 5, 15, 23]))
    (cache_dir / "meta.json").write_text(json.dumps({"dtype": "uint16"}))
    packed = PackedSequences(data.TokenCache(cache_dir), np.arange(3), seq_len=8)
    assert len(packed) == 3
    t, s, p = packed.sequence(0)
    np.testing.assert_array_equal(t, [1, 2, 3, 4, 5, 6, 7, 8])
    np.testing.assert_array_equal(s, [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(p, [0, 1, 2, 3, 4, 0, 1, 2])
    t, s, p = packed.sequence(1)  # doc 1 continues: a new segment whose positions restart
    np.testing.assert_array_equal(s, [1, 1, 1, 1, 1, 1, 1, 2])
    np.testing.assert_array_equal(p, [0, 1, 2, 3, 4, 5, 6, 0])
    t, s, p = packed.sequence(2)  # the last window is padded with segment 0
    np.testing.assert_array_equal(t, [17, 18, 19, 20, 21, 22, 23, 0])
    np.testing.assert_array_equal(s, [1, 1, 1, 1, 1, 1, 1, 0])


def test_two_processes_split_the_global_batch(corpus, tmp_path):
    folder, _ = corpus
    loaded = data.load_data(_cfg(tmp_path, [folder], seq_len=8))
    whole = loaded.batches(global_batch=4, seed=7)
    parts = [loaded.batches(global_batch=4, seed=7, process_index=p, process_count=2) for p in (0, 1)]
    for step in (0, 1, len(loaded.train) // 4 + 3):
        a, b = (part.batch(step) for part in parts)
        assert set(parts[0].rows(step)).isdisjoint(parts[1].rows(step))
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), whole.batch(step)[key])
            assert a[key].shape == (2, 8) and a[key].dtype == np.int32


def test_resuming_at_step_k_gives_the_same_batches(corpus, tmp_path):
    folder, _ = corpus
    loaded = data.load_data(_cfg(tmp_path, [folder], seq_len=8))
    n = len(loaded.train)
    batches = loaded.batches(global_batch=3, seed=1)
    k = n // 3 - 2  # the resumed stretch crosses an epoch boundary
    it = iter(batches)
    run = [next(it) for _ in range(k + 5)]
    resumed = loaded.batches(global_batch=3, seed=1).iterate(k)
    for want in run[k:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    # Each epoch draws every window once, in a new order.
    windows = [w for step in range(-(-2 * n // 3)) for _, w in batches.global_rows(step)]
    assert sorted(windows[:n]) == list(range(n)) and sorted(windows[n:2 * n]) == list(range(n))
    assert windows[:n] != windows[n:2 * n]


def test_one_source_deals_as_a_mixture_that_adds_a_source_at_weight_zero(corpus, tmp_path):
    """Adding a second source at weight 0 (switched on at a later step, as the resume check
    suggests) leaves the first source's windows as they were, past its first epochs."""
    folder, _ = corpus
    one = data.load_data(_cfg(tmp_path, [folder], seq_len=8))
    extra = SourceConfig("extra", (str(folder),), weight=0.0)
    two = data.load_data(DataConfig(sources=(str(folder), extra), cache_dir=str(tmp_path / "cache"), num_proc=1,
                                    seq_len=8))
    a, b = one.batches(global_batch=3, seed=5), two.batches(global_batch=3, seed=5)
    steps = 3 * len(one.train) // 3 + 2  # three epochs and a bit
    for step in range(steps):
        assert a.global_rows(step) == b.global_rows(step), step


def test_cache_is_reused_without_tokenizing(corpus, tmp_path, monkeypatch):
    folder, _ = corpus
    cfg = _cfg(tmp_path, [folder], seq_len=16)
    first = data.load_data(cfg).train.cache

    def boom(self, batch):
        raise AssertionError("tokenized again")
    monkeypatch.setattr(data_cache._Tokenize, "__call__", boom)
    second = data.load_data(cfg).train.cache
    assert second.path == first.path
    np.testing.assert_array_equal(second.tokens, first.tokens)
    (folder / "doc000.txt").write_text("a changed document")  # new inputs, new cache
    with pytest.raises(AssertionError, match="tokenized again"):
        data.load_data(cfg)


def test_parallel_tokenization_equals_serial(corpus, tmp_path):
    """num_proc=2 in a fresh interpreter: datasets.map forks, which JAX's threads make unsafe here."""
    import subprocess
    import sys
    folder, _ = corpus
    serial = data.load_data(_cfg(tmp_path / "a", [folder], seq_len=16)).train.cache
    code = ("import sys; from solarjax import data; from solarjax.train.config import DataConfig; "
            "c = data.load_data(DataConfig(sources=(sys.argv[1],), cache_dir=sys.argv[2], num_proc=2)).train.cache; "
            "print(c.path)")
    run = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "b")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    parallel = data.TokenCache(run.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(parallel.tokens, serial.tokens)
    np.testing.assert_array_equal(parallel.offsets, serial.offsets)


# One "host" of a pod. Its pid equals the others' (pids repeat across hosts), and it stops before
# its last writes until every host is there, so all publish at the same moment: the worst case.
_HOST = """
import os, sys, time
from pathlib import Path
import numpy as np
os.getpid = lambda: 7
from solarjax import data
from solarjax.data.config import DataConfig
from solarjax.tokenizer import load_tokenizer
corpus, cache_dir, barrier, me, hosts = sys.argv[1:]
save = np.save

def save_together(file, array):
    (Path(barrier) / me).touch()
    deadline = time.time() + 60
    while len(os.listdir(barrier)) < int(hosts) and time.time() < deadline:
        time.sleep(0.005)
    save(file, array)

np.save = save_together
cfg = DataConfig(sources=(corpus,), cache_dir=cache_dir, num_proc=1)
print(data.build_cache(cfg.sources, cfg, load_tokenizer()).path)
"""


@pytest.mark.slow
def test_hosts_racing_on_one_shared_cache_all_succeed(corpus, tmp_path):
    import subprocess
    import sys
    folder, _ = corpus
    (tmp_path / "barrier").mkdir()
    hosts = 3
    runs = [subprocess.Popen([sys.executable, "-c", _HOST, str(folder), str(tmp_path / "cache"),
                              str(tmp_path / "barrier"), str(i), str(hosts)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(hosts)]
    results = [(run.communicate(timeout=300), run.returncode) for run in runs]
    for (out, err), code in results:
        assert code == 0, err[-3000:]
    paths = {out.strip().splitlines()[-1] for (out, _), _ in results}
    assert len(paths) == 1
    cache = data.TokenCache(paths.pop())
    serial = data.load_data(_cfg(tmp_path / "serial", [folder])).train.cache
    np.testing.assert_array_equal(cache.tokens, serial.tokens)
    np.testing.assert_array_equal(cache.offsets, serial.offsets)
    assert not list((tmp_path / "cache").glob(".*.tmp-*"))  # the losers discarded their own copies


def test_json_parquet_csv_and_saved_datasets(tmp_path):
    import datasets
    rows = [{"body": f"document number {i} " * (i + 1), "id": i} for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:2]))
    datasets.Dataset.from_list(rows[2:4]).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_list(rows[4:]).to_csv(str(tmp_path / "c.csv"), index=False)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    tok = load_tokenizer()
    want = sorted(tuple(tok.encode(r["body"], eos=True)) for r in rows)
    for sources in ([tmp_path / "a.jsonl", tmp_path / "b.parquet", tmp_path / "c.csv"], [tmp_path / "saved"],
                    [str(tmp_path / "*.jsonl"), str(tmp_path / "*.parquet"), str(tmp_path / "*.csv")]):
        cache = data.load_data(_cfg(tmp_path, sources, text_field="body")).train.cache
        assert sorted(tuple(cache.doc(i)) for i in range(cache.n_docs)) == want


def test_validation_split(corpus, tmp_path):
    folder, docs = corpus
    d = data.load_data(_cfg(tmp_path, [folder], seq_len=8, validation_fraction=0.3))
    assert len(d.validation.doc_ids) == 3 and len(d.train.doc_ids) == 7
    assert sorted(np.concatenate([d.train.doc_ids, d.validation.doc_ids])) == list(range(10))
    own = _write_docs(tmp_path, ["held out text one", "held out text two"], name="val")
    d = data.load_data(_cfg(tmp_path, [folder], seq_len=8, validation=(str(own),)))
    assert d.validation.cache.n_docs == 2 and d.train.cache.n_docs == 10


def test_non_utf8_bytes_are_skipped_and_counted(corpus, tmp_path, capsys):
    folder, _ = corpus
    (folder / "zz_bad.txt").write_bytes(b"valid start \xff\xfe not utf-8")
    cache = data.load_data(_cfg(tmp_path, [folder], seq_len=8)).train.cache
    assert cache.meta["skipped"]["not_utf8"] == 1 and cache.n_docs == 10
    assert "skipped 1 documents with bytes that are not UTF-8" in capsys.readouterr().err


def test_replacement_character_is_text_not_an_encoding_error(tmp_path, capsys):
    """U+FFFD in valid UTF-8 is kept from every kind of source; only undecodable bytes are skipped."""
    import datasets
    text = "caf\ufffd: a decoder wrote U+FFFD here once; the file itself is valid UTF-8"
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_bytes(text.encode())
    (tmp_path / "txt" / "b.txt").write_bytes(b"caf\xe9 in Latin-1, not UTF-8")
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": text}) + "\n")
    datasets.Dataset.from_list([{"text": text}]).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list([{"text": text}]).to_csv(str(tmp_path / "a.csv"), index=False)
    want = load_tokenizer().encode(text, bos=True, eos=True)
    cache = data.load_data(_cfg(tmp_path, [tmp_path / "txt"])).train.cache
    assert cache.n_docs == 1 and list(cache.doc(0)) == want and cache.meta["skipped"]["not_utf8"] == 1
    assert f"{tmp_path / 'txt' / 'b.txt'} (byte 3)" in capsys.readouterr().err  # names the file and byte
    for name in ("a.jsonl", "a.parquet", "a.csv"):
        cache = data.load_data(_cfg(tmp_path, [tmp_path / name])).train.cache
        assert cache.n_docs == 1 and list(cache.doc(0)) == want, name
    with pytest.raises(DataError, match=r"no document has any text \(0 empty, 1 not UTF-8: .*b.txt \(byte 3\)"):
        data.load_data(_cfg(tmp_path, [tmp_path / "txt" / "b.txt"]))


def test_builtin_corpus_is_several_megabytes():
    files = default_corpus_files()
    assert len(files) > 100 and sum(f.stat().st_size for f in files) > 3_000_000
    assert data.resolve_sources(()) == [data.Source("files", "text", tuple(str(f) for f in files))]


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "missing.txt: no such file or directory"),
    ("*.nothing", None, "*.nothing: no file matches this pattern"),
    ("notes.docx", "x", "unknown file type '.docx'"),
    ("empty.jsonl", "", "empty.jsonl"),
    ("blank.txt", "  \n", "no document has any text (1 empty"),
    ("rows.jsonl", '{"content": "x"}', "no text field 'text'; columns are ['content']"),
])
def test_bad_sources_are_named(name, content, message, tmp_path):
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        data.load_data(_cfg(tmp_path, [tmp_path / name]))
    assert message in str(e.value)


def test_vocab_mismatch_names_both_sizes(corpus, tmp_path):
    folder, _ = corpus
    with pytest.raises(TokenizerError, match="has 32000 tokens, more than the vocab of 128"):
        data.load_data(_cfg(tmp_path, [folder]), vocab_size=128)


@pytest.mark.parametrize("kw, message", [
    (dict(seq_len=1), "data.seq_len must be an integer >= 2"),
    (dict(validation_fraction=1.0), "data.validation_fraction must be in [0, 1)"),
    (dict(validation=("a",), validation_fraction=0.1), "not both"),
])
def test_bad_data_config(kw, message):
    with pytest.raises(ConfigError) as e:
        DataConfig(**kw)
    assert message in str(e.value)


def test_batches_reject_too_little_data(corpus, tmp_path):
    folder, _ = corpus
    loaded = data.load_data(_cfg(tmp_path, [folder], seq_len=512))
    with pytest.raises(DataError, match=r"has \d sequences of 512 tokens, fewer than one global batch of 4"):
        loaded.batches(global_batch=4, seed=0)
    with pytest.raises(DataError, match="global batch 3 must be a positive multiple of the process count 2"):
        loaded.batches(global_batch=3, seed=0, process_count=2)


def test_tokenizer_from_a_model_directory(tmp_path):
    import shutil

    from hf_models import tokenizer_file
    (tmp_path / "hf").mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model in this directory"):
        load_tokenizer(tmp_path / "hf")
    shutil.copy(tokenizer_file(), tmp_path / "hf" / "tokenizer.model")
    assert load_tokenizer(tmp_path / "hf").encode(SENTENCE) == load_tokenizer().encode(SENTENCE)
    (tmp_path / "junk.model").write_text("not a model")
    with pytest.raises(TokenizerError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")


def test_local_files_show_no_downloading_bar(tmp_path, capfd):
    """datasets draws a "Downloading data" bar for 16+ local files; nothing is downloaded, so none."""
    folder = _write_docs(tmp_path, [f"document number {i}" for i in range(20)])
    d = data.load_data(_cfg(tmp_path, [folder], seq_len=8))
    assert len(d.train) > 0
    err = capfd.readouterr().err
    assert "Downloading" not in err
    from datasets import utils as bars
    assert not bars.are_progress_bars_disabled()  # switched back on for what follows
