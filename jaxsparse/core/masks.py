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

import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Masks = Any

SCOPES = ("local", "global")
"""Where a selection is made: ``"local"``, within each leaf on its own; ``"global"``, over all
the leaves together (one threshold)."""


def check_scope(scope: str) -> None:
  """Raises ValueError naming ``scope`` unless it is one of :data:`SCOPES`."""
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


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


def flatten_named(tree: Any) -> tuple[list[str], list[Any], Any]:
  """``(names, leaves, treedef)`` of ``tree``; an nnx ``Variable``'s value is its leaf.

  Mask and params trees are paired by these names, so the same leaves match
  whatever wraps them (flax nnx ``Param`` in the model's state, ``OptVariable``
  in an ``nnx.Optimizer``'s state, a plain dict, ...).
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [path_name(p) for p, _ in flat], [x for _, x in flat], treedef


def check_same_leaves(tree: Any, params: Params, what: str, *, shapes: bool = True) -> None:
  """Raises ValueError, naming the first leaf that differs, unless ``tree`` has the
  leaves of ``params`` (same names and, with ``shapes``, same shapes)."""
  names, leaves, _ = flatten_named(tree)
  p_names, p_leaves, _ = flatten_named(params)
  if names != p_names:
    missing = [n for n in p_names if n not in set(names)]
    extra = [n for n in names if n not in set(p_names)]
    if missing:
      raise ValueError(f"{what}: leaf '{missing[0]}' of params is missing from {what}"
                       + (f" ({len(missing)} missing in all)" if len(missing) > 1 else "")
                       + (f"; {what} has leaf '{extra[0]}', which params lacks" if extra else ""))
    if extra:
      raise ValueError(f"{what}: leaf '{extra[0]}' is not in params"
                       + (f" ({len(extra)} extra in all)" if len(extra) > 1 else ""))
    raise ValueError(f"{what}: the leaves are in another order than the params' leaves\n"
                     f"  params: {p_names}\n  {what}: {names}")
  if shapes:
    for name, x, p in zip(names, leaves, p_leaves):
      if jnp.shape(x) != jnp.shape(p):
        raise ValueError(f"{what}: leaf '{name}' has shape {jnp.shape(x)} but the param has shape "
                         f"{jnp.shape(p)}")


def check_masks(params: Params, masks: Masks) -> None:
  """Raises ValueError (naming the leaf) if ``masks`` does not fit ``params``.

  The trees must have the same leaves (by name: nnx ``Variable`` wrappers and
  container types may differ); a sparse leaf's mask has the param's shape and
  dtype bool, a dense leaf's mask is a scalar.
  """
  check_same_leaves(masks, params, "masks", shapes=False)
  names, p_leaves, _ = flatten_named(params)
  for name, p, m in zip(names, p_leaves, flatten_named(masks)[1]):
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
  """Zeroes the pruned weights: ``where(mask, p, 0)`` leaf by leaf.

  Returns a tree shaped like ``params`` (for flax nnx: an ``nnx.State`` of the
  model's variables, ready for ``nnx.update(model, ...)``). Raises ValueError
  naming the leaf when ``masks`` does not fit ``params``.
  """
  check_masks(params, masks)
  _, p_leaves, treedef = flatten_named(params)
  out = [p if jnp.ndim(m) == 0 else jnp.where(m, p, jnp.zeros_like(p))
         for p, m in zip(p_leaves, flatten_named(masks)[1])]
  return jax.tree.unflatten(treedef, out)


class LeafCount(NamedTuple):
  """Kept and total weights of one leaf.

  ``kept`` counts every weight that is not removed: kept by the mask, or
  non-zero in the params although the mask removes it. ``stray`` is the
  second kind (0 when the method's updates reached the params unchanged).
  """
  name: str
  shape: tuple
  kept: int
  total: int
  sparse: bool
  stray: int = 0

  @property
  def sparsity(self) -> float:
    return 1.0 - self.kept / self.total if self.total else 0.0


def _has_values(x: Any) -> bool:
  return not isinstance(x, (jax.ShapeDtypeStruct, jax.core.Tracer))


def count_leaves(params: Params, masks: Masks) -> list[LeafCount]:
  """Per-leaf kept/total counts (a host-side summary; not for use under jit).

  A weight counts as removed only when the mask removes it *and* it is zero in
  ``params``, so the counts report what the params really hold (``params``
  may also be ``jax.ShapeDtypeStruct`` leaves: then only the masks count).
  Raises ValueError naming the leaf when ``masks`` does not fit ``params``.
  """
  check_masks(params, masks)
  out = []
  names, p_leaves, _ = flatten_named(params)
  for name, p, m in zip(names, p_leaves, flatten_named(masks)[1]):
    shape = tuple(jnp.shape(p))
    size = int(np.prod(shape))
    removed = ~np.broadcast_to(np.asarray(m, bool), shape)
    stray = int(np.count_nonzero(removed & (np.asarray(p) != 0))) if _has_values(p) else 0
    kept = size - int(np.count_nonzero(removed)) + stray
    out.append(LeafCount(name, shape, kept, size, jnp.ndim(m) > 0, stray))
  return out


def _stray_message(counts: list[LeafCount]) -> str | None:
  bad = [c for c in counts if c.stray]
  if not bad:
    return None
  where = ", ".join(f"'{c.name}': {c.stray:,}" for c in bad[:3]) + (", ..." if len(bad) > 3 else "")
  return (f"{sum(c.stray for c in bad):,} weights that the masks remove are non-zero in params "
          f"({where}); they count as kept. Either the masks were never applied (call "
          "jaxsparse.apply_masks once after init), or a transform after the jaxsparse method in "
          "optax.chain changed its updates: put the method last, with the rest of the chain as "
          "its inner optimizer.")


def sparsity(params: Params, masks: Masks, *, sparse_only: bool = True) -> float:
  """Fraction of removed weights (masked *and* zero in ``params``), over the sparse
  leaves (default) or all leaves. Warns when masked weights are non-zero in ``params``."""
  counts = count_leaves(params, masks)
  msg = _stray_message(counts)
  if msg:
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
  counts = [c for c in counts if c.sparse or not sparse_only]
  total = sum(c.total for c in counts)
  return 1.0 - sum(c.kept for c in counts) / total if total else 0.0


def summary(params: Params, masks: Masks) -> str:
  """A printable per-leaf table of shape, kept/total and sparsity, with totals.

  Counts what ``params`` really hold (see :func:`count_leaves`); when masked
  weights are non-zero the table ends with a warning line (and warns).
  """
  counts = count_leaves(params, masks)
  width = max([len(c.name) for c in counts] + [len("total (sparse leaves)")])
  lines = [f"{'leaf':<{width}}  {'shape':<16} {'kept':>12} {'total':>12} {'sparsity':>9}"]
  for c in counts:
    kind = "" if c.sparse else "  (dense)"
    stray = f"  ({c.stray:,} masked but non-zero)" if c.stray else ""
    lines.append(f"{c.name:<{width}}  {str(c.shape):<16} {c.kept:>12,} {c.total:>12,} "
                 f"{c.sparsity:>9.2%}{kind}{stray}")
  sp = [c for c in counts if c.sparse]
  for label, group in (("sparse leaves", sp), ("all leaves", counts)):
    kept = sum(c.kept for c in group)
    total = sum(c.total for c in group)
    s = 1 - kept / total if total else 0.0
    lines.append(f"{'total (' + label + ')':<{width}}  {'':<16} {kept:>12,} {total:>12,} {s:>9.2%}")
  msg = _stray_message(counts)
  if msg:
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    lines.append(f"WARNING: {msg}")
  return "\n".join(lines)
