"""The chunked vocabulary loss against the plain formula: full float32 logits, log-softmax, the
weighted sum, and jax.grad through all of it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from solarjax.sharding import make_mesh
from solarjax.train.loss import chunk_length, cross_entropy_sum

B, T, D, V = 4, 16, 8, 40


def _inputs(dtype=jnp.float32):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(B, T, D), dtype)
    w = jnp.asarray(rng.randn(D, V) * 0.5, dtype)
    labels = jnp.asarray(rng.randint(0, V, (B, T)), jnp.int32)
    labels = labels.at[0, 0].set(0).at[0, 1].set(V - 1)  # the vocabulary's edges
    weights = jnp.asarray(rng.rand(B, T) * (rng.rand(B, T) > 0.3), jnp.float32)  # zeros: masked tokens
    return x, w, labels, weights


def _formula(x, w, labels, weights):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", x.astype(jnp.float32), w.astype(jnp.float32)), axis=-1)
    return -(jnp.take_along_axis(logp, labels[..., None], -1)[..., 0] * weights).sum()


@pytest.mark.parametrize("chunk", [1, 4, T])
def test_value_and_gradients_equal_the_formula(chunk):
    x, w, labels, weights = _inputs()
    # A scalar factor after the sum, as the mean loss has: the backward pass must apply it.
    ours = jax.value_and_grad(lambda x, w: 3.0 * cross_entropy_sum(x, w, labels, weights, chunk), (0, 1))(x, w)
    ref = jax.value_and_grad(lambda x, w: 3.0 * _formula(x, w, labels, weights), (0, 1))(x, w)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6)
    np.testing.assert_allclose(ours[1][0], ref[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours[1][1], ref[1][1], rtol=1e-5, atol=1e-6)
    # Without differentiation (evaluation) the same value.
    np.testing.assert_allclose(jax.jit(cross_entropy_sum, static_argnums=4)(x, w, labels, weights, chunk), ref[0] / 3,
                               rtol=1e-6)


def test_masked_tokens_contribute_nothing_even_when_their_loss_is_infinite():
    x, w, labels, weights = _inputs()
    # Label 5's logit overflows to -inf at (1, 3) only: x[..., 0] > 0 everywhere, 10 there.
    x = x.at[..., 0].set(jnp.abs(x[..., 0]) % 1 + 0.1).at[1, 3, 0].set(10.0)
    w = w.at[0, 5].set(-3e38)
    labels = jnp.where(labels == 5, 6, labels).at[1, 3].set(5)
    weights = weights.at[1, 3].set(0.0)
    assert np.isinf(_formula(x, w, labels, weights.at[1, 3].set(1.0)))
    loss, (dx, dw) = jax.value_and_grad(lambda x, w: cross_entropy_sum(x, w, labels, weights, 4), (0, 1))(x, w)
    assert np.isfinite(loss) and np.isfinite(dx).all() and np.isfinite(dw).all()


def test_bfloat16_compute_stays_close_to_float32():
    x, w, labels, weights = _inputs(jnp.bfloat16)
    ours, (dx, dw) = jax.value_and_grad(lambda x, w: cross_entropy_sum(x, w, labels, weights, 4), (0, 1))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16 and ours.dtype == jnp.float32
    ref, (rdx, rdw) = jax.value_and_grad(lambda x, w: _formula(x, w, labels, weights), (0, 1))(x, w)
    np.testing.assert_allclose(ours, ref, rtol=1e-5)  # logits accumulate in float32 either way
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(rdx, np.float32), atol=0.02)
    np.testing.assert_allclose(np.asarray(dw, np.float32), np.asarray(rdw, np.float32), atol=0.05)


def test_sharded_over_batch_and_vocabulary():
    """Batch over data x fsdp and the vocabulary over tensor, as the trainer shards them."""
    mesh = make_mesh(2, 2, 2)
    x, w, labels, weights = _inputs()
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    x_s = jax.device_put(x, rows)
    w_s = jax.device_put(w, NamedSharding(mesh, P(None, "tensor")))
    labels_s, weights_s = jax.device_put(labels, rows), jax.device_put(weights, rows)
    f = jax.jit(jax.value_and_grad(lambda x, w: cross_entropy_sum(x, w, labels_s, weights_s, 4), (0, 1)))
    loss, (dx, dw) = f(x_s, w_s)
    ref, (rdx, rdw) = jax.value_and_grad(lambda x, w: _formula(x, w, labels, weights), (0, 1))(x, w)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-6)


def test_chunk_length():
    assert chunk_length(256, 8, 256) == 32
    assert chunk_length(512, 4, 256) == 64
    assert chunk_length(96, 1, 64) == 48  # the longest divisor that fits, not a power of two
    assert chunk_length(7, 64, 256) == 1  # one position per step when even that is over the budget
    assert chunk_length(4096, 16, 4096) == 256
