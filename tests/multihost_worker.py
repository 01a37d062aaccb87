"""One process of a real multi-process (jax.distributed, gloo on localhost) training run; used by
test_multihost.py. argv: config.json coordinator num_processes process_id"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
config_path, coordinator, n, i = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
jax.distributed.initialize(coordinator, n, i)

from solarjax.train.config import train_config_from_dict  # noqa: E402
from solarjax.train.trainer import Trainer  # noqa: E402

cfg = train_config_from_dict(json.loads(open(config_path).read()))
trainer = Trainer(cfg)
assert jax.process_count() == n and len(jax.devices()) == 2 * n and len(jax.local_devices()) == 2
record = trainer.run()
windows = trainer.window_losses() if cfg.eval_every else {}  # collective: the recipe's paired scoring
print(json.dumps({"process": i, "loss": record.get("loss"), "step": int(trainer.state["step"]),
                  "local_rows": len(trainer.batches.rows(0)),
                  "windows": {name: {k: v.tolist() for k, v in arrays.items()} for name, arrays in windows.items()}}),
      flush=True)
