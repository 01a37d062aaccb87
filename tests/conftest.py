import os

# 8 simulated CPU devices for the mesh tests; must be set before jax initialises its backend.
# Tiny shapes run in microseconds; LLVM optimisation level 0 halves their compile time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
