"""Magnitude pruning: one-shot (local or global), gradual, random, lottery tickets.

* One-shot: Han et al. (2015) prune the smallest |w| and retrain with the mask.
* Gradual: Zhu & Gupta (2017), eq. 1 (:func:`jaxsparse.core.schedules.polynomial_sparsity`):
  the mask is recomputed every ``update_period`` steps and only ever loses weights.
* Random pruning: the same schedule with random scores, a baseline.
* Lottery tickets: Frankle & Carbin (2019): keep the mask, rewind the surviving
  weights to their values at init (or at step k) with :func:`rewind`, retrain
  with :func:`jaxsparse.keep_masks`.

``scope="local"`` prunes each leaf to its own target (from ``distribution``);
``scope="global"`` uses one threshold over all sparse leaves, so the layer
densities fall out of the magnitudes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.core import registry, selection as topk, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.core import schedules



def _check_scope(scope: str) -> None:
  masks_lib.check_scope(scope)


def prune_to_fraction(scores: Any, masks: Any, counts: Mapping[str, int], fraction: jax.Array,
                      scope: str, params: Any) -> Any:
  """Keeps the highest-scoring active weights so that each sparse leaf (local) or
  all sparse leaves together (global) lose ``fraction`` of their final pruning.

  ``counts`` are the final kept counts; at ``fraction = 1`` a leaf keeps exactly
  ``counts[name]`` (local) or the sparse leaves keep ``sum(counts)`` (global).
  Only active weights can be kept, so pruning is monotone.
  """
  names = masks_lib.leaf_names(params)
  flat_m, treedef = jax.tree.flatten(masks)
  flat_s = jax.tree.leaves(scores)
  idx = [i for i, n in enumerate(names) if n in counts]
  sizes = [int(np.prod(flat_m[i].shape)) for i in idx]

  def target(size, kept):  # kept count after pruning `fraction` of (size - kept)
    return size - jnp.round((size - kept) * fraction).astype(jnp.int32)

  new = list(flat_m)
  if scope == "local":
    for i, size in zip(idx, sizes):
      new[i] = topk.largest_k_mask(flat_s[i], target(size, counts[names[i]]), flat_m[i])
  else:
    # One selection over all sparse leaves without concatenating them (same result as on the
    # concatenation, ties to the earlier leaf), so sharded leaves keep their sharding.
    keep = topk.largest_k_masks([flat_s[i] for i in idx], target(sum(sizes), sum(counts.values())),
                                [flat_m[i] for i in idx])
    for j, i in enumerate(idx):
      new[i] = keep[j]
  return jax.tree.unflatten(treedef, new)


def magnitude_scores(params: Any) -> Any:
  """``|theta|``, the keep score of magnitude pruning (Han et al. 2015)."""
  return jax.tree.map(jnp.abs, params)


def score_masks(scores: Any, sparsity: float, *, scope: str = "global",
                distribution: dist.Distribution = "uniform", filter: dist.LeafFilter | None = None,
                keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
                masks: Any = None) -> Any:
  """Masks that keep the highest ``scores`` to ``sparsity`` (pure; scores shaped like params).

  The one scores -> mask engine of one-shot pruning: :func:`magnitude_masks` and every
  criterion of :mod:`jaxsparse.pruning.criteria` go through it.
  ``scope="local"``: each sparse leaf keeps its count from ``distribution``;
  ``"global"``: one threshold over all sparse leaves (the SNIP/GraSP/SynFlow
  papers' choice). With ``masks`` given, only weights they keep can survive.
  """
  _check_scope(scope)
  counts = dist.kept_counts(scores, sparsity, distribution=distribution, filter=filter,
                            keep_dense=keep_dense, overrides=overrides)
  if masks is None:
    masks = core.masks_from_fn(scores, counts, lambda n, leaf, i: jnp.ones(jnp.shape(leaf), bool))
  else:
    masks_lib.check_masks(scores, masks)
  return _select(scores, masks, {n: jnp.int32(k) for n, k in counts.items()}, scope)


@functools.partial(jax.jit, static_argnums=(3,))
def _select(scores: Any, masks: Any, counts: dict, scope: str) -> Any:
  """One jitted selection instead of many eager ops; traced counts, so one compile per shapes."""
  return prune_to_fraction(scores, masks, counts, jnp.float32(1.0), scope, scores)


def magnitude_masks(params: Any, sparsity: float, *, scope: str = "local",
                    distribution: dist.Distribution = "uniform",
                    filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                    overrides: Mapping[str, float] | None = None, masks: Any = None) -> Any:
  """One-shot magnitude masks of ``params`` (e.g. after training), as a pure function:
  :func:`score_masks` of :func:`magnitude_scores`, local by default.

  With ``masks`` given, only weights they keep can survive (iterative pruning).
  """
  return score_masks(magnitude_scores(params), sparsity, scope=scope, distribution=distribution,
                     filter=filter, keep_dense=keep_dense, overrides=overrides, masks=masks)


def score_transform(inner: optax.GradientTransformation,
                    sparsity_at: Callable[[jax.Array], jax.Array], final_sparsity: float,
                    is_update_step: Callable[[jax.Array], jax.Array],
                    score_fn: Callable[[core.MaskUpdateInputs], Any], *, scope: str,
                    distribution: dist.Distribution, filter: dist.LeafFilter | None,
                    keep_dense: Sequence[str], overrides: Mapping[str, float] | None,
                    seed: int = 0, sparsity_name: str = "final_sparsity"
                    ) -> optax.GradientTransformationExtraArgs:
  """The one engine of pruning during training (magnitude, gradual, random and
  :func:`jaxsparse.score_pruning`): masks start all-True and, at each update step, keep the
  highest ``score_fn(x)`` to the fraction ``sparsity_at(step) / final_sparsity`` of each leaf's
  (or, global, all sparse leaves') final pruning; they only ever lose weights."""
  _check_scope(scope)
  s_f = dist.check_sparsity(final_sparsity, sparsity_name)

  def counts(params):  # static: depends on shapes only
    return dist.kept_counts(params, s_f, distribution=distribution, filter=filter,
                            keep_dense=keep_dense, overrides=overrides)

  def init_masks(params, key):
    del key
    return core.masks_from_fn(params, counts(params),
                              lambda n, leaf, i: jnp.ones(jnp.shape(leaf), bool)), ()

  def update_masks(x: core.MaskUpdateInputs):
    frac = sparsity_at(x.step) / s_f if s_f > 0 else jnp.float32(1.0)
    new = prune_to_fraction(score_fn(x), x.masks, counts(x.params), frac, scope, x.params)
    return core.MaskUpdate(new, new, x.aux)

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=is_update_step, seed=seed)


def _magnitude_scores(x: core.MaskUpdateInputs) -> Any:
  return magnitude_scores(x.params)


def magnitude_pruning(inner: optax.GradientTransformation, sparsity: float, *,
                      prune_step: int = 0, scope: str = "local",
                      distribution: dist.Distribution = "uniform",
                      filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                      overrides: Mapping[str, float] | None = None
                      ) -> optax.GradientTransformationExtraArgs:
  """One-shot magnitude pruning at ``prune_step``; the mask then stays fixed.

  Before ``prune_step`` the model trains dense; at it, the smallest |w| are
  removed to ``sparsity`` (per leaf, or globally with ``scope="global"``).
  """
  schedules.check_period(1, prune_step)
  return score_transform(inner, lambda step: jnp.float32(sparsity), sparsity,
                         schedules.at_steps(prune_step), _magnitude_scores,
                         scope=scope, distribution=distribution, filter=filter,
                         keep_dense=keep_dense, overrides=overrides, sparsity_name="sparsity")


# One-shot global magnitude pruning halfway through the run, then fine-tuning.
registry.register("magnitude", magnitude_pruning,
                  lambda total_steps, steps_per_epoch, seed: {"prune_step": total_steps // 2,
                                                              "scope": "global"})


def gradual_pruning(inner: optax.GradientTransformation, final_sparsity: float, *,
                    initial_sparsity: float = 0.0, begin_step: int = 0, num_updates: int = 10,
                    update_period: int = 100, scope: str = "local",
                    distribution: dist.Distribution = "uniform",
                    filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                    overrides: Mapping[str, float] | None = None
                    ) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning, Zhu & Gupta (2017) eq. 1.

  Masks update at ``t0 + i * dt`` for ``i = 0..n`` (``t0 = begin_step``,
  ``dt = update_period``, ``n = num_updates``) to sparsity ``s_t``; with a
  non-uniform ``distribution`` each leaf prunes the same fraction ``s_t / s_f``
  of its own final pruning.
  """
  s_f = dist.check_sparsity(final_sparsity, "final_sparsity")
  if dist.check_sparsity(initial_sparsity, "initial_sparsity") > s_f:
    raise ValueError(f"initial_sparsity={initial_sparsity!r} is above final_sparsity="
                     f"{final_sparsity!r}: pruning only removes weights, so the model would stay "
                     "at initial_sparsity; pass initial_sparsity <= final_sparsity")
  sched = schedules.polynomial_sparsity(final_sparsity, initial_sparsity=initial_sparsity,
                                        begin_step=begin_step, num_updates=num_updates,
                                        update_period=update_period)
  is_update = schedules.periodic(update_period, begin_step,
                                 begin_step + num_updates * update_period + 1)
  return score_transform(inner, sched, final_sparsity, is_update, _magnitude_scores,
                         scope=scope, distribution=distribution, filter=filter,
                         keep_dense=keep_dense, overrides=overrides)


def _gradual_defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """Pruning from 10% to 60% of the run, every 100 steps (or a 20th of a shorter run)."""
  del steps_per_epoch, seed
  begin, period = total_steps // 10, registry.run_period(total_steps)
  return {"begin_step": begin, "num_updates": max(1, (total_steps * 6 // 10 - begin) // period),
          "update_period": period}


registry.register("gradual", gradual_pruning, _gradual_defaults)


def random_pruning(inner: optax.GradientTransformation, sparsity: float, *,
                   prune_step: int = 0, distribution: dist.Distribution = "uniform",
                   filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                   overrides: Mapping[str, float] | None = None, seed: int = 0
                   ) -> optax.GradientTransformationExtraArgs:
  """Random pruning at ``prune_step`` to ``sparsity`` per leaf: the baseline for any criterion."""
  schedules.check_period(1, prune_step)

  def random_scores(x: core.MaskUpdateInputs):
    leaves, treedef = jax.tree.flatten(x.params)
    return jax.tree.unflatten(treedef, [jax.random.uniform(jax.random.fold_in(x.key, i), l.shape)
                                        for i, l in enumerate(leaves)])

  return score_transform(inner, lambda step: jnp.float32(sparsity), sparsity,
                         schedules.at_steps(prune_step), random_scores,
                         scope="local", distribution=distribution, filter=filter,
                         keep_dense=keep_dense, overrides=overrides, seed=seed,
                         sparsity_name="sparsity")


registry.register("random", random_pruning,
                  lambda total_steps, steps_per_epoch, seed: {"seed": seed})


def rewind(params: Any, masks: Any) -> Any:
  """Lottery ticket rewinding: ``params`` (saved at init or at step k) with the mask applied.

  Train the ticket with ``jaxsparse.keep_masks(inner, masks)`` from these params.
  """
  masks_lib.check_masks(params, masks)
  return masks_lib.apply_masks(params, masks)
