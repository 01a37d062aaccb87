"""The optimizer's rules, each against its formula: the schedule at its corners, weight decay on
exactly the weights that are not norm scales, the loss mask on document boundaries and padding,
and gradient accumulation against the whole batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import solarjax
from solarjax.config import OptimConfig
from solarjax.optim import make_optimizer, schedule
from solarjax.trainer import jit_train_step, loss_and_count, new_state


def test_schedule_corners():
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    for kind in ("cosine", "linear"):
        lr = schedule(OptimConfig(**{**cfg.__dict__, "schedule": kind}), 100)
        np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10)), float(lr(100))],
                                   [1e-4, 5.5e-4, 1e-3, 1e-4], rtol=1e-5)  # warmup ends at the peak
        mid = 1e-4 + 0.9e-3 * (0.5 * (1 + np.cos(np.pi * 45 / 90)) if kind == "cosine" else 45 / 90)
        np.testing.assert_allclose(float(lr(55)), mid, rtol=1e-5)
    constant = schedule(OptimConfig(**{**cfg.__dict__, "schedule": "constant"}), 100)
    np.testing.assert_allclose([float(constant(10)), float(constant(100))], [1e-3, 1e-3], rtol=1e-6)


def test_weight_decay_skips_exactly_the_norm_scales():
    """With zero gradients AdamW's step is -lr * wd * w on decayed weights and nothing elsewhere."""
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(0))
    cfg = OptimConfig(learning_rate=0.5, warmup_steps=0, weight_decay=0.1, grad_clip=0.0, schedule="constant")
    opt = make_optimizer(cfg, 10)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    decayed = {jax.tree_util.keystr(path): np.asarray(u) for path, u in flat}
    originals = {jax.tree_util.keystr(path): np.asarray(p) for path, p in jax.tree_util.tree_flatten_with_path(params)[0]}
    scales = [k for k in decayed if k.endswith("['scale']")]
    assert len(scales) == 3  # input and post-attention norms (stacked) and the final norm
    for key, u in decayed.items():
        expected = 0 if key in scales else -0.5 * 0.1 * originals[key]
        np.testing.assert_allclose(u, expected, rtol=1e-6, atol=1e-9, err_msg=key)


def test_loss_ignores_targets_across_documents_and_on_padding():
    """Row: document A (3 tokens), document B (2 tokens), 3 padding. Targets: A0->A1, A1->A2,
    B0->B1 only; A2->B0 crosses a boundary, B1->pad and pad->pad are padding."""
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(1))
    tokens = np.array([[5, 6, 7, 8, 9, 0, 0, 0]], np.int32)
    segments = np.array([[1, 1, 1, 2, 2, 0, 0, 0]], np.int32)
    positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0]], np.int32)
    batch = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segments), "positions": jnp.asarray(positions)}
    loss, count = loss_and_count(config, params, batch)
    z = np.asarray(solarjax.logits(config, params, tokens[:, :5], positions[:, :5], segments[:, :5]), np.float64)[0]
    logp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    expected = -(logp[0, 6] + logp[1, 7] + logp[3, 9]) / 3
    assert int(count) == 3
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_microbatches_give_the_whole_batch_mean_loss_and_step():
    """Gradient accumulation: 4 rows with different numbers of targets (so a mean of the groups'
    means would be wrong), in 2 groups on a 2-device data mesh, give the same loss, gradient
    norm and updated weights as the whole batch at once; the whole batch's gradient is jax.grad of
    the mean loss over all targets."""
    config = solarjax.preset("tiny")
    params = solarjax.init_params(config, jax.random.key(2))
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, config.vocab_size, (4, 8)).astype(np.int32)
    segments = np.array([[1] * 8, [1] * 3 + [0] * 5, [1] * 5 + [2] * 3, [1] * 2 + [0] * 6], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 0, 1, 2],
                          [0, 1, 0, 0, 0, 0, 0, 0]], np.int32)
    batch = {"tokens": tokens, "segment_ids": segments, "positions": positions}
    # eps 1: AdamW's first step is ~lr * g, linear in the gradient, where eps 1e-8 makes it lr * sign(g)
    # and rounding-level gradients would decide the comparison.
    opt_cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant", eps=1.0)
    opt = make_optimizer(opt_cfg, 10)
    mesh = solarjax.make_mesh(2, 1, 1, jax.devices()[:2])
    expected_grads = jax.grad(lambda p: loss_and_count(config, p, jax.tree.map(jnp.asarray, batch))[0])(params)
    results = {}
    for k in (1, 2):
        step = jit_train_step(config, opt, schedule(opt_cfg, 10), mesh, chunk=4, microbatches=k)
        with jax.set_mesh(mesh):
            state = jax.jit(lambda p: new_state(opt, p))(jax.tree.map(jnp.copy, params))
            new, metrics = step(state, batch)
        results[k] = (jax.device_get(metrics), jax.device_get(new["params"]))
    np.testing.assert_allclose(results[1][0]["grad_norm"], float(optax.global_norm(expected_grads)), rtol=1e-5)
    for k in (2,):
        for name in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(results[k][0][name], results[1][0][name], rtol=1e-5, err_msg=f"{k}: {name}")
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), results[k][1], results[1][1])
