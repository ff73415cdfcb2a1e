"""The block-sparse matmul under ``jax.shard_map``: each device multiplies its own blocks.

:func:`sharded_bsr_matmul` computes ``Y = X @ W`` (``X`` dense ``[..., K]``,
``W`` block-sparse ``K x N``) on a device mesh in two layouts, which combine on
a 2D ``(data, model)`` mesh:

* **tensor parallel** (``W`` a :class:`ShardedBSR`, split over its ``axis``):
  ``W``'s block columns are cut into ``n`` equal slices, ``n`` the size of the
  mesh axis; device ``i`` holds the BSR of columns ``i * N/n .. (i+1) * N/n - 1``
  only (its own blocks, its own tables and its own ``nnz_max`` slots, i.e.
  index ``i`` of every stacked leaf of the :class:`ShardedBSR`). ``X`` is
  replicated over that axis. ``Y`` comes out split along its last axis.
* **data parallel** (``data_axis``): ``X`` is split along its leading (batch)
  axis, ``W`` (a :class:`~jaxsparse.kernels.bsr.BSR`, or a :class:`ShardedBSR`
  for both layouts at once) is replicated over that axis; each device runs the
  kernel on its own rows (every device holds all of ``W``'s blocks and
  tables). ``Y`` comes out split along its leading axis.

Each device runs the ordinary single-device kernel
(:func:`~jaxsparse.kernels.pallas_matmul.bsr_matmul`, any backend) on what it
holds. Where the collectives are:

* forward: none. Every output element is a sum over one block column, which
  lives on one device.
* backward (an explicit ``jax.custom_vjp`` around two ``shard_map`` calls, so
  the reductions below are the only ones):

  - ``dX = dY @ W^T`` sums over *all* block columns: each device computes the
    part from its own columns, then ``psum`` over the model axis
    (tensor parallel only);
  - ``dW = X^T @ dY`` (the stored blocks only) sums over *all* rows: each
    device computes the part from its own rows, then ``psum`` over
    ``data_axis`` (data parallel only).

  Each device runs three kernels per step (forward, dX, dW). Mesh axes that
  neither layout uses hold identical copies and do no collectives. The psums run in the input dtype: with bfloat16 inputs each
  device's partial sum is rounded to bfloat16 before the reduction.

:func:`sharded_bsr_from_dense` builds the :class:`ShardedBSR` from a dense
``(K, N)`` kernel and a jaxsparse mask inside a ``shard_map`` as well: each
device converts only its own column slice (no communication; a kernel and mask
placed in the tensor-parallel layout of :mod:`jaxsparse.core.sharding`,
``P(None, axis)``, are used where they are). Under ``jit`` a new mask only
rebuilds the tables: the shapes are static, nothing recompiles. Gradients reach
the dense kernel through the conversion (non-zero only in stored blocks), as
in :mod:`jaxsparse.kernels.layers`.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from jaxsparse.core import sharding as sharding_lib
from jaxsparse.kernels import bsr as bsr_lib
from jaxsparse.kernels import pallas_matmul
from jaxsparse.kernels.bsr import BSR

Array = jax.Array
_TABLES = ("indptr", "indices", "rows", "t_indptr", "t_indices", "t_perm", "nnz")


@dataclasses.dataclass(frozen=True)
class ShardedBSR:
  """A ``K x N`` block-sparse matrix split by block columns over the mesh axis ``axis``.

  Every array field is the corresponding :class:`~jaxsparse.kernels.bsr.BSR`
  field of one device's ``K x N/n`` column slice, stacked along a new leading
  axis of size ``n`` (the number of devices of ``axis``) and placed with
  ``NamedSharding(mesh, P(axis))``: device ``i`` holds exactly its own blocks
  and tables. Each slice has the same static ``nnz_max`` block slots.

  Attributes:
    data: ``[n, nnz_max, bk, bn]`` blocks of each slice.
    indptr, indices, rows, t_indptr, t_indices, t_perm: ``[n, ...]`` int32
      tables of each slice (see :class:`~jaxsparse.kernels.bsr.BSR`).
    nnz: int32 ``[n]``, the number of non-zero blocks of each slice's mask.
    shape: static global ``(K, N)``.
    axis: static name of the mesh axis the block columns are split over.
  """
  data: Array
  indptr: Array
  indices: Array
  rows: Array
  t_indptr: Array
  t_indices: Array
  t_perm: Array
  nnz: Array
  shape: tuple[int, int]
  axis: str

  @property
  def num_shards(self) -> int:
    return self.data.shape[0]

  @property
  def local_shape(self) -> tuple[int, int]:
    """``(K, N // n)``: the shape of each device's slice."""
    return self.shape[0], self.shape[1] // self.num_shards

  @property
  def block_shape(self) -> tuple[int, int]:
    return tuple(self.data.shape[2:])

  @property
  def nnz_max(self) -> int:
    """Block slots per device."""
    return self.data.shape[1]

  @property
  def grid(self) -> tuple[int, int]:
    """Global number of block rows and block columns."""
    return self.shape[0] // self.data.shape[2], self.shape[1] // self.data.shape[3]

  @property
  def dtype(self) -> Any:
    return self.data.dtype

  def local(self, i: int) -> BSR:
    """The :class:`~jaxsparse.kernels.bsr.BSR` of device ``i``'s column slice."""
    return _local_bsr(self.data[i], tuple(getattr(self, f)[i] for f in _TABLES),
                      self.local_shape)


jax.tree_util.register_dataclass(
    ShardedBSR, data_fields=["data", *_TABLES], meta_fields=["shape", "axis"])


def _local_bsr(data: Array, tables: Sequence[Array], shape: tuple[int, int]) -> BSR:
  return BSR(data, *tables, shape=shape)


# ------------------------------------------------------------------------- validation


def _check_mesh(mesh: Any) -> Mesh:
  return sharding_lib._check_mesh(mesh)


def _axis_names(mesh: Mesh, axis: Any, arg: str) -> tuple[str, ...]:
  """``axis`` (a name or a sequence of names) as a tuple; unknown names raise naming ``arg``."""
  names = (axis,) if isinstance(axis, str) else tuple(axis)
  if not names:
    raise ValueError(f"{arg}: expected a mesh axis name, got {axis!r}.")
  for name in names:
    if name not in mesh.axis_names:
      raise ValueError(f"{arg}: mesh axis {name!r} does not exist; the mesh has axes "
                       f"{tuple(mesh.axis_names)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"{arg}: mesh axes {names} repeat a name.")
  return names


def _size(mesh: Mesh, names: Sequence[str]) -> int:
  return int(np.prod([mesh.shape[n] for n in names], dtype=np.int64))


def _check_split(shape: tuple[int, int], block_shape: tuple[int, int], n: int,
                 axis: str) -> None:
  """Raises unless ``n`` devices each get whole, equal block columns of ``shape``."""
  cols, bn = shape[1], block_shape[1]
  if cols % n:
    raise ValueError(f"w has {cols} output columns (shape {tuple(shape)}), not divisible by the "
                     f"{n} devices of mesh axis {axis!r}.")
  if (cols // bn) % n:
    raise ValueError(f"w has {cols // bn} block columns of width {bn}, not divisible by the {n} "
                     f"devices of mesh axis {axis!r}: each device must hold whole block columns "
                     f"(choose block_shape[1] dividing {cols // n}).")


# ------------------------------------------------------------------------- conversion


def sharded_bsr_from_dense(w: Array, mask: Any, mesh: Mesh, *, axis: str = "model",
                           block_shape: tuple[int, int] = (16, 16),
                           nnz_max: int | None = None) -> ShardedBSR:
  """Splits a dense ``(K, N)`` kernel and its mask into per-device BSR column slices.

  Device ``i`` of mesh axis ``axis`` (``n`` devices) gets the blocks of
  columns ``i * N/n .. (i+1) * N/n - 1``, converted on that device by
  :func:`~jaxsparse.kernels.bsr.bsr_from_dense` (inside ``shard_map``, no
  communication). The result's leaves are sharded ``P(axis)``. jit-able for a
  fixed ``nnz_max``; differentiable in ``w``.

  Args:
    w: ``(K, N)`` dense kernel (best placed ``P(None, axis)``, the
      ``"tensor_parallel"`` layout of :func:`jaxsparse.core.sharding.param_shardings`).
    mask: ``None`` or a scalar (all blocks), an elementwise bool mask of ``w``'s
      shape, or a ``(K // bk, N // bn)`` block mask.
    mesh: the device mesh (``AxisType.Auto`` axes).
    axis: the mesh axis the block columns are split over.
    block_shape: ``(bk, bn)``, dividing ``w.shape``.
    nnz_max: static block slots *per device* (default: every block of a
      slice, which can never overflow).

  Raises:
    ValueError: naming ``axis`` when the mesh has no such axis; naming ``w``
      when its output dimension or its number of block columns does not divide
      by the axis size; naming ``nnz_max`` (and the device) when a concrete
      mask puts more than ``nnz_max`` blocks on one device; for a bad
      ``block_shape`` or ``mask``.
  """
  mesh = _check_mesh(mesh)
  if not isinstance(axis, str):
    raise ValueError(f"axis: expected one mesh axis name, got {axis!r}.")
  (axis,) = _axis_names(mesh, axis, "axis")
  w = jnp.asarray(w)
  bk, bn = bsr_lib.check_block_shape(w.shape, block_shape)
  n = mesh.shape[axis]
  _check_split(w.shape, (bk, bn), n, axis)
  k, cols = (int(s) for s in w.shape)
  nbr, nbc_local = k // bk, cols // bn // n
  total = nbr * nbc_local
  if nnz_max is None:
    nnz_max = total
  elif not isinstance(nnz_max, numbers.Integral) or nnz_max < 1:
    raise ValueError(f"nnz_max must be a positive integer, got {nnz_max!r}.")
  nnz_max = int(min(nnz_max, total))
  mask = jnp.asarray(True) if mask is None else jnp.asarray(mask)
  bmask = bsr_lib.block_mask(mask, w.shape, (bk, bn))          # validates mask
  if not isinstance(bmask, jax.core.Tracer):
    counts = np.asarray(bmask).reshape(nbr, n, nbc_local).sum(axis=(0, 2))
    over = np.flatnonzero(counts > nnz_max)
    if over.size:
      i = int(over[0])
      raise ValueError(f"nnz_max={nnz_max} is too small: device {i} of mesh axis {axis!r} "
                       f"(block columns {i * nbc_local}..{(i + 1) * nbc_local - 1}) has "
                       f"{int(counts[i])} non-zero blocks of shape {(bk, bn)}.")

  leaves = _convert(w, mask, mesh, axis, (bk, bn), nnz_max)
  return ShardedBSR(**leaves, shape=(k, cols), axis=axis)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _convert(w: Array, mask: Array, mesh: Mesh, axis: str, block_shape: tuple[int, int],
             nnz_max: int) -> dict[str, Array]:
  """Each device: ``bsr_from_dense`` of its column slice (jitted: eager shard_map runs op by op)."""

  def convert(w_local, mask_local):
    a = bsr_lib.bsr_from_dense(w_local, mask_local, block_shape, nnz_max)
    return {f: getattr(a, f)[None] for f in ("data", *_TABLES)}

  # check_vma: the conversion's transpose (dw) then knows w is invariant over the other mesh
  # axes and adds no reductions of its own.
  m_spec = PartitionSpec() if mask.ndim == 0 else PartitionSpec(None, axis)
  return jax.shard_map(convert, mesh=mesh, in_specs=(PartitionSpec(None, axis), m_spec),
                       out_specs=PartitionSpec(axis), check_vma=True)(w, mask)


@jax.jit
def sharded_bsr_to_dense(a: ShardedBSR) -> Array:
  """The dense ``(K, N)`` matrix of ``a`` (zeros outside the stored blocks)."""
  dense = jax.vmap(lambda d, *t: bsr_lib.bsr_to_dense(_local_bsr(d, t, a.local_shape)))(
      a.data, *(getattr(a, f) for f in _TABLES))                       # [n, K, N/n]
  return jnp.moveaxis(dense, 0, 1).reshape(a.shape)


def sharded_bsr_overflow(a: ShardedBSR) -> Array:
  """True when some device's slice had more blocks than ``nnz_max`` (jit-able)."""
  return jnp.any(a.nnz > a.nnz_max)


def sharded_bsr_with_data(a: ShardedBSR, data: Array) -> ShardedBSR:
  """``a`` with new block values (same tables)."""
  if data.shape != a.data.shape:
    raise ValueError(f"data has shape {data.shape}, expected {a.data.shape}.")
  return dataclasses.replace(a, data=data)


# ------------------------------------------------------------------------------ matmul


class _Layout(NamedTuple):
  """Static description of one sharded matmul (hashable)."""
  mesh: Mesh
  data_axis: tuple[str, ...]        # () : no data parallelism
  model_axis: str | None            # None: W replicated
  x_ndim: int
  local_shape: tuple[int, int]
  backend: pallas_matmul.Backend
  block_m: int | None

  def entry(self, names: tuple[str, ...]) -> Any:
    return None if not names else names[0] if len(names) == 1 else names

  @property
  def x_spec(self) -> PartitionSpec:
    return PartitionSpec(self.entry(self.data_axis))

  @property
  def w_spec(self) -> PartitionSpec:
    return PartitionSpec() if self.model_axis is None else PartitionSpec(self.model_axis)

  @property
  def y_spec(self) -> PartitionSpec:
    dims = [None] * self.x_ndim
    if self.data_axis:
      dims[0] = self.entry(self.data_axis)
    if self.model_axis:
      dims[-1] = self.model_axis
    return PartitionSpec(*dims)


def _local_matmul(lay: _Layout, x: Array, data: Array, tables: tuple[Array, ...]) -> Array:
  """One device: its rows of X times its blocks (stacked leaves carry a leading axis of 1)."""
  if lay.model_axis is not None:
    data, tables = data[0], tuple(t[0] for t in tables)
  w = _local_bsr(data, tables, lay.local_shape)
  return pallas_matmul.bsr_matmul(x, w, backend=lay.backend, block_m=lay.block_m)


@functools.partial(jax.jit, static_argnums=0)
def _forward(lay: _Layout, x: Array, data: Array, tables: tuple[Array, ...]) -> Array:
  # check_vma=False: pallas_call outputs carry no varying-axes type. Nothing is reduced.
  return jax.shard_map(functools.partial(_local_matmul, lay), mesh=lay.mesh,
                       in_specs=(lay.x_spec, lay.w_spec, lay.w_spec), out_specs=lay.y_spec,
                       check_vma=False)(x, data, tables)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sharded_mm(x: Array, data: Array, tables: tuple[Array, ...], lay: _Layout) -> Array:
  return _forward(lay, x, data, tables)


def _sharded_mm_fwd(x, data, tables, lay):
  return _forward(lay, x, data, tables), (x, data, tables)


def _sharded_mm_bwd(lay: _Layout, res, dy):
  x, data, tables = res
  dx, ddata = _backward(lay, x, data, tables, dy)
  return dx, ddata, None


@functools.partial(jax.jit, static_argnums=0)
def _backward(lay: _Layout, x: Array, data: Array, tables: tuple[Array, ...],
              dy: Array) -> tuple[Array, Array]:

  def local_grads(x, data, tables, dy):
    # The local kernel's own custom_vjp (dX and SDDMM dW kernels); its forward output is unused
    # and dead-code eliminated.
    _, vjp = jax.vjp(lambda x, d: _local_matmul(lay, x, d, tables), x, data)
    dx, ddata = vjp(dy)
    if lay.model_axis is not None:          # dX sums over the block columns of every device
      dx = lax.psum(dx, lay.model_axis)
    if lay.data_axis:                       # dW sums over the rows of every device
      ddata = lax.psum(ddata, lay.data_axis)
    return dx, ddata

  return jax.shard_map(local_grads, mesh=lay.mesh,
                       in_specs=(lay.x_spec, lay.w_spec, lay.w_spec, lay.y_spec),
                       out_specs=(lay.x_spec, lay.w_spec), check_vma=False)(x, data, tables, dy)


_sharded_mm.defvjp(_sharded_mm_fwd, _sharded_mm_bwd)


def sharded_bsr_matmul(x: Array, w: ShardedBSR | BSR, mesh: Mesh, *,
                       data_axis: str | Sequence[str] | None = None,
                       backend: str | pallas_matmul.Backend | None = None,
                       block_m: int | None = None) -> Array:
  """``x @ w`` with each device of ``mesh`` multiplying its own blocks (see the module doc).

  Layouts:

  * ``w`` a :class:`ShardedBSR` (from :func:`sharded_bsr_from_dense`): tensor
    parallel over ``w.axis``; with ``data_axis`` also data parallel over it.
  * ``w`` a :class:`~jaxsparse.kernels.bsr.BSR`: replicated, data parallel
    over ``data_axis`` (required).

  ``x`` is ``[..., K]``, split along its leading axis over ``data_axis`` (if
  any) and replicated over every other mesh axis. The result is ``[..., N]``
  with ``PartitionSpec(data_axis, ..., w.axis)`` (the entries that apply).
  Differentiable in ``x`` and the block data (hence in the dense kernel given
  to :func:`sharded_bsr_from_dense`); the backward reduces ``dX`` over
  ``w.axis`` and ``dW`` over ``data_axis``.

  Args:
    x: dense input, same dtype as ``w`` (float32, bfloat16 or float16).
    w: the block-sparse ``K x N`` matrix.
    mesh: the device mesh (``AxisType.Auto`` axes); for a :class:`ShardedBSR`,
      the one it was built for (same size of ``w.axis``).
    data_axis: mesh axis name(s) the batch is split over, or None.
    backend, block_m: passed to :func:`~jaxsparse.kernels.pallas_matmul.bsr_matmul`
      on every device (``block_m`` tiles each device's rows).

  Raises:
    ValueError: naming ``data_axis`` (or ``w.axis``) when the mesh has no such
      axis or both name the same axis, ``w`` when ``w.axis`` does not have
      ``w.num_shards`` devices, ``x`` when its last axis, dtype or batch size
      does not fit.
    TypeError: when ``w`` is not a BSR or ShardedBSR.
  """
  mesh = _check_mesh(mesh)
  data_names = () if data_axis is None else _axis_names(mesh, data_axis, "data_axis")
  if isinstance(w, ShardedBSR):
    (model_axis,) = _axis_names(mesh, w.axis, "w.axis")
    if mesh.shape[model_axis] != w.num_shards:
      raise ValueError(f"w is split into {w.num_shards} column slices, but mesh axis "
                       f"{model_axis!r} has {mesh.shape[model_axis]} devices; rebuild it with "
                       "sharded_bsr_from_dense for this mesh.")
    if model_axis in data_names:
      raise ValueError(f"data_axis {data_axis!r} includes w.axis {model_axis!r}: the batch and "
                       "the block columns must be split over different mesh axes.")
    local_shape = w.local_shape
  elif isinstance(w, BSR):
    if not data_names:
      raise ValueError("data_axis: a (replicated) BSR w is multiplied data parallel; give the "
                       "mesh axis the batch is split over, or split w by block columns with "
                       "sharded_bsr_from_dense for tensor parallelism.")
    model_axis, local_shape = None, w.shape
  else:
    raise TypeError(f"w must be a ShardedBSR or BSR matrix, got {type(w).__name__}.")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"x has shape {x.shape}; its last axis must be w's first, {w.shape[0]}.")
  if x.dtype != w.dtype:
    raise ValueError(f"x has dtype {x.dtype} but w has dtype {w.dtype}; cast one of them "
                     "(mixed-dtype block-sparse matmul is not supported).")
  if data_names:
    size = _size(mesh, data_names)
    if x.ndim < 2 or x.shape[0] % size:
      raise ValueError(f"x has shape {x.shape}; with data_axis {data_axis!r} its leading "
                       f"(batch) axis must be divisible by the {size} devices of that axis.")
  lay = _Layout(mesh, data_names, model_axis, x.ndim, tuple(local_shape),
                pallas_matmul.resolve_backend(backend), block_m)
  tables = tuple(getattr(w, f) for f in _TABLES)
  return _sharded_mm(x, w.data, tables, lay)


def sharded_bsr_matmul_reference(x: Array, w: ShardedBSR | BSR) -> Array:
  """``x @ dense(w)`` with one dense matmul (float32 accumulation); for tests."""
  dense = sharded_bsr_to_dense(w) if isinstance(w, ShardedBSR) else bsr_lib.bsr_to_dense(w)
  return jnp.matmul(x.astype(jnp.float32), dense.astype(jnp.float32),
                    precision=lax.Precision.HIGHEST).astype(x.dtype)
