"""SET: Sparse Evolutionary Training (Mocanu et al., 2018, Nature Communications).

Algorithm 1 of the paper, per sparse layer, every ``update_period`` steps
(the paper: every epoch):

1. remove the fraction ``zeta`` of the smallest positive weights and of the
   largest negative weights, i.e. ``floor(zeta * n_pos)`` positive weights
   closest to zero and ``floor(zeta * n_neg)`` negative weights closest to zero
   (active weights that are exactly zero lie between the two thresholds and
   are removed too, as in the authors' code);
2. add as many connections uniformly at random among the connections that are
   absent after step 1, with zeroed optimizer state. Their starting values are
   ``regrowth``: by default (``"init"``) random, like the layer's initial
   weights, as in the authors' code (``set_mlp.py`` draws new weights from the
   same ``randn / 10`` as the initial ones, with zero momentum); ``"zero"``
   starts them at exactly zero (as RigL grows).

The number of kept weights of each layer is therefore constant. The initial
mask is random with the Erdos-Renyi layer densities of the paper (eq. 1),
``distribution="er"``, with epsilon solved to reach ``sparsity``. A layer
whose density is 1 (ER caps a layer too small for its share) has nothing to
explore and is never rewired. The first update is one period in (after the
first epoch with ``update_period = steps_per_epoch``), as in the paper.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxsparse import core, schedules, topk
from jaxsparse import distributions as dist
from jaxsparse import masks as masks_lib
from jaxsparse.static import random_masks


def set_drop(values: jax.Array, zeta: jax.Array) -> jax.Array:
  """Step 1 of SET on the active weights ``values`` of one layer: which ones are removed.

  The ``floor(zeta * n_pos)`` positive and ``floor(zeta * n_neg)`` negative
  values closest to zero, and every value that is exactly zero.
  """
  pos = values > 0
  neg = values < 0
  k_pos = jnp.floor(zeta * topk.count_true(pos)).astype(jnp.int32)
  k_neg = jnp.floor(zeta * topk.count_true(neg)).astype(jnp.int32)
  # Both sides in one selection: the k_pos smallest |w| among positives (group 0)
  # and the k_neg smallest |w| among negatives (group 1).
  drop = topk.smallest_k_per_group(jnp.abs(values), neg.astype(jnp.int32),
                                   jnp.stack([k_pos, k_neg]), pos | neg)
  return drop | (values == 0)


class SETState(NamedTuple):
  """SET's ``aux`` state.

  Attributes:
    active: per sparse leaf, the flat indices of its active weights (static
      length nnz; a full leaf's are all its indices).
    scale: per sparse leaf, the standard deviation of its initial weights
      (``regrowth="init"``); ``()`` otherwise.
  """
  active: tuple
  scale: tuple = ()


_REMOVED = -128  # int8 code of an absent weight in _rewire_codes (a survivor is 127)


def _rewire_codes(key, w, mask, active, zeta, grow_codes):
  """:func:`set_rewire` that also places ``grow_codes`` (int8 in [-126, 126], one per slot)
  at the grown positions, in the scatter that sets them (no extra scatter: in the update
  branch each one costs at every step on CPU). Returns the codes: 127 kept, the grow code
  where grown, :data:`_REMOVED` elsewhere; the new mask is ``codes != _REMOVED``."""
  drop = set_drop(w.reshape(-1)[active], zeta)
  kept = mask.reshape(-1).at[active].set(~drop)
  n_grow = topk.count_true(drop)
  grown = topk.random_k_positions(key, n_grow, ~kept, active.shape[0])
  codes = jnp.where(kept, jnp.int8(127), jnp.int8(_REMOVED)).at[grown].set(grow_codes, mode="drop")
  slot = jnp.cumsum(drop, dtype=jnp.int32) - 1
  new_active = jnp.where(drop, grown[jnp.clip(slot, 0, active.shape[0] - 1)], active)
  return codes.reshape(mask.shape), kept.reshape(mask.shape), new_active


def set_rewire(key: jax.Array, w: jax.Array, mask: jax.Array, active: jax.Array, zeta: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One SET update of one layer.

  Args:
    key: PRNG key of this update and layer.
    w: the layer's weights; mask: its mask; active: the flat indices of its
      ``nnz`` active weights (the order is irrelevant).
    zeta: the drop fraction.

  Returns:
    ``(new_mask, survivors, new_active)``: the dropped slots of ``active`` are
    refilled with as many positions drawn uniformly at random among the
    connections absent after the drop (so a just-dropped connection may come
    back, at zero, as in the authors' code).
  """
  drop = set_drop(w.reshape(-1)[active], zeta)
  kept = mask.reshape(-1).at[active].set(~drop)
  n_grow = topk.count_true(drop)
  grown = topk.random_k_positions(key, n_grow, ~kept, active.shape[0])
  new = kept.at[grown].set(True, mode="drop")
  slot = jnp.cumsum(drop, dtype=jnp.int32) - 1
  new_active = jnp.where(drop, grown[jnp.clip(slot, 0, active.shape[0] - 1)], active)
  return new.reshape(mask.shape), kept.reshape(mask.shape), new_active


def set(inner: optax.GradientTransformation, sparsity: float, *, zeta: schedules.ScalarOrSchedule = 0.3,
        update_period: int = 100, update_start: int | None = None, update_stop: int | None = None,
        regrowth: Any = "init", distribution: dist.Distribution = "er",
        filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
        overrides: Mapping[str, float] | None = None,
        seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """SET as an optax wrapper around ``inner``.

  Args:
    inner: the optimizer (the paper: SGD with momentum 0.9).
    sparsity: global fraction of removed weights over the sparse leaves.
    zeta: fraction removed on each side at each update (paper: 0.3); a float or
      an ``optax`` schedule of the step (e.g. :func:`schedules.cosine_drop_fraction`).
    update_period: steps between mask updates; use ``steps_per_epoch`` for the
      paper's once-per-epoch rewiring.
    update_start, update_stop: first update step (``None``: ``update_period``,
      one period in, as the paper rewires after each epoch of training), and the
      step from which updates stop (``None``: never).
    regrowth: starting values of the regrown weights: ``"init"`` (default, the
      authors' code) a zero-mean normal with the standard deviation ``s`` of the
      layer's weights at ``init``, at 8 bits (steps of ``4 s / 126``, clipped to
      ``+-4 s``: free off update steps, see :func:`jaxsparse.sparse_transform`);
      ``"zero"``; or a callable ``(key, shape, dtype) -> array`` such as the
      layer's ``jax.nn.initializers`` initializer (called on the leaf's shape;
      the regrown positions take its values exactly, which costs a write and a
      read of the params' size at every step). Their optimizer state starts
      at zero in every case.
    distribution: layer densities, ``"er"`` (paper), ``"erk"`` or ``"uniform"``.
    filter, keep_dense, overrides: which leaves are sparse (see
      :func:`jaxsparse.distributions.kept_counts`).
    seed: seed of the initial mask and of the random regrowth.

  The state's ``aux`` is a :class:`SETState`: per sparse leaf the flat indices
  of its active weights (static length nnz), which an update reads and rewrites
  instead of scanning the whole leaf; masks and indices change together, so
  edit neither by hand (start from given masks with :func:`jaxsparse.keep_masks`
  instead).
  """
  dist.check_sparsity(sparsity)
  schedules.check_fraction(zeta, "zeta")
  core.check_regrowth(regrowth)
  is_update_step = schedules.periodic(update_period, update_start, update_stop)
  zeta_at = schedules.as_schedule(zeta)
  # "init" draws travel as int8 codes in units of 1/126 of 4 standard deviations (see
  # core.sparse_transform: free off update steps); a callable's values exactly.
  grow_values = False if regrowth == "zero" else ("int8" if regrowth == "init" else True)

  def init_masks(params, key):
    counts = dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                              keep_dense=keep_dense, overrides=overrides)
    masks = random_masks(params, counts, key)
    # aux: the flat indices of the active weights of each sparse leaf (static
    # length nnz), so that an update works on nnz values instead of n. nnz is
    # counts[name] (random_masks keeps exactly that many), not a concrete sum
    # of the mask, so init can be traced (jax.jit(tx.init, out_shardings=...)).
    names = masks_lib.leaf_names(params)
    sparse = [(n, p, m) for n, p, m in zip(names, jax.tree.leaves(params), jax.tree.leaves(masks))
              if masks_lib.is_sparse(m)]
    active = tuple(jnp.nonzero(m.reshape(-1), size=counts[n])[0].astype(jnp.int32)
                   for n, _, m in sparse)
    scale = tuple(core.init_scale(p, m) for _, p, m in sparse) if regrowth == "init" else ()
    return masks, SETState(active, scale)

  def update_masks(x: core.MaskUpdateInputs):
    z = zeta_at(x.step)
    leaves, treedef = jax.tree.flatten(x.masks)
    ws = jax.tree.leaves(x.params)
    new, survivors, values, units, active = [], [], [], [], list(x.aux.active)
    j = 0
    for i, (m, w) in enumerate(zip(leaves, ws)):
      units.append(jnp.ones([], jnp.float32))
      if not masks_lib.is_sparse(m):
        new.append(m)
        survivors.append(m)
        values.append(jnp.zeros([], w.dtype))
        continue
      if active[j].shape[0] == m.size:
        # Density 1 (e.g. capped by ER): nothing to explore, so no drop and no regrowth;
        # weights and optimizer state carry over as in dense training.
        new.append(m)
        survivors.append(m)
        values.append(jnp.zeros_like(w))
        j += 1
        continue
      key, vkey = jax.random.fold_in(x.key, i), jax.random.fold_in(x.key, (1 << 20) + i)
      if regrowth == "init":
        # One draw per slot (nnz, not the leaf's size), as int8 codes in steps of 4/126
        # standard deviations, set in the scatter that grows the positions.
        z8 = core.draw_regrowth("init", vkey, active[j].shape, jnp.float32, jnp.float32(1.0))
        grow_codes = jnp.clip(jnp.round(z8 * (126 / 4.0)), -126, 126).astype(jnp.int8)
        codes, kept, active[j] = _rewire_codes(key, w, m, active[j], z, grow_codes)
        m_new = codes != _REMOVED
        units[-1] = x.aux.scale[j] * (4.0 / 126)
        values.append(jnp.where(kept | ~m_new, 0, codes).astype(jnp.float32) * units[-1])
      else:
        m_new, kept, active[j] = set_rewire(key, w, m, active[j], z)
        if grow_values:
          values.append(core.draw_regrowth(regrowth, vkey, w.shape, w.dtype, None))
      new.append(m_new)
      survivors.append(kept)
      j += 1
    return core.MaskUpdate(jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, survivors),
                           SETState(tuple(active), x.aux.scale),
                           jax.tree.unflatten(treedef, values) if grow_values else None,
                           jax.tree.unflatten(treedef, units) if grow_values == "int8" else None)

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=is_update_step, grow_values=grow_values, seed=seed)
