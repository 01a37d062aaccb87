"""The run plan: what a run derives from its config, resolved once, with the checks across sections."""

import jax
import pytest

import solarjax
from solarjax.errors import ConfigError
from solarjax.train.config import train_config_from_dict
from solarjax.train.plan import RunPlan

TINY = {"preset": "tiny", "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "num_kv_heads": 2,
        "head_dim": 8, "max_position_embeddings": 128}


def _cfg(**over):
    d = {"model": dict(TINY), "data": {"seq_len": 64}, "global_batch": 8, "steps": 10}
    for key, value in over.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return train_config_from_dict(d)


def test_the_plan_resolves_model_attention_chunk_and_flops():
    mesh = solarjax.make_mesh(1, 4, 1, jax.devices()[:4])
    plan = RunPlan.resolve(_cfg(**{"model.num_layers": 4, "init.upscale": {"n": 4, "m": 1},
                                   "loss_chunk_tokens": 32}), mesh)
    assert plan.model_config.num_layers == 6 and plan.model_config.attention == "auto"  # as saved
    assert plan.step_config.attention == plan.attention == "xla"  # what runs on CPU
    assert plan.platform == "cpu" and plan.seq_len == 64
    assert plan.loss_chunk == 16  # 32 positions-rows over the 2 rows each device holds
    c = plan.model_config
    weights = solarjax.param_count(c) - c.vocab_size * c.hidden_size
    assert plan.flops_per_token == 6 * weights + 12 * c.num_layers * c.num_heads * c.head_dim * 64
    assert plan.objective.name == "lm" and plan.options is None
    dpo = RunPlan.resolve(_cfg(objective="dpo", **{"dpo.beta": 0.3}))
    assert dpo.objective.reference and dpo.options.beta == 0.3


@pytest.mark.parametrize("over, mesh, message", [
    ({"data.seq_len": 256}, None, "data.seq_len 256 is longer than the model's max_position_embeddings 128"),
    ({"data.seq_len": 1024, "model.rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 128}}, None,
     "longer than the model's max_position_embeddings 128 and the 512 positions its RoPE scaling allows"),
    ({"global_batch": 6}, (1, 4, 1), "global_batch 6 must be a multiple of mesh data x fsdp = 4"),
    ({"microbatches": 4}, (1, 4, 1), "global_batch 8 must be a multiple of mesh data x fsdp = 4 times microbatches 4"),
    ({"model.param_dtype": "bfloat16"}, None, "model.param_dtype bfloat16 is refused for training"),
    ({"model.attention": "pallas_gpu", "model.sliding_window": 32}, None, "Pallas GPU kernel has no sliding window"),
])
def test_checks_across_sections_name_both_values(over, mesh, message):
    mesh = solarjax.make_mesh(*mesh, jax.devices()[:4]) if mesh else None
    with pytest.raises(ConfigError, match=message):
        RunPlan.resolve(_cfg(**over), mesh)


def test_a_scaled_model_trains_as_long_as_its_rope_scaling_allows():
    """YaRN factor 4 over 128 positions (vLLM's rule: original x factor) trains at 512."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
    assert RunPlan.resolve(_cfg(**{"data.seq_len": 512, "model.rope_scaling": yarn})).seq_len == 512


def test_a_saved_model_wins_and_a_changed_one_is_refused():
    cfg = _cfg()
    saved = RunPlan.resolve(cfg).model_config
    assert RunPlan.resolve(_cfg(**{"model.remat": "full"}), saved=saved).model_config == saved.replace(remat="full")
    with pytest.raises(ConfigError, match="holds a run with model.num_layers=2, but the config says 3"):
        RunPlan.resolve(_cfg(**{"model.num_layers": 3}), saved=saved)
