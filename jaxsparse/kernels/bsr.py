"""Block-sparse row (BSR) matrices with a fixed block budget, as a pytree.

A ``(rows, cols)`` matrix cut into ``(bk, bn)`` blocks has a ``(rows // bk,
cols // bn)`` grid of blocks; a *block mask* marks the blocks that may hold
non-zeros. :class:`BSR` stores those blocks in row-major block order in
``data[nnz_max, bk, bn]`` together with two sets of integer tables:

* by block row (CSR on blocks): ``indptr[nbr + 1]``, and for every slot ``s``
  its block column ``indices[s]`` and block row ``rows[s]``; the slots of
  block row ``i`` are ``indptr[i] .. indptr[i + 1] - 1``;
* by block column (the transpose, used by ``X @ W``): ``t_indptr[nbc + 1]``,
  and for every column-major entry ``e`` its block row ``t_indices[e]`` and its
  slot in ``data``, ``t_perm[e]``.

``nnz_max`` is static (the leading dimension of ``data``), so every array has
a shape that does not depend on the mask: a new mask rebuilds the tables inside
``jit`` without recompiling. Slots past ``nnz`` are padding (zero data, block
indices 0) that no table points to.

If a mask has more non-zero blocks than ``nnz_max``, :func:`bsr_from_dense`
raises when the mask is concrete; under ``jit`` it keeps the first ``nnz_max``
blocks in row-major order and records the true count in ``nnz``, so that
:func:`bsr_overflow` can report it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BSR:
  """A block-sparse matrix of static ``shape`` with at most ``nnz_max`` blocks.

  Attributes:
    data: ``[nnz_max, bk, bn]`` non-zero blocks, row-major block order.
    indptr: int32 ``[nbr + 1]``, slot range of each block row.
    indices: int32 ``[nnz_max]``, block column of each slot.
    rows: int32 ``[nnz_max]``, block row of each slot.
    t_indptr: int32 ``[nbc + 1]``, entry range of each block column.
    t_indices: int32 ``[nnz_max]``, block row of each column-major entry.
    t_perm: int32 ``[nnz_max]``, slot in ``data`` of each column-major entry.
    nnz: int32 scalar, the number of non-zero blocks of the mask it was built
      from (``> nnz_max`` means blocks were dropped).
    shape: static ``(rows, cols)`` of the dense matrix.
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

  @property
  def block_shape(self) -> tuple[int, int]:
    return tuple(self.data.shape[1:])

  @property
  def nnz_max(self) -> int:
    return self.data.shape[0]

  @property
  def grid(self) -> tuple[int, int]:
    """Number of block rows and block columns."""
    return self.shape[0] // self.data.shape[1], self.shape[1] // self.data.shape[2]

  @property
  def dtype(self) -> Any:
    return self.data.dtype


jax.tree_util.register_dataclass(
    BSR, data_fields=["data", "indptr", "indices", "rows", "t_indptr", "t_indices", "t_perm",
                      "nnz"], meta_fields=["shape"])


def check_block_shape(shape: tuple[int, ...], block_shape: Any) -> tuple[int, int]:
  """Validates ``block_shape`` against a 2D ``shape``; returns it as a tuple of ints.

  Raises:
    ValueError: naming ``block_shape`` when it is not two positive ints that
      divide ``shape``, or naming the matrix when it is not 2D.
  """
  if len(shape) != 2:
    raise ValueError(f"block-sparse matrices must be 2D, got shape {tuple(shape)}.")
  try:
    bk, bn = block_shape
  except (TypeError, ValueError):
    raise ValueError(f"block_shape must be a pair (bk, bn), got {block_shape!r}.") from None
  if not all(isinstance(b, numbers.Integral) and b > 0 for b in (bk, bn)):
    raise ValueError(f"block_shape must be two positive integers, got {block_shape!r}.")
  if shape[0] % bk or shape[1] % bn:
    raise ValueError(f"block_shape {(int(bk), int(bn))} does not divide the matrix shape "
                     f"{tuple(shape)}: both dimensions must be multiples of the block's.")
  return int(bk), int(bn)


def block_mask(mask: Any, shape: tuple[int, int], block_shape: tuple[int, int]) -> Array:
  """The ``(nbr, nbc)`` block mask of a jaxsparse mask leaf.

  ``mask`` may be the scalar dense mask (every block kept), an elementwise mask
  of ``shape`` (a block is kept when any of its elements is), or already a
  block mask of shape ``(nbr, nbc)``.

  Raises:
    ValueError: naming ``mask`` when its shape is neither.
  """
  bk, bn = check_block_shape(shape, block_shape)
  grid = (shape[0] // bk, shape[1] // bn)
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_:
    raise ValueError(f"mask must be boolean, got dtype {mask.dtype}.")
  if mask.ndim == 0:
    return jnp.broadcast_to(mask, grid)
  if mask.shape == tuple(shape):
    return jnp.any(mask.reshape(grid[0], bk, grid[1], bn), axis=(1, 3))
  if mask.shape == grid:
    return mask
  raise ValueError(f"mask has shape {mask.shape}; expected the matrix shape {tuple(shape)}, "
                   f"the block grid {grid}, or a scalar.")


def expand_block_mask(bmask: Array, block_shape: tuple[int, int]) -> Array:
  """The elementwise mask that is constant ``bmask[i, j]`` on block ``(i, j)``."""
  bk, bn = block_shape
  return jnp.repeat(jnp.repeat(bmask, bk, axis=0), bn, axis=1)


def is_block_structured(mask: Array, block_shape: tuple[int, int]) -> Array:
  """True when the elementwise ``mask`` is constant on every block (jit-able)."""
  mask = jnp.asarray(mask)
  bm = block_mask(mask, mask.shape, block_shape)
  return jnp.all(expand_block_mask(bm, block_shape) == mask)


def tables_from_block_mask(bmask: Array, nnz_max: int) -> dict[str, Array]:
  """The BSR tables (see :class:`BSR`) of a ``(nbr, nbc)`` block mask; jit-able.

  Also returns ``slots``: the row-major flat block index of each slot (for
  gathering data) and ``valid``: which slots hold a block.
  """
  nbr, nbc = bmask.shape
  flat = bmask.reshape(-1)
  rank = jnp.cumsum(flat.astype(jnp.int32)) - 1          # slot of each kept block
  nnz = jnp.sum(flat, dtype=jnp.int32)
  kept = flat & (rank < nnz_max)                          # truncation on overflow
  kept2 = kept.reshape(nbr, nbc)
  fill = nbr * nbc
  (flat_idx,) = jnp.nonzero(kept, size=nnz_max, fill_value=fill)
  valid = flat_idx < fill
  safe = jnp.where(valid, flat_idx, 0)
  rows = jnp.where(valid, safe // nbc, 0).astype(jnp.int32)
  cols = jnp.where(valid, safe % nbc, 0).astype(jnp.int32)
  zero = jnp.zeros((1,), jnp.int32)
  indptr = jnp.concatenate([zero, jnp.cumsum(jnp.sum(kept2, axis=1, dtype=jnp.int32))])
  t_indptr = jnp.concatenate([zero, jnp.cumsum(jnp.sum(kept2, axis=0, dtype=jnp.int32))])
  (t_flat,) = jnp.nonzero(kept2.T.reshape(-1), size=nnz_max, fill_value=fill)
  t_valid = t_flat < fill
  t_safe = jnp.where(t_valid, t_flat, 0)
  t_rows = jnp.where(t_valid, t_safe % nbr, 0).astype(jnp.int32)
  t_cols = t_safe // nbr
  t_perm = jnp.where(t_valid, rank[t_rows * nbc + t_cols], 0).astype(jnp.int32)
  return dict(indptr=indptr.astype(jnp.int32), indices=cols, rows=rows,
              t_indptr=t_indptr.astype(jnp.int32), t_indices=t_rows, t_perm=t_perm, nnz=nnz,
              slots=safe, valid=valid)


def _check_nnz_max(nnz_max: Any, total: int) -> int:
  if not isinstance(nnz_max, numbers.Integral) or nnz_max < 1:
    raise ValueError(f"nnz_max must be a positive integer, got {nnz_max!r}.")
  return int(min(nnz_max, total))


def bsr_from_dense(w: Array, mask: Any = None, block_shape: tuple[int, int] = (16, 16),
                   nnz_max: int | None = None) -> BSR:
  """Converts a dense matrix and a (block or elementwise) mask to :class:`BSR`.

  The stored blocks are ``where(mask, w, 0)`` for an elementwise mask, so
  ``bsr_to_dense(bsr_from_dense(w, m, ...)) == where(m, w, 0)`` exactly; with a
  block mask (or none) whole blocks are kept. jit-able for a fixed
  ``nnz_max`` (default: every block, which can never overflow).

  Args:
    w: ``(R, C)`` matrix.
    mask: ``None`` or scalar (all blocks), an elementwise bool mask of ``w``'s
      shape (a jaxsparse mask leaf), or a ``(R // bk, C // bn)`` block mask.
    block_shape: ``(bk, bn)``, dividing ``w.shape``.
    nnz_max: static number of block slots (capped at the number of blocks).

  Raises:
    ValueError: for a bad ``block_shape``, ``mask`` or ``nnz_max``, or when a
      concrete mask has more than ``nnz_max`` non-zero blocks.
  """
  w = jnp.asarray(w)
  bk, bn = check_block_shape(w.shape, block_shape)
  total = (w.shape[0] // bk) * (w.shape[1] // bn)
  nnz_max = total if nnz_max is None else _check_nnz_max(nnz_max, total)
  mask = jnp.asarray(True) if mask is None else jnp.asarray(mask)
  bm = block_mask(mask, w.shape, (bk, bn))
  if not isinstance(bm, jax.core.Tracer):
    count = int(np.sum(np.asarray(bm)))
    if count > nnz_max:
      raise ValueError(f"nnz_max={nnz_max} is too small: the mask has {count} non-zero "
                       f"blocks of shape {(bk, bn)}.")
  t = tables_from_block_mask(bm, nnz_max)
  del t["slots"]
  valid = t.pop("valid")
  # Gather the stored blocks straight from w (cost ~ nnz_max blocks, no full transpose).
  grid = (w.shape[0] // bk, w.shape[1] // bn)
  blocks = w.reshape(grid[0], bk, grid[1], bn)[t["rows"], :, t["indices"], :]
  keep = valid[:, None, None]
  if mask.shape == w.shape:
    keep = keep & mask.reshape(grid[0], bk, grid[1], bn)[t["rows"], :, t["indices"], :]
  data = jnp.where(keep, blocks, jnp.zeros_like(blocks))
  return BSR(data=data, shape=tuple(int(s) for s in w.shape), **t)


def bsr_to_dense(a: BSR) -> Array:
  """The dense ``(R, C)`` matrix of ``a`` (zeros outside the stored blocks)."""
  nbr, nbc = a.grid
  bk, bn = a.block_shape
  slot = jnp.arange(a.nnz_max)
  valid = slot < jnp.minimum(a.nnz, a.nnz_max)
  flat = jnp.where(valid, a.rows * nbc + a.indices, nbr * nbc)   # padding: dropped
  blocks = jnp.zeros((nbr * nbc, bk, bn), a.dtype).at[flat].set(a.data, mode="drop")
  return blocks.reshape(nbr, nbc, bk, bn).transpose(0, 2, 1, 3).reshape(a.shape)


def bsr_block_mask(a: BSR) -> Array:
  """The ``(nbr, nbc)`` block mask of the stored blocks of ``a``."""
  nbr, nbc = a.grid
  valid = jnp.arange(a.nnz_max) < jnp.minimum(a.nnz, a.nnz_max)
  flat = jnp.where(valid, a.rows * nbc + a.indices, nbr * nbc)
  return jnp.zeros((nbr * nbc,), bool).at[flat].set(True, mode="drop").reshape(nbr, nbc)


def bsr_overflow(a: BSR) -> Array:
  """True when the mask ``a`` was built from had more blocks than ``nnz_max`` (jit-able)."""
  return a.nnz > a.nnz_max


def bsr_with_data(a: BSR, data: Array) -> BSR:
  """``a`` with new block values (same tables)."""
  if data.shape != a.data.shape:
    raise ValueError(f"data has shape {data.shape}, expected {a.data.shape}.")
  return dataclasses.replace(a, data=data)
