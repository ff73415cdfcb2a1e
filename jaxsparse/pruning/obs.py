"""Optimal Brain Surgeon, layer-wise, with a damped empirical Fisher (Hassibi & Stork 1993).

For a layer with flattened weights ``w`` (d of them) the Hessian is replaced by
the damped empirical Fisher ``F = 1/N sum_i g_i g_i^T + lambda I`` from N
per-example gradients (``jax.vmap``). Its inverse comes from the Woodbury
identity, which costs an N x N solve instead of a d x d one::

  F^-1 = I / lambda - G^T (N lambda I_N + G G^T)^-1 G / lambda     (G: N x d)

OBS's saliency of weight q is ``L_q = 1/2 * w_q^2 / [F^-1]_qq`` (Hassibi & Stork,
eq. 5) and removing q moves the others by ``delta = -w_q / [F^-1]_qq * F^-1 e_q``
(eq. 4). Removing a set Q at once (one shot) uses the same problem's
multi-weight solution ``delta = -F^-1[:, Q] (F^-1[Q, Q])^-1 w_Q``, which sets
``w_Q`` exactly to zero at the least quadratic cost and reduces to eq. 4 for
one weight. Weights are ranked by their single-weight saliency.

Size guard: the dense inverse of a layer has d^2 entries, so a layer (or,
with ``block_size``, a block) with more than ``max_size`` weights is refused.
Use ``block_size`` (a block-diagonal Fisher over consecutive weights, as in
WoodFisher, Singh & Alistarh 2020), the diagonal OBD criterion
(:func:`jaxsparse.pruning.criteria.obd_scores`), or keep the layer dense.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.pruning import criteria
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib

DEFAULT_MAX_SIZE = 4096
"""Largest layer (or block) whose dense d x d inverse OBS builds: 4096^2 float32 = 64 MiB."""


class OBSResult(NamedTuple):
  """What :func:`obs_prune` returns.

  Attributes:
    params: the pruned params, with OBS's compensating update applied to the kept weights.
    masks: the mask tree (sparse leaves carry bool arrays).
    scores: the OBS saliencies ``1/2 w^2 / [F^-1]_qq`` (dense leaves: zeros).
  """
  params: Any
  masks: Any
  scores: Any


def damped_fisher_inverse(grads: jax.Array, damping: float) -> jax.Array:
  """``(G^T G / N + damping I)^-1`` for per-example gradients ``grads`` (N, d), by Woodbury."""
  n = grads.shape[0]
  g = grads.astype(jnp.float32)
  small = n * damping * jnp.eye(n, dtype=g.dtype) + g @ g.T
  return (jnp.eye(g.shape[1], dtype=g.dtype) - g.T @ jnp.linalg.solve(small, g)) / damping


def saliency(w: jax.Array, hinv_diag: jax.Array) -> jax.Array:
  """OBS saliency ``1/2 * w_q^2 / [H^-1]_qq`` (Hassibi & Stork 1993, eq. 5)."""
  return 0.5 * jnp.square(w) / hinv_diag


def compensating_update(w: jax.Array, hinv: jax.Array, prune: jax.Array) -> jax.Array:
  """``delta = -H^-1[:, Q] (H^-1[Q, Q])^-1 w_Q`` for ``Q = prune`` (eq. 4 when |Q| = 1).

  ``w`` and ``prune`` are flat (d,); ``delta`` sets ``w + delta`` to zero on Q.
  Fixed shapes: the Q x Q system is embedded in a d x d one with identity rows off Q.
  """
  both = prune[:, None] & prune[None, :]
  sub = jnp.where(both, hinv, jnp.eye(w.shape[0], dtype=hinv.dtype))
  c = jnp.linalg.solve(sub, jnp.where(prune, w, 0.0))
  return -hinv @ jnp.where(prune, c, 0.0)


def check_size(name: str, size: int, block_size: int | None, max_size: int) -> int:
  """The block length OBS will invert for a leaf; raises ValueError over the size guard."""
  b = size if block_size is None else int(block_size)
  if b > max_size:
    what = (f"layer '{name}' has {size} weights" if block_size is None
            else f"block_size={block_size} for layer '{name}'")
    raise ValueError(
        f"OBS: {what}, over the size guard max_size={max_size}: its dense inverse Hessian would "
        f"hold {b}^2 = {b * b:,} entries. Use block_size=<= {max_size} (block-diagonal Fisher), "
        "the diagonal OBD criterion (jaxsparse.pruning.criteria.obd_scores), keep the layer out with "
        "keep_dense=/filter=, or raise max_size if you have the memory.")
  return b


def _blocks(x: jax.Array, b: int) -> jax.Array:
  """(..., d) -> (..., ceil(d / b), b), zero-padded."""
  d = x.shape[-1]
  pad = -d % b
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(x.shape[:-1] + ((d + pad) // b, b))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _leaf_inverses(g: jax.Array, b: int, damping: float) -> jax.Array:
  """Per-block damped Fisher inverses (nb, b, b) of one leaf; ``g`` is (N, *leaf shape)."""
  gb = _blocks(g.reshape(g.shape[0], -1), b)              # (N, nb, b)
  return jax.vmap(damped_fisher_inverse, in_axes=(1, None))(gb, damping)


@jax.jit
def _leaf_saliency(w: jax.Array, hinv: jax.Array) -> jax.Array:
  diag = jnp.diagonal(hinv, axis1=1, axis2=2).reshape(-1)[:w.size].reshape(w.shape)
  return saliency(w.astype(jnp.float32), diag)


@functools.partial(jax.jit, static_argnums=(3,))
def _update_leaf(w: jax.Array, m: jax.Array, hinv: jax.Array, b: int) -> jax.Array:
  """``w + delta`` on the kept weights, exactly zero on the pruned ones (blocks vmapped)."""
  wb = _blocks(w.reshape(-1).astype(jnp.float32), b)
  qb = _blocks(~m.reshape(-1), b)   # padding is False: never pruned, delta there unused
  delta = jax.vmap(compensating_update)(wb, hinv, qb).reshape(-1)[:w.size]
  return jnp.where(m, w + delta.reshape(w.shape).astype(w.dtype), jnp.zeros_like(w))


def obs_prune(params: Any, loss_fn: criteria.LossFn, batch: criteria.Batch, sparsity: float, *,
              damping: float = 1e-4, block_size: int | None = None,
              max_size: int = DEFAULT_MAX_SIZE, scope: str = "global",
              distribution: dist.Distribution = "uniform", filter: dist.LeafFilter | None = None,
              keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
              masks: Any = None) -> OBSResult:
  """One-shot layer-wise OBS to ``sparsity``, with the compensating update.

  Args:
    params, loss_fn, batch: the model, ``loss_fn(params, batch) -> scalar`` and
      the N examples whose per-example gradients form the empirical Fisher.
    sparsity: target sparsity of the sparse leaves (selected by ``filter``).
    damping: lambda in ``F + lambda I``.
    block_size: None inverts each layer whole; an int uses a block-diagonal
      Fisher over blocks of that many consecutive (row-major) weights.
    max_size: the size guard on the inverted dimension (see module doc).
    scope: rank saliencies per leaf ("local") or over all leaves ("global").
    masks: optional current masks; only weights they keep can survive.
  """
  if not isinstance(damping, (int, float)) or not damping > 0:
    raise ValueError(f"damping must be a float > 0, got {damping!r}")
  if block_size is not None and (not isinstance(block_size, (int, np.integer)) or block_size <= 0):
    raise ValueError(f"block_size must be None or a positive int, got {block_size!r}")
  counts = dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                            keep_dense=keep_dense, overrides=overrides)
  names = masks_lib.leaf_names(params)
  leaves, treedef = jax.tree.flatten(params)
  sizes = {n: check_size(n, int(np.prod(jnp.shape(l))), block_size, max_size)
           for n, l in zip(names, leaves) if n in counts}
  grads = jax.tree.leaves(criteria.per_example_grads(params, loss_fn, batch))

  inverses, score_leaves = {}, []
  for n, w, g in zip(names, leaves, grads):
    if n not in counts:
      score_leaves.append(jnp.zeros(jnp.shape(w), jnp.float32))
      continue
    hinv = _leaf_inverses(g, sizes[n], float(damping))
    inverses[n] = hinv
    score_leaves.append(_leaf_saliency(w, hinv))
  scores = jax.tree.unflatten(treedef, score_leaves)
  new_masks = criteria.score_masks(scores, sparsity, scope=scope, distribution=distribution,
                                   filter=filter, keep_dense=keep_dense, overrides=overrides,
                                   masks=masks)

  out = []
  for n, w, m in zip(names, leaves, jax.tree.leaves(new_masks)):
    if n not in counts:
      out.append(w)
      continue
    out.append(_update_leaf(w, m, inverses[n], sizes[n]))
  return OBSResult(jax.tree.unflatten(treedef, out), new_masks, scores)
