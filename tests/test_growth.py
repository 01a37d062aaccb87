"""The growth family (block expansion, stacking, middle duplication, zero_new): grown models
compute the base's function, in solarjax and after export in transformers; the streamed CLI writes
the in-memory growth's files byte for byte; bad specs are one line naming the value."""

import shutil

import jax
import numpy as np
import pytest
import transformers
from test_objectives import _cfg as _objective_cfg, models  # noqa: F401  (a fixture: tiny Llamas, SFT and DPO data)

import solarjax
from solarjax.cli import convert
from solarjax.errors import ConfigError
from solarjax.weights import hf, upscale
from solarjax.weights.upscale import UpscaleError, UpscaleSpec

from hf_models import hf_logits, make_hf_model, save_hf_model, tokenizer_file

# (spec, the grown model's base layer per layer, the new layers, zeroed or not)
SPECS = {
    "expand2": (UpscaleSpec(expand=2), [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7], [2, 5, 8, 11]),
    "expand8": (UpscaleSpec(expand=8), list(range(8)) + [7], [8]),
    "stack_zero_new": (UpscaleSpec(layers="0:8,0:8", zero_new=True), list(range(8)) * 2, list(range(8, 16))),
    "middle_zero_new": (UpscaleSpec(layers="0:3,3:5,3:5,5:8", zero_new=True), [0, 1, 2, 3, 4, 3, 4, 5, 6, 7], [5, 6]),
    "dus_zero_new": (UpscaleSpec(n=8, m=2, zero_new=True), list(range(6)) + list(range(2, 8)), [6, 7, 8, 9]),
}


@pytest.fixture(scope="module")
def base8(tmp_path_factory):
    """A tiny 8-layer Llama with a tokenizer, as HF writes it."""
    path = tmp_path_factory.mktemp("base8") / "hf"
    save_hf_model(make_hf_model("llama", num_hidden_layers=8, hidden_size=32, intermediate_size=48), path)
    shutil.copy(tokenizer_file(), path / "tokenizer.model")
    return path


def test_growth_maps_layers_and_names_new_ones():
    for name, (spec, index, new) in SPECS.items():
        growth = spec.growth(8)
        assert list(growth.index) == index and list(growth.new) == new and list(growth.zeroed) == new, name
    plain = UpscaleSpec(layers="0:8,0:8").growth(8)  # without zero_new: new layers, none zeroed
    assert list(plain.new) == list(range(8, 16)) and plain.zeroed == ()
    assert upscale.expand_plan(4, 2) == ((0, 2), (1, 4), (3, 4))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_grown_models_compute_the_base_function_here_and_in_transformers(base8, tmp_path, name):
    """The loader (reading each new layer from the base's files), the param-tree operator, and the
    HF export loaded by transformers all give the base's logits; the new layers' o_proj and
    down_proj are zero and every other tensor is its base layer's."""
    spec, index, new = SPECS[name]
    tokens = np.random.RandomState(0).randint(0, 128, (2, 12))
    config, base = solarjax.load_hf(base8)
    base_logits = np.asarray(solarjax.logits(config, base, tokens))
    grown_config, grown = solarjax.load_model(base8, upscale=spec)
    tree_config, tree = upscale.grow(config, base, spec)
    assert grown_config == tree_config and grown_config.num_layers == len(index)
    for (path, a), b, base_leaf in zip(jax.tree_util.tree_leaves_with_path(grown), jax.tree.leaves(tree),
                                       jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
        if path[0].key != "layers":
            continue
        zeroed = tuple(k.key for k in path[1:]) in upscale.ZEROED
        for i, b_i in enumerate(index):
            expected = 0 * np.asarray(base_leaf[b_i]) if zeroed and i in new else np.asarray(base_leaf[b_i])
            np.testing.assert_array_equal(np.asarray(a[i]), expected, err_msg=f"{jax.tree_util.keystr(path)} {i}")
    assert np.abs(np.asarray(solarjax.logits(grown_config, grown, tokens)) - base_logits).max() <= 1e-5
    hf.save_hf(grown_config, grown, tmp_path / "out", tokenizer_dir=base8)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert theirs.config.num_hidden_layers == len(index)
    assert np.abs(hf_logits(theirs, tokens) - base_logits).max() <= 1e-5


@pytest.mark.parametrize("args, spec, dtype", [
    (["--expand", "2"], UpscaleSpec(expand=2), "float32"),
    (["--layers", "0:3,3:5,3:5,5:8", "--zero-new"], UpscaleSpec(layers="0:3,3:5,3:5,5:8", zero_new=True), "bfloat16"),
])
def test_streamed_cli_writes_the_in_memory_growth_byte_for_byte(base8, tmp_path, capsys, args, spec, dtype):
    out = tmp_path / "stream"
    assert convert.main(["upscale", "--hf", str(base8), "--out", str(out), "--dtype", dtype, "--shard-size", "20KB",
                         *args]) == 0, capsys.readouterr().err
    config, base = solarjax.load_hf(base8)
    grown_config, grown = upscale.grow(config, base, spec)
    hf.save_hf(grown_config, grown, tmp_path / "tree", dtype=dtype, shard_size=20_000, tokenizer_dir=base8)
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and files == sorted(p.name for p in (tmp_path / "tree").glob("*.safetensors"))
    for name in files + ["model.safetensors.index.json", "config.json"]:
        assert (out / name).read_bytes() == (tmp_path / "tree" / name).read_bytes(), name
    assert "o_proj and down_proj zero" in (out / "README.md").read_text()


@pytest.mark.parametrize("spec, message", [
    (UpscaleSpec(expand=3), "expand=3 must divide the base's depth of 8 layers (expand in [1, 2, 4, 8])"),
    (UpscaleSpec(expand=0), "expand=0 must be a positive integer"),
    (UpscaleSpec(expand=2, n=8, m=2), "expand=2 is a growth of its own: give expand, or n and m, or layers"),
    (UpscaleSpec(expand=2, layers="0:8"), "expand=2 is a growth of its own"),
    (UpscaleSpec(layers="0:8", zero_new="yes"), "zero_new='yes' must be true or false"),
])
def test_bad_growth_specs_are_one_line(spec, message):
    with pytest.raises(UpscaleError) as e:
        spec.plan(8)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ConfigError)


def test_bad_growth_in_the_config_and_the_cli(base8, tmp_path, capsys):
    from solarjax.train.config import train_config_from_dict
    with pytest.raises(ConfigError, match=r"^init.upscale: expand=2 is a growth of its own"):
        train_config_from_dict({"model": {"preset": "tiny"}, "init": {"upscale": {"expand": 2, "n": 2, "m": 1}}})
    with pytest.raises(ConfigError, match=r"init.upscale: unknown key 'expnad' \(known: expand, layers, m, n, "
                                         r"zero_new\)"):
        train_config_from_dict({"model": {"preset": "tiny"}, "init": {"upscale": {"expnad": 2}}})
    code = convert.main(["upscale", "--hf", str(base8), "--out", str(tmp_path / "o"), "--expand", "3"])
    assert code == 2 and "expand=3 must divide the base's depth of 8 layers" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# Training a grown model's parts (top-level `trainable`)

TINY = {"preset": "tiny", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
        "num_kv_heads": 2, "head_dim": 8}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.RandomState(0)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for i in range(20):
        (folder / f"d{i:02d}.txt").write_text(" ".join(" ".join(words[:rng.randint(3, 8)]) for _ in range(30)))
    return folder


def _cfg_dict(tmp_path, corpus, **over) -> dict:
    d = {"model": dict(TINY), "data": {"sources": [str(corpus)], "seq_len": 32, "num_proc": 1,
                                       "cache_dir": str(tmp_path.parent / "cache")},
         "optim": {"learning_rate": 1e-2, "warmup_steps": 0}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
         "run_dir": str(tmp_path / "run"), "steps": 3, "global_batch": 8, "log_every": 1, "eval_every": 0,
         "checkpoint_every": 2}
    for key, value in over.items():
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return d


def _train_cfg(tmp_path, corpus, **over):
    from solarjax.train.config import train_config_from_dict
    return train_config_from_dict(_cfg_dict(tmp_path, corpus, **over))


def _host(tree):
    return jax.tree.map(lambda a: np.array(a), tree)


@pytest.mark.slow
def test_new_layers_train_alone_on_a_3d_mesh_with_microbatches(tmp_path, corpus, capsys):
    """A 2-layer model expanded every block (4 layers, new: 1 and 3), trainable: new_layers, on a
    data x fsdp x tensor mesh with 2 microbatches: after 3 steps every frozen tensor (embeddings,
    final norm, head, layers 0 and 2) is bit-identical to the grown model at step 0 and every
    tensor of the new layers moved (o_proj and down_proj away from zero too); Adam's moments exist
    for the new layers only, in their parameters' shards; the start-up line counts them."""
    from solarjax.train.trainer import Trainer
    mesh = solarjax.make_mesh(2, 2, 2)
    cfg = _train_cfg(tmp_path, corpus, trainable="new_layers", microbatches=2, **{"init.upscale": {"expand": 1}})
    trainer = Trainer(cfg, mesh)
    start = _host(trainer.state["params"])
    err = capsys.readouterr().err
    config = trainer.model_config
    assert config.num_layers == 4
    per_layer = sum(a[0].size for a in jax.tree.leaves(start["layers"]))
    total = sum(a.size for a in jax.tree.leaves(start))
    assert (f"trainable: new_layers (layers 1:2,3:4): {2 * per_layer:,} parameters trained, "
            f"{total - 2 * per_layer:,} frozen; optimizer state") in err
    moments = [a for a in jax.tree.leaves(trainer.state["opt_state"]) if a.ndim]
    assert sum(a.size for a in moments) == 2 * 2 * per_layer  # mu and nu of the two new layers, nothing else
    q = trainer.state["params"]["layers"]["self_attn"]["q_proj"]
    mu_q = [a for p, a in jax.tree_util.tree_leaves_with_path(trainer.state["opt_state"])
            if jax.tree_util.keystr(p).endswith("['layers']['self_attn']['q_proj']")]
    assert len(mu_q) == 2 and all(m.shape[0] == 2 and m.sharding.spec == q.sharding.spec for m in mu_q)
    # The grown model at step 0 is the base function: o_proj/down_proj of the new layers are zero.
    assert not start["layers"]["self_attn"]["o_proj"][[1, 3]].any()
    trainer.run()
    end = _host(trainer.state["params"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start), jax.tree.leaves(end)):
        name = jax.tree_util.keystr(path)
        if path[0].key != "layers":
            np.testing.assert_array_equal(b, a, err_msg=name)
            continue
        for i in (0, 2):
            np.testing.assert_array_equal(b[i], a[i], err_msg=f"{name} layer {i}")
        for i in (1, 3):
            assert (b[i] != a[i]).any(), f"{name} layer {i} did not move"


@pytest.mark.slow
def _no_data(*args, **kwargs):
    raise AssertionError("the data was loaded before a refusal that needs none of it")


def test_resume_with_other_trainable_parts_is_refused_not_damage(tmp_path, corpus, monkeypatch):
    """A run of trainable "1:2" resumed with "0:1" (the same state shapes) or with all (other shapes)
    stops naming both and moves nothing; without trainable.json (a run from before it was written),
    the saved state's shapes still tell 1:2 from all. The same trainable resumes."""
    from solarjax.train.trainer import CheckpointError, Trainer
    mesh = solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    Trainer(_train_cfg(tmp_path, corpus, trainable="1:2"), mesh).run(until=2)
    folder = tmp_path / "run" / "checkpoints"
    before = sorted(p.name for p in folder.iterdir())
    for other, said in (("0:1", "trainable: 0:1 (layers 0:1)"), ("all", "trainable: all;")):
        with pytest.raises(CheckpointError) as e, monkeypatch.context() as m:
            m.setattr(solarjax.data, "load_data", _no_data)  # refused before the corpus is tokenized
            Trainer(_train_cfg(tmp_path, corpus, trainable=other), mesh)
        assert f"was trained with trainable: 1:2 (layers 1:2), but the config says {said}" in str(e.value)
        assert f"init.from: {folder / '2'}" in str(e.value) and "nothing was moved" in str(e.value)
    (tmp_path / "run" / "trainable.json").rename(tmp_path / "trainable.json")
    with pytest.raises(CheckpointError, match="does not match this config's train state: the optimizer state"):
        Trainer(_train_cfg(tmp_path, corpus, trainable="all"), mesh)
    (tmp_path / "trainable.json").rename(tmp_path / "run" / "trainable.json")
    assert sorted(p.name for p in folder.iterdir()) == before
    resumed = Trainer(_train_cfg(tmp_path, corpus, trainable="1:2"), mesh)
    assert int(resumed.state["step"]) == 2


@pytest.mark.parametrize("over, message", [
    ({"trainable": "new_layers"}, "trainable: new_layers names the layers a growth adds, and init.upscale is not set"),
    ({"trainable": "0:2,1:3"}, "trainable: ranges 0:2 and 1:3 in '0:2,1:3' overlap"),
    ({"trainable": "2:2"}, "trainable: range 2:2 in '2:2' is empty"),
    ({"trainable": "top"}, "trainable: range 'top' in 'top' is not START:END"),
    ({"trainable": 492}, "trainable: range 492 is a number: YAML reads an unquoted 8:16 as 8 * 60 + 16"),
    ({"init.upscale": {"expand": 2, "layers": "0:2"}}, "init.upscale: expand=2 is a growth of its own"),
])
def test_bad_trainable_in_the_config_is_one_line(tmp_path, corpus, over, message):
    with pytest.raises(ConfigError) as e:
        _train_cfg(tmp_path, corpus, **over)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("over, message", [
    ({"trainable": "3:5", "init.upscale": {"expand": 2}},
     "trainable: range 3:5 is outside the grown model's 3 layers [0, 3)"),
    ({"trainable": "1:3"}, "trainable: range 1:3 is outside the model's 2 layers [0, 2)"),
    ({"trainable": "new_layers", "init.upscale": {"layers": "0:2"}}, "trainable: new_layers names no parameter"),
    ({"init.upscale": {"expand": 3}}, "expand=3 must divide the base's depth of 2 layers (expand in [1, 2])"),
])
def test_trainable_against_the_model_is_one_line(tmp_path, corpus, over, message):
    from solarjax.train.plan import planned_model_config
    from solarjax.train.step import resolve_trainable
    cfg = _train_cfg(tmp_path, corpus, **over)
    with pytest.raises(ConfigError) as e:
        planned_model_config(cfg)
        resolve_trainable(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_run_with_frozen_parts_killed_with_sigkill_resumes_exactly(tmp_path, corpus):
    """train.py (expand: 1, trainable: new_layers) killed with SIGKILL once it has saved step >= 2,
    then the same command: every step's loss and the final parameters are bit-identical to an
    uninterrupted run, and the frozen parts are still the grown model's at step 0."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from solarjax.train.trainer import Trainer, read_metrics

    from killing import sigkill_after_checkpoint
    steps = 20
    over = {"trainable": "new_layers", "init.upscale": {"expand": 1}, "steps": steps, "global_batch": 2}
    config = tmp_path / "killed.yaml"
    config.write_text(json.dumps(_cfg_dict(tmp_path / "killed", corpus, **over)))
    job = [sys.executable, str(Path(__file__).resolve().parent.parent / "train.py"), "--config", str(config)]
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    run = tmp_path / "killed" / "run"
    at = sigkill_after_checkpoint(job, env, run / "checkpoints", 2, timeout=120)
    assert 2 <= at < steps and not (run / "final").exists()
    with open(tmp_path / "resumed.err", "w") as err:
        resumed = subprocess.Popen(job, stderr=err, env=env)
    try:
        straight = Trainer(_train_cfg(tmp_path / "straight", corpus, **over),
                           solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
        start = _host(straight.state["params"])
        straight.run()
        resumed.wait(timeout=120)
    finally:
        resumed.kill()
    stderr = (tmp_path / "resumed.err").read_text()
    assert resumed.returncode == 0, stderr[-3000:]
    assert f"resumed from its checkpoint of step {at}" in stderr
    timing = {"tokens_per_s", "model_tflops_per_s", "mfu"}
    metrics = lambda p: [{k: v for k, v in r.items() if k not in timing}  # noqa: E731
                         for r in read_metrics(p / "run" / "metrics.jsonl")]
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")
    _, final = solarjax.load_model(run / "final")
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(straight.state["params"]), jax.tree.leaves(final),
                               jax.tree.leaves(start), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        frozen = np.asarray(b) if path[0].key != "layers" else np.asarray(b)[[0, 2]]
        np.testing.assert_array_equal(frozen, s if path[0].key != "layers" else s[[0, 2]])


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_new_layers_train_alone_under_every_objective(tmp_path, objective, models):  # noqa: F811
    """sft and dpo (whose reference is the grown model at step 0) on an expanded HF model: only
    the new layers move (lm: test_new_layers_train_alone_on_a_3d_mesh_with_microbatches)."""
    from solarjax.train.trainer import Trainer
    sources = models["sft"] if objective == "sft" else [models["more_pairs"]]
    cfg = _objective_cfg(tmp_path, models, objective, sources, trainable="new_layers", steps=2,
                         **{"init.upscale": {"expand": 1}, "data.seq_len": 64})
    trainer = Trainer(cfg, solarjax.make_mesh(1, 2, 1, devices=jax.devices()[:2]))
    start = _host(trainer.state["params"])
    trainer.run()
    end = _host(trainer.state["params"])
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start), jax.tree.leaves(end)):
        if path[0].key != "layers":
            np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_array_equal(b[[0, 2]], a[[0, 2]], err_msg=jax.tree_util.keystr(path))
    assert all((o != 0).any() for o in end["layers"]["self_attn"]["o_proj"][[1, 3]])  # from zero


# ---------------------------------------------------------------------------------------------
# configs/llama_pro.yaml, its stages run tiny


@pytest.mark.slow
def test_llama_pro_recipe_runs_its_stages_tiny(tmp_path, corpus):
    """configs/llama_pro.yaml with a few steps per stage on a small corpus: the expanded arm starts
    at the base's held-out loss (the function is kept through the recipe), trains only its copies
    (the base's layers, embeddings, norm and head come out bit-identical to the base's final), then
    pro_all trains everything; the arms see equal tokens."""
    from pathlib import Path

    from solarjax.train import recipe as recipe_lib
    from solarjax.train.config import load_job
    steps = {"base": 4, "pro_new": 2, "pro_all": 2, "upscaled": 4, "control": 4}
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.sources=[{corpus}]", "data.seq_len=64",
                 "data.validation_fraction=0.1", f"data.cache_dir={tmp_path / 'cache'}", "data.num_proc=1",
                 "eval_every=2", "eval_batches=2", "checkpoint_every=2", "log_every=1", "mesh.data=1", "mesh.fsdp=1",
                 "mesh.tensor=1", "stages.base.optim.learning_rate=1e-2", "stages.base.optim.warmup_steps=1",
                 *(f"stages.{name}.steps={n}" for name, n in steps.items())]
    recipe = load_job(Path(__file__).resolve().parent.parent / "configs" / "llama_pro.yaml", overrides)
    summary = recipe_lib.run_recipe(recipe, solarjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    stages = summary["stages"]
    assert list(stages) == list(steps)
    assert abs(stages["pro_new"]["eval_loss_at_init"] - stages["base"]["eval_loss_final"]) <= 1e-4
    assert abs(stages["upscaled"]["eval_loss_at_init"] - stages["base"]["eval_loss_final"]) > 1e-3  # DUS is not
    assert stages["pro_new"]["tokens"] + stages["pro_all"]["tokens"] == stages["upscaled"]["tokens"] == \
        stages["control"]["tokens"]
    run = tmp_path / "run"
    _, base = solarjax.load_model(run / "base" / "final")
    _, pro = solarjax.load_model(run / "pro_new" / "final")
    _, pro_all = solarjax.load_model(run / "pro_all" / "final")
    for (path, b), p, a in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(pro),
                               jax.tree.leaves(pro_all)):
        b, p, a = np.asarray(b), np.asarray(p), np.asarray(a)
        if path[0].key != "layers":
            np.testing.assert_array_equal(p, b, err_msg=jax.tree_util.keystr(path))
        else:  # grown layers 0 1 [1] 2 3 [3]: the copies 2 and 5 train
            np.testing.assert_array_equal(p[[0, 1, 3, 4]], b, err_msg=jax.tree_util.keystr(path))
            if tuple(k.key for k in path[1:]) in upscale.ZEROED:
                assert all(p[i].any() for i in (2, 5)), "the copies' zeroed projections did not train"
        assert (a != p).any(), f"pro_all did not train {jax.tree_util.keystr(path)}"
    recipe_lib.plot_curves(summary, tmp_path / "curves.png")  # pro_all drawn after pro_new's tokens
    assert recipe_lib._spent_before(summary, "pro_all", "tokens") == stages["pro_new"]["tokens"]
    assert recipe_lib._spent_before(summary, "pro_new", "tokens") == 0
    table = recipe_lib.format_table(summary)
    assert "base (expand 2), trains new_layers" in table and "base (DUS)" in table
    assert set(summary["paired_difference"]) == {"upscaled - control", "pro_all - control", "pro_all - upscaled"}
    assert "pro_all - control: " in table and "95% paired interval" in table
