"""SET: Sparse Evolutionary Training (Mocanu et al., 2018, Nature Communications).

Algorithm 1 of the paper, per sparse layer, every ``update_period`` steps
(the paper: every epoch):

1. remove the fraction ``drop_fraction`` (the paper's zeta) of the smallest positive weights
   and of the largest negative weights, i.e. ``floor(drop_fraction * n_pos)`` positive weights
   closest to zero and ``floor(drop_fraction * n_neg)`` negative weights closest to zero
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

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.core import registry, schedules, selection as topk, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.core.deprecation import renamed_kwargs
from jaxsparse.methods.static import random_masks


@renamed_kwargs(zeta="drop_fraction")
def set_drop(values: jax.Array, drop_fraction: jax.Array) -> jax.Array:
  """Step 1 of SET on the active weights ``values`` of one layer: which ones are removed.

  The ``floor(drop_fraction * n_pos)`` positive and ``floor(drop_fraction * n_neg)``
  negative values closest to zero, and every value that is exactly zero.
  """
  return set_drop_each([values], drop_fraction)[0]


@renamed_kwargs(zeta="drop_fraction")
@functools.partial(jax.jit, inline=True)  # one compile when called eagerly (see topk)
def set_drop_each(values: Sequence[jax.Array], drop_fraction: jax.Array) -> list[jax.Array]:
  """:func:`set_drop` for several layers at once, in one selection (a program with many
  layers holds it once): group ``2 l`` is layer l's positives, ``2 l + 1`` its negatives."""
  sizes = [v.shape[0] for v in values]
  vals = _concat(values)
  pos, neg = vals > 0, vals < 0
  groups = 2 * topk.segment_ids(sizes) + neg
  # n_pos and n_neg of every layer in one scatter-add (a count per array would be 2 kernels
  # each to compile)
  counts = jnp.zeros(2 * len(sizes), jnp.int32).at[groups].add((pos | neg).astype(jnp.int32),
                                                               mode="promise_in_bounds")
  k = jnp.floor(drop_fraction * counts)
  drop = topk.smallest_k_per_group(jnp.abs(vals), groups, k.astype(jnp.int32), pos | neg)
  return _split(drop | (vals == 0), sizes)


def _concat(xs: Sequence[jax.Array]) -> jax.Array:
  return jnp.concatenate(xs) if len(xs) > 1 else xs[0]


def _split(x: jax.Array, sizes: Sequence[int]) -> list[jax.Array]:
  ends = np.cumsum(sizes)
  return [x[e - s:e] for s, e in zip(sizes, ends)]


class SETState(NamedTuple):
  """SET's ``aux`` state.

  Attributes:
    active: the flat indices of the active weights of every rewired leaf (a sparse leaf
      below density 1), laid end to end in leaf order: one int32 array whose length is the
      sum of their static nnz. One array, not one per leaf, so that an update writes one
      output however many layers there are (on CPU each output is a kernel to compile).
    scale: per sparse leaf, the standard deviation of its initial weights
      (``regrowth="init"``); ``()`` otherwise.
  """
  active: jax.Array
  scale: tuple = ()


_REMOVED = -128  # int8 code of an absent weight in set_rewire_each's codes (a survivor is 127)


@renamed_kwargs(zeta="drop_fraction")
def set_rewire(key: jax.Array, w: jax.Array, mask: jax.Array, active: jax.Array,
               drop_fraction: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One SET update of one layer.

  Args:
    key: PRNG key of this update.
    w: the layer's weights; mask: its mask; active: the flat indices of its
      ``nnz`` active weights (the order is irrelevant).
    drop_fraction: the fraction dropped on each side (the paper's zeta).

  Returns:
    ``(new_mask, survivors, new_active)``: the dropped slots of ``active`` are
    refilled with as many positions drawn uniformly at random among the
    connections absent after the drop (so a just-dropped connection may come
    back, as in the authors' code).
  """
  (new,), (kept,), (new_active,) = set_rewire_each(key, [w], [mask], [active], drop_fraction)
  return new, kept, new_active


@renamed_kwargs(zeta="drop_fraction")
@functools.partial(jax.jit, inline=True)
def set_rewire_each(key: jax.Array, ws: Sequence[jax.Array], masks: Sequence[jax.Array],
                    actives: Sequence[jax.Array], drop_fraction: jax.Array,
                    grow_codes: jax.Array | None = None, *, bits: jax.Array | None = None
                    ) -> tuple[list, list, list]:
  """:func:`set_rewire` for several layers at once: one drop selection and one set of
  random draws for all (so a program holds them once, however many layers it has).

  ``grow_codes`` (int8 in [-126, 126], one per slot of all layers' ``actives`` in order):
  instead of new masks, return int8 codes set in the scatter that grows the positions:
  127 kept, the slot's grow code where grown, :data:`_REMOVED` elsewhere (the new mask is
  ``codes != _REMOVED``; no extra scatter, since in the update branch each one costs at
  every step on CPU).

  ``bits``: the random positions' bits, drawn by the caller from ``key`` in one hash with its
  other draws (see ``topk.random_k_positions_each``); the same result as without them.
  """
  # On one CPU device, from four layers on (topk.concatenate_on_cpu), the layers' gathers and
  # scatters run on their concatenation: one kernel each instead of one per layer (XLA:CPU
  # compiles every kernel on its own, ~20 ms apiece). Elsewhere each layer keeps its own
  # arrays, so that a sharded leaf is never regathered. Both give the same masks, survivors
  # and indices.
  sizes = [a.shape[0] for a in actives]
  new, kept, new_active = _rewire_all(key, list(ws), list(masks), _concat(list(actives)),
                                      drop_fraction, grow_codes, bits, sizes=sizes)
  return new, kept, _split(new_active, sizes)


def _rewire_all(key, ws, masks, active, drop_fraction, grow_codes, bits, *, sizes):
  """:func:`set_rewire_each` on the layers' active indices laid end to end (``active``, layer
  l's ``sizes[l]`` in order); returns the new indices the same way."""
  args = (key, ws, masks, active, drop_fraction, grow_codes, bits)
  if not topk.concatenate_on_cpu(len(sizes)):
    return _rewire(*args, sizes=sizes, concat=False)
  return topk.cpu_or_default(functools.partial(_rewire, sizes=sizes, concat=True),
                             functools.partial(_rewire, sizes=sizes, concat=False), *args)


def _rewire(key, ws, masks, active, drop_fraction, grow_codes, bits, *, sizes, concat: bool):
  n = [m.size for m in masks]
  leaf = topk.segment_ids(sizes)                                   # each slot's layer
  per_slot = lambda values: topk.lookup(values, leaf, jnp.int32)
  if concat:
    # flat index of every slot in the concatenation of the layers
    at = active + per_slot(np.cumsum(n) - n)
    flat_masks = _concat([m.reshape(-1) for m in masks])
    values = _concat([w.reshape(-1) for w in ws]).at[at].get(mode="promise_in_bounds")
    drop = _concat(set_drop_each(_split(values, sizes), drop_fraction))  # each layer its own k
    kept_all = flat_masks.at[at].set(~drop, mode="promise_in_bounds")
    kept = _split(kept_all, n)
  else:
    actives = _split(active, sizes)
    drops = set_drop_each([w.reshape(-1)[a] for w, a in zip(ws, actives)], drop_fraction)
    kept = [m.reshape(-1).at[a].set(~d) for m, a, d in zip(masks, actives, drops)]
    drop = _concat(drops)
  n_grow = jnp.zeros(len(sizes), jnp.int32).at[leaf].add(drop.astype(jnp.int32),
                                                          mode="promise_in_bounds")
  grown = (topk.random_k_positions_flat(key, n_grow, ~kept_all, n, sizes, bits=bits) if concat
           else topk.random_k_positions_each(key, n_grow, [~k for k in kept], sizes, bits=bits))
  # The j-th dropped slot of layer l takes layer l's j-th grown position.
  grown_all = _concat(grown)
  dropped_before = topk.prefix_sum(n_grow) - n_grow
  j = topk.prefix_sum(drop.astype(jnp.int32)) - 1 - per_slot(dropped_before)
  new_active = jnp.where(drop, grown_all[jnp.clip(per_slot(np.cumsum(sizes) - sizes) + j, 0,
                                                  grown_all.shape[0] - 1)], active)
  if concat:
    # a grown slot's flat index in the concatenation; unfilled slots (index n_l) are dropped
    grown_at = jnp.where(grown_all < per_slot(n), grown_all + per_slot(np.cumsum(n) - n),
                         int(sum(n)))
    if grow_codes is None:
      new_all = kept_all.at[grown_at].set(True, mode="drop")
    else:
      new_all = jnp.where(kept_all, jnp.int8(127), jnp.int8(_REMOVED)).at[grown_at].set(
          grow_codes, mode="drop")
    new = [x.reshape(m.shape) for x, m in zip(_split(new_all, n), masks)]
  else:
    codes = None if grow_codes is None else _split(grow_codes, sizes)
    new = []
    for i, (k, g) in enumerate(zip(kept, grown)):
      if codes is None:
        new.append(k.at[g].set(True, mode="drop").reshape(masks[i].shape))
      else:
        c = jnp.where(k, jnp.int8(127), jnp.int8(_REMOVED)).at[g].set(codes[i], mode="drop")
        new.append(c.reshape(masks[i].shape))
  return new, [k.reshape(m.shape) for k, m in zip(kept, masks)], new_active


@renamed_kwargs(zeta="drop_fraction")
def sparse_evolutionary_training(
    inner: optax.GradientTransformation, sparsity: float, *,
    drop_fraction: schedules.ScalarOrSchedule = 0.3, update_period: int = 100,
    update_start: int | None = None, update_stop: int | None = None, regrowth: Any = "init",
    distribution: dist.Distribution = "er", filter: dist.LeafFilter | None = None,
    keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
    seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """SET as an optax wrapper around ``inner``.

  Args:
    inner: the optimizer (the paper: SGD with momentum 0.9).
    sparsity: global fraction of removed weights over the sparse leaves.
    drop_fraction: fraction removed on each side at each update (the paper's zeta, 0.3); a
      float or an ``optax`` schedule of the step (e.g. :func:`schedules.cosine_drop_fraction`);
      ``zeta=`` is its deprecated name.
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
      :func:`jaxsparse.core.distributions.kept_counts`).
    seed: seed of the initial mask and of the random regrowth.

  The state's ``aux`` is a :class:`SETState`: the flat indices of the active
  weights of every rewired leaf, end to end in one array, which an update reads and
  rewrites instead of scanning the whole leaves; masks and indices change together, so
  edit neither by hand (start from given masks with :func:`jaxsparse.keep_masks`
  instead).
  """
  dist.check_sparsity(sparsity)
  schedules.check_fraction(drop_fraction, "drop_fraction")
  core.check_regrowth(regrowth)
  is_update_step = schedules.periodic(update_period, update_start, update_stop)
  fraction_at = schedules.as_schedule(drop_fraction)
  # "init" draws travel as int8 codes in units of 1/126 of 4 standard deviations (see
  # core.sparse_transform: free off update steps); a callable's values exactly.
  grow_values = False if regrowth == "zero" else ("int8" if regrowth == "init" else True)

  def counts_of(params):
    return dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                            keep_dense=keep_dense, overrides=overrides)

  def rewired_slots(params, masks) -> list[tuple[int, int]]:
    """``(j, nnz)`` of every rewired leaf, j its index among the sparse leaves (static: from
    the shapes). A leaf at density 1 (e.g. capped by ER) has nothing to explore: no drop
    and no regrowth; its weights and optimizer state carry over as in dense training."""
    counts = counts_of(params)
    sparse = [(n, m) for n, m in zip(masks_lib.leaf_names(params), jax.tree.leaves(masks))
              if masks_lib.is_sparse(m)]
    return [(j, counts[n]) for j, (n, m) in enumerate(sparse) if counts[n] < jnp.size(m)]

  def init_masks(params, key):
    masks = random_masks(params, counts_of(params), key)
    # aux: the flat indices of the active weights of the rewired leaves (static length
    # nnz each), so that an update works on nnz values instead of n. nnz comes from the
    # counts (random_masks keeps exactly that many), not a concrete sum of the mask, so init
    # can be traced (jax.jit(tx.init, out_shardings=...)).
    sparse = [(p, m) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
              if masks_lib.is_sparse(m)]
    active = [jnp.nonzero(sparse[j][1].reshape(-1), size=nnz)[0].astype(jnp.int32)
              for j, nnz in rewired_slots(params, masks)]
    active = _concat(active) if active else jnp.zeros([0], jnp.int32)
    scale = tuple(core.init_scale(p, m) for p, m in sparse) if regrowth == "init" else ()
    return masks, SETState(active, scale)

  def update_masks(x: core.MaskUpdateInputs):
    z = fraction_at(x.step)
    leaves, treedef = jax.tree.flatten(x.masks)
    ws = jax.tree.leaves(x.params)
    sparse = [i for i, m in enumerate(leaves) if masks_lib.is_sparse(m)]
    rewiring = rewired_slots(x.params, x.masks)
    rewired, slots = [j for j, _ in rewiring], [nnz for _, nnz in rewiring]
    new, survivors, active = list(leaves), list(leaves), x.aux.active
    # "init": int8 codes (see core.MaskUpdate.units); a callable: the params' dtype
    code = jnp.int8 if regrowth == "init" else None
    values = [jnp.zeros_like(w, code) if masks_lib.is_sparse(m) else jnp.zeros([], code or w.dtype)
              for m, w in zip(leaves, ws)]
    units = [jnp.ones([], jnp.float32) for _ in leaves]
    if rewired:
      idx = [sparse[j] for j in rewired]
      grow_codes = bits = None
      key = jax.random.fold_in(x.key, 0)
      if regrowth == "init":
        # One draw per slot (nnz, not the leaf's size), as int8 codes in steps of 4/126
        # standard deviations, set in the scatter that grows the positions. Its bits and the
        # random positions' are one hash (each hash is ~220 ops on GPU, a loop of kernels to
        # compile on CPU); the same bits as two draws.
        value_key = jax.random.fold_in(x.key, 1)
        bits, value_bits = topk.random_bits_each(
            [key, value_key], [topk.position_draws([leaves[i].size for i in idx], slots),
                               sum(slots)])
        z8 = core.draw_regrowth("init", value_key, (sum(slots),), jnp.float32, jnp.float32(1.0),
                                bits=value_bits)
        grow_codes = jnp.clip(jnp.round(z8 * (126 / 4.0)), -126, 126).astype(jnp.int8)
      out, kept, active = _rewire_all(key, [ws[i] for i in idx], [leaves[i] for i in idx],
                                      active, z, grow_codes, bits, sizes=slots)
      for n, (i, j) in enumerate(zip(idx, rewired)):
        survivors[i] = kept[n]
        if regrowth == "init":
          new[i] = out[n] != _REMOVED
          units[i] = x.aux.scale[j] * (4.0 / 126)
          values[i] = out[n]   # the int8 codes: the grown weights' are their values in units
        else:
          new[i] = out[n]
          if grow_values:
            values[i] = core.draw_regrowth(regrowth, jax.random.fold_in(x.key, (1 << 20) + i),
                                           ws[i].shape, ws[i].dtype, None)
    return core.MaskUpdate(jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, survivors),
                           SETState(active, x.aux.scale),
                           jax.tree.unflatten(treedef, values) if grow_values else None,
                           jax.tree.unflatten(treedef, units) if grow_values == "int8" else None)

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=is_update_step, grow_values=grow_values, seed=seed)


def _defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """The paper's rewiring once per epoch, the first after one epoch of training."""
  del total_steps
  return {"update_period": steps_per_epoch, "update_start": steps_per_epoch, "seed": seed}


registry.register("set", sparse_evolutionary_training, _defaults)
