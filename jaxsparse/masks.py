"""Mask pytrees: the one data structure every jaxsparse method shares.

A mask tree has exactly the structure of the params tree. Each leaf is a
boolean ``jax.Array``:

* a *sparse* leaf's mask has the param's shape; ``True`` marks a kept weight;
* a *dense* leaf's mask is the scalar ``True`` (shape ``()``), which
  broadcasts against any param, so ``jax.tree.map(f, params, masks)`` is
  always well defined and ``jnp.where(mask, p, 0)`` needs no special case.

Whether a leaf is sparse is therefore static (its mask's rank), which keeps
every function here jit-able without recompilation when a mask changes.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Masks = Any

DENSE = True
"""The mask value of a dense leaf: ``jnp.asarray(True)`` (shape ``()``)."""


def dense_mask() -> jax.Array:
  """Returns the scalar ``True`` mask that marks a leaf as dense."""
  return jnp.asarray(True)


def is_sparse(mask: jax.Array) -> bool:
  """True when ``mask`` is the full-shape mask of a sparse leaf (static)."""
  return jnp.ndim(mask) > 0


def path_name(path: tuple) -> str:
  """'/'-joined readable name of a pytree path (flax nnx's trailing ``value`` dropped)."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    else:
      parts.append(str(key))
  if len(parts) > 1 and parts[-1] == "value":
    parts = parts[:-1]
  return "/".join(parts)


def leaf_names(tree: Any) -> list[str]:
  """Names of the leaves of ``tree`` in flattening order."""
  return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_masks(params: Params, masks: Masks) -> None:
  """Raises ValueError (naming the leaf) if ``masks`` does not fit ``params``."""
  p_def = jax.tree.structure(params)
  m_def = jax.tree.structure(masks)
  if p_def != m_def:
    raise ValueError(
        "masks: the mask tree's structure does not match the params tree.\n"
        f"  params: {p_def}\n  masks:  {m_def}")
  names = leaf_names(params)
  for name, p, m in zip(names, jax.tree.leaves(params), jax.tree.leaves(masks)):
    if jnp.ndim(m) == 0:
      continue
    if jnp.shape(m) != jnp.shape(p):
      raise ValueError(
          f"masks: leaf '{name}' has mask shape {jnp.shape(m)} but param shape "
          f"{jnp.shape(p)}; a sparse leaf's mask must have the param's shape "
          "and a dense leaf's mask must be the scalar True.")
    if jnp.result_type(m) != jnp.bool_:
      raise ValueError(f"masks: leaf '{name}' has mask dtype {jnp.result_type(m)}, expected bool.")


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes the pruned weights: ``where(mask, p, 0)`` leaf by leaf."""
  return jax.tree.map(lambda p, m: p if jnp.ndim(m) == 0 else jnp.where(m, p, jnp.zeros_like(p)),
                      params, masks)


class LeafCount(NamedTuple):
  """Kept and total weights of one leaf."""
  name: str
  shape: tuple
  kept: int
  total: int
  sparse: bool

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total if self.total else 0.0


def count_leaves(params: Params, masks: Masks) -> list[LeafCount]:
  """Per-leaf kept/total counts (a host-side summary; not for use under jit)."""
  out = []
  names = leaf_names(params)
  for name, p, m in zip(names, jax.tree.leaves(params), jax.tree.leaves(masks)):
    size = int(np.prod(jnp.shape(p)))
    if jnp.ndim(m) == 0:
      kept = size if bool(m) else 0
      out.append(LeafCount(name, tuple(jnp.shape(p)), kept, size, False))
    else:
      out.append(LeafCount(name, tuple(jnp.shape(p)), int(jnp.sum(m)), size, True))
  return out


def kept_counts(masks: Masks, params: Params | None = None) -> Any:
  """Per-leaf number of kept weights as a tree of int32 scalars (jit-able).

  Dense leaves count their full size, which needs ``params`` for the shape;
  without ``params`` a dense leaf counts as 0.
  """
  if params is None:
    return jax.tree.map(lambda m: jnp.sum(m, dtype=jnp.int32) if jnp.ndim(m) else jnp.int32(0), masks)
  return jax.tree.map(
      lambda p, m: jnp.sum(m, dtype=jnp.int32) if jnp.ndim(m) else jnp.int32(jnp.size(p)),
      params, masks)


def sparsity(params: Params, masks: Masks, *, sparse_only: bool = True) -> float:
  """Fraction of zeroed weights, over the sparse leaves (default) or all leaves."""
  counts = [c for c in count_leaves(params, masks) if c.sparse or not sparse_only]
  total = sum(c.total for c in counts)
  return 1.0 - sum(c.kept for c in counts) / total if total else 0.0


def nonzero_sparsity(params: Params) -> dict[str, float]:
  """Per-leaf fraction of weights that are exactly zero in ``params`` itself."""
  return {n: float(jnp.mean(p == 0)) for n, p in zip(leaf_names(params), jax.tree.leaves(params))}


def summary(params: Params, masks: Masks) -> str:
  """A printable per-leaf table of shape, kept/total and sparsity, with totals."""
  counts = count_leaves(params, masks)
  width = max([len(c.name) for c in counts] + [len("total (sparse leaves)")])
  lines = [f"{'leaf':<{width}}  {'shape':<16} {'kept':>12} {'total':>12} {'sparsity':>9}"]
  for c in counts:
    kind = "" if c.sparse else "  (dense)"
    lines.append(f"{c.name:<{width}}  {str(c.shape):<16} {c.kept:>12,} {c.total:>12,} "
                 f"{c.sparsity:>9.2%}{kind}")
  sp = [c for c in counts if c.sparse]
  for label, group in (("sparse leaves", sp), ("all leaves", counts)):
    kept = sum(c.kept for c in group)
    total = sum(c.total for c in group)
    s = 1 - kept / total if total else 0.0
    lines.append(f"{'total (' + label + ')':<{width}}  {'':<16} {kept:>12,} {total:>12,} {s:>9.2%}")
  return "\n".join(lines)
