import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it runs: XLA:CPU with LLVM at -O0 compiles a sparse train
# step ~40% faster (test_train.py: 184 -> 113 s). The programs are the same; floats may differ
# from -O3 in the last bits (fused multiply-adds), which no test depends on. Users' runs and
# the benchmarks keep XLA's default. Subprocesses and notebook kernels inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()
# One persistent XLA compilation cache for the whole test run (xdist workers and the
# subprocesses of the multi-device tests inherit it through the environment): many tests
# build the same train step again (a fresh jit, another seed), and XLA's compile time is
# most of the suite's time on CPU. Tracing still runs every time, so the tests that count
# traces to prove "no recompilation" are unaffected. A run starts with an empty cache.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxsparse-tests-xla-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None)
settings.load_profile("ci")
