"""Model config: presets, exact parameter counts from shapes alone, and validation errors."""

import jax
import pytest

import solarjax
from solarjax.errors import ConfigError
from solarjax.model.config import ModelConfig
from solarjax.weights import hf


@pytest.mark.parametrize("name, count", [("mistral-7b", 7_241_732_096), ("solar-10.7b", 10_731_524_096)])
def test_preset_parameter_counts_allocate_nothing(name, count):
    before = sum(a.size for a in jax.live_arrays())
    assert solarjax.param_count(solarjax.preset(name)) == count
    assert sum(a.size for a in jax.live_arrays()) - before < 10_000


def test_preset_reference_facts():
    m, s = solarjax.preset("mistral-7b"), solarjax.preset("solar-10.7b")
    assert (m.num_layers, s.num_layers) == (32, 48)
    assert m.head_dim == s.head_dim == 128 and m.group_size == 4
    assert m.sliding_window == 4096 and s.sliding_window is None
    assert m.max_position_embeddings == 32768 and s.max_position_embeddings == 4096


def test_round_trip_through_json(tmp_path):
    c = solarjax.preset("tiny").replace(head_dim=8, sliding_window=3, remat="dots")
    c.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == c
    assert hash(c) == hash(ModelConfig.load(tmp_path / "c.json"))


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=5), "model.num_heads 5 must be a multiple of model.num_kv_heads 2"),
    (dict(hidden_size=0), "model.hidden_size must be a positive integer, got 0"),
    (dict(head_dim=7), "model.head_dim must be a positive even integer, got 7"),
    (dict(sliding_window=0), "model.sliding_window must be null or a positive integer, got 0"),
    (dict(dtype="float8"), "model.dtype must be one of"),
    (dict(remat="everything"), "model.remat must be one of"),
    (dict(rope_theta=-1.0), "model.rope_theta must be > 0"),
    (dict(colour="red"), "model: unknown key 'colour'"),
    (dict(rope_theta="fast"), "model.rope_theta must be a number, got 'fast'"),
])
def test_bad_values_are_named(changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        solarjax.preset("tiny").replace(**changes)


def test_from_dict_names_unknown_and_missing_keys(tmp_path):
    d = solarjax.preset("tiny").to_dict()
    with pytest.raises(ConfigError, match="unknown key 'hiden_size'"):
        ModelConfig.from_dict({**d, "hiden_size": 3})
    d.pop("vocab_size")
    with pytest.raises(ConfigError, match="vocab_size"):
        ModelConfig.from_dict(d)
    with pytest.raises(ConfigError, match="unknown model preset 'gpt-5'"):
        solarjax.preset("gpt-5")


def test_replaced_width_or_heads_recompute_an_implied_head_dim(tmp_path):
    tiny = solarjax.preset("tiny")  # hidden 64 / 4 heads: head_dim 16, implied
    assert tiny.head_dim == 16
    assert tiny.replace(hidden_size=256).head_dim == 64
    assert tiny.replace(num_heads=8, num_kv_heads=2).head_dim == 8
    assert tiny.replace(num_layers=3).replace(hidden_size=128).head_dim == 32  # through two replaces
    # A head_dim given explicitly stays, through replace and the JSON file.
    explicit = tiny.replace(head_dim=16)
    assert explicit == tiny and explicit.replace(hidden_size=256).head_dim == 16
    for c in (tiny, explicit):
        c.save(tmp_path / "c.json")
        loaded = ModelConfig.load(tmp_path / "c.json")
        assert loaded == c and loaded.replace(hidden_size=256).head_dim == c.replace(hidden_size=256).head_dim
        assert hf.config_from_hf(hf.config_to_hf(c, "llama")) == c  # HF's config.json says 16 either way
    with pytest.raises(ConfigError, match="hidden_size 96 is not divisible by model.num_heads 5"):
        tiny.replace(hidden_size=96, num_heads=5, num_kv_heads=1)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def test_rope_scaling_and_biases_round_trip_through_json_yaml_and_config_json(tmp_path):
    c = solarjax.preset("tiny").replace(rope_scaling=LLAMA3, qkv_bias=True, initializer_range=0.01)
    assert c.rope == LLAMA3 and c.to_dict()["rope_scaling"] == LLAMA3
    c.save(tmp_path / "c.json")
    assert ModelConfig.load(tmp_path / "c.json") == c and hash(ModelConfig.load(tmp_path / "c.json")) == hash(c)
    from solarjax.train.config import train_config_from_dict
    cfg = train_config_from_dict({"model": {"preset": "tiny", "rope_scaling": LLAMA3}})  # as YAML gives it
    assert cfg.model.rope_scaling == c.rope_scaling and cfg.to_dict()["model"]["rope_scaling"] == LLAMA3
    assert hf.config_from_hf(hf.config_to_hf(c, "qwen2")) == c
    plain = solarjax.preset("tiny").replace(rope_scaling={"rope_type": "dynamic", "factor": 2})
    assert hf.config_from_hf(hf.config_to_hf(plain, "mistral")) == plain


@pytest.mark.parametrize("scaling, message", [
    ({"rope_type": "longrope", "factor": 2.0}, "model.rope_scaling.rope_type 'longrope' is not supported"),
    ({"factor": 2.0}, "model.rope_scaling.rope_type None is not supported"),
    ({"rope_type": "yarn", "factor": 2.0}, "rope_type 'yarn' needs key 'original_max_position_embeddings'"),
    ({**LLAMA3, "beta_fast": 32}, "key 'beta_fast' is not used by rope_type 'llama3'"),
    ({"rope_type": "linear", "factor": "big"}, "model.rope_scaling.factor must be a number, got 'big'"),
    ({"rope_type": "linear", "factor": 0}, "model.rope_scaling.factor must be > 0, got 0"),
    ({**LLAMA3, "original_max_position_embeddings": 8192.5}, "original_max_position_embeddings must be a positive"),
    ("llama3", "model.rope_scaling must be a mapping"),
])
def test_bad_rope_scaling_is_named(scaling, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        solarjax.preset("tiny").replace(rope_scaling=scaling)
