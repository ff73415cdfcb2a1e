"""The block-sparse kernel under shard_map: tensor- and data-parallel layouts on 8 devices.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, but conftest.py has already started JAX in this process, so
they run in one subprocess that executes this file as a script (``python
tests/kernels/test_sharded_kernel.py``), as in tests/core/test_sharding.py. The kernels run
in Pallas interpret mode on the CPU: shapes are tiny, and each layout compiles
one program (forward + dX + dW) that is then driven by several masks.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # when run as a script
  sys.path.insert(0, ROOT)

from jaxsparse.core import sharding  # noqa: E402
from jaxsparse.kernels import bsr_from_dense, expand_block_mask  # noqa: E402
from jaxsparse.kernels.sharded import (ShardedBSR, sharded_bsr_from_dense,  # noqa: E402
                                       sharded_bsr_matmul, sharded_bsr_matmul_reference,
                                       sharded_bsr_overflow, sharded_bsr_to_dense,
                                       sharded_bsr_with_data)

TOL = dict(atol=2e-4, rtol=2e-4)
BF16_TOL = dict(atol=1e-1, rtol=2e-2)   # f32 accumulation, bf16 rounding of results/partials
HIGHEST = jax.lax.Precision.HIGHEST
COLLECTIVES = ("all-reduce(", "all-gather(", "all-to-all(", "collective-permute(",
               "reduce-scatter(")


# ---------------------------------------------------------------------------- worker side

def dense_vjp(x, w, mask, ct):
  """y, dx, dw of ``x @ where(mask, w, 0)`` in float32 (the unsharded reference)."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  f = lambda x, w: jnp.matmul(x, jnp.where(mask, w, 0), precision=HIGHEST)
  y, vjp = jax.vjp(f, f32(x), f32(w))
  return (y, *vjp(f32(ct)))


def check(got, want, tol, tag):
  for name, a, b in zip(("y", "dx", "dw"), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol,
                               err_msg=f"{tag}: {name}")


def collectives(jitted, *args) -> dict[str, int]:
  hlo = jitted.lower(*args).compile().as_text()   # the cached executable of the calls above
  return {c[:-1]: hlo.count(c) for c in COLLECTIVES if hlo.count(c)}


def block_masks(grid, n, rng):
  """Block masks for a ``grid`` whose block columns are split into ``n`` device slices."""
  nbr, nbc = grid
  per = nbc // n
  out = {"random": rng.random(grid) < 0.5}
  holes = rng.random(grid) < 0.6
  for dev in (1, n - 1):                     # two devices with no block at all
    holes[:, dev * per:(dev + 1) * per] = False
  holes[:, :per] = True                      # device 0: every block
  out["empty_devices"] = holes
  single = np.zeros(grid, bool)
  single[nbr - 1, nbc - 1] = True            # one block, on the last device
  out["single"] = single
  return out


def fit(bm, n, nnz_max):
  """``bm`` without the blocks past the first ``nnz_max`` (row-major) of each device's slice."""
  nbr, nbc = bm.shape
  per = bm.reshape(nbr, n, nbc // n).transpose(1, 0, 2).reshape(n, -1)
  per = per & (np.cumsum(per, axis=1) <= nnz_max)
  return per.reshape(n, nbr, nbc // n).transpose(1, 0, 2).reshape(nbr, nbc)


def case_tensor_parallel_8() -> None:
  """Mesh (8,): W split by block columns; the ShardedBSR is built outside jit and passed in;
  dW as the gradient of the per-device block data."""
  mesh = sharding.make_mesh((8,), ("model",))
  m, k, n, block = 16, 32, 128, (8, 8)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  grid = (k // block[0], n // block[1])
  traces = []

  @jax.jit
  def run(x, a, ct):
    traces.append(1)
    f = lambda x, d: sharded_bsr_matmul(x, sharded_bsr_with_data(a, d), mesh)
    y, vjp = jax.vjp(f, x, a.data)
    return (y, *vjp(ct))

  to_bsr = jax.jit(bsr_from_dense, static_argnums=(2, 3))
  nnz_max = 6                                # of the 8 blocks of each device's slice
  seen = []
  for name, bm in block_masks(grid, 8, rng).items():
    bm = fit(bm, 8, nnz_max)
    mask = expand_block_mask(jnp.asarray(bm), block)
    a = sharded_bsr_from_dense(w, mask, mesh, axis="model", block_shape=block, nnz_max=nnz_max)
    assert isinstance(a, ShardedBSR) and a.num_shards == 8 and a.local_shape == (k, n // 8)
    assert a.data.shape == (8, nnz_max) + block and a.nnz_max == nnz_max
    assert a.data.sharding.spec == P("model") and a.t_perm.sharding.spec == P("model"), name
    assert not bool(sharded_bsr_overflow(a))
    np.testing.assert_array_equal(sharded_bsr_to_dense(a), jnp.where(mask, w, 0), err_msg=name)
    shards = {sh.index[0].start: sh for sh in a.data.addressable_shards}
    for dev in (0, 1, 7):                    # device i holds exactly its own slice's BSR
      cols = slice(dev * n // 8, (dev + 1) * n // 8)
      ref = to_bsr(w[:, cols], mask[:, cols], block, nnz_max)
      assert shards[dev].device == mesh.devices[dev] and shards[dev].data.shape[0] == 1
      np.testing.assert_array_equal(shards[dev].data[0], ref.data, err_msg=f"{name} {dev}")
      for f in ("indptr", "indices", "rows", "t_indptr", "t_indices", "t_perm", "nnz"):
        np.testing.assert_array_equal(getattr(a.local(dev), f), getattr(ref, f),
                                      err_msg=f"{name} device {dev} {f}")
    y, dx, dd = run(x, a, ct)
    ry, rdx, rdw = dense_vjp(x, w, mask, ct)
    rdd = sharded_bsr_from_dense(rdw, mask, mesh, axis="model", block_shape=block,
                                 nnz_max=nnz_max).data
    check((y, dx, dd), (ry, rdx, rdd), TOL, f"tp8 {name}")
    assert y.sharding.spec == P(None, "model"), y.sharding
    assert dd.sharding.spec == P("model"), dd.sharding
    seen.append(np.asarray(y))
  assert not np.allclose(seen[0], seen[1])
  assert len(traces) == 1 and run._cache_size() == 1, "a new mask must not recompile"
  got = collectives(run, x, a, ct)
  assert got == {"all-reduce": 1}, f"tp8: expected one all-reduce (dX over 'model'): {got}"
  print("tp8: ok", flush=True)


def case_data_parallel_8() -> None:
  """Mesh (8,): X split by rows, a replicated BSR; dW (dense kernel) summed over 'data'."""
  mesh = sharding.make_mesh((8,), ("data",))
  m, k, n, block = 32, 32, 32, (8, 8)
  rng = np.random.default_rng(1)
  x = jax.device_put(jnp.asarray(rng.normal(size=(m, k)), jnp.float32),
                     NamedSharding(mesh, P("data")))
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  traces = []

  @jax.jit
  def run(x, w, mask, ct):
    traces.append(1)
    f = lambda x, w: sharded_bsr_matmul(x, bsr_from_dense(w, mask, block, 10), mesh,
                                        data_axis="data")
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))

  for name, bm in block_masks((4, 4), 4, rng).items():
    bm = fit(bm, 1, 10)
    mask = expand_block_mask(jnp.asarray(bm), block)
    got = run(x, w, mask, ct)
    check(got, dense_vjp(x, w, mask, ct), TOL, f"dp8 {name}")
    assert got[0].sharding.spec == P("data"), got[0].sharding
    assert got[1].sharding.spec == P("data"), got[1].sharding
  assert len(traces) == 1 and run._cache_size() == 1, "a new mask must not recompile"
  got = collectives(run, x, w, mask, ct)
  assert got == {"all-reduce": 1}, f"dp8: expected one all-reduce (dW over 'data'): {got}"
  print("dp8: ok", flush=True)


def run_2d(mesh, dtype, lead, data_axis):
  """Mesh (2, 4): W split over 'model', the conversion inside jit (dense kernel + mask in,
  dense masked dW out), X's batch split over ``data_axis`` (or replicated)."""
  k, n, block = 32, 64, (8, 8)
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(*lead, k)), dtype)
  w = jax.device_put(jnp.asarray(rng.normal(size=(k, n)), dtype),
                     NamedSharding(mesh, P(None, "model")))
  ct = jnp.asarray(rng.normal(size=(*lead, n)), dtype)
  traces = []

  @jax.jit
  def run(x, w, mask, ct):
    traces.append(1)
    f = lambda x, w: sharded_bsr_matmul(
        x, sharded_bsr_from_dense(w, mask, mesh, axis="model", block_shape=block, nnz_max=8),
        mesh, data_axis=data_axis)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))

  tol = TOL if dtype == jnp.float32 else BF16_TOL
  for name, bm in block_masks((k // block[0], n // block[1]), 4, rng).items():
    mask = expand_block_mask(jnp.asarray(bm), block)
    if name == "random":                     # an elementwise (not block-structured) mask
      mask = mask & jnp.asarray(rng.random((k, n)) < 0.7)
    y, dx, dw = run(x, w, mask, ct)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    check((y, dx, dw), dense_vjp(x, w, mask, ct), tol, f"2d {dtype.__name__} {name}")
    assert not np.any(np.asarray(dw)[~np.asarray(mask)])
    want = P(data_axis, *[None] * (len(lead) - 1), "model")
    assert y.sharding.spec == want, (y.sharding, want)
    assert dw.sharding.spec == P(None, "model"), dw.sharding
  assert len(traces) == 1 and run._cache_size() == 1, "a new mask must not recompile"
  return run, (x, w, mask, ct)


def case_mesh_2x4() -> None:
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  # Both layouts: dX summed over 'model', dW over 'data'; nothing in the forward.
  run, args = run_2d(mesh, jnp.float32, (16,), "data")
  got = collectives(run, *args)
  assert got == {"all-reduce": 2}, f"2x4: expected two all-reduces (dX, dW): {got}"
  # Tensor parallel only ('data' unused: identical copies, no collective over it); leading
  # batch axes; bfloat16 inputs with float32 accumulation.
  run, args = run_2d(mesh, jnp.bfloat16, (4, 2), None)
  got = collectives(run, *args)
  assert got == {"all-reduce": 1}, f"2x4 bf16: expected one all-reduce (dX over 'model'): {got}"
  print("2x4: ok", flush=True)


def case_lowering() -> None:
  """On a GPU the grad program holds exactly three kernels per device: forward, dX, dW (the
  forward that the backward's local vjp re-traces is dead code)."""
  from jax import export
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  target = "__gpu$xla.gpu.triton"

  def step(x, w, mask):
    f = lambda x, w: sharded_bsr_matmul(
        x, sharded_bsr_from_dense(w, mask, mesh, block_shape=(64, 64)), mesh,
        data_axis="data", backend="triton")
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(y)

  spec = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype,
                                                      sharding=NamedSharding(mesh, s))
  exp = export.export(jax.jit(step), platforms=("cuda",),
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
      spec((64, 128), jnp.bfloat16, P("data")), spec((128, 512), jnp.bfloat16, P(None, "model")),
      spec((128, 512), jnp.bool_, P(None, "model")))
  assert exp.mlir_module().count(target) == 3, exp.mlir_module().count(target)
  print("lowering: ok", flush=True)


def case_bad() -> None:
  """Errors that need a mesh axis of more than one device."""
  mesh = sharding.make_mesh((2, 4), ("data", "model"))
  with pytest.raises(ValueError, match=r"w has 62 output columns .* 4 devices of mesh axis "
                                       r"'model'"):
    sharded_bsr_from_dense(jnp.ones((32, 62)), None, mesh, block_shape=(8, 2))
  with pytest.raises(ValueError, match=r"w has 6 block columns of width 8, not divisible by "
                                       r"the 4 devices of mesh axis 'model'"):
    sharded_bsr_from_dense(jnp.ones((32, 48)), None, mesh, block_shape=(8, 8))
  bm = np.zeros((4, 8), bool)
  bm[:3, 5] = True                             # 3 blocks on device 2 of 'model'
  with pytest.raises(ValueError, match=r"nnz_max=2 is too small: device 2 of mesh axis 'model' "
                                       r"\(block columns 4..5\) has 3 non-zero blocks"):
    sharded_bsr_from_dense(jnp.ones((32, 64)), bm, mesh, block_shape=(8, 8), nnz_max=2)
  a = sharded_bsr_from_dense(jnp.ones((32, 64)), bm, mesh, block_shape=(8, 8), nnz_max=3)
  with pytest.raises(ValueError, match=r"x has shape \(3, 32\); with data_axis 'data' its "
                                       r"leading \(batch\) axis must be divisible by the 2"):
    sharded_bsr_matmul(jnp.ones((3, 32)), a, mesh, data_axis="data")
  with pytest.raises(ValueError, match="w is split into 4 column slices, but mesh axis 'model' "
                                       "has 2 devices"):
    sharded_bsr_matmul(jnp.ones((4, 32)), a, sharding.make_mesh(
        (2, 2), ("data", "model"), devices=jax.devices()[:4]))
  with pytest.raises(ValueError, match="data_axis: mesh axis 'batch' does not exist"):
    sharded_bsr_matmul(jnp.ones((4, 32)), a, mesh, data_axis="batch")
  # Under jit an oversized mask cannot raise: it is truncated and reported.
  over = jax.jit(lambda m: sharded_bsr_overflow(sharded_bsr_from_dense(
      jnp.ones((32, 64)), m, mesh, block_shape=(8, 8), nnz_max=2)))
  assert bool(over(bm)) and not bool(over(bm & (np.arange(4) < 2)[:, None]))
  print("bad: ok", flush=True)


CASES = {"tp8": case_tensor_parallel_8, "dp8": case_data_parallel_8, "2x4": case_mesh_2x4,
         "lowering": case_lowering, "bad": case_bad}


# ---------------------------------------------------------------------------- pytest side

@pytest.mark.e2e
def test_8_devices_forward_grads_shardings_no_recompile():
  """Meshes (8,) [tensor parallel; data parallel] and (2, 4) [data, model] in float32 and
  bfloat16, against the dense masked matmul and its jax.grad; one worker process."""
  from tests.helpers import eight_cpu_devices_env
  env = eight_cpu_devices_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), *CASES], env=env, cwd=ROOT,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
  assert proc.returncode == 0, f"worker failed (rc={proc.returncode}):\n{proc.stdout[-8000:]}"
  for name in CASES:
    assert f"{name}: ok" in proc.stdout, proc.stdout


def _mesh(*names: str) -> jax.sharding.Mesh:
  return sharding.make_mesh((1,) * len(names), names, devices=jax.devices()[:1])


def test_one_device_matches_kernel_reference():
  mesh = _mesh("data", "model")
  rng = np.random.default_rng(3)
  w = jnp.asarray(rng.normal(size=(16, 32)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  a = sharded_bsr_from_dense(w, rng.random((2, 4)) < 0.5, mesh, block_shape=(8, 8))
  y = sharded_bsr_matmul(x, a, mesh, data_axis="data", backend="xla")
  np.testing.assert_allclose(y, sharded_bsr_matmul_reference(x, a), **TOL)


def test_bad_inputs():
  mesh = _mesh("data", "model")
  w = jnp.ones((16, 32))
  with pytest.raises(ValueError, match=r"axis: mesh axis 'tensor' does not exist; the mesh has "
                                       r"axes \('data', 'model'\)"):
    sharded_bsr_from_dense(w, None, mesh, axis="tensor", block_shape=(8, 8))
  with pytest.raises(ValueError, match="axis: expected one mesh axis name"):
    sharded_bsr_from_dense(w, None, mesh, axis=("data", "model"), block_shape=(8, 8))
  with pytest.raises(ValueError, match="block_shape"):
    sharded_bsr_from_dense(w, None, mesh, block_shape=(8, 5))
  with pytest.raises(ValueError, match="mask has shape"):
    sharded_bsr_from_dense(w, jnp.ones((3, 3), bool), mesh, block_shape=(8, 8))
  with pytest.raises(ValueError, match=r"nnz_max=3 is too small: device 0 of mesh axis 'model' "
                                       r"\(block columns 0..3\) has 8 non-zero blocks"):
    sharded_bsr_from_dense(w, None, mesh, block_shape=(8, 8), nnz_max=3)
  with pytest.raises(ValueError, match="nnz_max must be a positive integer"):
    sharded_bsr_from_dense(w, None, mesh, block_shape=(8, 8), nnz_max=0)
  a = sharded_bsr_from_dense(w, None, mesh, block_shape=(8, 8))
  with pytest.raises(ValueError, match="data_axis: mesh axis 'batch' does not exist"):
    sharded_bsr_matmul(jnp.ones((4, 16)), a, mesh, data_axis="batch")
  with pytest.raises(ValueError, match="w.axis: mesh axis 'model' does not exist"):
    sharded_bsr_matmul(jnp.ones((4, 16)), a, _mesh("data"), data_axis="data")
  with pytest.raises(ValueError, match="includes w.axis 'model'"):
    sharded_bsr_matmul(jnp.ones((4, 16)), a, mesh, data_axis=("data", "model"))
  with pytest.raises(ValueError, match="last axis must be w's first, 16"):
    sharded_bsr_matmul(jnp.ones((4, 32)), a, mesh)
  with pytest.raises(ValueError, match="dtype"):
    sharded_bsr_matmul(jnp.ones((4, 16), jnp.bfloat16), a, mesh)
  with pytest.raises(ValueError, match="data_axis: a .replicated. BSR w"):
    sharded_bsr_matmul(jnp.ones((4, 16)), bsr_from_dense(w, None, (8, 8)), mesh)
  with pytest.raises(TypeError, match="ShardedBSR or BSR"):
    sharded_bsr_matmul(jnp.ones((4, 16)), w, mesh, data_axis="data")
  explicit = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Explicit,),
                           devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="not AxisType.Auto"):
    sharded_bsr_from_dense(w, None, explicit, block_shape=(8, 8))


if __name__ == "__main__":
  assert len(jax.devices()) == 8, jax.devices()
  for case in sys.argv[1:] or CASES:
    t0 = time.time()
    CASES[case]()
    print(f"  {case}: {time.time() - t0:.1f}s", flush=True)
