"""Baselines: dense training, a fixed random mask, and a fixed given mask.

All three use the same engine as the dynamic methods (:mod:`jaxsparse.core.transform`),
so a comparison between them differs only in how masks are chosen.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxsparse.core import registry, selection as topk, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib


def random_masks(params: Any, counts: Mapping[str, int], key: jax.Array) -> Any:
  """Masks with exactly ``counts[name]`` kept weights per sparse leaf, uniformly at random."""
  def leaf_mask(name, leaf, i):
    return topk.random_k_mask(jax.random.fold_in(key, i), counts[name],
                              jnp.ones(jnp.shape(leaf), bool))
  return core.masks_from_fn(params, counts, leaf_mask)


def dense(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """No sparsity, through the same code path (every mask is the scalar ``True``)."""
  def init_masks(params, key):
    del key
    return jax.tree.map(lambda _: masks_lib.dense_mask(), params), ()
  return core.sparse_transform(inner, init_masks=init_masks, update_masks=None,
                               is_update_step=lambda step: jnp.bool_(False))


registry.register("dense", dense, hyperparameters=False)


def static_sparse(inner: optax.GradientTransformation, sparsity: float, *,
                  distribution: dist.Distribution = "uniform",
                  filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                  overrides: Mapping[str, float] | None = None,
                  seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: a random mask drawn at init and never changed.

  The per-leaf kept counts follow ``distribution`` (see
  :mod:`jaxsparse.core.distributions`); the DSR paper's "static" baseline.
  """
  dist.check_sparsity(sparsity)

  def init_masks(params, key):
    counts = dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                              keep_dense=keep_dense, overrides=overrides)
    return random_masks(params, counts, key), ()

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=None,
                               is_update_step=lambda step: jnp.bool_(False), seed=seed)


# A random ER mask: the DSR paper's static baseline.
registry.register("static", static_sparse,
                  lambda total_steps, steps_per_epoch, seed: {"distribution": "er", "seed": seed})


def keep_masks(inner: optax.GradientTransformation, masks: Any
               ) -> optax.GradientTransformationExtraArgs:
  """Trains with the given ``masks`` fixed (e.g. a lottery ticket or a SNIP mask).

  Raises ValueError naming the leaf when a sparse leaf's mask removes every weight
  (the layer's output would be constant: keep it, or make the layer dense).
  """
  masks = jax.tree.map(lambda m: jnp.asarray(m, bool), masks)
  for name, m in zip(masks_lib.leaf_names(masks), jax.tree.leaves(masks)):
    if jnp.ndim(m) and not isinstance(m, jax.core.Tracer) and not bool(jnp.any(m)):
      raise ValueError(f"masks: the mask of leaf '{name}' removes every weight, so the layer's "
                       "output would be constant; keep some weights, or give the leaf the scalar "
                       "mask True to keep it dense")

  def init_masks(params, key):
    del key
    masks_lib.check_masks(params, masks)
    return masks, ()

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=None,
                               is_update_step=lambda step: jnp.bool_(False))
