"""Every attention implementation against the formula, written out here: softmax(q k^T / sqrt(E))
v over the keys of the same packed document, causal, within the sliding window (q - k < window),
query head h reading kv head h // G. The kernels run in Pallas interpret mode on CPU."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import solarjax
from solarjax.errors import ConfigError
from solarjax.model import attention
from solarjax.sharding import make_mesh

B, T, H, K, E = 2, 200, 4, 2, 32  # T: not a multiple of any kernel block, so the padding is exercised
LENGTHS = [[90, 70, 40], [150]]  # row 1 ends in 50 padding tokens (segment 0)


def packed():
    rng = np.random.RandomState(4)
    q, k, v = (rng.randn(B, T, n, E).astype(np.float32) for n in (H, K, K))
    seg, pos = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for i, n in enumerate(lengths):
            seg[r, start:start + n], pos[r, start:start + n] = i + 1, np.arange(n)
            start += n
        pos[r, start:] = np.arange(T - start)  # padding: its own segment 0, positions rising
    return q, k, v, seg, pos


def reference(q, k, v, seg, window):
    """The formula, one (row, head) at a time, with an index-loop mask."""
    out = np.zeros_like(q)
    for b in range(B):
        mask = np.array([[seg[b, i] == seg[b, j] and j <= i and (window is None or i - j < window)
                          for j in range(T)] for i in range(T)])
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // (H // K)].T / np.sqrt(E)
            s = np.where(mask, s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[b, :, h] = (p / p.sum(-1, keepdims=True)) @ v[b, :, h // (H // K)]
    return out


def reference_grads(q, k, v, seg, window, cot):
    """Gradients of sum(out * cot) by autodiff of the same formula in jnp (no solarjax code)."""
    G = H // K
    idx = np.arange(T)
    mask = (seg[:, :, None] == seg[:, None, :]) & (idx[None, None, :] <= idx[None, :, None])
    if window is not None:
        mask &= (idx[None, :, None] - idx[None, None, :]) < window

    def f(q, k, v):
        kk, vv = jnp.repeat(k, G, axis=2), jnp.repeat(v, G, axis=2)
        s = jnp.einsum("bthe,bshe->bhts", q, kk) / np.sqrt(E)
        p = jax.nn.softmax(jnp.where(mask[:, None], s, -jnp.inf), axis=-1)
        return (jnp.einsum("bhts,bshe->bthe", p, vv) * cot).sum()
    return jax.grad(f, argnums=(0, 1, 2))(q, k, v)


CASES = [("xla", None), ("xla", 50), ("splash", None), ("splash", 50), ("pallas_gpu", None), ("cudnn", None),
         ("cudnn", 50)]


@pytest.mark.parametrize("name,window", CASES)
def test_implementation_equals_the_formula(name, window):
    q, k, v, seg, pos = packed()
    cot = np.random.RandomState(5).randn(B, T, H, E).astype(np.float32)

    def run(q, k, v):
        return attention.self_attend(q, k, v, jnp.asarray(pos), jnp.asarray(seg), window, name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # interpret mode's warning
        out = jax.jit(run)(q, k, v)
        grads = jax.jit(jax.grad(lambda *a: (run(*a) * cot).sum(), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, seg, window), atol=2e-5)
    for got, want in zip(grads, reference_grads(q, k, v, seg, window, cot)):
        np.testing.assert_allclose(got, want, atol=2e-4)


def test_a_kernel_runs_per_shard_under_a_mesh():
    """splash under data x tensor: rows and kv heads (with their query heads) split over devices."""
    q, k, v, seg, pos = packed()
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = jax.jit(lambda *a: attention.self_attend(*a, 50, "splash"))(q, k, v, pos, seg)
    np.testing.assert_allclose(out, reference(q, k, v, seg, 50), atol=2e-5)


BF16 = {"dtype": "bfloat16", "head_dim": 128}


def test_tpu_takes_splash_and_cpu_xla():
    assert attention.choose("auto", "tpu", 4096, 8192) == "splash"
    assert attention.choose("auto", "tpu", None, 8192, "float32") == "splash"
    assert attention.choose("auto", "cpu", 4096, 8192, **BF16) == "xla"
    assert attention.choose("splash", "cpu", 4096, 8192) == "splash"  # interpret mode, for tests
    assert attention.choose("cudnn", "cpu", None, 128, "float32") == "cudnn"  # interpret mode takes float32


def test_gpu_prefers_cudnn_where_it_runs_the_case():
    """bf16, heads up to 128: cudnn (faster than the Pallas kernel on an H100), window or not."""
    assert attention.choose("auto", "gpu", None, 4096, **BF16) == "cudnn"
    assert attention.choose("auto", "gpu", 4096, 8192, **BF16) == "cudnn"
    assert attention.choose("auto", "gpu", None, 4096, "float16", 64) == "cudnn"


def test_gpu_float32_has_no_fused_kernel_and_says_so():
    """float32 on a GPU: the Pallas kernel exhausts shared memory, cuDNN refuses the dtype: xla,
    with a start-up note naming both reasons; naming either kernel is refused."""
    assert attention.choose("auto", "gpu", None, 4096, "float32", 128) == "xla"
    note = attention.fallback_note("auto", "xla", "gpu", None, 4096, "float32", 128)
    assert note.startswith("attention: xla") and "cuDNN takes bfloat16/float16 only, not float32" in note \
        and "runs out of shared memory at float32" in note
    assert attention.fallback_note("auto", "cudnn", "gpu", None, 4096, **BF16) is None
    assert attention.fallback_note("auto", "xla", "cpu", None, 4096, "float32", 128) is None
    with pytest.raises(attention.AttentionError, match="pallas_gpu cannot run this model: the Pallas GPU kernel "
                                                       "runs out of shared memory at float32"):
        attention.choose("pallas_gpu", "gpu", None, 4096, "float32", 128)
    with pytest.raises(attention.AttentionError, match="cudnn cannot run this model: cuDNN takes bfloat16/float16"):
        attention.choose("cudnn", "gpu", None, 4096, "float32", 128)


def test_gpu_head_sizes_cudnn_does_not_take_go_to_pallas():
    assert attention.choose("auto", "gpu", None, 4096, "bfloat16", 256) == "pallas_gpu"
    assert attention.choose("auto", "gpu", None, 4096, "bfloat16", 100) == "pallas_gpu"
    with pytest.raises(attention.AttentionError, match="head sizes up to 128 in multiples of 8, not 256"):
        attention.choose("cudnn", "gpu", None, 4096, "bfloat16", 256)


def test_gpu_long_packed_rows_avoid_the_quadratic_segment_mask():
    """cuDNN takes packed documents only as a [B, 1, T, S] mask: past 8192 tokens the Pallas
    kernel (segment ids natively), and unpacked rows keep cudnn."""
    assert attention.choose("auto", "gpu", None, 16384, **BF16) == "pallas_gpu"
    assert attention.choose("auto", "gpu", None, 16384, **BF16, segments=False) == "cudnn"
    assert attention.choose("auto", "gpu", None, 8192, **BF16) == "cudnn"


def test_gpu_window_shorter_than_the_sequence():
    """pallas_gpu has no window: with one shorter than the sequence, cudnn if it can, else xla."""
    assert attention.choose("auto", "gpu", 4096, 4096, "bfloat16", 256) == "pallas_gpu"  # the window covers it
    assert attention.choose("auto", "gpu", 4096, 8192, "bfloat16", 256) == "xla"
    note = attention.fallback_note("auto", "xla", "gpu", 4096, 8192, "bfloat16", 256)
    assert "not 256" in note and "has no sliding window" in note
    with pytest.raises(attention.AttentionError, match="pallas_gpu cannot run this model: the Pallas GPU kernel has "
                                                       "no sliding window.*4096.*8192"):
        attention.choose("pallas_gpu", "gpu", 4096, 8192, **BF16)
    with pytest.raises(attention.AttentionError, match="no sliding window"):  # interpret mode has none either
        attention.choose("pallas_gpu", "cpu", 4096, 8192)


def test_kernels_are_refused_on_the_wrong_platform():
    with pytest.raises(attention.AttentionError, match="splash runs on tpu, not on gpu"):
        attention.choose("splash", "gpu", None, 128)
    with pytest.raises(attention.AttentionError, match="cudnn runs on gpu/cuda, not on tpu"):
        attention.choose("cudnn", "tpu", None, 128)
    with pytest.raises(ConfigError, match="model.attention must be one of .* got 'flash'"):
        solarjax.preset("tiny").replace(attention="flash")


@pytest.mark.slow
def test_the_decoder_uses_the_configured_kernel():
    """The model's logits and gradients with splash equal those with the einsum path."""
    config = solarjax.preset("tiny").replace(num_layers=2, sliding_window=24)
    params = solarjax.init_params(config, jax.random.key(0))
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 40))
    segments = np.repeat([[1, 2]], [30, 10], axis=1).repeat(2, axis=0)
    positions = np.concatenate([np.arange(30), np.arange(10)])[None].repeat(2, axis=0)

    def loss(params, cfg):
        logits = solarjax.model.decoder.Decoder(cfg).apply({"params": params}, tokens, positions, segments)
        return jnp.mean(jax.nn.logsumexp(logits, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splash = config.replace(attention="splash")
        assert "pallas_call" in str(jax.make_jaxpr(loss, static_argnums=1)(params, splash))
        got = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, splash)
    want = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, config.replace(attention="xla"))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
        np.testing.assert_allclose(a, b, atol=1e-5)
