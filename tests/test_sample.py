"""The sampler: greedy equals transformers' generate, the KV cache equals recomputation, sampling rules."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import solarjax
from solarjax.cli import sample as sample_cli
from solarjax.eval import sample
from solarjax.eval.sample import Sampling, SamplingError, decode_params
from solarjax.model.decoder import Decoder, abstract_params, init_cache
from solarjax.sharding import param_shardings

from hf_models import (
    KINDS,
    make_bpe_tokenizer,
    make_chatml_sentencepiece,
    make_hf_model,
    save_hf_model,
    save_kind,
    tokenizer_file,
)

PROMPT_LENGTHS = (5, 11, 8)
NEW = 12


def _hf_greedy(model, prompts, new, eos):
    """HF generate on a left-padded batch, cut after each row's first EOS."""
    tokens, _, segments = sample.left_pad(prompts)
    ids, mask = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(segments > 0, dtype=torch.long)
    P = tokens.shape[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=0, eos_token_id=eos)[:, P:].tolist()
    return [row[:row.index(eos) + 1] if eos in row else row for row in out]


@pytest.mark.parametrize("arch, overrides", [
    ("mistral", dict(sliding_window=7, head_dim=32)),  # the window is shorter than prompt + output
    ("llama", dict(num_key_value_heads=1)),
])
def test_greedy_matches_transformers_generate(arch, overrides, tmp_path):
    hf_model = make_hf_model(arch, **overrides)
    config, params = solarjax.load_model(save_hf_model(hf_model, tmp_path / "hf"))
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    ours = [r["token_ids"] for r in sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW), eos_ids=2)]
    assert ours == _hf_greedy(hf_model, prompts, NEW, eos=2)
    # The batch does not change any prompt's output.
    alone = sample.generate(config, params, prompts[1:2], Sampling(max_new_tokens=NEW), eos_ids=2)
    assert alone[0]["token_ids"] == ours[1]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_greedy_matches_transformers_generate_for_each_model_kind(kind, tmp_path):
    """Token for token, with positions running to 111: past original_max_position_embeddings (llama3:
    32, yarn: 64) and, for dynamic NTK, past max_position_embeddings (64) from the prompt on (its
    base grows with the length; each new key gets the frequencies of its own step in both)."""
    hf_model, path = save_kind(kind, tmp_path / "hf")
    config, params = solarjax.load_model(path)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (100, 70)]
    hf_model.generation_config.eos_token_id = None  # no stop: the first row's positions reach 100 + 12 - 1
    ours = [r["token_ids"] for r in sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW))]
    assert ours == _hf_greedy(hf_model, prompts, NEW, eos=None) and len(ours[0]) == NEW


@pytest.mark.slow
@pytest.mark.parametrize("decode_layout", [False, True])
def test_cached_decoding_equals_full_recomputation(decode_layout):
    config = solarjax.preset("tiny").replace(sliding_window=6)
    params = solarjax.init_params(config, jax.random.key(0))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, config.vocab_size, (2, 14)))
    full = jax.jit(Decoder(config).apply)({"params": params}, tokens)
    if decode_layout:
        params = decode_params(config, params)
    apply = jax.jit(Decoder(config, decode_layout).apply, static_argnames="last_only")
    cache = init_cache(config, 2, 14, stacked=not decode_layout)
    logits, cache = apply({"params": params}, tokens[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), cache=cache)
    steps = [logits]
    for t in range(8, 14):
        pos = jnp.full((2, 1), t, jnp.int32)
        logits, cache = apply({"params": params}, tokens[:, t:t + 1], pos, cache=cache)
        steps.append(logits)
    assert int(cache["index"]) == 14
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=1e-5)
    # A prefill that keeps only the last position's logits, as the sampler's does.
    cache = init_cache(config, 2, 14, stacked=not decode_layout)
    last, _ = apply({"params": params}, tokens[:, :8], jnp.broadcast_to(jnp.arange(8), (2, 8)), cache=cache,
                    last_only=True)
    np.testing.assert_allclose(last[:, 0], full[:, 7], atol=1e-5)


@pytest.mark.parametrize("kind", ["yarn", "linear", "dynamic"])
def test_scaled_models_sample_as_far_as_their_scaling_allows(kind, tmp_path, capsys):
    """Qwen2.5's YaRN form (max_position_embeddings = original_max_position_embeddings = 64, factor
    4), linear factor 4 and dynamic factor 2 over 64: the limit is 256 (dynamic: 128), as vLLM
    derives it, so a prompt of 100 is sampled, token for token as transformers' generate, with one
    line saying it passes the trained length; llama3's config holds the scaled length itself."""
    overrides = dict(max_position_embeddings=64)
    if kind == "yarn":
        overrides["rope_parameters"] = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64,
                                            rope_theta=10000.0)
    hf_model, path = save_kind(kind, tmp_path / "hf", **overrides)
    config, params = solarjax.load_model(path)
    limit = 128 if kind == "dynamic" else 256
    assert config.max_position_embeddings == 64 and config.position_limit == limit
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, config.vocab_size, n).tolist() for n in (100, 70)]
    hf_model.generation_config.eos_token_id = None
    sample._TOLD_PAST_TRAINED.discard(config)  # said once per model and process: an earlier test may have
    capsys.readouterr()
    ours = [r["token_ids"] for r in sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW))]
    assert ours == _hf_greedy(hf_model, prompts, NEW, eos=None)
    sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reaches 112 positions, past the model's max_position_embeddings 64" in err, err
    with pytest.raises(SamplingError, match=f"prompt 0 has 300 tokens, more than the model's maximum of {limit}"):
        sample.generate(config, params, [[5] * 300])
    save_kind("llama3", tmp_path / "llama3")
    assert solarjax.load_model(tmp_path / "llama3")[0].position_limit == 256  # its max_position_embeddings


def test_each_row_gets_the_new_tokens_that_fit(capsys):
    """max_new_tokens is cut per row, not for the batch by its longest prompt: a prompt 3 short of
    the model's positions gets 3 tokens, with one line saying so; the short prompt beside it gets
    all 10, the tokens it gets alone."""
    config = solarjax.preset("tiny").replace(max_position_embeddings=32)
    params = solarjax.init_params(config, jax.random.key(4))
    prompts = [list(range(1, 30)), [1, 7, 9, 4]]
    out = sample.generate(config, params, prompts, Sampling(max_new_tokens=10), eos_ids=None)
    alone = sample.generate(config, params, prompts[1:], Sampling(max_new_tokens=10), eos_ids=None)
    assert [len(r["token_ids"]) for r in out] == [3, 10] and out[1]["token_ids"] == alone[0]["token_ids"]
    err = capsys.readouterr().err
    assert "prompt 0 gets 3 of the 10 new tokens asked: it has 29 tokens and the model's positions end at 32" in err
    assert err.count("\n") == 1


def test_top_k_and_top_p_stay_inside_their_sets():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 500)
    draw = jax.jit(jax.vmap(lambda k, t, kk, p: sample.sample_logits(logits, k, t, kk, p),
                            in_axes=(0, None, None, None)))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    got = np.asarray(draw(keys, 1.0, 5, 1.0))
    for b in range(4):
        assert set(got[:, b]) <= set(top5[b]) and len(set(got[:, b])) > 1
    # top-p: only the smallest set of most likely tokens whose mass reaches p.
    probs = np.asarray(jax.nn.softmax(logits, -1))
    got = np.asarray(draw(keys, 1.0, 0, 0.6))
    for b in range(4):
        order = np.argsort(-probs[b])
        n = int(np.searchsorted(np.cumsum(probs[b][order]), 0.6) + 1)
        assert set(got[:, b]) <= set(order[:n])
    # temperature -> 0 is greedy.
    assert (np.asarray(draw(keys[:20], 1e-6, 0, 1.0)) == np.argmax(np.asarray(logits), -1)).all()


def test_seed_gives_the_same_text_and_temperature_zero_is_greedy():
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(2))
    prompts = [[1, 5, 9, 4], [1, 7]]
    a = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW, temperature=1.0, seed=3), eos_ids=None)
    b = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW, temperature=1.0, seed=3), eos_ids=None)
    c = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW, temperature=1.0, seed=4), eos_ids=None)
    assert [r["token_ids"] for r in a] == [r["token_ids"] for r in b] != [r["token_ids"] for r in c]
    assert all(len(r["token_ids"]) == NEW for r in a)
    greedy = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW), eos_ids=None)
    cold = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW, temperature=1e-6, seed=5),
                           eos_ids=None)
    assert [r["token_ids"] for r in cold] == [r["token_ids"] for r in greedy]


@pytest.mark.slow
def test_same_code_on_a_tensor_parallel_mesh():
    config = solarjax.preset("tiny").replace(sliding_window=5)
    params = solarjax.init_params(config, jax.random.key(3))
    prompts = [[1, 2, 3, 4, 5], [1, 9]]
    ref = sample.generate(config, params, prompts, Sampling(max_new_tokens=NEW), eos_ids=None)
    mesh = solarjax.make_mesh(data=1, fsdp=1, tensor=2, devices=jax.devices()[:2])
    sharded = jax.device_put(params, param_shardings(abstract_params(config), mesh))
    assert sharded["layers"]["mlp"]["up_proj"].sharding.spec[2] == "tensor"
    with jax.set_mesh(mesh):
        out = sample.generate(config, sharded, prompts, Sampling(max_new_tokens=NEW), eos_ids=None)
        # The decode layout keeps the weights sharded: up_proj is [F, D] there, F still on "tensor".
        relaid = jax.jit(decode_params, static_argnums=0)(config, sharded)
    assert relaid["layers_1"]["mlp"]["up_proj"].sharding.spec[0] == "tensor"
    assert [r["token_ids"] for r in out] == [r["token_ids"] for r in ref]


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(temperature=-0.5), "temperature must be >= 0 (0 is greedy), got -0.5"),
    (dict(top_k=-1), "top_k must be an integer >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
])
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(SamplingError) as e:
        Sampling(**kwargs)
    assert message in str(e.value)


def test_bad_prompts():
    config = solarjax.preset("tiny").replace(max_position_embeddings=32)
    params = jax.eval_shape(lambda: solarjax.init_params(config, jax.random.key(0)))
    with pytest.raises(SamplingError, match="prompt 1 is empty"):
        sample.generate(config, params, [[1, 2], []])
    with pytest.raises(SamplingError, match="prompt 0 has 40 tokens, more than the model's maximum of 32"):
        sample.generate(config, params, [[1] * 40])
    with pytest.raises(SamplingError, match=r"token id 300 outside the vocabulary \[0, 256\)"):
        sample.generate(config, params, [[1, 300]])


@pytest.fixture(scope="module")
def mistral_vocab_model(tmp_path_factory):
    """A tiny model with the real Mistral vocabulary and tokenizer."""
    path = tmp_path_factory.mktemp("vocab") / "hf"
    save_hf_model(make_hf_model("mistral", vocab_size=32000, hidden_size=32, intermediate_size=64,
                                head_dim=8, num_hidden_layers=1), path)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    return path


def test_cli_json(mistral_vocab_model, capsys):
    code = sample_cli.main(["--hf", str(mistral_vocab_model), "--prompt", "The capital of France is",
                        "--prompt", "Hi", "--max-new-tokens", "5", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in lines] == ["The capital of France is", "Hi"]
    for r in lines:
        assert 1 <= len(r["token_ids"]) <= 5 and isinstance(r["completion"], str)
        assert set(r["timing"]) == {"prefill_s", "decode_s", "decode_tokens_per_s"}
        assert r["timing"]["decode_tokens_per_s"] > 0


def _generated(ids):
    """A stand-in for sample.generate that returns `ids` for every prompt: the CLI's text, not the model, is tested."""
    def generate(config, params, prompts, sampling, eos_ids):
        timing = {"prefill_s": 1.0, "decode_s": 1.0, "decode_tokens_per_s": 1.0}
        return [{"token_ids": list(ids), "timing": timing} for _ in prompts]
    return generate


@pytest.mark.parametrize("kind", ["sentencepiece", "byte-level"])
def test_cli_prints_the_completion_as_it_reads_after_the_prompt(kind, mistral_vocab_model, tmp_path, capsys,
                                                                 monkeypatch):
    """The completion is decode(prompt + completion) past decode(prompt), as transformers' text
    streamers print it: decoded alone, SentencePiece's "▁Paris" loses its space ("...isParis")."""
    import transformers

    from solarjax.tokenizer import load_tokenizer
    path = mistral_vocab_model
    if kind == "byte-level":
        path = save_hf_model(make_hf_model("llama", vocab_size=320, num_hidden_layers=1), tmp_path / "bpe")
        make_bpe_tokenizer(path)
    tok, theirs = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path)
    prompt, text = "The capital of France is", "The capital of France is Paris."
    whole = tok.encode(text)
    assert whole[:len(tok.encode(prompt))] == tok.encode(prompt)
    monkeypatch.setattr(sample, "generate", _generated(whole[len(tok.encode(prompt)):] + [tok.eos_id]))
    for fmt in ("text", "json"):
        assert sample_cli.main(["--hf", str(path), "--prompt", prompt, "--format", fmt]) == 0
        out = capsys.readouterr().out
        printed = prompt + json.loads(out)["completion"] if fmt == "json" else out.rstrip("\n")
        assert printed == text == theirs.decode(whole, skip_special_tokens=True)


def test_cli_chat_with_added_tokens_stops_at_im_end(tmp_path, capsys, monkeypatch):
    """A ChatML fine-tune beside tokenizer.model: the reply ends at <|im_end|> (its EOS, id 32000,
    an added token), which is not printed, and the reply is printed as its own turn."""
    from solarjax.tokenizer import load_tokenizer
    path = save_hf_model(make_hf_model("mistral", vocab_size=32002, hidden_size=32, intermediate_size=64,
                                       head_dim=8, num_hidden_layers=1), tmp_path / "chatml")
    make_chatml_sentencepiece(path)
    tok = load_tokenizer(path)
    user = [{"role": "user", "content": "The capital of France?"}]
    prompt = tok.apply_chat_template(user, add_generation_prompt=True)
    whole = tok.apply_chat_template(user + [{"role": "assistant", "content": "Paris."}])
    assert whole[:len(prompt)] == prompt and whole[-3:] == [32000, 28705, 13] and tok.eos_ids == [32000]
    monkeypatch.setattr(sample, "generate", _generated(whole[len(prompt):-2]))  # through <|im_end|>
    assert sample_cli.main(["--hf", str(path), "--prompt", "The capital of France?", "--chat", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == "Paris."
    assert sample_cli.main(["--hf", str(path), "--prompt", "The capital of France?", "--chat"]) == 0
    assert capsys.readouterr().out == "The capital of France?\nParis.\n\n"
    # Real generation stops at <|im_end|>: the stop ids reach the sampler.
    seen = []
    monkeypatch.setattr(sample, "generate", lambda *args: seen.append(args[-1]) or _generated([5])(*args))
    assert sample_cli.main(["--hf", str(path), "--prompt", "x", "--chat"]) == 0 and seen == [[32000]]


def test_cli_samples_over_all_local_devices(mistral_vocab_model, capsys, monkeypatch):
    """By default the CLI shards the weights over every local device (FSDP) and samples there;
    the tokens are those of one device."""
    seen = []
    real = sample.generate

    def spy(config, params, *args):
        seen.append(len(params["embed_tokens"].sharding.device_set))
        return real(config, params, *args)
    monkeypatch.setattr(sample, "generate", spy)
    runs = {}
    for mesh in ("1,-1,1", "1,1,1"):
        args = ["--hf", str(mistral_vocab_model), "--prompt", "Paris is", "--max-new-tokens", "6", "--format", "json"]
        assert sample_cli.main(args + (["--mesh", mesh] if mesh != "1,-1,1" else [])) == 0
        runs[mesh] = json.loads(capsys.readouterr().out)["token_ids"]
    assert seen == [len(jax.devices()), 1]
    assert runs["1,-1,1"] == runs["1,1,1"]
    assert sample_cli.main(["--hf", str(mistral_vocab_model), "--prompt", "x", "--mesh", "2,2"]) == 2
    assert "--mesh must be three integers data,fsdp,tensor, got '2,2'" in capsys.readouterr().err


def test_cli_errors(mistral_vocab_model, tmp_path, capsys):
    def run(*args):
        code = sample_cli.main([str(a) for a in args])
        return code, capsys.readouterr().err
    code, err = run("--hf", mistral_vocab_model, "--prompt", "  ")
    assert code == 2 and "prompt 0 is empty" in err
    code, err = run("--hf", mistral_vocab_model, "--prompt", "x", "--top-p", "2")
    assert code == 2 and "top_p must be in (0, 1], got 2.0" in err
    no_tok = tmp_path / "no-tok"
    save_hf_model(make_hf_model("llama"), no_tok)  # vocab 128, no tokenizer files
    code, err = run("--hf", no_tok, "--prompt", "x")
    assert code == 2 and "has no tokenizer.json or tokenizer.model; give --tokenizer" in err
    # Mistral's vocabulary size does not make Mistral's tokenizer the model's: still refused.
    no_tok_32k = tmp_path / "no-tok-32k"
    shutil.copytree(mistral_vocab_model, no_tok_32k, ignore=shutil.ignore_patterns("tokenizer.model"))
    code, err = run("--hf", no_tok_32k, "--prompt", "x")
    assert code == 2 and "give --tokenizer" in err
    code, err = run("--hf", no_tok_32k, "--prompt", "x", "--max-new-tokens", "2", "--tokenizer", tokenizer_file())
    assert code == 0, err
    code, err = run("--hf", no_tok, "--prompt", "x", "--tokenizer", tokenizer_file())
    assert code == 2 and "32000" in err and "128" in err


@pytest.mark.slow
def test_cli_uses_the_model_tokenizer_and_stops_on_its_eos_ids(tmp_path, capsys):
    """A model with a byte-level BPE tokenizer.json (special ids 300..305): text in, text out, the
    chat template with --chat, and generation stops at any id generation_config.json lists."""
    from solarjax.tokenizer import load_tokenizer
    path = save_hf_model(make_hf_model("llama", vocab_size=320, num_hidden_layers=1), tmp_path / "hf")
    make_bpe_tokenizer(path)
    tok = load_tokenizer(path)
    config, params = solarjax.load_model(path)
    prompt = "def main():"
    free = sample.generate(config, params, [tok.encode(prompt)], Sampling(max_new_tokens=10), eos_ids=None)
    greedy = free[0]["token_ids"]
    k = next(i for i in range(2, 10) if greedy[i] not in greedy[:i])  # a token greedy decoding reaches at step k
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [301, greedy[k]]}))

    def run(*args):
        code = sample_cli.main(["--hf", str(path), "--max-new-tokens", "10", "--format", "json", *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]

    (r,) = run("--prompt", prompt)
    assert tok.encode(prompt)[0] == 300 and r["token_ids"] == greedy[:k + 1]  # stopped at the model's EOS
    assert r["completion"] == tok.decode(greedy[:k])
    (c,) = run("--prompt", prompt, "--chat")
    chat_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    stop = load_tokenizer(path).eos_ids
    want = sample.generate(config, params, [chat_ids], Sampling(max_new_tokens=10), eos_ids=stop)[0]["token_ids"]
    assert c["token_ids"] == want and c["completion"] == tok.decode([t for t in want if t not in stop])


def test_generate_stops_at_any_of_several_eos_ids(mistral_vocab_model):
    config, params = solarjax.load_model(mistral_vocab_model)
    free = sample.generate(config, params, [[1, 415, 5565]], Sampling(max_new_tokens=8), eos_ids=None)[0]["token_ids"]
    for k in (1, 3):
        stop = [31999, free[k], 7]
        ids = sample.generate(config, params, [[1, 415, 5565]], Sampling(max_new_tokens=8),
                              eos_ids=stop)[0]["token_ids"]
        assert ids == free[:free.index(free[k]) + 1]
        # The jitted loop itself stops there (generate also trims on the host).
        tokens, positions, segments = sample.left_pad([[1, 415, 5565]], 16)
        knobs = (np.float32(0), np.int32(0), np.float32(1), np.array(stop + [-1] * 5, np.int32))
        cache, first, rng = sample._prefill(config, 8, params, tokens, positions, segments, jax.random.key(0), *knobs)
        _, steps = sample._decode(config, 8, params, cache, first, np.array([3], np.int32), np.array([8], np.int32),
                                  rng, *knobs)
        assert int(steps) == len(ids)
    with pytest.raises(SamplingError, match="9 EOS ids given; at most 8"):
        sample.generate(config, params, [[1]], eos_ids=list(range(9)))
