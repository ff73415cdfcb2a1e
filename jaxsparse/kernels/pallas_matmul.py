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


def _compiler_params(be: Backend, grid_semantics: tuple[str, ...]) -> Any:
  """Backend-specific ``compiler_params`` (None in interpret mode)."""
  if be.interpret or be.strategy == "xla":
    return None
  if be.name == "triton":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=be.num_warps, num_stages=be.num_stages)
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


def _fwd_loop_kernel(ptr_ref, trow_ref, perm_ref, x_ref, d_ref, o_ref, *, bk):
  j = pl.program_id(1)

  def body(e, acc):
    r, s = trow_ref[e], perm_ref[e]
    xb = x_ref[:, pl.ds(pl.multiple_of(r * bk, bk), bk)]
    return acc + _dot(xb, d_ref[s])

  acc = lax.fori_loop(ptr_ref[j], ptr_ref[j + 1], body, jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _dx_loop_kernel(ptr_ref, col_ref, dy_ref, d_ref, o_ref, *, bn):
  i = pl.program_id(1)

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


def _fwd_loop(x, data, t: _Tables, be: Backend, bm: int, shape: tuple[int, int]) -> Array:
  (m, k), (_, bk, bn) = x.shape, data.shape
  nbc = shape[1] // bn
  ins = (t.t_indptr, t.t_indices, t.t_perm)
  return pl.pallas_call(
      functools.partial(_fwd_loop_kernel, bk=bk),
      out_shape=jax.ShapeDtypeStruct((m, shape[1]), x.dtype), grid=(m // bm, nbc),
      in_specs=[*(_full(a) for a in ins), pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                _full(data)],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)), interpret=be.interpret,
      compiler_params=_compiler_params(be, ("parallel", "parallel")),
      name="bsr_matmul_fwd")(*ins, x, data)


def _dx_loop(dy, data, t: _Tables, be: Backend, bm: int, shape: tuple[int, int]) -> Array:
  (m, n), (_, bk, bn) = dy.shape, data.shape
  nbr = shape[0] // bk
  ins = (t.indptr, t.indices)
  return pl.pallas_call(
      functools.partial(_dx_loop_kernel, bn=bn),
      out_shape=jax.ShapeDtypeStruct((m, shape[0]), dy.dtype), grid=(m // bm, nbr),
      in_specs=[*(_full(a) for a in ins), pl.BlockSpec((bm, n), lambda i, j: (i, 0)),
                _full(data)],
      out_specs=pl.BlockSpec((bm, bk), lambda i, j: (i, j)), interpret=be.interpret,
      compiler_params=_compiler_params(be, ("parallel", "parallel")),
      name="bsr_matmul_dx")(*ins, dy, data)


def _dw_loop(x, dy, data, t: _Tables, be: Backend, bm: int) -> Array:
  nnz_max, bk, bn = data.shape
  m = x.shape[0]
  ins = (t.nnz, t.rows, t.indices)
  return pl.pallas_call(
      functools.partial(_dw_loop_kernel, bm=bm, bk=bk, bn=bn, n_m=m // bm),
      out_shape=jax.ShapeDtypeStruct(data.shape, data.dtype), grid=(nnz_max,),
      in_specs=[*(_full(a) for a in ins), _full(x), _full(dy)],
      out_specs=pl.BlockSpec((1, bk, bn), lambda s: (s, 0, 0)), interpret=be.interpret,
      compiler_params=_compiler_params(be, ("parallel",)),
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


def _prefetch_call(kernel, n_prefetch, grid, in_specs, out_specs, out_shape, scratch, be, sem,
                   name):
  from jax.experimental.pallas import tpu as pltpu
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_prefetch, grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=[_acc_scratch(scratch)])
  return pl.pallas_call(kernel, out_shape=out_shape, grid_spec=spec, interpret=be.interpret,
                        compiler_params=_compiler_params(be, sem), name=name)


def _fwd_grid(x, data, t: _Tables, be: Backend, bm: int, shape: tuple[int, int]) -> Array:
  (m, _), (nnz_max, bk, bn) = x.shape, data.shape
  nbr, nbc = shape[0] // bk, shape[1] // bn

  def x_map(i, j, p, ptr, trow, perm):
    return i, trow[_entry(ptr, j, p, nnz_max)]

  def d_map(i, j, p, ptr, trow, perm):
    return perm[_entry(ptr, j, p, nnz_max)], 0, 0

  call = _prefetch_call(
      _fwd_grid_kernel, 3, (m // bm, nbc, nbr),
      [pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((1, bk, bn), d_map)],
      pl.BlockSpec((bm, bn), lambda i, j, p, *_: (i, j)),
      jax.ShapeDtypeStruct((m, shape[1]), x.dtype), (bm, bn), be,
      ("parallel", "parallel", "arbitrary"), "bsr_matmul_fwd")
  return call(t.t_indptr, t.t_indices, t.t_perm, x, data)


def _dx_grid(dy, data, t: _Tables, be: Backend, bm: int, shape: tuple[int, int]) -> Array:
  (m, _), (nnz_max, bk, bn) = dy.shape, data.shape
  nbr, nbc = shape[0] // bk, shape[1] // bn

  def dy_map(i, r, p, ptr, cols):
    return i, cols[_entry(ptr, r, p, nnz_max)]

  def d_map(i, r, p, ptr, cols):
    return _entry(ptr, r, p, nnz_max), 0, 0

  call = _prefetch_call(
      _dx_grid_kernel, 2, (m // bm, nbr, nbc),
      [pl.BlockSpec((bm, bn), dy_map), pl.BlockSpec((1, bk, bn), d_map)],
      pl.BlockSpec((bm, bk), lambda i, r, p, *_: (i, r)),
      jax.ShapeDtypeStruct((m, shape[0]), dy.dtype), (bm, bk), be,
      ("parallel", "parallel", "arbitrary"), "bsr_matmul_dx")
  return call(t.indptr, t.indices, dy, data)


def _dw_grid(x, dy, data, t: _Tables, be: Backend, bm: int) -> Array:
  nnz_max, bk, bn = data.shape
  m = x.shape[0]
  call = _prefetch_call(
      _dw_grid_kernel, 3, (nnz_max, m // bm),
      [pl.BlockSpec((bm, bk), lambda s, i, nnz, rows, cols: (i, rows[s])),
       pl.BlockSpec((bm, bn), lambda s, i, nnz, rows, cols: (i, cols[s]))],
      pl.BlockSpec((1, bk, bn), lambda s, i, *_: (s, 0, 0)),
      jax.ShapeDtypeStruct(data.shape, data.dtype), (bk, bn), be,
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
  block_m: int
  shape: tuple[int, int]


def _forward(x, data, t, st: _Static):
  if st.backend.strategy == "xla":
    return _fwd_xla(x, data, t, st.shape)
  f = _fwd_loop if st.backend.strategy == "loop" else _fwd_grid
  return f(x, data, t, st.backend, st.block_m, st.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bsr_mm(x: Array, data: Array, t: _Tables, st: _Static) -> Array:
  return _forward(x, data, t, st)


def _bsr_mm_fwd(x, data, t, st):
  return _forward(x, data, t, st), (x, data, t)


def _bsr_mm_bwd(st: _Static, res, dy):
  x, data, t = res
  be = st.backend
  dy = dy.astype(x.dtype)
  if be.strategy == "xla":
    dx, dw = _dx_xla(dy, data, t, st.shape), _dw_xla(x, dy, data, t, st.shape)
  elif be.strategy == "loop":
    dx = _dx_loop(dy, data, t, be, st.block_m, st.shape)
    dw = _dw_loop(x, dy, data, t, be, st.block_m)
  else:
    dx = _dx_grid(dy, data, t, be, st.block_m, st.shape)
    dw = _dw_grid(x, dy, data, t, be, st.block_m)
  return dx, dw, None


_bsr_mm.defvjp(_bsr_mm_fwd, _bsr_mm_bwd)


def _block_m(m: int, block_m: int | None, be: Backend) -> int:
  """Rows of X per program: a power of two >= 16 (Triton), at most ``block_m``."""
  if block_m is None:
    block_m = 128
  if not isinstance(block_m, int) or block_m < 1:
    raise ValueError(f"block_m must be a positive integer, got {block_m!r}.")
  p2 = 1 << max(4, math.ceil(math.log2(max(m, 1))))
  bm = min(block_m, p2)
  if be.name == "triton" and (bm & (bm - 1) or bm < 16):
    raise ValueError(f"block_m must be a power of two >= 16 for the triton backend, got {bm}.")
  return bm


def _check_blocks(block_shape: tuple[int, int], be: Backend) -> None:
  """Block shapes the compiled backends accept (interpret and xla take any)."""
  bk, bn = block_shape
  if be.name == "triton" and not all(b >= 16 and b & (b - 1) == 0 for b in (bk, bn)):
    raise ValueError(f"block_shape {block_shape}: the triton backend needs powers of two >= 16.")
  if be.name == "mosaic_tpu" and (bk % 128 or bn % 128):
    raise ValueError(f"block_shape {block_shape}: the mosaic_tpu backend needs multiples of 128 "
                     "(TPU lane width).")


def bsr_matmul(x: Array, w: BSR, *, backend: str | Backend | None = None,
               block_m: int | None = None) -> Array:
  """``x @ w`` for a dense ``x[..., K]`` and a block-sparse ``w`` (``K x N``).

  Differentiable in ``x`` and ``w.data`` (the gradient of ``w.data`` is
  non-zero only in stored blocks); the tables are not differentiated. Leading
  axes of ``x`` are flattened into rows, which are padded to a multiple of the
  row tile ``block_m`` (default 128, reduced for small inputs).

  Raises:
    ValueError: naming ``x`` when its last axis is not ``K`` or its dtype
      differs from ``w``'s, or naming ``backend``/``block_m``.
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
  bm = _block_m(m, block_m, be)
  pad = (-m) % bm
  if pad:
    x2 = jnp.pad(x2, ((0, pad), (0, 0)))
  y = _bsr_mm(x2, w.data, _tables(w), _Static(be, bm, w.shape))
  return y[:m].reshape(*lead, w.shape[1])


def bsr_matmul_reference(x: Array, w: BSR) -> Array:
  """``x @ bsr_to_dense(w)`` with a dense matmul (float32 accumulation); for tests."""
  from jaxsparse.kernels.bsr import bsr_to_dense
  return jnp.matmul(x.astype(jnp.float32), bsr_to_dense(w).astype(jnp.float32),
                    precision=lax.Precision.HIGHEST).astype(x.dtype)
