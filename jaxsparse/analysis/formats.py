"""Storage formats of a masked model: their cost in bits and exports for inference.

For an ``r x c`` matrix with ``k`` kept weights of ``b`` bits each (values plus
index bits; ``lg(n) = ceil(log2(n))``):

* dense:  ``r * c * b``
* bitmap: ``r * c + k * b``
* COO:    ``k * (lg(r) + lg(c) + b)``
* CSR:    ``k * (lg(c) + b) + (r + 1) * lg(k + 1)``
* BSR, ``(br, bc)`` blocks, ``kb`` blocks holding a kept weight:
  ``kb * (br * bc * b + lg(c / bc)) + (r / br + 1) * lg(kb + 1)``

A leaf of rank other than 2 is viewed as a matrix: rank 0 and 1 as one row,
higher ranks as ``(prod(shape[:-1]), shape[-1])`` (a conv kernel ``HWIO`` as
``(H*W*I, O)``). BSR is only priced when the block divides that matrix.
These are host-side summaries (not for use under ``jit``). Deep Compression's format
(relative indices with fillers, a shared-weight codebook, Huffman coding) is priced on top of
these helpers in :mod:`jaxsparse.analysis.compression`.

Exports turn every sparse 2D leaf into ``jax.experimental.sparse`` ``BCOO`` or
``BCSR``, or into plain numpy CSR arrays (:class:`CSRArrays`); other leaves are
returned dense (with the mask applied). Inside :func:`sparse_inference`, a flax
linen model's ``apply`` takes the exported ``BCOO`` / ``BCSR`` tree as its params::

    exported = export_sparse(params, masks)            # Dense kernels become BCOO
    with sparse_inference():
      logits = jax.jit(net.apply)({"params": exported}, x)
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import masks as masks_lib

Params = Any
Masks = Any
FORMATS = ("dense", "bitmap", "coo", "csr", "bsr")


def ceil_log2(n: int) -> int:
  """``ceil(log2(n))`` for an integer ``n >= 1`` (0 for ``n == 1``), exactly."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}.")
  return (int(n) - 1).bit_length()


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  """The ``(rows, cols)`` a leaf of ``shape`` is stored as."""
  shape = tuple(int(s) for s in shape)
  if len(shape) == 0:
    return 1, 1
  if len(shape) == 1:
    return 1, shape[0]
  return math.prod(shape[:-1]), shape[-1]


def dense_bits(r: int, c: int, k: int, b: int) -> int:
  return r * c * b


def bitmap_bits(r: int, c: int, k: int, b: int) -> int:
  return r * c + k * b


def coo_bits(r: int, c: int, k: int, b: int) -> int:
  return k * (ceil_log2(r) + ceil_log2(c) + b)


def csr_bits(r: int, c: int, k: int, b: int) -> int:
  return k * (ceil_log2(c) + b) + (r + 1) * ceil_log2(k + 1)


def bsr_bits(r: int, c: int, kb: int, b: int, block_shape: tuple[int, int]) -> int:
  """BSR bits with ``kb`` stored blocks.

  Raises:
    ValueError: naming ``block_shape`` when it does not divide the matrix.
  """
  br, bc = block_shape
  if r % br or c % bc:
    raise ValueError(f"block_shape {tuple(block_shape)} does not divide the matrix shape {(r, c)}.")
  return kb * (br * bc * b + ceil_log2(c // bc)) + (r // br + 1) * ceil_log2(kb + 1)


class FormatSizes(NamedTuple):
  """Bits needed by each format for one leaf (``bsr`` is None when the block does not divide)."""
  name: str
  shape: tuple
  kept: int
  value_bits: int
  dense: int
  bitmap: int
  coo: int
  csr: int
  bsr: int | None

  def sizes(self) -> dict[str, int]:
    """Format -> bits, for the formats that apply."""
    return {f: getattr(self, f) for f in FORMATS if getattr(self, f) is not None}

  @property
  def best(self) -> str:
    """The format with the fewest bits (ties: the first in :data:`FORMATS`)."""
    s = self.sizes()
    return min(s, key=lambda f: (s[f], FORMATS.index(f)))


def leaf_sizes(mask: Any, shape: tuple[int, ...], value_bits: int = 32,
               block_shape: tuple[int, int] = (16, 16), name: str = "") -> FormatSizes:
  """Storage cost of one leaf of ``shape`` with ``mask`` (scalar: dense leaf, all kept).

  Raises:
    ValueError: naming ``value_bits`` or ``mask`` when invalid.
  """
  if not isinstance(value_bits, int) or value_bits < 1:
    raise ValueError(f"value_bits must be a positive integer, got {value_bits!r}.")
  r, c = matrix_shape(shape)
  m = np.asarray(mask)
  if m.ndim == 0:
    m = np.broadcast_to(m, (r, c))
  elif m.size != r * c:
    raise ValueError(f"mask of leaf '{name}' has shape {m.shape}, expected {tuple(shape)}.")
  m = m.reshape(r, c).astype(bool)
  k = int(m.sum())
  br, bc = block_shape
  bsr = None
  if r % br == 0 and c % bc == 0:
    kb = int(m.reshape(r // br, br, c // bc, bc).any(axis=(1, 3)).sum())
    bsr = bsr_bits(r, c, kb, value_bits, (br, bc))
  b = value_bits
  return FormatSizes(name, tuple(int(s) for s in shape), k, b, dense_bits(r, c, k, b),
                     bitmap_bits(r, c, k, b), coo_bits(r, c, k, b), csr_bits(r, c, k, b), bsr)


def storage_sizes(params: Params, masks: Masks, *, value_bits: int | None = None,
                  block_shape: tuple[int, int] = (16, 16)) -> list[FormatSizes]:
  """Per-leaf :class:`FormatSizes`; ``value_bits`` defaults to each leaf's dtype width."""
  masks_lib.check_masks(params, masks)
  out = []
  for name, p, m in zip(masks_lib.leaf_names(params), jax.tree.leaves(params),
                        jax.tree.leaves(masks)):
    b = value_bits if value_bits is not None else jnp.dtype(jnp.result_type(p)).itemsize * 8
    out.append(leaf_sizes(m, jnp.shape(p), b, block_shape, name))
  return out


def best_formats(params: Params, masks: Masks, **kwargs: Any) -> dict[str, tuple[str, float]]:
  """Leaf name -> (format with the fewest bytes, its bytes)."""
  return {s.name: (s.best, s.sizes()[s.best] / 8) for s in storage_sizes(params, masks, **kwargs)}


def storage_summary(params: Params, masks: Masks, **kwargs: Any) -> str:
  """A printable per-leaf table of bytes per format, the best format, and totals."""
  sizes = storage_sizes(params, masks, **kwargs)
  width = max([len(s.name) for s in sizes] + [5])
  head = f"{'leaf':<{width}} " + " ".join(f"{f:>12}" for f in FORMATS) + "  best"
  lines = [head]
  totals = dict.fromkeys(FORMATS, 0)
  best_total = 0
  for s in sizes:
    cells = [f"{(getattr(s, f) or 0) / 8:>12,.0f}" if getattr(s, f) is not None else f"{'-':>12}"
             for f in FORMATS]
    lines.append(f"{s.name:<{width}} " + " ".join(cells) + f"  {s.best}")
    for f in FORMATS:
      totals[f] += getattr(s, f) if getattr(s, f) is not None else s.dense
    best_total += s.sizes()[s.best]
  lines.append(f"{'total':<{width}} " + " ".join(f"{totals[f] / 8:>12,.0f}" for f in FORMATS)
               + f"  best per leaf: {best_total / 8:,.0f} bytes")
  return "\n".join(lines)


# ------------------------------------------------------------------------- exports


class CSRArrays(NamedTuple):
  """A CSR matrix as plain numpy arrays (no scipy needed)."""
  data: np.ndarray
  indices: np.ndarray
  indptr: np.ndarray
  shape: tuple[int, int]

  def todense(self) -> np.ndarray:
    out = np.zeros(self.shape, self.data.dtype)
    rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
    out[rows, self.indices] = self.data
    return out

  def matmul(self, x: np.ndarray) -> np.ndarray:
    """``x @ self`` for a dense ``x[..., rows]`` (inference)."""
    x = np.asarray(x)
    out = np.zeros((*x.shape[:-1], self.shape[1]), np.result_type(x, self.data))
    rows = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
    np.add.at(out, (..., self.indices), x[..., rows] * self.data)
    return out


def csr_from_dense(w: Any, mask: Any = None) -> CSRArrays:
  """Numpy CSR of ``where(mask, w, 0)`` storing exactly the kept positions (even zero values)."""
  w = np.asarray(w)
  if w.ndim != 2:
    raise ValueError(f"w must be 2D for CSR, got shape {w.shape}.")
  m = np.ones(w.shape, bool) if mask is None or np.ndim(mask) == 0 else np.asarray(mask, bool)
  if mask is not None and np.ndim(mask) == 0 and not bool(mask):
    m = np.zeros(w.shape, bool)
  if m.shape != w.shape:
    raise ValueError(f"mask has shape {m.shape}, expected {w.shape}.")
  rows, cols = np.nonzero(m)
  counts = np.bincount(rows, minlength=w.shape[0])
  indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
  return CSRArrays(w[rows, cols], cols.astype(np.int32), indptr, tuple(w.shape))


def export_sparse(params: Params, masks: Masks, format: str = "bcoo") -> Params:  # noqa: A002
  """The params tree with every sparse 2D leaf in ``format``: ``"bcoo"``/``"bcsr"``
  (``jax.experimental.sparse``, ``nse`` = kept count), ``"csr"`` (:class:`CSRArrays`)
  or ``"bsr"`` (:class:`~jaxsparse.kernels.bsr.BSR` with 16x16 blocks when they divide).
  Other leaves come back as ``where(mask, p, 0)``.

  Raises:
    ValueError: naming ``format`` when unknown, or the leaf when ``masks`` does
      not fit ``params``.

  ``params`` may be a flax nnx state (``nnx.state(model, nnx.Param)``); the
  result then holds the exported leaves inside the same ``Param`` wrappers.
  For inference with a linen model see :func:`sparse_inference`.
  """
  from jax.experimental import sparse as jsparse
  if format not in ("bcoo", "bcsr", "csr", "bsr"):
    raise ValueError(f"format must be 'bcoo', 'bcsr', 'csr' or 'bsr', got {format!r}.")
  masks_lib.check_masks(params, masks)

  def one(p, m):
    if jnp.ndim(m) == 0 or jnp.ndim(p) != 2:
      return jnp.where(m, p, jnp.zeros_like(p))
    pm = jnp.where(m, p, jnp.zeros_like(p))
    nse = max(int(jnp.sum(m)), 1)
    if format == "bcoo":
      return jsparse.BCOO.fromdense(pm, nse=nse)
    if format == "bcsr":
      return jsparse.BCSR.fromdense(pm, nse=nse)
    if format == "csr":
      return csr_from_dense(p, m)
    from jaxsparse.kernels.bsr import bsr_from_dense, block_mask
    bs = (16, 16) if p.shape[0] % 16 == 0 and p.shape[1] % 16 == 0 else (1, 1)
    nnz = max(int(jnp.sum(block_mask(m, p.shape, bs))), 1)
    return bsr_from_dense(p, m, bs, nnz)

  _, p_leaves, treedef = masks_lib.flatten_named(params)
  return jax.tree.unflatten(treedef, [one(p, m) for p, m in
                                      zip(p_leaves, masks_lib.flatten_named(masks)[1])])


@contextlib.contextmanager
def sparse_inference() -> Iterator[None]:
  """Within it, flax linen ``nn.Dense`` layers whose kernel is a ``BCOO`` or ``BCSR``
  (from :func:`export_sparse`) multiply with ``jax.experimental.sparse`` instead of
  failing in ``nn.Dense`` (which calls ``jnp.asarray`` on its kernel). Other layers
  and dense kernels run as usual. Works under ``jax.jit``; the output equals the
  masked dense model's up to float rounding.
  """
  import flax.linen as nn
  from jax.experimental import sparse as jsparse

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dense) and context.method_name == "__call__":
      p = module.variables.get("params", {})
      kernel = p.get("kernel")
      if isinstance(kernel, (jsparse.BCOO, jsparse.BCSR)):
        (x,) = args
        dtype = module.dtype or jnp.result_type(x, kernel.dtype)
        if isinstance(kernel, jsparse.BCSR):  # BCSR only multiplies as the left operand
          kernel = kernel.to_bcoo()
        x2 = jnp.asarray(x, dtype).reshape(-1, x.shape[-1])
        y = (x2 @ kernel).reshape(*x.shape[:-1], kernel.shape[-1])
        if module.use_bias and "bias" in p:
          y = y + jnp.asarray(p["bias"], dtype)
        return y
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
