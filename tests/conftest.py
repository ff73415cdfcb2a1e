import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite compiles far more than it runs, so it compiles cheaply: XLA:CPU with LLVM at -O0
# (a sparse train step ~40% faster to compile: test_train.py 184 -> 113 s), and XLA:CPU's
# classic loop fusion emitters instead of its newer MLIR fusion emitters (on LeNet-300-100,
# SET's step compiles in 0.9 s instead of 2.2-2.9 s, RigL's 0.5-0.7 s instead of 1.2-1.5 s;
# see README, "Compile time"). The programs compute the same; floats may differ from the
# default in the last bits, which no test depends on. Users' runs and the benchmarks keep
# XLA's defaults. Subprocesses and notebook kernels inherit these flags.
_TEST_XLA_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_cpu_use_fusion_emitters": "false"}
_flags = os.environ.get("XLA_FLAGS", "")
for _name, _value in _TEST_XLA_FLAGS.items():
  if _name not in _flags:
    _flags = f"{_flags} {_name}={_value}".strip()
os.environ["XLA_FLAGS"] = _flags
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
