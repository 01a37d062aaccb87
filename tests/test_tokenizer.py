"""One Tokenizer over tokenizer.json and SentencePiece: ids, text, special ids and chat templates equal
transformers' AutoTokenizer from the same directory; the token cache, training, sampling and export
use the model's own tokenizer and special ids."""

import json
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import transformers

from solarjax import data
from solarjax.data.config import DataConfig
from solarjax.data.corpus import default_corpus_files
from solarjax.tokenizer import TokenizerError, load_tokenizer, resolve_tokenizer

from hf_models import (
    make_bpe_tokenizer,
    make_chatml_sentencepiece,
    make_mistral_sentencepiece,
    make_mistral_tokenizer_json,
)

UNICODE = ["", " ", "hello world", "  two leading spaces", "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",
           "深度学习 和 日本語のテキスト", "한국어 텍스트", "e\u0301 n\u0303 combining marks, and precomposed \u00e9",
           "tabs\tand\nnew\n\nlines  \n", "Ünïcödé ß ﬁ ligature", "math ∑∫√ and arrows →⇒", "\u200bzero width"]
SPECIAL_TEXT = ["<s>[INST] hi [/INST]</s>", "a<s>b</s> c", "text <|eot_id|> more <|end_of_text|>", "<unk>",
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>"]


def _corpus_sample(n=12, chars=1500):
    return [f.read_text(errors="replace")[:chars] for f in default_corpus_files()[20:20 + n]]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return {"bpe": make_bpe_tokenizer(root / "bpe"), "mistral-json": make_mistral_tokenizer_json(root / "mj"),
            "sentencepiece": make_mistral_sentencepiece(root / "sp")}


@pytest.mark.parametrize("kind", ["bpe", "mistral-json", "sentencepiece"])
def test_ids_and_text_equal_transformers(dirs, kind):
    ours, theirs = load_tokenizer(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
    assert ours.path.name == ("tokenizer.model" if kind == "sentencepiece" else "tokenizer.json")
    assert ours.vocab_size == len(theirs)
    texts = _corpus_sample() + UNICODE + SPECIAL_TEXT
    if kind == "sentencepiece":
        # transformers converts a .model to a tokenizers BPE that merges runs of spaces differently
        # ("a  b": ▁▁ b, where SentencePiece and mistral-common give ▁ ▁b); we keep SentencePiece,
        # which the model was trained with, so runs of spaces (a leading one counts: the dummy
        # prefix adds one) are left out of this comparison.
        assert load_tokenizer(dirs[kind]).encode("a  b", bos=False) == [264, 28705, 287]
        # Likewise after a control token: SentencePiece prefixes " c" in "</s> c" as "▁▁c".
        texts = [re.sub("  +", " ", t).lstrip(" ") for t in texts if not re.search("(<s>|</s>) ", t)]
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs.encode(text), text
        assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
        if kind != "sentencepiece":
            assert ours.decode(ids) == theirs.decode(ids), text
        else:  # special tokens written out, the text after them as SentencePiece decodes it (no space added)
            assert ours.decode(ids) == "<s>" + ours.decode(ids[1:]) and ours.decode(ids[1:]) == text, text
    assert ours.encode_batch(texts[:3], eos=True) == [theirs.encode(t) + [theirs.eos_token_id] for t in texts[:3]]


@pytest.mark.parametrize("kind", ["bpe", "mistral-json", "sentencepiece"])
def test_special_ids_equal_transformers(dirs, kind):
    ours, theirs = load_tokenizer(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id)
    assert ours.add_bos == (theirs.encode("x")[:1] == [theirs.bos_token_id])
    if kind == "bpe":  # Llama 3's ids: special tokens past the vocabulary, several stop ids
        assert ours.bos_id == 300 and ours.eos_id == 304 and ours.pad_id == 305 and ours.add_bos
        assert ours.eos_ids == [304, 301]  # the tokenizer's eos, then generation_config.json's others
    else:
        assert (ours.bos_id, ours.eos_ids, ours.add_bos) == (1, [2], True)


def test_no_bos_token_and_an_eos_adding_post_processor(dirs, tmp_path):
    """A model without a BOS token (Qwen-like): bos_id None, nothing prepended, as transformers."""
    d = shutil.copytree(dirs["bpe"], tmp_path / "nobos")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["bos_token"] = None
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "special_tokens_map.json").unlink()
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (d / "tokenizer.json").write_text(json.dumps(tok))
    ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.bos_id is None is theirs.bos_token_id and not ours.add_bos and ours.pad_id is None
    assert ours.encode("hello", bos=True) == theirs.encode("hello") == theirs.encode("hello", add_special_tokens=False)
    # A post-processor that appends EOS too (add_eos_token models): encode() does what it does.
    eot = {"id": "<|eot_id|>", "ids": [304], "tokens": ["<|eot_id|>"]}
    tok["post_processor"] = {"type": "TemplateProcessing", "pair": [], "special_tokens": {"<|eot_id|>": eot},
                             "single": [{"Sequence": {"id": "A", "type_id": 0}},
                                        {"SpecialToken": {"id": "<|eot_id|>", "type_id": 0}}]}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.add_eos and ours.encode("hello") == theirs.encode("hello") and ours.encode("hello")[-1] == 304


def test_chat_template_ids_equal_transformers(dirs, tmp_path):
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime. 🤖"},
            {"role": "assistant", "content": " 7 "}, {"role": "user", "content": "Another, in 日本語? <b>&'"}]
    for kind, messages in (("bpe", chat), ("mistral-json", chat[1:]), ("sentencepiece", chat[1:])):
        ours, theirs = load_tokenizer(dirs[kind]), transformers.AutoTokenizer.from_pretrained(dirs[kind])
        for gen in (False, True):
            want = theirs.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want, (kind, gen)
    ids = load_tokenizer(dirs["bpe"]).apply_chat_template(chat, add_generation_prompt=True)
    assert ids[0] == 300 and ids.count(304) == 4  # one BOS from the template, an <|eot_id|> per turn
    with pytest.raises(TokenizerError, match="Conversation roles must alternate"):
        load_tokenizer(dirs["mistral-json"]).apply_chat_template(chat)  # its template's raise_exception
    # A multi-line ChatML template in chat_template.jinja, where trim_blocks/lstrip_blocks matter,
    # `tools` is None (not undefined) and tojson keeps 日本語 and <> as they are.
    d = shutil.copytree(dirs["bpe"], tmp_path / "chatml")
    (d / "chat_template.jinja").write_text(
        "{% if tools is not none %}\n<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}\n"
        "{% for message in messages %}\n    {% if message['role'] == 'user' %}\n{{ message | tojson }}\n    {% endif %}\n"
        "    {% if loop.first and message['role'] != 'system' %}\n"
        "<|im_start|>system\nYou are helpful.<|im_end|>\n    {% endif %}\n"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}\n"
        "{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}\n")
    ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    for messages in (chat, chat[1:]):
        want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == want
    with pytest.raises(TokenizerError, match="has no chat template"):
        load_tokenizer().apply_chat_template(chat)


def test_resolution_pickling_and_errors(dirs, tmp_path):
    both = shutil.copytree(dirs["mistral-json"], tmp_path / "both")
    shutil.copy(dirs["sentencepiece"] / "tokenizer.model", both)
    assert load_tokenizer(both).path.name == "tokenizer.json"  # preferred, as transformers' fast tokenizers
    assert load_tokenizer(dirs["bpe"] / "tokenizer.json").eos_ids == [304, 301]  # a file reads its directory
    assert resolve_tokenizer(None, dirs["bpe"]).path == dirs["bpe"] / "tokenizer.json"
    assert resolve_tokenizer(None, tmp_path).path == load_tokenizer().path  # no tokenizer there: Mistral's
    assert resolve_tokenizer(str(dirs["sentencepiece"]), dirs["bpe"]).path.name == "tokenizer.model"
    for d in dirs.values():  # datasets.map workers get a pickled copy
        tok = load_tokenizer(d)
        copy = pickle.loads(pickle.dumps(tok))
        assert copy.encode(UNICODE[4]) == tok.encode(UNICODE[4]) and copy.eos_ids == tok.eos_ids
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model in this directory"):
        load_tokenizer(tmp_path / "both" / ".." / "..")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_vocab_that_does_not_fit_is_refused_naming_both_sizes(dirs, tmp_path):
    with pytest.raises(TokenizerError, match=r"has 306 tokens, more than the vocab of 128"):
        load_tokenizer(dirs["bpe"]).check_fits(128)
    cfg = DataConfig(sources=(str(default_corpus_files()[0]),), cache_dir=str(tmp_path / "c"), num_proc=1)
    with pytest.raises(TokenizerError, match=r"has 32000 tokens, more than the vocab of 306"):
        data.load_data(cfg, vocab_size=306)  # the default Mistral tokenizer for a small model
    load_tokenizer(dirs["bpe"]).check_fits(306)


def test_token_cache_uses_the_model_tokenizer_and_its_settings(dirs, tmp_path):
    docs = ["The cache holds ids. 深度 🤖", "A second <|eot_id|> document.", "third"]
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(docs):
        (folder / f"d{i}.txt").write_text(text)
    cfg = DataConfig(sources=(str(folder),), cache_dir=str(tmp_path / "cache"), num_proc=1, seq_len=16)
    d = data.load_data(cfg, model_dir=str(dirs["bpe"]))
    theirs = transformers.AutoTokenizer.from_pretrained(dirs["bpe"])
    cache = d.train.cache
    assert [cache.doc(i).tolist() for i in range(cache.n_docs)] == [theirs.encode(t) + [304] for t in docs]
    assert theirs.decode(cache.doc(0), skip_special_tokens=True) == docs[0]
    # datasets.map workers (num_proc=2) reload the tokenizer from its files: the same ids. In a
    # fresh interpreter, since datasets forks, which JAX's threads make unsafe in this one.
    code = ("import sys; from solarjax import data; from solarjax.train.config import DataConfig; "
            "c = data.load_data(DataConfig(sources=(sys.argv[1],), cache_dir=sys.argv[2], num_proc=2), "
            "model_dir=sys.argv[3]).train.cache; print(c.path)")
    run = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "par"), str(dirs["bpe"])],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    np.testing.assert_array_equal(data.TokenCache(run.stdout.strip().splitlines()[-1]).tokens, cache.tokens)
    # The fingerprint covers the tokenizer's files and special settings: another eos, another cache.
    other = shutil.copytree(dirs["bpe"], tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "special_tokens_map.json").unlink()
    config["eos_token"] = "<|end_of_text|>"
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    d2 = data.load_data(cfg, model_dir=str(other))
    assert d2.train.cache.path != cache.path and d2.train.cache.doc(0).tolist()[-1] == 301
    assert data.load_data(cfg, model_dir=str(dirs["bpe"])).train.cache.path == cache.path  # reused
    assert data.load_data(cfg).tokenizer.path == load_tokenizer().path  # no model dir: Mistral's


# ---------------------------------------------------------------------------------------------
# Added tokens beside a tokenizer.model (issue 38): ChatML fine-tunes of Mistral

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime. 🤖"},
        {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another, in 日本語? <b>&'"}]
ADDED_TEXT = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b", "x<|im_start|>",
              "<|im_end|><|im_start|><|im_end|>", "end.<|im_end|>", "<s>[INST] hi [/INST]</s>", "<|im_end|>\n\n",
              "<|im_start|>system\nYou are 日本語 🤖<|im_end|>", "<|im_end|b<|im_start", "tabs\t<|im_end|>\tand\nnew"]


def _chunks_without_space_runs(text):
    """Texts where transformers' BPE conversion of a .model and SentencePiece agree: no run of
    spaces and no piece of text (between added tokens) that starts with a space."""
    return not re.search(r"  |^ |(<\|im_end\|>|<\|im_start\|>|<s>|</s>) ", text)


@pytest.mark.parametrize("layout", ["decoder", "legacy", "named"])
def test_added_tokens_beside_a_sentencepiece_model_equal_transformers(layout, tmp_path):
    """<|im_end|> is one id, the EOS that stops generation; text and chat templates are split on
    the added tokens before SentencePiece, as transformers' AutoTokenizer (its tokenizers-based
    conversion) and its slow SentencePiece tokenizer do."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    d = make_chatml_sentencepiece(tmp_path / layout, layout)
    ours, fast = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.vocab_size == len(fast) == 32002 and ours.token_id("<|im_end|>") == 32000
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id)
    generation = transformers.GenerationConfig.from_pretrained(d)
    assert ours.eos_ids == [generation.eos_token_id] == [32000]
    with pytest.raises(TokenizerError, match="has 32002 tokens, more than the vocab of 32000"):
        ours.check_fits(32000)
    ours.check_fits(32002)
    texts = ADDED_TEXT + UNICODE + SPECIAL_TEXT + _corpus_sample(4)
    # transformers' slow tokenizer: SentencePiece on each piece of text, so equal to ours on runs of
    # spaces too; it cannot append named tokens, nor split on control pieces that no config names.
    slow = SentencePieceBackend.from_pretrained(d) if layout == "decoder" else None
    for text in texts:
        ids = ours.encode(text)
        if slow is not None:
            assert ids[1:] == slow.encode(text, add_special_tokens=False), text
        # transformers 5 drops the .model's control pieces from its special tokens when the config
        # lists additional_special_tokens ("named"): it spells "</s>" out there, unlike anywhere else.
        if _chunks_without_space_runs(text) and not (layout == "named" and "</s>" in text):
            assert ids == fast.encode(text), text
            assert ours.encode(text, bos=False) == fast.encode(text, add_special_tokens=False), text
        # Added tokens written out, each piece of text between them as it was (transformers' decode
        # keeps the dummy prefix of every piece but the first: "<|im_start|> user"; with legacy false
        # it equals ours, see below).
        assert ours.decode(ids[1:]) == text, text
    assert ours.encode("<|im_end|>", bos=False) == [32000]
    skipped = ours.decode([32000, 32001, 1], skip_special_tokens=True)
    assert skipped == fast.decode([32000, 32001, 1], skip_special_tokens=True)
    assert skipped == ("" if layout == "named" else "<|im_start|>")  # ChatML ships <|im_start|> not special
    for messages in (CHAT, CHAT[1:2]):
        for gen in (False, True):
            want = fast.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == want, (messages, gen)
    ids = ours.apply_chat_template(CHAT[1:2], add_generation_prompt=True)
    assert len(ids) == 18 and ids.count(32000) == 1 and ids.count(32001) == 2  # not 9 pieces per "<|im_…|>"
    text = "<|im_start|>user\nName a prime. 🤖<|im_end|>\n<|im_start|>assistant\n"
    assert ours.decode(ids) == text == fast.apply_chat_template(CHAT[1:2], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("flags", [dict(lstrip=True, rstrip=True), dict(single_word=True), dict(normalized=True)])
@pytest.mark.parametrize("legacy", [True, False, None])
def test_added_token_flags_and_legacy_equal_transformers(flags, legacy, tmp_path):
    """lstrip/rstrip swallow the whitespace beside <|im_end|>, single_word matches it only between
    non-word characters, normalized changes nothing (transformers 5's Llama tokenizer has no
    normalizer). legacy: false (and no legacy key: transformers 5's default) gives only the text's
    start SentencePiece's dummy prefix; decode then writes what transformers writes."""
    d = make_chatml_sentencepiece(tmp_path / "d", legacy=legacy, **flags)
    ours, fast = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
    assert ours.legacy is bool(legacy)
    texts = ADDED_TEXT + ["a <|im_end|> b", "a\t<|im_end|>\n b", "a<|im_end|>b", "x <|im_end|>-", "é<|im_end|>",
                          "_<|im_end|> b", "<|im_end|>", "hello world"]
    for text in texts:
        want = fast.encode(text, add_special_tokens=False)
        if flags.get("rstrip") or not re.search(r"  |^ |(<\|im_end\|>|<\|im_start\|>|<s>|</s>) ", text):
            assert ours.encode(text, bos=False) == want, text
        if not legacy:  # the same decoder as transformers': one leading space dropped, nothing per token
            for skip in (False, True):
                assert ours.decode(want, skip_special_tokens=skip) == fast.decode(want, skip_special_tokens=skip), text


def test_added_token_ids_that_do_not_follow_the_vocabulary_are_refused(tmp_path):
    """transformers appends added tokens in id order whatever id a file declares: a gap would put
    <|im_end|> on another embedding row than the model learned, so it is refused, naming the file."""
    d = make_chatml_sentencepiece(tmp_path / "gap")
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["32005"] = config["added_tokens_decoder"].pop("32001")
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: added token '<\|im_start\|>' has id 32005, "
                                             r"but it would get id 32001"):
        load_tokenizer(d)
    config["added_tokens_decoder"]["3"] = config["added_tokens_decoder"].pop("32005")  # renames piece 3: refused
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"'<\|im_start\|>' has id 3, but it would get id 32000"):
        load_tokenizer(d)
    (d / "tokenizer_config.json").unlink()
    (d / "added_tokens.json").write_text(json.dumps({"<|im_end|>": "32000"}))
    with pytest.raises(TokenizerError, match=r"added_tokens.json: expected \{token: id\}"):
        load_tokenizer(d)


def test_tokens_the_configs_add_to_a_tokenizer_json_equal_transformers(dirs, tmp_path):
    """transformers appends to tokenizer.json what tokenizer_config.json's added_tokens_decoder,
    added_tokens.json, a special token's name or additional_special_tokens add; so do we. With an
    added_tokens_decoder, special_tokens_map.json is not read (transformers 5)."""
    cases = {
        "decoder": ({"added_tokens_decoder": {"306": {"content": "<|im_end|>", "special": True},
                                              "307": {"content": "<|im_start|>", "special": False}},
                     "eos_token": "<|im_end|>"}, None),
        "added-json": ({}, {"<|im_end|>": 306}),
        "named": ({"additional_special_tokens": ["<|x|>"], "mask_token": "<|mask|>"}, None),
    }
    for name, (update, added) in cases.items():
        d = shutil.copytree(dirs["bpe"], tmp_path / name)
        config = json.loads((d / "tokenizer_config.json").read_text())
        (d / "tokenizer_config.json").write_text(json.dumps({**config, **update}))
        if added:
            (d / "added_tokens.json").write_text(json.dumps(added))
        ours, theirs = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(d)
        assert ours.vocab_size == len(theirs) > 306, name
        assert (ours.eos_id, ours.pad_id) == (theirs.eos_token_id, theirs.pad_token_id), name
        for text in ["a<|im_start|>b<|im_end|>c<|x|>d <|mask|> e", "plain text", *ADDED_TEXT]:
            ids = ours.encode(text)
            assert ids == theirs.encode(text), (name, text)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
        assert load_tokenizer(d).fingerprint() != load_tokenizer(dirs["bpe"]).fingerprint()
