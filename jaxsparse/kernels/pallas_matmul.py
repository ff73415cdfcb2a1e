"""Block-sparse matmul ``Y = X @ W`` with Pallas kernels and a ``custom_vjp``.

``W`` is a :class:`~jaxsparse.kernels.bsr.BSR` matrix (``K x N``, blocks
``bk x bn``); ``X`` is dense ``M x K``. Three kernels touch only the stored
blocks:

* forward, ``Y[:, j] = sum_{i in col j} X[:, i] @ W_ij`` (block-column tables);
* ``dX[:, i] = sum_{j in row i} dY[:, j] @ W_ij^T`` (block-row tables);
* ``dW_ij = X[:, i]^T @ dY[:, j]`` for the stored blocks only: a sampled dense
  -dense matmul (SDDMM), so the gradient is itself block-sparse.

Inputs may be float32, bfloat16 or float16 (``X`` and ``W`` of the same dtype);
every kernel accumulates in float32 and casts the result to the input dtype.
Pallas calls have no transpose rule, hence the ``jax.custom_vjp``.

All knowledge of the Pallas backends lives in :func:`resolve_backend`, the one
dispatcher (API churn in Pallas stays here):

* ``"triton"`` (NVIDIA/AMD GPU): tables are ordinary inputs and each program
  loops over its block row/column with a dynamic-bound ``fori_loop`` (the
  pattern of Pallas's GPU paged attention). JAX 0.10 lowers ``pallas_call`` to
  Mosaic GPU by default; passing ``pallas.triton.CompilerParams`` selects the
  Triton lowering explicitly.
* ``"mosaic_tpu"``: tables are scalar-prefetched (``PrefetchScalarGridSpec``)
  and drive the block index maps; an ``arbitrary`` grid axis walks the blocks.
* ``"interpret"`` / ``"interpret_tpu"``: the same two kernels with
  ``interpret=True`` (CPU; a sequential loop over the grid, for tests).
* ``"xla"``: no Pallas; the same block-sparse math with gathers and einsums
  (a reference, and a fallback for other platforms).

``backend=None`` picks ``"triton"`` on GPU, ``"mosaic_tpu"`` on TPU and
``"interpret"`` on CPU. When a JAX release drops the Triton lowering of
``pallas_call``, a Mosaic GPU (``plgpu.kernel``) entry belongs here, next to
the others.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxsparse.kernels.bsr import BSR

Array = jax.Array

BACKENDS = ("triton", "mosaic_tpu", "interpret", "interpret_tpu", "xla")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Backend(NamedTuple):
  """How the kernels run: a resolved, hashable dispatch decision.

  Attributes:
    name: one of :data:`BACKENDS`.
    strategy: ``"loop"`` (tables as inputs, loops in the kernel), ``"grid"``
      (scalar prefetch, tables drive the grid) or ``"xla"`` (no Pallas).
    interpret: run the Pallas kernels in interpret mode.
    platform: the JAX platform the decision was made for.
    num_warps, num_stages: Triton launch parameters (GPU tuning knobs).
  """
  name: str
  strategy: str
  interpret: bool
  platform: str
  num_warps: int = 4
  num_stages: int = 3


def resolve_backend(backend: str | Backend | None = None, *, num_warps: int = 4,
                    num_stages: int = 3) -> Backend:
  """The single dispatcher: maps a backend name (or ``None``: automatic) to a :class:`Backend`.

  Raises:
    ValueError: naming ``backend`` when it is unknown.
  """
  if isinstance(backend, Backend):
    return backend
  platform = jax.default_backend()
  if backend is None:
    backend = {"gpu": "triton", "cuda": "triton", "rocm": "triton",
               "tpu": "mosaic_tpu", "cpu": "interpret"}.get(platform, "xla")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}.")
  strategy = {"triton": "loop", "interpret": "loop", "mosaic_tpu": "grid",
              "interpret_tpu": "grid", "xla": "xla"}[backend]
  return Backend(backend, strategy, backend.startswith("interpret"), platform, int(num_warps),
                 int(num_stages))


class KernelConfig(NamedTuple):
  """Launch parameters of one kernel.

  Attributes:
    block_m: rows of X (or dY) per program (forward, dX) or per loop step (dW); a power
      of two >= 16 on Triton.
    num_warps, num_stages: Triton's warps per program and software-pipeline stages
      (ignored by the other backends).
    rows_outer: forward and dX on the loop strategy: launch the programs of one row
      tile of X (dY) together, over all block columns (rows), so that they share that
      row panel in L2; ``False`` launches one block column's row tiles together (the
      order before 2026-11-30; kept to measure against). Ignored by dW and TPU.
  """
  block_m: int = 128
  num_warps: int = 4
  num_stages: int = 3
  rows_outer: bool = True


class BsrMatmulConfig(NamedTuple):
  """One :class:`KernelConfig` per kernel: forward, dX and dW (each tuned on its own)."""
  fwd: KernelConfig = KernelConfig()
  dx: KernelConfig = KernelConfig()
  dw: KernelConfig = KernelConfig()


def _check_config(config: Any, be: Backend) -> BsrMatmulConfig:
  if not isinstance(config, BsrMatmulConfig):
    raise TypeError(f"config must be a BsrMatmulConfig, got {type(config).__name__}.")
  for kind, c in zip(config._fields, config):
    bm, warps, stages, rows_outer = c
    if not isinstance(rows_outer, bool):
      raise ValueError(f"config.{kind}.rows_outer must be a bool, got {rows_outer!r}.")
    if not (isinstance(bm, int) and bm >= 1 and isinstance(warps, int) and isinstance(stages, int)):
      raise ValueError(f"config.{kind} must hold positive ints, got {c}.")
    if be.name == "triton" and (bm < 16 or bm & (bm - 1)):
      raise ValueError(f"config.{kind}.block_m must be a power of two >= 16 for the triton "
                       f"backend, got {bm}.")
    if warps not in (1, 2, 4, 8, 16) or stages < 1:
      raise ValueError(f"config.{kind}: num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, "
                       f"got {c}.")
  return config


def _compiler_params(be: Backend, cfg: KernelConfig, grid_semantics: tuple[str, ...]) -> Any:
  """Backend-specific ``compiler_params`` (None in interpret mode)."""
  if be.interpret or be.strategy == "xla":
    return None
  if be.name == "triton":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.CompilerParams(dimension_semantics=grid_semantics)


def _acc_scratch(shape: tuple[int, ...]) -> Any:
  """A float32 VMEM accumulator (interpret mode emulates it on CPU)."""
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.VMEM(shape, jnp.float32)


def _dot(a: Array, b: Array, contract: tuple[int, int] = (1, 0)) -> Array:
  """``a . b`` over the given axes with float32 accumulation."""
  prec = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                         precision=prec, preferred_element_type=jnp.float32)


class _Tables(NamedTuple):
  """Integer tables handed to the kernels (``nnz``: 1-element count of valid slots)."""
  indptr: Array
  indices: Array
  rows: Array
  t_indptr: Array
  t_indices: Array
  t_perm: Array
  nnz: Array


def _tables(a: BSR) -> _Tables:
  nnz = jnp.minimum(a.nnz, a.nnz_max).astype(jnp.int32).reshape(1)
  return _Tables(a.indptr, a.indices, a.rows, a.t_indptr, a.t_indices, a.t_perm, nnz)


def _full(a: Any) -> pl.BlockSpec:
  """The whole array as one block, whatever the grid index."""
  return pl.BlockSpec(a.shape, lambda *idx: (0,) * len(a.shape))


# --------------------------------------------------------------- loop strategy (GPU, interpret)


def _panel_grid(n_row_tiles: int, n_blocks: int, rows_outer: bool):
  """The launch grid over (row tile i, block column/row j), and the map program ids -> (i, j).

  A GPU launches grid axis 0 fastest (Pallas maps it to CUDA's x). With ``rows_outer`` the
  block axis goes first, so the programs running at one time share one row panel of X
  (or dY) and read it from L2; the other way, every block column re-reads its blocks of
  X from HBM (X: 256 MiB at 16384x8192 bf16; the stored W blocks at 90% fit in L2).
  """
  if rows_outer:
    return (n_blocks, n_row_tiles), 0, lambda a, b: (b, a)
  return (n_row_tiles, n_blocks), 1, lambda a, b: (a, b)


def _fwd_loop_kernel(ptr_ref, trow_ref, perm_ref, x_ref, d_ref, o_ref, *, bk, block_axis):
  j = pl.program_id(block_axis)

  def body(e, acc):
    r, s = trow_ref[e], perm_ref[e]
    xb = x_ref[:, pl.ds(pl.multiple_of(r * bk, bk), bk)]
    return acc + _dot(xb, d_ref[s])

  acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_loop_kernel(ptr_ref, col_ref, dy_ref, d_ref, o_ref, *, bn, block_axis):
  i = pl.program_id(block_axis)

  def body(s, acc):
    c = col_ref[s]
    dyb = dy_ref[:, pl.ds(pl.multiple_of(c * bn, bn), bn)]
    return acc + _dot(dyb, d_ref[s], (1, 1))

  acc = lax.fori_loop(ptr_ref[i], ptr_ref[i + 1], body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dw_loop_kernel(nnz_ref, row_ref, col_ref, x_ref, dy_ref, o_ref, *, bm, bk, bn, n_m):
  s = pl.program_id(0)
  r, c = row_ref[s], col_ref[s]
  # Slots past nnz run no iteration. Integer arithmetic, not ``jnp.where``: Triton's
  # lowering of a select between int32 scalars asserts on its i1 condition (jax 0.11.2).
  steps = n_m * jnp.clip(nnz_ref[0] - s, 0, 1)

  def body(m, acc):
    rows = pl.ds(pl.multiple_of(m * bm, bm), bm)
    xb = x_ref[rows, pl.ds(pl.multiple_of(r * bk, bk), bk)]
    dyb = dy_ref[rows, pl.ds(pl.multiple_of(c * bn, bn), bn)]
    return acc + _dot(xb, dyb, (0, 0))

  # Both bounds int32: a Python 0 lowers to an index-typed bound, and Triton's verifier
  # rejects an ``scf.for`` whose bounds differ in type.
  acc = lax.fori_loop(jnp.int32(0), steps, body, jnp.zeros((bk, bn), jnp.float32))
  o_ref[0] = acc.astype(o_ref.dtype)


def _fwd_loop(x, data, t: _Tables, be: Backend, cfg: KernelConfig, shape: tuple[int, int]
              ) -> Array:
  (m, k), (_, bk, bn), bm = x.shape, data.shape, cfg.block_m
  nbc = shape[1] // bn
  ins = (t.t_indptr, t.t_indices, t.t_perm)
  grid, block_axis, ij = _panel_grid(m // bm, nbc, cfg.rows_outer)
  return pl.pallas_call(
      functools.partial(_fwd_loop_kernel, bk=bk, block_axis=block_axis),
      out_shape=jax.ShapeDtypeStruct((m, shape[1]), x.dtype), grid=grid,
      in_specs=[*(_full(a) for a in ins), pl.BlockSpec((bm, k), lambda a, b: (ij(a, b)[0], 0)),
                _full(data)],
      out_specs=pl.BlockSpec((bm, bn), ij), interpret=be.interpret,
      compiler_params=_compiler_params(be, cfg, ("parallel", "parallel")),
      name="bsr_matmul_fwd")(*ins, x, data)


def _dx_loop(dy, data, t: _Tables, be: Backend, cfg: KernelConfig, shape: tuple[int, int]
             ) -> Array:
  (m, n), (_, bk, bn), bm = dy.shape, data.shape, cfg.block_m
  nbr = shape[0] // bk
  ins = (t.indptr, t.indices)
  grid, block_axis, ij = _panel_grid(m // bm, nbr, cfg.rows_outer)
  return pl.pallas_call(
      functools.partial(_dx_loop_kernel, bn=bn, block_axis=block_axis),
      out_shape=jax.ShapeDtypeStruct((m, shape[0]), dy.dtype), grid=grid,
      in_specs=[*(_full(a) for a in ins), pl.BlockSpec((bm, n), lambda a, b: (ij(a, b)[0], 0)),
                _full(data)],
      out_specs=pl.BlockSpec((bm, bk), ij), interpret=be.interpret,
      compiler_params=_compiler_params(be, cfg, ("parallel", "parallel")),
      name="bsr_matmul_dx")(*ins, dy, data)


def _dw_loop(x, dy, data, t: _Tables, be: Backend, cfg: KernelConfig) -> Array:
  nnz_max, bk, bn = data.shape
  m, bm = x.shape[0], cfg.block_m
  ins = (t.nnz, t.rows, t.indices)
  return pl.pallas_call(
      functools.partial(_dw_loop_kernel, bm=bm, bk=bk, bn=bn, n_m=m // bm),
      out_shape=jax.ShapeDtypeStruct(data.shape, data.dtype), grid=(nnz_max,),
      in_specs=[*(_full(a) for a in ins), _full(x), _full(dy)],
      out_specs=pl.BlockSpec((1, bk, bn), lambda s: (s, 0, 0)), interpret=be.interpret,
      compiler_params=_compiler_params(be, cfg, ("parallel",)),
      name="bsr_matmul_dw")(*ins, x, dy)


# ------------------------------------------------------ grid strategy (TPU scalar prefetch)


def _entry(ptr_ref, j, p, nnz_max):
  """Entry ``ptr[j] + p``, clamped to the last entry of segment ``j`` (and to the table).

  Grid steps past the segment's end map to the block already resident, so the
  pipeline issues no copy for them (and the kernel skips their compute).
  """
  start, cnt = ptr_ref[j], ptr_ref[j + 1] - ptr_ref[j]
  return jnp.clip(start + jnp.minimum(p, jnp.maximum(cnt - 1, 0)), 0, nnz_max - 1)


def _fwd_grid_kernel(ptr_ref, trow_ref, perm_ref, x_ref, d_ref, o_ref, acc_ref):
  j, p = pl.program_id(1), pl.program_id(2)
  cnt = ptr_ref[j + 1] - ptr_ref[j]

  @pl.when(p == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(p < cnt)
  def _():
    acc_ref[...] += _dot(x_ref[...], d_ref[0])

  @pl.when(p == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dx_grid_kernel(ptr_ref, col_ref, dy_ref, d_ref, o_ref, acc_ref):
  i, p = pl.program_id(1), pl.program_id(2)
  cnt = ptr_ref[i + 1] - ptr_ref[i]

  @pl.when(p == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(p < cnt)
  def _():
    acc_ref[...] += _dot(dy_ref[...], d_ref[0], (1, 1))

  @pl.when(p == pl.num_programs(2) - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def _dw_grid_kernel(nnz_ref, row_ref, col_ref, x_ref, dy_ref, o_ref, acc_ref):
  s, m = pl.program_id(0), pl.program_id(1)

  @pl.when(m == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(s < nnz_ref[0])
  def _():
    acc_ref[...] += _dot(x_ref[...], dy_ref[...], (0, 0))

  @pl.when(m == pl.num_programs(1) - 1)
  def _():
    o_ref[0] = acc_ref[...].astype(o_ref.dtype)


def _prefetch_call(kernel, n_prefetch, grid, in_specs, out_specs, out_shape, scratch, be, cfg,
                   sem, name):
  from jax.experimental.pallas import tpu as pltpu
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_prefetch, grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=[_acc_scratch(scratch)])
  return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec, interpret=be.interpret,
                        compiler_params=_compiler_params(be, cfg, sem), name=name)


def _fwd_grid(x, data, t: _Tables, be: Backend, cfg: KernelConfig, shape: tuple[int, int]
              ) -> Array:
  (m, _), (nnz_max, bk, bn), bm = x.shape, data.shape, cfg.block_m
  nbr, nbc = shape[0] // bk, shape[1] // bn

  def x_map(i, j, p, ptr, trow, perm):
    return i, trow[_entry(ptr, j, p, nnz_max)]

  def d_map(i, j, p, ptr, trow, perm):
    return perm[_entry(ptr, j, p, nnz_max)], 0, 0

  call = _prefetch_call(
      _fwd_grid_kernel, 3, (m // bm, nbc, nbr),
      [pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((1, bk, bn), d_map)],
      pl.BlockSpec((bm, bn), lambda i, j, p, *_: (i, j)),
      jax.ShapeDtypeStruct((m, shape[1]), x.dtype), (bm, bn), be, cfg,
      ("parallel", "parallel", "arbitrary"), "bsr_matmul_fwd")
  return call(t.t_indptr, t.t_indices, t.t_perm, x, data)


def _dx_grid(dy, data, t: _Tables, be: Backend, cfg: KernelConfig, shape: tuple[int, int]
             ) -> Array:
  (m, _), (nnz_max, bk, bn), bm = dy.shape, data.shape, cfg.block_m
  nbr, nbc = shape[0] // bk, shape[1] // bn

  def dy_map(i, r, p, ptr, cols):
    return i, cols[_entry(ptr, r, p, nnz_max)]

  def d_map(i, r, p, ptr, cols):
    return _entry(ptr, r, p, nnz_max), 0, 0

  call = _prefetch_call(
      _dx_grid_kernel, 2, (m // bm, nbr, nbc),
      [pl.BlockSpec((bm, bn), dy_map), pl.BlockSpec((1, bk, bn), d_map)],
      pl.BlockSpec((bm, bk), lambda i, r, p, *_: (i, r)),
      jax.ShapeDtypeStruct((m, shape[0]), dy.dtype), (bm, bk), be, cfg,
      ("parallel", "parallel", "arbitrary"), "bsr_matmul_dx")
  return call(t.indptr, t.indices, dy, data)


def _dw_grid(x, dy, data, t: _Tables, be: Backend, cfg: KernelConfig) -> Array:
  nnz_max, bk, bn = data.shape
  m, bm = x.shape[0], cfg.block_m
  call = _prefetch_call(
      _dw_grid_kernel, 3, (nnz_max, m // bm),
      [pl.BlockSpec((bm, bk), lambda s, i, nnz, rows, cols: (i, rows[s])),
       pl.BlockSpec((bm, bn), lambda s, i, nnz, rows, cols: (i, cols[s]))],
      pl.BlockSpec((1, bk, bn), lambda s, i, *_: (s, 0, 0)),
      jax.ShapeDtypeStruct(data.shape, data.dtype), (bk, bn), be, cfg,
      ("parallel", "arbitrary"), "bsr_matmul_dw")
  return call(t.nnz, t.rows, t.indices, x, dy)


# ------------------------------------------------------------------ xla strategy (no Pallas)


def _f32(*xs: Array) -> tuple[Array, ...]:
  """Operands of the XLA path in float32 (XLA:CPU has no bf16 x bf16 -> f32 dot)."""
  return tuple(x.astype(jnp.float32) for x in xs)


def _valid(data: Array, t: _Tables) -> Array:
  return jnp.arange(data.shape[0]) < t.nnz[0]


def _fwd_xla(x, data, t: _Tables, shape):
  (m, _), (_, bk, bn) = x.shape, data.shape
  nbr, nbc = shape[0] // bk, shape[1] // bn
  d = jnp.where(_valid(data, t)[:, None, None], data, 0)
  xb = x.reshape(m, nbr, bk)[:, t.rows]
  prod = jnp.einsum("msk,skn->msn", *_f32(xb, d), precision=lax.Precision.HIGHEST)
  y = jnp.zeros((m, nbc, bn), jnp.float32).at[:, t.indices].add(prod)
  return y.reshape(m, shape[1]).astype(x.dtype)


def _dx_xla(dy, data, t: _Tables, shape):
  (m, _), (_, bk, bn) = dy.shape, data.shape
  nbr, nbc = shape[0] // bk, shape[1] // bn
  d = jnp.where(_valid(data, t)[:, None, None], data, 0)
  dyb = dy.reshape(m, nbc, bn)[:, t.indices]
  prod = jnp.einsum("msn,skn->msk", *_f32(dyb, d), precision=lax.Precision.HIGHEST)
  dx = jnp.zeros((m, nbr, bk), jnp.float32).at[:, t.rows].add(prod)
  return dx.reshape(m, shape[0]).astype(dy.dtype)


def _dw_xla(x, dy, data, t: _Tables, shape):
  (m, _), (_, bk, bn) = x.shape, data.shape
  nbr, nbc = shape[0] // bk, shape[1] // bn
  xb = x.reshape(m, nbr, bk)[:, t.rows]
  dyb = dy.reshape(m, nbc, bn)[:, t.indices]
  dw = jnp.einsum("msk,msn->skn", *_f32(xb, dyb), precision=lax.Precision.HIGHEST)
  return jnp.where(_valid(data, t)[:, None, None], dw, 0).astype(data.dtype)


# ------------------------------------------------------------------------ custom_vjp


class _Static(NamedTuple):
  backend: Backend
  config: BsrMatmulConfig
  shape: tuple[int, int]


def _forward(x, data, t, st: _Static):
  if st.backend.strategy == "xla":
    return _fwd_xla(x, data, t, st.shape)
  f = _fwd_loop if st.backend.strategy == "loop" else _fwd_grid
  return f(x, data, t, st.backend, st.config.fwd, st.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bsr_mm(x: Array, data: Array, t: _Tables, st: _Static) -> Array:
  return _forward(x, data, t, st)


def _bsr_mm_fwd(x, data, t, st):
  return _forward(x, data, t, st), (x, data, t)


def _input_grad(dy, data, t, st: _Static):
  if st.backend.strategy == "xla":
    return _dx_xla(dy, data, t, st.shape)
  f = _dx_loop if st.backend.strategy == "loop" else _dx_grid
  return f(dy, data, t, st.backend, st.config.dx, st.shape)


def _weight_grad(x, dy, data, t, st: _Static):
  if st.backend.strategy == "xla":
    return _dw_xla(x, dy, data, t, st.shape)
  f = _dw_loop if st.backend.strategy == "loop" else _dw_grid
  return f(x, dy, data, t, st.backend, st.config.dw)


def _bsr_mm_bwd(st: _Static, res, dy):
  x, data, t = res
  dy = dy.astype(x.dtype)
  return _input_grad(dy, data, t, st), _weight_grad(x, dy, data, t, st), None


_bsr_mm.defvjp(_bsr_mm_fwd, _bsr_mm_bwd)


def _block_m(m: int, block_m: int | None, be: Backend) -> int:
  """Rows of X per program: a power of two >= 16 (Triton), at most ``block_m``."""
  if block_m is None:
    block_m = 128
  if not isinstance(block_m, int) or block_m < 1:
    raise ValueError(f"block_m must be a positive integer, got {block_m!r}.")
  bm = min(block_m, _rows_p2(m))
  if be.name == "triton" and (bm & (bm - 1) or bm < 16):
    raise ValueError(f"block_m must be a power of two >= 16 for the triton backend, got {bm}.")
  return bm


def _rows_p2(m: int) -> int:
  """The smallest power of two >= max(m, 16): no tile needs more rows than that."""
  return 1 << max(4, math.ceil(math.log2(max(m, 1))))


# ------------------------------------------------------------------- tuned configurations

# Tuned configs, by :func:`tuning_key`; filled by :func:`tune_bsr_matmul` or
# :func:`load_tuned_configs`, read by :func:`bsr_matmul` at trace time (all static).
_TUNED: dict[str, BsrMatmulConfig] = {}


def tuning_key(m: int, w: BSR, dtype: Any, backend: str | Backend | None = None) -> str:
  """The key a tuned config is stored under: device kind, backend, dtype and the static shapes."""
  be = resolve_backend(backend)
  (k, n), (bk, bn) = w.shape, w.block_shape
  device = jax.devices()[0].device_kind
  return (f"{device}|{be.name}|{jnp.dtype(dtype).name}|m{m}|k{k}|n{n}|b{bk}x{bn}"
          f"|nnz{w.data.shape[0]}")


def _default_candidates(be: Backend) -> list[KernelConfig]:
  if be.name == "triton":
    return ([KernelConfig(bm, w, st) for bm in (64, 128) for w in (4, 8) for st in (3, 4)]
            + [KernelConfig(128, be.num_warps, be.num_stages, rows_outer=False)])
  return [KernelConfig(bm, be.num_warps, be.num_stages) for bm in (64, 128)]


def tune_bsr_matmul(x: Array, w: BSR, *, backend: str | Backend | None = None,
                    candidates: list[KernelConfig] | None = None, repeats: int = 5
                    ) -> BsrMatmulConfig:
  """Times each candidate for the forward, dX and dW kernels on ``x @ w``; keeps the fastest.

  Each kernel is timed on its own (median of ``repeats`` runs after a warm-up, ended by
  ``block_until_ready``), so the three may pick different configs. The result is stored
  under :func:`tuning_key`, where later :func:`bsr_matmul` calls of the same shapes find it
  (when they pass neither ``config`` nor ``block_m``), and returned. A candidate that fails
  to compile is skipped. On CPU (interpret mode) the times mean nothing.

  Raises:
    ValueError: naming ``candidates`` when it is empty or every candidate failed.
  """
  import statistics
  import time
  be = resolve_backend(backend)
  x = jnp.asarray(x)
  x2 = x.reshape(-1, w.shape[0])
  m = x2.shape[0]
  candidates = _default_candidates(be) if candidates is None else list(candidates)
  if not candidates:
    raise ValueError("candidates must hold at least one KernelConfig.")
  dy = jnp.ones((m, w.shape[1]), x.dtype)
  t = _tables(w)
  best = {}
  for kind in BsrMatmulConfig._fields:
    times, errors = {}, []
    for c in dict.fromkeys(c._replace(block_m=min(c.block_m, _rows_p2(m))) for c in candidates):
      cfg = _check_config(BsrMatmulConfig(c, c, c), be)
      st = _Static(be, cfg, w.shape)
      pad = (-m) % c.block_m
      xp, dyp = jnp.pad(x2, ((0, pad), (0, 0))), jnp.pad(dy, ((0, pad), (0, 0)))
      fn = jax.jit({"fwd": lambda x, dy, d, t: _forward(x, d, t, st),
                    "dx": lambda x, dy, d, t: _input_grad(dy, d, t, st),
                    "dw": lambda x, dy, d, t: _weight_grad(x, dy, d, t, st)}[kind])
      try:
        jax.block_until_ready(fn(xp, dyp, w.data, t))
      except Exception as e:  # noqa: BLE001 (a config the compiler rejects is not a candidate)
        errors.append(f"{c}: {type(e).__name__}")
        continue
      runs = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(xp, dyp, w.data, t))
        runs.append(time.perf_counter() - t0)
      times[c] = statistics.median(runs)
    if not times:
      raise ValueError(f"candidates: none compiled for the {kind} kernel ({'; '.join(errors)}).")
    best[kind] = min(times, key=times.get)
  config = BsrMatmulConfig(**best)
  _TUNED[tuning_key(m, w, x.dtype, be)] = config
  return config


def tuned_configs() -> dict[str, BsrMatmulConfig]:
  """A copy of the tuned configs, by :func:`tuning_key`."""
  return dict(_TUNED)


def save_tuned_configs(path: str) -> None:
  """Writes the tuned configs to a JSON file (to reuse them in another process)."""
  import json
  with open(path, "w") as f:
    json.dump({k: [[*c[:3], int(c[3])] for c in v] for k, v in _TUNED.items()}, f, indent=1)


def load_tuned_configs(path: str) -> int:
  """Adds the tuned configs of a JSON file written by :func:`save_tuned_configs`; returns how many.

  Raises:
    ValueError: naming ``path`` when an entry is not three ``[block_m, num_warps,
      num_stages, rows_outer]`` lists.
  """
  import json
  with open(path) as f:
    raw = json.load(f)
  loaded = {}
  for key, triples in raw.items():
    if (not isinstance(triples, list) or len(triples) != 3
        or not all(isinstance(c, list) and len(c) == 4 and all(isinstance(v, int) for v in c)
                   for c in triples)):
      raise ValueError(f"path {path!r}: entry {key!r} must be three [block_m, num_warps, "
                       f"num_stages, rows_outer] lists, got {triples!r}.")
    loaded[key] = BsrMatmulConfig(*(KernelConfig(*c[:3], bool(c[3])) for c in triples))
  _TUNED.update(loaded)
  return len(loaded)


def _check_blocks(block_shape: tuple[int, int], be: Backend) -> None:
  """Block shapes the compiled backends accept (interpret and xla take any)."""
  bk, bn = block_shape
  if be.name == "triton" and not all(b >= 16 and b & (b - 1) == 0 for b in (bk, bn)):
    raise ValueError(f"block_shape {block_shape}: the triton backend needs powers of two >= 16.")
  if be.name == "mosaic_tpu" and (bk % 128 or bn % 128):
    raise ValueError(f"block_shape {block_shape}: the mosaic_tpu backend needs multiples of 128 "
                     "(TPU lane width).")


def bsr_matmul(x: Array, w: BSR, *, backend: str | Backend | None = None,
               block_m: int | None = None, config: BsrMatmulConfig | None = None) -> Array:
  """``x @ w`` for a dense ``x[..., K]`` and a block-sparse ``w`` (``K x N``).

  Differentiable in ``x`` and ``w.data`` (the gradient of ``w.data`` is
  non-zero only in stored blocks); the tables are not differentiated. Leading
  axes of ``x`` are flattened into rows, which are padded to a multiple of the
  row tiles.

  Launch parameters, first match wins: ``config`` (one :class:`KernelConfig` per
  kernel); else ``block_m`` rows per program for all three kernels with the backend's
  ``num_warps``/``num_stages``; else a config tuned for these shapes on this device
  (:func:`tune_bsr_matmul`); else ``block_m=128`` (reduced for small inputs).

  Raises:
    ValueError: naming ``x`` when its last axis is not ``K`` or its dtype
      differs from ``w``'s, or naming ``backend``/``block_m``/``config``.
  """
  if not isinstance(w, BSR):
    raise TypeError(f"w must be a BSR matrix, got {type(w).__name__}.")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x has shape {x.shape}; its last axis must be w's first, {w.shape[0]}.")
  if x.dtype != w.dtype:
    raise ValueError(f"x has dtype {x.dtype} but w has dtype {w.dtype}; cast one of them "
                     "(mixed-dtype block-sparse matmul is not supported).")
  if not any(x.dtype == d for d in SUPPORTED_DTYPES):
    raise ValueError(f"x has dtype {x.dtype}; supported: float32, bfloat16, float16.")
  be = resolve_backend(backend)
  _check_blocks(w.block_shape, be)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, w.shape[0])
  m = x2.shape[0]
  if config is not None:
    config = _check_config(config, be)
  elif block_m is None and tuning_key(m, w, x.dtype, be) in _TUNED:
    config = _TUNED[tuning_key(m, w, x.dtype, be)]
  else:
    c = KernelConfig(_block_m(m, block_m, be), be.num_warps, be.num_stages)
    config = BsrMatmulConfig(c, c, c)
  # No tile larger than the rows need; pad the rows to every kernel's tile (powers of two).
  config = BsrMatmulConfig(*(c._replace(block_m=min(c.block_m, _rows_p2(m))) for c in config))
  pad = (-m) % max(c.block_m for c in config)
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
  y = _bsr_mm(x2, w.data, _tables(w), _Static(be, config, w.shape))
  return y[:m].reshape(*lead, w.shape[1])


def bsr_matmul_reference(x: Array, w: BSR) -> Array:
  """``x @ bsr_to_dense(w)`` with a dense matmul (float32 accumulation); for tests."""
  from jaxsparse.kernels.bsr import bsr_to_dense
  return jnp.matmul(x.astype(jnp.float32), bsr_to_dense(w).astype(jnp.float32),
                    precision=lax.Precision.HIGHEST).astype(x.dtype)
