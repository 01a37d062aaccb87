"""The optimizer's rules, each against its formula: the schedule at its corners, weight decay on
exactly the weights that are not norm scales, the loss mask on document boundaries and padding,
gradient accumulation against the whole batch, and frozen parameters (no state, no movement, not
in the clip's norm, no decay)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import solarjax
from solarjax.errors import ConfigError
from solarjax.train.config import OptimConfig
from solarjax.train.optim import Trainable, make_optimizer, schedule
from solarjax.train.step import jit_train_step, loss_and_count, new_state


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


@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_every_min_lr_ratio_extends_a_schedule(kind, ratio):
    """A 20-step schedule extended at step 10 (continue) and at step 20 (restart, it had ended):
    finite, continuous where it continues, and from the peak again where it restarts."""
    cfg = OptimConfig(learning_rate=1e-3, warmup_steps=4, min_lr_ratio=ratio, schedule=kind)
    base = schedule(cfg, 20)
    floor = 1e-3 * ratio if kind != "constant" else 1e-3
    go_on = schedule(cfg, 20, ((10, 30, "continue"),))
    np.testing.assert_allclose(float(go_on(10)), float(base(10)), rtol=1e-6)
    np.testing.assert_allclose(float(go_on(30)), floor, rtol=1e-5, atol=1e-12)
    again = schedule(cfg, 20, ((20, 40, "restart"),))
    fresh = schedule(cfg, 20)  # the new segment is a fresh 20-step schedule, shifted by 20
    got = [float(again(t)) for t in range(20, 41)]
    want = [float(fresh(t)) for t in range(0, 21)]
    assert all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)


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


@pytest.mark.slow
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


# Frozen parameters (make_optimizer(trainable=Trainable(...))), on a small tree shaped like the
# model's: `embed` and `head` outside the stack, and a stacked [L=3, ...] `layers` trained in layer
# 1 only, as block expansion leaves them.
def _frozen_tree():
    rng = np.random.RandomState(0)
    params = {"embed": rng.randn(6, 4), "head": rng.randn(4, 6),
              "layers": {"w": rng.randn(3, 4, 5), "scale": rng.randn(3, 4)}}
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def _frozen_opt(trainable=Trainable(layers=(1,), rest=False), **overrides):
    cfg = OptimConfig(**{"learning_rate": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.1,
                         "grad_clip": 0.0, **overrides})
    return make_optimizer(cfg, 10, trainable=trainable)


def test_frozen_parts_carry_no_optimizer_state():
    """Adam's two moments exist for the trained layers (and, with rest, the leaves outside the
    stack) only: the state's arrays (beyond scalar step counts) add up to 2 x their sizes, where
    the same optimizer without freezing holds 2 x every parameter."""
    params = _frozen_tree()
    sizes = {k: sum(a.size for a in jax.tree.leaves(v)) for k, v in params.items()}
    state_size = lambda opt: sum(a.size for a in jax.tree.leaves(opt.init(params)) if a.ndim)  # noqa: E731
    assert state_size(_frozen_opt(None)) == 2 * sum(sizes.values())
    assert state_size(_frozen_opt()) == 2 * sizes["layers"] // 3
    assert state_size(_frozen_opt(Trainable(layers=(0, 2), rest=True))) == 2 * (
        sizes["embed"] + sizes["head"] + 2 * sizes["layers"] // 3)
    assert state_size(_frozen_opt(Trainable(layers=(), rest=True))) == 2 * (sizes["embed"] + sizes["head"])


def test_frozen_values_never_move_and_trained_ones_do():
    """Three steps on random gradients, with weight decay: the leaves outside the stack and the
    frozen layers stay bit-identical; the trained layer moves. Then, with zero gradients (weight
    decay alone moves weights), the trained decayed weights shrink by lr * wd * w and nothing
    frozen moves: no decay reaches a frozen weight."""
    params = _frozen_tree()
    opt = _frozen_opt()
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    p, state = params, opt.init(params)
    rng = np.random.RandomState(1)
    for _ in range(3):
        p, state = step(p, state, jax.tree.map(lambda a: jnp.asarray(rng.randn(*a.shape), jnp.float32), params))
    for name in ("embed", "head"):
        np.testing.assert_array_equal(p[name], params[name], err_msg=name)
    for name in ("w", "scale"):
        for i in (0, 2):
            np.testing.assert_array_equal(p["layers"][name][i], params["layers"][name][i], err_msg=f"{name} layer {i}")
        assert np.abs(np.asarray(p["layers"][name][1] - params["layers"][name][1])).min() > 0, name

    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = opt.update(zeros, opt.init(params), params)
    np.testing.assert_allclose(updates["layers"]["w"][1], -0.1 * 0.1 * params["layers"]["w"][1], rtol=1e-6)
    for u in (updates["embed"], updates["head"], updates["layers"]["w"][0], updates["layers"]["w"][2],
              updates["layers"]["scale"]):
        np.testing.assert_array_equal(u, 0)
    # A frozen -0.0 stays -0.0: the frozen update is -0.0, and x + (-0.0) is x bit for bit.
    signed = {**params, "embed": params["embed"].at[0, 0].set(-0.0)}
    moved = optax.apply_updates(signed, opt.update(zeros, opt.init(signed), signed)[0])
    assert np.signbit(np.asarray(moved["embed"][0, 0]))


def test_clipping_counts_only_trained_gradients():
    """The global norm that clipping divides by is that of the trained gradients alone: however
    large the frozen gradients (the leaves outside the stack, the frozen layers), the trained
    parameters take the step the formula gives from their own gradients. With eps 1 Adam's first
    step is lr * g / (|g| + 1), so the clip's scale shows in it (with eps 1e-8 it would be ~ lr * sign(g))."""
    params = _frozen_tree()
    opt = _frozen_opt(grad_clip=1.0, eps=1.0, weight_decay=0.0)
    rng = np.random.RandomState(2)
    grads = jax.tree.map(lambda a: rng.randn(*a.shape).astype(np.float32), params)
    keep = {"w": np.zeros((3, 4, 5), bool), "scale": np.zeros((3, 4), bool)}
    keep["w"][1], keep["scale"][1] = True, True
    trained = [grads["layers"]["w"][keep["w"]], grads["layers"]["scale"][keep["scale"]]]
    norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in trained))
    assert norm > 2  # so that the clip acts
    scale = 1.0 / norm
    expected = {name: -0.1 * g * scale / (np.abs(g * scale) + 1.0) for name, g in
                (("w", grads["layers"]["w"][1]), ("scale", grads["layers"]["scale"][1]))}
    for frozen_size in (0.0, 1e3):
        layers = {k: np.where(keep[k], grads["layers"][k], frozen_size).astype(np.float32) for k in ("w", "scale")}
        g = {"embed": np.full((6, 4), frozen_size, np.float32), "head": np.full((4, 6), frozen_size, np.float32),
             "layers": layers}
        updates, _ = opt.update(jax.tree.map(jnp.asarray, g), opt.init(params), params)
        for name in ("w", "scale"):
            np.testing.assert_allclose(updates["layers"][name][1], expected[name], rtol=1e-5,
                                       err_msg=f"{name}, frozen {frozen_size}")


def test_bad_trainable_layers_are_refused():
    params = _frozen_tree()
    with pytest.raises(ConfigError, match=r"trainable layer 3 is outside the model's 3 layers \[0, 3\)"):
        _frozen_opt(Trainable(layers=(1, 3), rest=False)).init(params)
