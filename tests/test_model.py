"""The decoder against transformers' own Mistral and Llama, and invariants of our implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solarjax
from solarjax.errors import SolarjaxError
from solarjax.eval import sample
from solarjax.model import decoder as model_lib, xla_cpu

from hf_models import KINDS, hf_logits, make_hf_model, save_hf_model, save_kind

PARITY_CASES = {
    # GQA, head_dim (32) != hidden/heads (16), a window shorter than the sequence, rope_theta != 1e4.
    "mistral-gqa-window": ("mistral", dict(head_dim=32, sliding_window=8, rope_theta=50000.0), 24),
    # MQA: one kv head for four query heads.
    "llama-mqa": ("llama", dict(num_key_value_heads=1, rope_theta=10000.0), 16),
    # Tied embeddings, head_dim 8 != 16, and full MHA (kv heads == heads).
    "llama-tied-mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4, head_dim=8,
                                     rope_theta=1e6), 16),
    # Longer than one attention chunk (128): three query chunks, the later ones skipping keys
    # that fell out of the window.
    "mistral-long-window": ("mistral", dict(sliding_window=100, max_position_embeddings=512), 300),
}


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_logits_match_transformers(case, tmp_path):
    arch, overrides, length = PARITY_CASES[case]
    hf_model = make_hf_model(arch, **overrides)
    config, params = solarjax.load_model(save_hf_model(hf_model, tmp_path / "hf"))
    assert config.sliding_window == overrides.get("sliding_window")
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, length))
    ours = np.asarray(solarjax.logits(config, params, tokens))
    ref = hf_logits(hf_model, tokens)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_transformers_for_each_model_kind(kind, tmp_path):
    """RoPE scalings (read from either config form), Qwen2's biases, tied embeddings: float32 logits
    equal transformers' to 1e-5 over 80 positions, past each scaling's threshold."""
    hf_model, path = save_kind(kind, tmp_path / "hf")
    config, params = solarjax.load_model(path)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 80))
    ref = hf_logits(hf_model, tokens)
    ours = np.asarray(solarjax.logits(config, params, tokens))
    assert np.abs(ours - ref).max() <= 1e-5, np.abs(ours - ref).max()
    if config.rope_scaling is not None:  # the scaling is exercised: plain RoPE is far off
        plain = np.asarray(solarjax.logits(config.replace(rope_scaling=None), params, tokens))
        assert np.abs(plain - ref).max() > 1e-3, np.abs(plain - ref).max()
    if config.qkv_bias:
        assert np.abs(np.asarray(params["layers"]["self_attn"]["k_bias"])).max() > 0.1


def test_packed_batch_matches_each_document_alone(tmp_path):
    """Documents packed in one row with restarting positions give each document's own logits."""
    hf_model = make_hf_model("mistral", head_dim=32, sliding_window=6, rope_theta=50000.0)
    config, params = solarjax.load_model(save_hf_model(hf_model, tmp_path / "hf"))
    rng = np.random.RandomState(2)
    rows = [[9, 7, 8], [12, 12]]  # document lengths per row, 24 tokens a row
    docs = [[rng.randint(0, config.vocab_size, n) for n in row] for row in rows]
    tokens = np.stack([np.concatenate(row) for row in docs])
    positions = np.stack([np.concatenate([np.arange(len(d)) for d in row]) for row in docs])
    segments = np.stack([np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(row)]) for row in docs])
    ours = np.asarray(solarjax.logits(config, params, tokens, positions, segments))
    for r, row in enumerate(docs):
        start = 0
        for doc in row:
            ref = hf_logits(hf_model, doc[None])[0]
            got = ours[r, start:start + len(doc)]
            assert np.abs(got - ref).max() <= 1e-4, (r, start, np.abs(got - ref).max())
            start += len(doc)


def test_causal_and_window_mask():
    """Changing a future token never changes earlier logits; a token past the window never matters."""
    config = solarjax.preset("tiny").replace(sliding_window=4)
    params = solarjax.init_params(config, jax.random.key(0))
    tokens = np.random.RandomState(3).randint(0, config.vocab_size, (1, 12))
    base = np.asarray(solarjax.logits(config, params, tokens))
    changed = tokens.copy()
    changed[0, 8] = (changed[0, 8] + 1) % config.vocab_size
    out = np.asarray(solarjax.logits(config, params, changed))
    np.testing.assert_array_equal(out[0, :8], base[0, :8])
    assert np.abs(out[0, 8:] - base[0, 8:]).max() > 0
    # With 2 layers and a window of 4, position 8 reaches at most 2 * 3 = 6 positions forward.
    np.testing.assert_array_equal(out[0, 8 + 2 * 3 + 1:], base[0, 8 + 2 * 3 + 1:])


def _loss_and_grads(config, params, tokens, jit: bool):
    def f(p):
        out = model_lib.Decoder(config).apply({"params": p}, tokens)
        return jnp.mean(jax.nn.logsumexp(out, axis=-1) - jnp.take_along_axis(out, tokens[..., None], -1)[..., 0])
    f = jax.value_and_grad(f)
    return (jax.jit(f) if jit else f)(params)


@pytest.fixture(scope="module")
def jitted_reference():
    config = solarjax.preset("tiny").replace(sliding_window=5)
    params = solarjax.init_params(config, jax.random.key(1))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, config.vocab_size, (2, 10)))
    return config, params, tokens, _loss_and_grads(config, params, tokens, jit=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["no-jit", "remat-full", "remat-dots", "remat-dots_no_batch"])
def test_jit_and_remat_give_same_loss_and_gradients(variant, jitted_reference):
    config, params, tokens, (ref_loss, ref_grads) = jitted_reference
    if variant == "no-jit":
        with jax.disable_jit():
            loss, grads = _loss_and_grads(config, params, tokens, jit=False)
    else:
        loss, grads = _loss_and_grads(config.replace(remat=variant.split("-", 1)[1]), params, tokens, jit=True)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        assert np.abs(r).max() > 0, path
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_scan_stacks_layers_on_one_axis():
    config = solarjax.preset("tiny").replace(num_layers=3)
    boxed = model_lib.abstract_params(config)
    q = boxed["layers"]["self_attn"]["q_proj"]
    assert q.names == ("layers", "embed", "heads", "head_dim")
    assert q.value.shape == (3, 64, 4, 16)


def test_bfloat16_compute_stays_close_to_float32():
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(2))
    tokens = np.random.RandomState(5).randint(0, config.vocab_size, (2, 8))
    ref = np.asarray(solarjax.logits(config, params, tokens))
    out = solarjax.logits(config.replace(dtype="bfloat16"), params, tokens)
    assert out.dtype == jnp.float32
    assert np.abs(np.asarray(out) - ref).max() < 0.05 * np.abs(ref).max()


def test_logits_rejects_bad_token_ids():
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(0))
    with pytest.raises(SolarjaxError, match="token id 256 is outside the vocabulary"):
        solarjax.logits(config, params, np.array([[1, 256]]))
    with pytest.raises(SolarjaxError, match=r"shape \[batch, length\]"):
        solarjax.logits(config, params, np.array([1, 2]))
    with pytest.raises(SolarjaxError, match="row 0, index 2 has position 5 after 1"):
        solarjax.logits(config, params, np.array([[1, 2, 3]]), positions=np.array([[0, 1, 5]]))
    # A new document (segment) may restart its positions.
    solarjax.logits(config, params, np.array([[1, 2, 3]]), positions=np.array([[0, 1, 0]]),
                    segment_ids=np.array([[1, 1, 2]]))
    # Padding as the data pipeline makes it (segment 0, position 0) is no document; a real one is checked.
    solarjax.logits(config, params, np.array([[1, 2, 0, 0]]), positions=np.array([[0, 1, 0, 0]]),
                    segment_ids=np.array([[1, 1, 0, 0]]))
    with pytest.raises(SolarjaxError, match="row 0, index 3 has position 0 after 0"):
        solarjax.logits(config, params, np.array([[1, 2, 3, 4]]), positions=np.array([[0, 1, 0, 0]]),
                        segment_ids=np.array([[1, 1, 2, 2]]))


@pytest.mark.parametrize("tied", [False, True])
def test_decode_layout_equals_train_layout(tied):
    """Decoder(decode_layout=True) on decode_params(params) computes what the training layout does."""
    config = solarjax.preset("tiny").replace(num_layers=3, sliding_window=4, tie_word_embeddings=tied)
    params = solarjax.init_params(config, jax.random.key(5))
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, config.vocab_size, (2, 9)))
    unstacked = sample.decode_params(config, params)
    assert sorted(k for k in unstacked if k.startswith("layers")) == ["layers_0", "layers_1", "layers_2"]
    np.testing.assert_array_equal(unstacked["layers_2"]["mlp"]["up_proj"], params["layers"]["mlp"]["up_proj"][2].T)
    np.testing.assert_array_equal(unstacked["layers_1"]["self_attn"]["o_proj"],
                                  params["layers"]["self_attn"]["o_proj"][1].transpose(2, 0, 1))
    out = jax.jit(model_lib.Decoder(config, decode_layout=True).apply)({"params": unstacked}, tokens)
    np.testing.assert_allclose(out, solarjax.logits(config, params, tokens), atol=1e-5)


def test_the_einsum_path_of_accelerators_equals_the_cpu_path(monkeypatch):
    """xla_cpu.dense runs the projections as 2-D matmuls on CPU (which the HF parity tests check)
    and as the written einsums elsewhere: both give the same logits and gradients."""
    config = solarjax.preset("tiny").replace(num_layers=2, num_kv_heads=2)
    params = solarjax.init_params(config, jax.random.key(2))
    tokens = np.random.RandomState(3).randint(0, config.vocab_size, (2, 10))

    def value_and_grad():
        loss = lambda p: jnp.mean(jax.nn.logsumexp(model_lib.Decoder(config).apply({"params": p}, tokens), -1))
        return jax.jit(jax.value_and_grad(loss))(params)  # a new function: traced again, platform read again
    want = value_and_grad()
    used = []
    monkeypatch.setattr(xla_cpu, "platform", lambda: used.append(1) or "tpu")
    monkeypatch.setattr(xla_cpu.jnp, "matmul", None)  # the einsum path must not need it
    got = value_and_grad()
    assert used
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, atol=1e-6)
