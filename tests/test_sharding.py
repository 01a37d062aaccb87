"""Sharded execution on 8 simulated CPU devices equals single-device execution."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import solarjax
from solarjax import sharding
from solarjax.errors import ConfigError
from solarjax.model.decoder import abstract_params


def test_mesh_has_eight_devices():
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 simulated CPU devices"


def test_sharded_logits_equal_single_device_logits(tmp_path):
    config = solarjax.preset("tiny").replace(sliding_window=6)
    mesh = solarjax.make_mesh(data=2, fsdp=2, tensor=2)
    params = solarjax.init_params(config, jax.random.key(0), mesh)
    # Parameters are created in their shards: q_proj [L, D, H, E] splits D over fsdp and H over tensor.
    q = params["layers"]["self_attn"]["q_proj"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 2, 16)
    assert params["embed_tokens"].sharding.spec == P("tensor", "fsdp")

    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (4, 16))
    single = jax.device_put(params, jax.devices()[0])
    ref = np.asarray(solarjax.logits(config, single, tokens))
    with jax.set_mesh(mesh):
        batch = jax.device_put(tokens, sharding.batch_sharding(mesh))
        out = solarjax.logits(config, params, batch)
    assert out.sharding.mesh.shape == mesh.shape
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5)


def test_load_hf_places_shards_on_the_mesh(tmp_path):
    from hf_models import hf_logits, make_hf_model, save_hf_model
    hf_model = make_hf_model("mistral", num_key_value_heads=2, sliding_window=8)
    mesh = solarjax.make_mesh(data=1, fsdp=4, tensor=2)
    config, params = solarjax.load_model(save_hf_model(hf_model, tmp_path / "hf"), mesh=mesh)
    o = params["layers"]["self_attn"]["o_proj"]
    assert o.sharding.spec == P(None, "tensor", None, "fsdp")
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 12))
    with jax.set_mesh(mesh):
        out = np.asarray(solarjax.logits(config, params, tokens))
    assert np.abs(out - hf_logits(hf_model, tokens)).max() <= 1e-4


def test_indivisible_dims_stay_replicated():
    """MQA: one kv head cannot split over tensor=2, so that dim stays whole instead of failing."""
    config = solarjax.preset("tiny").replace(num_kv_heads=1)
    mesh = solarjax.make_mesh(data=1, fsdp=4, tensor=2)
    with pytest.warns(UserWarning) as record:
        shardings = sharding.param_shardings(abstract_params(config), mesh)
    assert shardings["layers"]["self_attn"]["k_proj"].spec == P(None, "fsdp", None, None)
    assert shardings["layers"]["self_attn"]["q_proj"].spec == P(None, "fsdp", "tensor", None)
    assert sorted(str(w.message) for w in record) == [
        f"layers/self_attn/{n}_proj [2, 64, 1, 16]: kv_heads 1 is not divisible by mesh tensor=2, so that dim "
        f"is replicated (expected: fewer kv heads than tensor)" for n in "kv"]


def test_replicating_a_dim_warns_once_per_parameter():
    """hidden 42 over fsdp=4 (like 4096 over fsdp=6) shards no weight: every device would hold the
    whole model and its Adam moments, so each parameter says so."""
    config = solarjax.preset("tiny").replace(hidden_size=42, head_dim=8)
    mesh = solarjax.make_mesh(data=1, fsdp=4, tensor=2)
    with pytest.warns(UserWarning) as record:
        shardings = sharding.param_shardings(abstract_params(config), mesh)
    assert shardings["embed_tokens"].spec == P("tensor", None)
    messages = [str(w.message) for w in record]
    assert "embed_tokens [256, 42]: embed 42 is not divisible by mesh fsdp=4, so that dim is replicated" in messages
    named = sorted(m.split(" ")[0] for m in messages)
    assert named == sorted(["embed_tokens", "lm_head"] + [f"layers/{p}" for p in (
        "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj", "self_attn/k_proj", "self_attn/o_proj",
        "self_attn/q_proj", "self_attn/v_proj")])  # norms are never sharded, so they do not warn


@pytest.mark.parametrize("sizes, message", [
    ((3, -1, 1), "does not fit 8 devices"),
    ((-1, -1, 2), "at most one mesh axis may be -1"),
    ((2, 2, 1), "has 4 devices, but 8 are present"),
])
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(ConfigError, match=message):
        solarjax.make_mesh(*sizes)
