"""experiments.bench_compile: compile seconds and program sizes against the dense step."""
import json

from experiments import bench_compile


def test_reports_compile_times_and_op_counts_against_dense(tmp_path):
  out = tmp_path / "new_dir" / "c.json"   # --out's folder is created
  rows = bench_compile.main(["--models", "lenet300", "--methods", "static",
                             "--repeats", "1", "--out", str(out)])
  (row,) = rows
  assert row["model"] == "lenet300" and list(row["methods"]) == ["dense", "static"]
  dense, static = row["methods"]["dense"], row["methods"]["static"]
  assert dense["compile_ratio"] == 1.0
  for m in row["methods"].values():
    assert m["compile_s"] > 0 and m["lower_s"] > 0 and m["ops"] > 0 and m["cuda_ops"] > 0
  # the masking adds ops to the dense step, on both lowerings
  assert static["ops"] > dense["ops"] and static["cuda_ops"] > dense["cuda_ops"]
  assert json.loads(out.read_text())[0]["methods"]["static"]["ops"] == static["ops"]
  assert "| lenet300 | static |" in bench_compile.markdown(rows)


def test_timed_compiles_skip_the_persistent_cache(tmp_path):
  # The suite runs with a persistent compilation cache (conftest.py); a benchmark's timed
  # compile must neither read nor fill it.
  import jax
  import jax.numpy as jnp
  from jax.experimental.compilation_cache import compilation_cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path))
  jax.config.update(names[1], 0)
  compilation_cache.reset_cache()
  try:
    f = lambda x: jnp.sin(x) * 3.25 + jnp.cos(x) ** 2     # a program no other test builds
    with bench_compile.no_persistent_cache():
      jax.jit(f).lower(jnp.ones(7)).compile()
    assert not list(tmp_path.iterdir())
    jax.clear_caches()                                      # (in-memory caches)
    jax.jit(f).lower(jnp.ones(7)).compile()                 # outside: cached
    assert list(tmp_path.iterdir())
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()


def test_counts_the_llvm_modules_of_a_step_in_a_child_process():
  import pytest

  dense = bench_compile.llvm_modules("lenet300", "dense")
  # LeNet-300-100's dense step: forward, backward and the SGD update are a few dozen kernels
  assert 10 <= dense["modules"] <= 200 and dense["codegen_s"] > 0, dense
  with pytest.raises(RuntimeError, match="lenet300/nope in a child process failed"):
    bench_compile.llvm_modules("lenet300", "nope")
  row = {"model": "m", "backend": "cpu", "device": "cpu", "jax_version": "x", "repeats": 1,
         "methods": {n: dict(lower_s=1.0, compile_s=1.0, compile_ratio=1.0, total_ratio=1.0,
                             ops=1, cuda_ops=1, modules=m, codegen_s=0.5)
                     for n, m in (("dense", 20), ("set", 70))}}
  table = bench_compile.markdown([row])
  assert "| LLVM modules | modules / dense |" in table and "| 70 | 3.5x | 0.50 |" in table


def test_jaxpruner_peer_arguments_are_checked(tmp_path, capsys):
  """``--jaxpruner`` names what is wrong before anything is compiled: ResNet-20 (jaxpruner's
  SET fails on its unmasked BatchNorm leaves) or a folder without jaxpruner; the peer's step
  needs its checkout."""
  import pytest
  with pytest.raises(SystemExit):
    bench_compile.main(["--models", "resnet20", "--jaxpruner", str(tmp_path)])
  assert "--jaxpruner: jaxpruner's SET fails on unmasked leaves" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    bench_compile.main(["--models", "lenet300", "--jaxpruner", str(tmp_path)])
  assert f"--jaxpruner: no jaxpruner package in {str(tmp_path)!r}" in capsys.readouterr().err
  with pytest.raises(ValueError, match="method 'jaxpruner_set' needs jaxpruner_dir"):
    bench_compile.step_of("lenet300", bench_compile.PEER)
  # with the peer, every step's model is without biases (jaxpruner's SET masks every leaf)
  step, (params, _, _) = bench_compile.step_of("lenet300", "dense", jaxpruner_dir=str(tmp_path))
  import jax
  assert all(path[-1].key == "kernel" for path, _ in jax.tree_util.tree_leaves_with_path(params))
