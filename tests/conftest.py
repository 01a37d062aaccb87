import os

# 8 simulated CPU devices for the mesh tests; must be set before jax initialises its backend.
# Tiny shapes run in microseconds; LLVM optimisation level 0 halves their compile time.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One compilation cache for the whole run, shared by the xdist workers and the subprocess jobs
# (killed and resumed runs, multi-process runs, recipes), which compile the same programs: the
# process that starts first makes it (its workers inherit the variable) and removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="solarjax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
