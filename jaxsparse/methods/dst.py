"""Dynamic sparse training: the shared vocabulary, and RigL, SNFS and DSR built from it.

Every dynamic sparse training (DST) update is, per mask update step:

1. **drop** (a :class:`DropRule`): which active weights are removed, e.g. the
   smallest ``|w|`` (RigL, SNFS), SET's smallest positive and negative
   weights, or everything under one global threshold (DSR);
2. **redistribute** (a :class:`Redistribution`): how many weights each
   sparse leaf grows back: as many as it dropped (RigL, SET), or the total
   dropped count shared over the leaves in proportion to their surviving
   non-zeros (DSR) or to their mean momentum magnitude (SNFS);
3. **grow** (a :class:`GrowRule`): which absent weights come back: at random
   (SET, DSR), by largest dense-gradient magnitude (RigL), by largest momentum
   magnitude (SNFS);
4. ``regrown``: what happens to weights that are dropped and grown back in
   the same update: ``"zero"`` (regrown at zero, SET's code), ``"keep"`` (they
   keep value and optimizer state, RigL's and SNFS's code) or ``"exclude"``
   (they cannot be regrown, DSR).

plus the schedule: when updates happen (``is_update_step``) and the drop
fraction over time. :func:`dynamic_sparse` wires any combination into an optax
transform on top of :func:`jaxsparse.core.transform.sparse_transform`, so a variant such
as "SET pruning with RigL growth" is one call::

    tx = dst.dynamic_sparse(optax.sgd(0.1, 0.9), 0.9, drop=dst.drop_set(0.3),
                            grow=dst.grow_gradient(), is_update_step=periodic(100))

Grown weights start with zeroed optimizer state (the core engine does that
for every weight that is not a survivor) and, by default, at exactly zero
(``regrowth="zero"``; ``"init"`` or a callable draw random values, see
:func:`jaxsparse.sparse_evolutionary_training`). A leaf at density 1 (ERK caps a leaf too small for its
share) has nothing to explore and takes no part in drop and grow. The total number
of non-zeros is constant across updates; per-leaf counts are constant with
:func:`same_layer` and move between leaves with :func:`by_nonzeros` and
:func:`by_momentum`. A leaf never grows more weights than it has candidate
positions: the excess goes to the other leaves in proportion to their shares
(water-filling), so the total only falls if every leaf is full.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse.core import registry, schedules, selection as topk, transform as core
from jaxsparse.methods import sparse_evolutionary
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.core.deprecation import renamed_kwargs
from jaxsparse.methods.static import random_masks

REGROWN = ("zero", "keep", "exclude")


class Layers(NamedTuple):
  """The sparse leaves at a mask update, in flattening order: what every rule sees."""
  names: tuple[str, ...]             # leaf names (static)
  weights: tuple[jax.Array, ...]     # current weights, zero where masked
  grads: tuple[jax.Array, ...]       # this step's raw dense gradient
  momenta: tuple[jax.Array, ...]     # momentum of the dense gradient (``()`` unless tracked)
  masks: tuple[jax.Array, ...]       # masks before the update
  step: jax.Array                    # the step of this update
  key: jax.Array                     # PRNG key of this update


class DropRule(NamedTuple):
  """Which active weights an update removes.

  Attributes:
    init: ``() -> state`` of the rule (e.g. DSR's threshold), ``()`` if none.
    apply: ``(layers, state) -> (drop masks, new state)``; each drop mask is a
      subset of its leaf's mask.
    uses_momentum: whether the rule reads ``layers.momenta``.
  """
  init: Callable[[], Any]
  apply: Callable[[Layers, Any], tuple[tuple[jax.Array, ...], Any]]
  uses_momentum: bool = False


class GrowRule(NamedTuple):
  """Which absent weights an update grows.

  Attributes:
    select: ``(layers, allowed, k, key) -> masks``: for every leaf ``i``, the mask
      of exactly ``min(k[i], count(allowed[i]))`` positions among ``allowed[i]``
      (all leaves in one call, so that a program holds one selection for all).
    uses_momentum: whether the rule reads ``layers.momenta``.
  """
  select: Callable[[Layers, tuple[jax.Array, ...], jax.Array, jax.Array], tuple[jax.Array, ...]]
  uses_momentum: bool = False


class Redistribution(NamedTuple):
  """How many weights each leaf grows.

  Attributes:
    counts: ``(layers, kept, dropped, capacity) -> int32[L]``: ``kept`` are the
      masks after the drop, ``dropped`` and ``capacity`` (candidate positions)
      int32 per leaf. The result never exceeds ``capacity``.
    uses_momentum: whether the rule reads ``layers.momenta``.
  """
  counts: Callable[[Layers, tuple[jax.Array, ...], jax.Array, jax.Array], jax.Array]
  uses_momentum: bool = False


class DSTState(NamedTuple):
  """The ``aux`` state of :func:`dynamic_sparse`: the drop rule's, the momentum, and the
  per-leaf standard deviation of the initial weights (``regrowth="init"``, else ``()``)."""
  drop: Any
  momenta: tuple[jax.Array, ...]
  scale: tuple = ()


# ---------------------------------------------------------------------------- drop rules

def _fraction_count(drop_fraction: jax.Array, n: jax.Array, rounding: str) -> jax.Array:
  x = drop_fraction * n.astype(jnp.float32)
  return (jnp.floor(x) if rounding == "floor" else jnp.ceil(x)).astype(jnp.int32)


@renamed_kwargs(fraction="drop_fraction")
def drop_magnitude(drop_fraction: schedules.ScalarOrSchedule = 0.3, *, rounding: str = "floor"
                   ) -> DropRule:
  """Drops ``k_l = floor(f(t) * nnz_l)`` (or ``ceil``) active weights of smallest ``|w|`` per leaf,
  ``f = drop_fraction`` (a float or a schedule of the step).

  RigL (Evci et al. 2020, sec. 3) with ``floor`` and a cosine ``f``;
  SNFS (Dettmers & Zettlemoyer 2019, alg. 1) with ``ceil``. Ties at equal
  ``|w|`` drop the lower flat index first.
  """
  schedules.check_fraction(drop_fraction, "drop_fraction")
  if rounding not in ("floor", "ceil"):
    raise ValueError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")
  f_at = schedules.as_schedule(drop_fraction)

  def apply(layers: Layers, state: Any):
    f = jnp.clip(f_at(layers.step), 0.0, 1.0)
    k = _fraction_count(f, topk.count_true_each(layers.masks), rounding)
    drops = topk.smallest_k_each([jnp.abs(w) for w in layers.weights], k, layers.masks)
    return tuple(drops), state

  return DropRule(lambda: (), apply)


@renamed_kwargs(zeta="drop_fraction")
def drop_set(drop_fraction: schedules.ScalarOrSchedule = 0.3) -> DropRule:
  """SET's drop (Mocanu et al. 2018, alg. 1): per leaf the ``floor(f * n_pos)``
  positive and ``floor(f * n_neg)`` negative active weights closest to zero,
  and every active weight that is exactly zero (``f = drop_fraction``, the paper's zeta)."""
  schedules.check_fraction(drop_fraction, "drop_fraction")
  z_at = schedules.as_schedule(drop_fraction)

  def apply(layers: Layers, state: Any):
    z = jnp.clip(z_at(layers.step), 0.0, 1.0)
    # SET's own rule (one implementation) on the active weights; removed ones read as zero.
    drops = sparse_evolutionary.set_drop_each(
        [jnp.where(m, w, 0).reshape(-1) for w, m in zip(layers.weights, layers.masks)], z)
    return tuple(d.reshape(m.shape) & m for d, m in zip(drops, layers.masks)), state

  return DropRule(lambda: (), apply)


class ThresholdState(NamedTuple):
  """DSR's adaptive global pruning threshold ``H``."""
  threshold: jax.Array


def drop_threshold(target_pruned: int = 600, *, initial_threshold: float = 1e-3,
                   tolerance: float = 0.1) -> DropRule:
  """DSR's drop (Mostafa & Wang 2019, alg. 1): every active weight with ``|w| < H``,
  ``H`` one threshold over all sparse leaves, then ``H`` adapts for the next update.

  With ``K`` the pruned count and ``Np = target_pruned``: ``H <- H / 2`` if
  ``K > (1 + delta) * Np``, ``H <- 2 * H`` if ``K < (1 - delta) * Np``
  (``delta = tolerance``). As in the authors' code, a leaf whose every active
  weight falls under ``H`` keeps its largest one.
  """
  if not isinstance(target_pruned, int) or isinstance(target_pruned, bool) or target_pruned <= 0:
    raise ValueError(f"target_pruned (Np) must be an int > 0, got {target_pruned!r}")
  if not isinstance(tolerance, (int, float)) or not 0.0 < float(tolerance) < 1.0:
    raise ValueError(f"tolerance (delta) must be in (0, 1), got {tolerance!r}")
  if not isinstance(initial_threshold, (int, float)) or not float(initial_threshold) > 0.0:
    raise ValueError(f"initial_threshold (H0) must be > 0, got {initial_threshold!r}")

  def init():
    return ThresholdState(jnp.float32(initial_threshold))

  def apply(layers: Layers, state: ThresholdState):
    h = state.threshold
    drops = []
    for w, m in zip(layers.weights, layers.masks):
      d = m & (jnp.abs(w) < h)
      all_gone = ~jnp.any(m & ~d)   # one reduction, not two counts
      # the largest active |w| (first on ties), by an argmax rather than a selection
      largest = jnp.arange(w.size).reshape(w.shape) == jnp.argmax(jnp.where(m, jnp.abs(w), -1.0))
      drops.append(jnp.where(all_gone, d & ~largest, d))
    k = jnp.sum(topk.count_true_each(drops)).astype(jnp.float32)
    h = jnp.where(k > (1 + tolerance) * target_pruned, h / 2,
                  jnp.where(k < (1 - tolerance) * target_pruned, h * 2, h))
    return tuple(drops), ThresholdState(h)

  return DropRule(init, apply)


# ---------------------------------------------------------------------------- grow rules

def grow_random() -> GrowRule:
  """Grows uniformly at random among the candidates (SET, DSR)."""
  return GrowRule(lambda layers, allowed, k, key: tuple(topk.random_k_masks_each(key, k, allowed)))


def _grow_by(score: Callable[[Layers, int], jax.Array], uses_momentum: bool = False) -> GrowRule:
  def select(layers, allowed, k, key):
    scores = [score(layers, i) for i in range(len(allowed))]
    return tuple(topk.largest_k_each(scores, k, allowed))
  return GrowRule(select, uses_momentum)


def _finite_abs(x: jax.Array) -> jax.Array:
  # A non-finite entry never wins (it may sit at a removed weight: only the active
  # entries are checked before an update runs).
  return jnp.where(jnp.isfinite(x), jnp.abs(x), 0.0)


def grow_gradient() -> GrowRule:
  """Grows the candidates of largest ``|dense gradient|`` (RigL, Evci et al. 2020, sec. 3);
  a non-finite gradient entry counts as zero."""
  return _grow_by(lambda layers, i: _finite_abs(layers.grads[i]))


def grow_momentum() -> GrowRule:
  """Grows the candidates of largest ``|momentum|`` (SNFS, Dettmers & Zettlemoyer 2019, alg. 1)."""
  return _grow_by(lambda layers, i: _finite_abs(layers.momenta[i]), uses_momentum=True)


# ---------------------------------------------------------------------------- redistribution

_PAIRWISE_RANKS_MAX = 128  # above: apportion's n + 1 rounds of n**2 compares would cost more


def _stable_ranks(key: jax.Array) -> jax.Array:
  """Each entry's position in a stable ascending sort of ``key`` (ties: lower index first):
  how many keys are smaller, plus how many equal ones come before it. Up to
  ``_PAIRWISE_RANKS_MAX`` entries (one per leaf) all pairs are compared: a few fused kernels
  where an argsort and a scatter were ~10 (a mask update's compile time goes by kernels);
  beyond, an argsort, whose work grows as n log n."""
  n = key.shape[0]
  if n > _PAIRWISE_RANKS_MAX:
    order = jnp.argsort(key, stable=True)
    return jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  i = jnp.arange(n)
  before = (key[None, :] < key[:, None]) | ((key[None, :] == key[:, None]) & (i[None, :] < i[:, None]))
  return jnp.sum(before, axis=1, dtype=jnp.int32)


def apportion(total: jax.Array, shares: jax.Array, capacity: jax.Array) -> jax.Array:
  """Integers summing to ``min(total, sum(capacity))``, proportional to ``shares``, capped by ``capacity``.

  Largest-remainder rounding (ties: lower index), then water-filling: the
  part a capped leaf cannot take is shared again over the others. Leaves with
  zero share get nothing unless every open leaf has zero share; then the
  remainder is shared by free capacity.
  """
  capacity = jnp.asarray(capacity, jnp.int32)
  shares = jnp.maximum(jnp.nan_to_num(jnp.asarray(shares, jnp.float32)), 0.0)
  total = jnp.minimum(jnp.asarray(total, jnp.int32), jnp.sum(capacity))
  n = shares.shape[0]

  def round_once(alloc):
    free = capacity - alloc
    open_ = free > 0
    remaining = total - jnp.sum(alloc)
    w = jnp.where(open_, shares, 0.0)
    w = jnp.where(jnp.sum(w) > 0, w, jnp.where(open_, free.astype(jnp.float32), 0.0))
    w = w / jnp.maximum(jnp.max(w), jnp.finfo(jnp.float32).tiny)  # max 1: tiny shares stay exact
    quota = remaining.astype(jnp.float32) * w / jnp.maximum(jnp.sum(w), 1.0)
    base = jnp.floor(quota).astype(jnp.int32)
    frac = quota - base
    rem = remaining - jnp.sum(base)      # in [0, n) up to float error
    rank = _stable_ranks(-jnp.where(open_, frac, -1.0))
    rank_low = _stable_ranks(jnp.where(base > 0, frac, 2.0))
    up = ((rank < rem) & open_).astype(jnp.int32)
    down = (rank_low < -rem).astype(jnp.int32)
    add = base + jnp.where(rem >= 0, up, -down)
    return alloc + jnp.clip(add, 0, free)

  # Each round either places everything or fills at least one more leaf.
  return lax.fori_loop(0, n + 1, lambda _, a: round_once(a), jnp.zeros(n, jnp.int32))


def same_layer() -> Redistribution:
  """Each leaf grows what it dropped: per-leaf counts stay constant (SET, RigL)."""
  return Redistribution(lambda layers, kept, dropped, capacity: jnp.minimum(dropped, capacity))


def by_nonzeros() -> Redistribution:
  """DSR: the total dropped count over the leaves in proportion to each leaf's
  surviving non-zeros ``R_l`` (Mostafa & Wang 2019, alg. 1), rounded to exactly the total."""
  def counts(layers, kept, dropped, capacity):
    r = topk.count_true_each(kept).astype(jnp.float32)
    return apportion(jnp.sum(dropped), r, capacity)
  return Redistribution(counts)


def by_momentum() -> Redistribution:
  """SNFS: the total dropped count over the leaves in proportion to each leaf's
  mean ``|momentum|`` over its active weights (Dettmers & Zettlemoyer 2019, alg. 1)."""
  def counts(layers, kept, dropped, capacity):
    mean = jnp.stack([jnp.sum(jnp.where(m, jnp.abs(v), 0.0)) / jnp.maximum(jnp.sum(m), 1)
                      for v, m in zip(layers.momenta, layers.masks)])
    return apportion(jnp.sum(dropped), mean, capacity)
  return Redistribution(counts, uses_momentum=True)


# ---------------------------------------------------------------------------- blocks

def _check_block_shape(block_shape) -> None:
  if block_shape is None:
    return
  if (not isinstance(block_shape, (tuple, list)) or len(block_shape) != 2
      or not all(isinstance(b, int) and b > 0 for b in block_shape)):
    raise ValueError(f"block_shape must be None or two positive ints (bk, bn), got {block_shape!r}")


def block_pool(x: jax.Array, block_shape: tuple[int, int]) -> jax.Array:
  """Mean of a 2-D array over each ``(bk, bn)`` block: shape ``(r / bk, c / bn)``."""
  bk, bn = block_shape
  r, c = x.shape
  return x.reshape(r // bk, bk, c // bn, bn).astype(jnp.float32).mean(axis=(1, 3))


def block_expand(b: jax.Array, block_shape: tuple[int, int]) -> jax.Array:
  """Repeats each entry of a block-level array over its ``(bk, bn)`` block."""
  return jnp.repeat(jnp.repeat(b, block_shape[0], axis=0), block_shape[1], axis=1)


def _random_block_masks(params, counts, block_shape, key):
  bk, bn = block_shape
  names = masks_lib.leaf_names(params)
  for name, leaf in zip(names, jax.tree.leaves(params)):
    if name in counts and (jnp.ndim(leaf) != 2 or leaf.shape[0] % bk or leaf.shape[1] % bn):
      raise ValueError(f"block_shape {tuple(block_shape)} needs 2-D sparse leaves with dimensions "
                       f"divisible by it; leaf {name!r} has shape {tuple(jnp.shape(leaf))} (make it "
                       f"dense with keep_dense or filter)")

  def leaf_mask(name, leaf, i):
    r, c = leaf.shape[0] // bk, leaf.shape[1] // bn
    k = min(r * c, max(1, round(counts[name] / (bk * bn)))) if counts[name] else 0
    blocks = topk.random_k_mask(jax.random.fold_in(key, i), k, jnp.ones((r, c), bool))
    return block_expand(blocks, block_shape)

  return core.masks_from_fn(params, counts, leaf_mask)


# ---------------------------------------------------------------------------- the engine

def dynamic_sparse(inner: optax.GradientTransformation, sparsity: float, *, drop: DropRule,
                   grow: GrowRule, redistribute: Redistribution | None = None,
                   is_update_step: Callable[[jax.Array], jax.Array], regrown: str = "zero",
                   regrowth: Any = "zero", momentum: float = 0.9,
                   distribution: dist.Distribution = "erk",
                   filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                   overrides: Mapping[str, float] | None = None,
                   block_shape: tuple[int, int] | None = None, seed: int = 0
                   ) -> optax.GradientTransformationExtraArgs:
  """Any drop / redistribute / grow combination as an optax wrapper around ``inner``.

  Args:
    inner: the optax optimizer to wrap.
    sparsity: global fraction of removed weights over the sparse leaves.
    drop, grow, redistribute: the rules (``redistribute`` defaults to :func:`same_layer`).
    is_update_step: ``step -> bool``, e.g. :func:`jaxsparse.core.schedules.periodic`.
    regrown: ``"zero"``, ``"keep"`` or ``"exclude"`` (see the module docstring).
    regrowth: starting values of grown weights: ``"zero"`` (default), ``"init"``
      or a callable ``(key, shape, dtype) -> array`` (see :func:`jaxsparse.sparse_evolutionary_training`).
    momentum: coefficient of the momentum ``m <- momentum * m + g`` of the raw
      dense gradient, kept in the state (every step) only when a rule uses it.
    distribution, filter, keep_dense, overrides: the initial random mask (see
      :func:`jaxsparse.core.distributions.kept_counts`).
    block_shape: ``(bk, bn)`` to train at block granularity (the structure the
      block-sparse kernel accelerates): every sparse leaf must be 2-D with
      dimensions divisible by the block; masks are constant on each block; the
      rules see one entry per block (weights, gradients and momenta pooled to
      their mean ``|.|`` over the block) so counts, ``target_pruned`` and
      thresholds are in blocks. Each leaf keeps
      ``round(kept_count / (bk * bn))`` blocks.
    seed: seed of the initial mask and of random growth.
  """
  dist.check_sparsity(sparsity)
  _check_block_shape(block_shape)
  redistribute = same_layer() if redistribute is None else redistribute
  for name, rule, kind in (("drop", drop, DropRule), ("grow", grow, GrowRule),
                           ("redistribute", redistribute, Redistribution)):
    if not isinstance(rule, kind):
      raise TypeError(f"{name} must be a jaxsparse.methods.dst.{kind.__name__}, got {type(rule).__name__}")
  if regrown not in REGROWN:
    raise ValueError(f"regrown must be one of {REGROWN}, got {regrown!r}")
  if not isinstance(momentum, (int, float)) or not 0.0 <= float(momentum) < 1.0:
    raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
  core.check_regrowth(regrowth)
  tracks = drop.uses_momentum or grow.uses_momentum or redistribute.uses_momentum
  # as in jaxsparse.sparse_evolutionary_training: "init" draws as int8 codes (free off update steps), a callable's exactly
  grow_values = False if regrowth == "zero" else ("int8" if regrowth == "init" else True)

  def counts_of(params):
    return dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                            keep_dense=keep_dense, overrides=overrides)

  def full_leaves(params) -> set[str]:
    """Sparse leaves at density 1 (static: from the shapes): excluded from drop and grow."""
    shapes = {n: jnp.shape(p) for n, p in zip(masks_lib.leaf_names(params), jax.tree.leaves(params))}
    out = set()
    for name, c in counts_of(params).items():
      size = int(np.prod(shapes[name]))
      if block_shape is not None:
        blocks = size // (block_shape[0] * block_shape[1])
        full = min(blocks, max(1, round(c / (block_shape[0] * block_shape[1])))) == blocks
      else:
        full = c == size
      if full:
        out.add(name)
    return out

  def init_masks(params, key):
    counts = counts_of(params)
    if block_shape is None:
      masks = random_masks(params, counts, key)
    else:
      masks = _random_block_masks(params, counts, block_shape, key)
    sparse = [(p, m) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks))
              if masks_lib.is_sparse(m)]
    momenta = tuple(jnp.zeros(jnp.shape(p), jnp.result_type(p)) for p, _ in sparse) if tracks else ()
    scale = tuple(core.init_scale(p, m) for p, m in sparse) if regrowth == "init" else ()
    return masks, DSTState(drop.init(), momenta, scale)

  def track(aux: DSTState, grads, masks):
    pairs = [(x, m) for x, m in zip(jax.tree.leaves(grads), jax.tree.leaves(masks))
             if masks_lib.is_sparse(m)]
    # As for the mask update, only the active entries must be finite; a non-finite entry
    # at a removed weight does not enter the momentum.
    ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(jnp.where(m, x, 0))) for x, m in pairs]))
    momenta = tuple(jnp.where(ok, momentum * v + jnp.where(jnp.isfinite(x), x, 0), v)
                    for v, (x, _) in zip(aux.momenta, pairs))
    return aux._replace(momenta=momenta)

  def update_masks(x: core.MaskUpdateInputs) -> core.MaskUpdate:
    flat_m, treedef = jax.tree.flatten(x.masks)
    names = masks_lib.leaf_names(x.params)
    # the leaves may come flat on CPU (flat_update below); their shapes are in x.shapes
    shaped = x.params if x.shapes is None else x.shapes
    shapes = [jnp.shape(s) for s in jax.tree.leaves(shaped)]
    full = full_leaves(shaped)
    sparse_idx = [i for i, m in enumerate(flat_m) if masks_lib.is_sparse(m)]
    # j-th entry of aux.momenta / aux.scale <-> sparse_idx[j]; the rules see the non-full ones
    pos = [j for j, i in enumerate(sparse_idx) if names[i] not in full]
    idx = [sparse_idx[j] for j in pos]
    flat_p, flat_g = jax.tree.leaves(x.params), jax.tree.leaves(x.grads)

    def values_for(new):
      """(values, units) of the grown weights, as core.sparse_transform's grow_values wants."""
      if not grow_values:
        return None, None
      vals = [jnp.zeros([], p.dtype) if not masks_lib.is_sparse(m) else jnp.zeros_like(p)
              for p, m in zip(flat_p, flat_m)]
      units = [jnp.ones([], jnp.float32) for _ in flat_p]
      for j, i in zip(pos, idx):
        key = jax.random.fold_in(x.key, (1 << 20) + i)
        scale = x.aux.scale[j] if regrowth == "init" else None
        vals[i] = core.draw_regrowth(regrowth, key, shapes[i], flat_p[i].dtype, scale).reshape(
            flat_p[i].shape)     # drawn in the leaf's shape: a callable's fan-in
        if regrowth == "init":
          units[i] = scale * (4.0 / 126)  # +-4 standard deviations in 126 steps
      return (jax.tree.unflatten(treedef, vals),
              jax.tree.unflatten(treedef, units) if grow_values == "int8" else None)

    if not idx:
      return core.MaskUpdate(x.masks, x.masks, x.aux, *values_for(x.masks))
    layers = Layers(names=tuple(names[i] for i in idx), weights=tuple(flat_p[i] for i in idx),
                    grads=tuple(flat_g[i] for i in idx),
                    momenta=tuple(x.aux.momenta[j].reshape(flat_p[i].shape)
                                  for j, i in zip(pos, idx)) if x.aux.momenta else (),
                    masks=tuple(flat_m[i] for i in idx), step=x.step, key=x.key)
    if block_shape is not None:
      pool = lambda a: block_pool(jnp.abs(a), block_shape)
      layers = layers._replace(weights=tuple(map(pool, layers.weights)),
                               grads=tuple(map(pool, layers.grads)),
                               momenta=tuple(map(pool, layers.momenta)),
                               masks=tuple(block_pool(m, block_shape) > 0 for m in layers.masks))
    drops, drop_state = drop.apply(layers, x.aux.drop)
    kept = tuple(m & ~d for m, d in zip(layers.masks, drops))
    allowed = tuple(~m if regrown == "exclude" else ~k for m, k in zip(layers.masks, kept))
    dropped = topk.count_true_each(drops)
    capacity = topk.count_true_each(allowed)
    n_grow = redistribute.counts(layers, kept, dropped, capacity)
    new, survivors = list(flat_m), list(flat_m)
    expand = (lambda b: b) if block_shape is None else (lambda b: block_expand(b, block_shape))
    grown_all = grow.select(layers, allowed, n_grow, jax.random.fold_in(x.key, 0))
    for j, i in enumerate(idx):
      grown = grown_all[j]
      new[i] = expand(kept[j] | grown)
      survivors[i] = expand(kept[j] | (grown & layers.masks[j]) if regrown == "keep" else kept[j])
    return core.MaskUpdate(jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, survivors),
                           DSTState(drop_state, x.aux.momenta, x.aux.scale), *values_for(new))

  # Without blocks the rules read every leaf as a flat array (flat indices): on CPU they may
  # see the leaves flattened, which compiles faster (see core.sparse_transform).
  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=is_update_step, track=track if tracks else None,
                               grow_values=grow_values, flat_update=block_shape is None,
                               seed=seed)


# ---------------------------------------------------------------------------- the methods

def rigl(inner: optax.GradientTransformation, sparsity: float, *, update_stop: int,
         drop_fraction: float = 0.3, update_period: int = 100, update_start: int | None = None,
         distribution: dist.Distribution = "erk", filter: dist.LeafFilter | None = None,
         keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
         block_shape: tuple[int, int] | None = None, seed: int = 0
         ) -> optax.GradientTransformationExtraArgs:
  """RigL, Rigging the Lottery (Evci et al. 2020, alg. 1).

  Every ``update_period`` (``dT = 100``) steps until ``update_stop`` (``T_end``,
  the paper: 75% of training), each sparse leaf drops
  ``floor(f(t) * nnz)`` active weights of smallest ``|w|`` and grows as many
  absent weights of largest ``|dense gradient|``, with the cosine drop fraction
  ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))`` (eq. 1, ``alpha = 0.3``).
  Grown weights start at zero with zeroed optimizer state; a weight dropped and
  regrown in the same update keeps its value (the authors' default). ERK layer
  densities.
  """
  schedules.check_fraction(drop_fraction, "drop_fraction")
  is_update_step = schedules.periodic(update_period, update_start, update_stop)
  return dynamic_sparse(
      inner, sparsity,
      drop=drop_magnitude(schedules.cosine_drop_fraction(drop_fraction, update_stop)),
      grow=grow_gradient(), redistribute=same_layer(),
      is_update_step=is_update_step, regrown="keep",
      distribution=distribution, filter=filter, keep_dense=keep_dense, overrides=overrides,
      block_shape=block_shape, seed=seed)


def _rigl_defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """T_end at 75% of training (the paper's), dT = 100 steps or a 20th of a shorter run."""
  del steps_per_epoch
  return {"update_stop": max(1, total_steps * 3 // 4),
          "update_period": registry.run_period(total_steps), "seed": seed}


registry.register("rigl", rigl, _rigl_defaults)


@renamed_kwargs(prune_rate="drop_fraction", min_prune_rate="min_drop_fraction")
def snfs(inner: optax.GradientTransformation, sparsity: float, *, total_steps: int,
         update_period: int, drop_fraction: float = 0.5, min_drop_fraction: float = 0.005,
         momentum: float = 0.9, update_start: int | None = None, update_stop: int | None = None,
         distribution: dist.Distribution = "uniform", filter: dist.LeafFilter | None = None,
         keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
         block_shape: tuple[int, int] | None = None, seed: int = 0
         ) -> optax.GradientTransformationExtraArgs:
  """Sparse momentum, SNFS (Dettmers & Zettlemoyer 2019, alg. 1).

  Every ``update_period`` steps (the paper: every epoch), each sparse leaf
  drops ``ceil(p(t) * nnz)`` active weights of smallest ``|w|``; the total is
  regrown over the leaves in proportion to their mean ``|momentum|`` over
  active weights, each leaf growing its absent weights of largest
  ``|momentum|``. ``p(t)`` (the paper's prune rate) decays by a cosine from
  ``drop_fraction`` (0.5) to ``min_drop_fraction`` (0.005, the authors' code) over
  ``total_steps`` (``prune_rate=`` and ``min_prune_rate=`` are their deprecated names). The
  momentum is ``m <- momentum * m + g`` of the raw dense gradient (the
  authors read SGD's momentum buffer, which in their code sees the dense
  gradient). Uniform initial densities, as in the authors' code; unlike it,
  the total count of non-zeros is kept exactly (their code rounds each leaf
  and smooths the drift over updates).
  """
  if not isinstance(total_steps, int) or total_steps <= 0:
    raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
  schedules.check_fraction(drop_fraction, "drop_fraction")
  schedules.check_fraction(min_drop_fraction, "min_drop_fraction")
  if drop_fraction == 0 or min_drop_fraction > drop_fraction:
    raise ValueError(f"need 0 <= min_drop_fraction <= drop_fraction and drop_fraction > 0, got "
                     f"drop_fraction={drop_fraction!r}, min_drop_fraction={min_drop_fraction!r}")
  rate = optax.cosine_decay_schedule(drop_fraction, total_steps,
                                     alpha=min_drop_fraction / drop_fraction)
  return dynamic_sparse(
      inner, sparsity, drop=drop_magnitude(rate, rounding="ceil"), grow=grow_momentum(),
      redistribute=by_momentum(),
      is_update_step=schedules.periodic(update_period, update_start, update_stop),
      regrown="keep", momentum=momentum, distribution=distribution, filter=filter,
      keep_dense=keep_dense, overrides=overrides, block_shape=block_shape, seed=seed)


def _snfs_defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """The drop fraction decays over the whole run; updates once per epoch (the paper's)."""
  return {"total_steps": total_steps, "update_period": steps_per_epoch, "seed": seed}


registry.register("snfs", snfs, _snfs_defaults)


def dsr(inner: optax.GradientTransformation, sparsity: float, *, target_pruned: int = 600,
        initial_threshold: float = 1e-3, tolerance: float = 0.1, update_period: int = 100,
        doubling_steps: Sequence[int] = (), update_start: int | None = None,
        update_stop: int | None = None, distribution: dist.Distribution = "uniform",
        filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
        overrides: Mapping[str, float] | None = None,
        block_shape: tuple[int, int] | None = None, seed: int = 0
        ) -> optax.GradientTransformationExtraArgs:
  """DSR, dynamic sparse reparameterization (Mostafa & Wang 2019, alg. 1).

  At every reallocation step: prune every active weight with ``|w| < H``
  (``H`` one threshold over all sparse leaves; ``K`` = pruned count); adapt
  ``H`` (halve if ``K > (1 + delta) Np``, double if ``K < (1 - delta) Np``);
  regrow ``K`` weights over the leaves in proportion to each leaf's surviving
  non-zeros (rounded so that the total is exactly ``K``), at random absent
  positions other than the just-pruned ones, at zero. The total number of
  non-zeros is constant; per-leaf counts move. A leaf with fewer candidate
  positions than its share grows what it can and the rest goes to the others.

  Defaults from the authors' code: ``H0 = 1e-3``, ``delta = 0.1``,
  ``Np = 600`` (their MNIST MLP; it should scale with the network: 20000 for
  WRN-28-2), period 100 steps doubled at each of ``doubling_steps`` (their
  MNIST run: epochs 25, 50, 75) and ``update_stop`` near the end (epoch 90 of
  100). Uniform initial densities. ``H`` lives in the state and is updated on
  device.
  """
  return dynamic_sparse(
      inner, sparsity,
      drop=drop_threshold(target_pruned, initial_threshold=initial_threshold, tolerance=tolerance),
      grow=grow_random(), redistribute=by_nonzeros(),
      is_update_step=schedules.doubling_periodic(update_period, tuple(doubling_steps),
                                                 update_start, update_stop),
      regrown="exclude", distribution=distribution, filter=filter, keep_dense=keep_dense,
      overrides=overrides, block_shape=block_shape, seed=seed)


def _dsr_defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """The authors' MNIST schedule scaled to the run: period 100 steps (or a 20th of a shorter
  run) doubled at 25, 50 and 75% of training, updates stop at 90%."""
  del steps_per_epoch
  doubling = tuple(sorted({int(total_steps * q) for q in (0.25, 0.5, 0.75)} - {0}))
  period = registry.run_period(total_steps)
  return {"update_period": period, "doubling_steps": tuple(d for d in doubling if d > period),
          "update_stop": max(period + 1, total_steps * 9 // 10), "seed": seed}


registry.register("dsr", dsr, _dsr_defaults)


@renamed_kwargs(zeta="drop_fraction")
def block_set(inner: optax.GradientTransformation, sparsity: float, *,
              block_shape: tuple[int, int], drop_fraction: schedules.ScalarOrSchedule = 0.3,
              update_period: int = 100, update_start: int | None = None,
              update_stop: int | None = None, regrowth: Any = "zero",
              distribution: dist.Distribution = "er",
              filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
              overrides: Mapping[str, float] | None = None, seed: int = 0
              ) -> optax.GradientTransformationExtraArgs:
  """SET (Mocanu et al. 2018) at block granularity, for the block-sparse kernel.

  A block has no sign, so SET's "smallest positive and largest negative"
  becomes: drop ``floor(drop_fraction * nnz_blocks)`` blocks of smallest mean ``|w|``
  per leaf, regrow as many blocks at random among the absent ones (at zero; or as
  ``regrowth`` says, see :func:`jaxsparse.sparse_evolutionary_training`). For element-wise SET use
  :func:`jaxsparse.sparse_evolutionary_training`.
  """
  return dynamic_sparse(
      inner, sparsity, drop=drop_magnitude(drop_fraction), grow=grow_random(),
      redistribute=same_layer(),
      is_update_step=schedules.periodic(update_period, update_start, update_stop), regrown="zero",
      regrowth=regrowth, distribution=distribution, filter=filter, keep_dense=keep_dense,
      overrides=overrides,
      block_shape=block_shape, seed=seed)
