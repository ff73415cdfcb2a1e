"""SET: Sparse Evolutionary Training (Mocanu et al., 2018, Nature Communications).

Algorithm 1 of the paper, per sparse layer, every ``update_period`` steps
(the paper: every epoch):

1. remove the fraction ``zeta`` of the smallest positive weights and of the
   largest negative weights, i.e. ``floor(zeta * n_pos)`` positive weights
   closest to zero and ``floor(zeta * n_neg)`` negative weights closest to zero
   (active weights that are exactly zero lie between the two thresholds and
   are removed too, as in the authors' code);
2. add as many connections uniformly at random among the connections that are
   absent after step 1; they start at exactly zero, with zeroed optimizer state.

The number of kept weights of each layer is therefore constant. The initial
mask is random with the Erdos-Renyi layer densities of the paper (eq. 1),
``distribution="er"``, with epsilon solved to reach ``sparsity``.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxsparse import core, schedules, topk
from jaxsparse import distributions as dist
from jaxsparse import masks as masks_lib
from jaxsparse.static import random_masks


def set_prune(w: jax.Array, mask: jax.Array, zeta: jax.Array) -> jax.Array:
  """Step 1 of SET on one leaf: the mask of weights that survive the removal."""
  pos = mask & (w > 0)
  neg = mask & (w < 0)
  k_pos = jnp.floor(zeta * jnp.sum(pos)).astype(jnp.int32)
  k_neg = jnp.floor(zeta * jnp.sum(neg)).astype(jnp.int32)
  # Both sides in one selection: the k_pos smallest |w| among positives (group 0)
  # and the k_neg smallest |w| among negatives (group 1).
  drop = topk.smallest_k_per_group(jnp.abs(w), (w < 0).astype(jnp.int32),
                                   jnp.stack([k_pos, k_neg]), pos | neg)
  return (pos | neg) & ~drop


def random_regrow(key: jax.Array, kept: jax.Array, n_grow: jax.Array) -> jax.Array:
  """Step 2 of SET: ``kept`` plus ``n_grow`` uniformly random absent connections."""
  return kept | topk.random_k_mask(key, n_grow, ~kept)


def set(inner: optax.GradientTransformation, sparsity: float, *, zeta: schedules.ScalarOrSchedule = 0.3,
        update_period: int = 100, update_start: int = 0, update_stop: int | None = None,
        distribution: dist.Distribution = "er", filter: dist.LeafFilter | None = None,
        keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
        seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """SET as an optax wrapper around ``inner``.

  Args:
    inner: the optimizer (the paper: SGD with momentum 0.9).
    sparsity: global fraction of removed weights over the sparse leaves.
    zeta: fraction removed on each side at each update (paper: 0.3); a float or
      an ``optax`` schedule of the step (e.g. :func:`schedules.cosine_drop_fraction`).
    update_period: steps between mask updates; use ``steps_per_epoch`` for the
      paper's once-per-epoch rewiring.
    update_start, update_stop: first update step, and the step from which
      updates stop (``None``: never).
    distribution: layer densities, ``"er"`` (paper), ``"erk"`` or ``"uniform"``.
    filter, keep_dense, overrides: which leaves are sparse (see
      :func:`jaxsparse.distributions.kept_counts`).
    seed: seed of the initial mask and of the random regrowth.
  """
  dist.check_sparsity(sparsity)
  schedules.check_fraction(zeta, "zeta")
  is_update_step = schedules.periodic(update_period, update_start, update_stop)
  zeta_at = schedules.as_schedule(zeta)

  def init_masks(params, key):
    counts = dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                              keep_dense=keep_dense, overrides=overrides)
    return random_masks(params, counts, key), ()

  def update_masks(x: core.MaskUpdateInputs):
    z = zeta_at(x.step)
    leaves, treedef = jax.tree.flatten(x.masks)
    ws = jax.tree.leaves(x.params)
    new, survivors = [], []
    for i, (m, w) in enumerate(zip(leaves, ws)):
      if not masks_lib.is_sparse(m):
        new.append(m)
        survivors.append(m)
        continue
      kept = set_prune(w, m, z)
      n_grow = jnp.sum(m, dtype=jnp.int32) - jnp.sum(kept, dtype=jnp.int32)
      new.append(random_regrow(jax.random.fold_in(x.key, i), kept, n_grow))
      survivors.append(kept)
    return core.MaskUpdate(jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, survivors),
                           x.aux)

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=is_update_step, seed=seed)
