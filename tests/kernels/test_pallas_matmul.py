"""Block-sparse Pallas matmul: forward, dX and dW against the masked dense matmul.

The CPU runs the kernels in interpret mode (sequential grid): shapes are small
and each jitted function is compiled once, then driven by many masks (a new
mask must not recompile).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from jaxsparse.kernels import (BSR, bsr_from_dense, bsr_matmul, bsr_matmul_reference,
                               bsr_with_data, expand_block_mask, resolve_backend)

TOL = dict(atol=2e-4, rtol=2e-4)
HIGHEST = jax.lax.Precision.HIGHEST


def block_masks(grid, rng):
  """Block masks covering the cases of the issue (random, empty rows/cols, dense, single, empty)."""
  nbr, nbc = grid
  out = {"dense": np.ones(grid, bool), "single": np.zeros(grid, bool),
         "empty": np.zeros(grid, bool)}
  out["single"][nbr - 1, nbc // 2] = True
  for d in (0.2, 0.5, 0.8):
    out[f"random{d}"] = rng.random(grid) < d
  holes = rng.random(grid) < 0.7
  holes[nbr // 2, :] = False          # an empty block row
  holes[:, 0] = False                 # an empty block column
  holes[0, -1] = True
  out["empty_row_col"] = holes
  return out


def masked_vjp(x, w, mask, ct):
  f = lambda x, w: jnp.matmul(x, jnp.where(mask, w, 0), precision=HIGHEST)
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(ct))


def make_kernel_vjp(block_shape, nnz_max, backend, traces):
  @jax.jit
  def run(x, w, mask, ct):
    traces.append(1)
    f = lambda x, w: bsr_matmul(x, bsr_from_dense(w, mask, block_shape, nnz_max),
                                backend=backend)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))
  return run


# (M, K, N, block): M not a multiple of the row tile (padding), rectangular blocks.
CASES = [(40, 64, 96, (16, 16)), (24, 96, 64, (32, 32)), (16, 128, 192, (64, 64)),
         (8, 64, 64, (16, 32))]


# The GPU-style kernels ("interpret") on every block size; the TPU-style (scalar
# prefetch) kernels on one, to fit the CPU budget; the XLA reference on all.
@pytest.mark.parametrize("backend,case", [
    *[("interpret", c) for c in CASES[:3]], ("interpret_tpu", CASES[0]),
    ("xla", CASES[1])])
def test_fwd_dx_dw_match_masked_dense(backend, case):
  m, k, n, block = case
  rng = np.random.default_rng(m * k + n)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  grid = (k // block[0], n // block[1])
  traces = []
  run = make_kernel_vjp(block, grid[0] * grid[1], backend, traces)
  for name, bm in block_masks(grid, rng).items():
    mask = expand_block_mask(jnp.asarray(bm), block)
    y, dx, dw = run(x, w, mask, ct)
    ry, rdx, rdw = masked_vjp(x, w, mask, ct)
    np.testing.assert_allclose(y, ry, **TOL, err_msg=name)
    np.testing.assert_allclose(dx, rdx, **TOL, err_msg=name)
    np.testing.assert_allclose(dw, rdw, **TOL, err_msg=name)
    assert not np.any(np.asarray(dw)[~np.asarray(mask)]), name
  assert len(traces) == 1, "a new mask must not retrace"


def test_rectangular_blocks_elementwise_mask_and_small_budget():
  """An elementwise (not block-structured) mask, rectangular blocks and nnz_max < all blocks."""
  m, k, n, block = CASES[3]
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  bm = np.zeros((4, 2), bool)
  bm[[0, 2, 3], [1, 0, 1]] = True
  mask = expand_block_mask(jnp.asarray(bm), block) & jnp.asarray(rng.random((k, n)) < 0.6)
  y, dx, dw = make_kernel_vjp(block, 4, "interpret", [])(x, w, mask, ct)
  ry, rdx, rdw = masked_vjp(x, w, mask, ct)
  for a, b in ((y, ry), (dx, rdx), (dw, rdw)):
    np.testing.assert_allclose(a, b, **TOL)


def test_mask_update_does_not_recompile_and_changes_result():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(64, 64)), jnp.float32)
  traces = []

  @jax.jit
  def fwd(x, w, bm):
    traces.append(1)
    return bsr_matmul(x, bsr_from_dense(w, bm, (16, 16), nnz_max=6), backend="interpret")

  a = np.zeros((4, 4), bool)
  a[0, 0] = a[1, 2] = a[3, 3] = True
  b = np.zeros((4, 4), bool)
  b[2, :] = True
  b[0, 1] = b[3, 0] = True
  ya, yb = fwd(x, w, a), fwd(x, w, b)
  assert len(traces) == 1
  for y, bm in ((ya, a), (yb, b)):
    ref = x @ jnp.where(expand_block_mask(jnp.asarray(bm), (16, 16)), w, 0)
    np.testing.assert_allclose(y, ref, **TOL)
  assert not np.allclose(ya, yb)


@pytest.mark.parametrize("backend", ["interpret", "xla"])
def test_bf16_inputs_accumulate_in_f32(backend):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 128)), jnp.bfloat16)     # leading batch axes
  w = jnp.asarray(rng.normal(size=(128, 64)), jnp.bfloat16)
  bm = rng.random((4, 2)) < 0.6
  bm[0, 0] = True
  a = bsr_from_dense(w, bm, (32, 32))

  @jax.jit
  def run(x, d):
    f = lambda x, d: bsr_matmul(x, bsr_with_data(a, d), backend=backend)
    y, vjp = jax.vjp(f, x, d)
    return (y, *vjp(jnp.ones_like(y)))

  y, dx, dd = run(x, a.data)
  assert y.shape == (2, 8, 64)
  assert y.dtype == dx.dtype == dd.dtype == jnp.bfloat16
  w32 = bsr_with_data(a, a.data.astype(jnp.float32))
  x32 = x.astype(jnp.float32)
  # f32 accumulation and one bf16 rounding of the output: relative error ~ 2**-8.
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-2,
                                                  atol=1e-1)
  close(y, bsr_matmul_reference(x32, w32))
  close(dx, jnp.broadcast_to(jnp.sum(bsr_matmul_reference(jnp.eye(128), w32), axis=1), x.shape))
  dw_ref = bsr_from_dense(jnp.sum(x32, axis=(0, 1))[:, None] * jnp.ones((1, 64)), bm, (32, 32))
  close(dd, dw_ref.data)


# ------------------------------------------------------------------- dispatcher


def test_resolve_backend_defaults_to_interpret_on_cpu():
  be = resolve_backend()
  assert be.name == "interpret" and be.interpret and be.strategy == "loop"
  assert resolve_backend("mosaic_tpu").strategy == "grid"
  assert not resolve_backend("triton").interpret
  with pytest.raises(ValueError, match="backend"):
    resolve_backend("cuda-magic")


@pytest.mark.parametrize("backend,platform,target,block", [
    ("triton", "cuda", "__gpu$xla.gpu.triton", (64, 64)),
    ("mosaic_tpu", "tpu", "tpu_custom_call", (128, 128))])
def test_accelerator_lowering(backend, platform, target, block):
  """The GPU (Triton) and TPU (Mosaic) kernels lower for their platforms without the device."""
  k = n = 2 * block[0]
  w = jnp.ones((k, n), jnp.bfloat16)
  a = bsr_from_dense(w, np.array([[True, False], [True, True]]), block, 3)

  def step(x, data):
    y, vjp = jax.vjp(lambda x, d: bsr_matmul(x, bsr_with_data(a, d), backend=backend), x, data)
    return y, vjp(y)

  exp = export.export(jax.jit(step), platforms=(platform,),
                      disabled_checks=[export.DisabledSafetyCheck.custom_call(target)])(
      jax.ShapeDtypeStruct((256, k), jnp.bfloat16),
      jax.ShapeDtypeStruct(a.data.shape, jnp.bfloat16))
  assert exp.mlir_module().count(target) == 3   # forward, dX, dW


# The compiled GPU / TPU kernels are checked against the reference by
# experiments/bench_kernel.py (check_kernel) before it times anything; CI has no GPU.


# -------------------------------------------------------------------- bad input


def test_bad_inputs():
  w = bsr_from_dense(jnp.ones((32, 32)), None, (16, 16))
  with pytest.raises(ValueError, match="dtype"):
    bsr_matmul(jnp.ones((4, 32), jnp.bfloat16), w, backend="xla")
  with pytest.raises(ValueError, match="last axis"):
    bsr_matmul(jnp.ones((4, 16)), w, backend="xla")
  with pytest.raises(ValueError, match="block_m"):
    bsr_matmul(jnp.ones((4, 32)), w, backend="xla", block_m=0)
  with pytest.raises(ValueError, match="float32, bfloat16"):
    bsr_matmul(jnp.ones((4, 32), jnp.int32), bsr_from_dense(jnp.ones((32, 32), jnp.int32), None,
                                                             (16, 16)), backend="xla")
  with pytest.raises(TypeError, match="BSR"):
    bsr_matmul(jnp.ones((4, 32)), jnp.ones((32, 32)))
  with pytest.raises(ValueError, match="triton"):
    bsr_matmul(jnp.ones((4, 48)), bsr_from_dense(jnp.ones((48, 48)), None, (24, 24)),
               backend="triton")
  with pytest.raises(ValueError, match="mosaic_tpu"):
    bsr_matmul(jnp.ones((4, 32)), w, backend="mosaic_tpu")
  assert isinstance(w, BSR)


# ------------------------------------------------------------ launch configs and tuning

from jaxsparse.kernels import (BsrMatmulConfig, KernelConfig, load_tuned_configs,  # noqa: E402
                               save_tuned_configs, tune_bsr_matmul, tuned_configs, tuning_key)


def test_per_kernel_configs_with_different_row_tiles_match_masked_dense():
  """Forward, dX and dW with three different block_m: rows padded to the largest tile."""
  m, k, n, block = CASES[0]
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
  ct = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)
  bm = rng.random((k // 16, n // 16)) < 0.5
  mask = expand_block_mask(jnp.asarray(bm), block)
  config = BsrMatmulConfig(KernelConfig(16), KernelConfig(32, rows_outer=False), KernelConfig(64))

  @jax.jit
  def run(x, w):
    f = lambda x, w: bsr_matmul(x, bsr_from_dense(w, mask, block), backend="interpret",
                                config=config)
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(ct))

  for got, want in zip(run(x, w), masked_vjp(x, w, mask, ct)):
    np.testing.assert_allclose(got, want, **TOL)


def test_tuning_picks_a_candidate_per_kernel_stores_it_and_round_trips(tmp_path):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(48, 64)), jnp.float32)
  a = bsr_from_dense(jnp.asarray(rng.normal(size=(64, 64)), jnp.float32),
                     rng.random((4, 4)) < 0.5, (16, 16))
  cands = [KernelConfig(16), KernelConfig(32), KernelConfig(16, rows_outer=False)]
  cfg = tune_bsr_matmul(x, a, backend="interpret", candidates=cands, repeats=1)
  assert all(c in cands for c in cfg)
  key = tuning_key(48, a, jnp.float32, "interpret")
  assert tuned_configs()[key] == cfg
  # bsr_matmul now uses it (same result as any other config), and it survives a file round trip.
  np.testing.assert_allclose(bsr_matmul(x, a, backend="interpret"),
                             bsr_matmul_reference(x, a), **TOL)
  path = str(tmp_path / "tuned.json")
  save_tuned_configs(path)
  assert load_tuned_configs(path) >= 1 and tuned_configs()[key] == cfg
  with open(path, "w") as f:
    f.write('{"k": [[16, 4, 3, 1]]}')
  with pytest.raises(ValueError, match="path"):
    load_tuned_configs(path)
  with pytest.raises(ValueError, match="candidates"):
    tune_bsr_matmul(x, a, backend="interpret", candidates=[])


def test_bad_config_names_the_field():
  w = bsr_from_dense(jnp.ones((32, 32)), None, (16, 16))
  with pytest.raises(ValueError, match="config.dw.block_m"):
    bsr_matmul(jnp.ones((4, 32)), w, backend="triton",
               config=BsrMatmulConfig(dw=KernelConfig(block_m=24)))
  with pytest.raises(ValueError, match="config.fwd"):
    bsr_matmul(jnp.ones((4, 32)), w, backend="xla", config=BsrMatmulConfig(fwd=KernelConfig(16, 3)))
  with pytest.raises(TypeError, match="BsrMatmulConfig"):
    bsr_matmul(jnp.ones((4, 32)), w, backend="xla", config=(16, 4, 3))
