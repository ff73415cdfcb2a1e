"""Pruning criteria beyond magnitude: score functions that plug into the pruning machinery.

Every criterion is a pure function that returns a *score tree* shaped like the
params. The convention is the one of :func:`jaxsparse.pruning.magnitude.prune_to_fraction`:
**higher score = keep**. Scores are turned into masks by :func:`score_masks`
(one-shot, local or global) or used inside training by :func:`score_pruning`
(one-shot at a step or gradual, like :func:`jaxsparse.magnitude_pruning`).

Criteria:

* SNIP (Lee et al. 2019, eq. 6): ``|theta * dL/dtheta|`` on one batch at init.
* GraSP (Wang et al. 2020, eq. 8): ``S = -theta * (H g)``; the paper removes the
  weights with the *highest* S, so the keep score is ``-S``
  (:func:`grasp_scores` returns S itself).
* SynFlow (Tanaka et al. 2020, alg. 1): data-free,
  ``R = 1^T (prod_l |W_l|) 1``, score ``theta * dR/dtheta``, iterated 100 times
  with the exponential schedule ``density_k = density ** (k / n)``.
* Taylor / OBD (LeCun et al. 1990, eq. 5): ``1/2 * theta^2 * H_qq`` with the
  diagonal of the empirical Fisher (per-example gradients with ``jax.vmap``) or
  a Hutchinson estimate of the Hessian's diagonal (``E[z * Hz]``, Rademacher z).

``loss_fn(params, batch) -> scalar`` is the mean loss on ``batch``, a pytree of
arrays with a leading example axis (e.g. ``(x, y)``). A "prune at init" mask is
trained with ``jaxsparse.keep_masks(inner, masks)`` (static sparse training).
"""

from __future__ import annotations

import functools

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.core import schedules, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.pruning import magnitude
from jaxsparse.pruning.magnitude import magnitude_scores, prune_to_fraction, score_masks

Params = Any
Batch = Any
Scores = Any
LossFn = Callable[[Params, Batch], jax.Array]
ScoreFn = Callable[[core.MaskUpdateInputs], Scores]

CURVATURES = ("fisher", "hutchinson")


# ------------------------------------------------------------------ checks


def check_batch(batch: Batch, criterion: str) -> int:
  """Raises ValueError (naming ``batch``) unless it is a non-empty pytree of arrays with one batch axis."""
  leaves = jax.tree.leaves(batch)
  if batch is None or not leaves:
    raise ValueError(f"batch: the {criterion} score needs a batch of data (e.g. (x, y)), got {batch!r}")
  sizes = {int(jnp.shape(l)[0]) if jnp.ndim(l) else -1 for l in leaves}
  if len(sizes) != 1 or -1 in sizes or 0 in sizes:
    raise ValueError(f"batch: every leaf needs the same non-zero leading (example) axis, "
                     f"got leading sizes {sorted(sizes)}")
  return sizes.pop()


def check_loss(loss_fn: LossFn, params: Params, batch: Batch) -> None:
  """Raises ValueError (naming ``loss_fn``) unless ``loss_fn(params, batch)`` is a real scalar."""
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a callable (params, batch) -> scalar, got {loss_fn!r}")
  out = jax.eval_shape(loss_fn, params, batch)
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != () or not jnp.issubdtype(
      out.dtype, jnp.floating):
    shape = getattr(out, "shape", type(out).__name__)
    raise ValueError(f"loss_fn must return a scalar float loss (the mean over the batch), "
                     f"got {shape}; reduce it, e.g. with .mean()")


def _check_scope(scope: str) -> None:
  masks_lib.check_scope(scope)


# ------------------------------------------------------------------ scores


def snip_scores(params: Params, loss_fn: LossFn, batch: Batch) -> Scores:
  """SNIP connection sensitivity ``|theta * dL/dtheta|`` (Lee et al. 2019, eq. 6, unnormalised)."""
  check_batch(batch, "SNIP")
  check_loss(loss_fn, params, batch)
  return _snip(params, loss_fn, batch)


# The criteria are jitted once per loss_fn (a static argument: same function, same shapes, no
# recompilation), not as a fresh closure per call, which compiled at every call.
@functools.partial(jax.jit, static_argnums=1)
def _snip(params: Params, loss_fn: LossFn, batch: Batch) -> Scores:
  return jax.tree.map(lambda w, d: jnp.abs(w * d), params, jax.grad(loss_fn)(params, batch))


def hessian_gradient_product(params: Params, loss_fn: LossFn, batch: Batch) -> Params:
  """``H g`` with ``g = dL/dtheta``: forward-over-reverse, ``jax.jvp`` of ``jax.grad``."""
  grad_fn = jax.grad(lambda p: loss_fn(p, batch))
  g = grad_fn(params)
  return jax.jvp(grad_fn, (params,), (g,))[1]


def grasp_scores(params: Params, loss_fn: LossFn, batch: Batch) -> Scores:
  """GraSP's ``S(-theta) = -theta * (H g)`` (Wang et al. 2020, eq. 8).

  The paper removes the weights with the **highest** S (they reduce the
  gradient flow least, or increase it); use ``-S`` as keep score
  (:func:`grasp_masks` does).
  """
  check_batch(batch, "GraSP")
  check_loss(loss_fn, params, batch)
  return _grasp(params, loss_fn, batch)


@functools.partial(jax.jit, static_argnums=1)
def _grasp(params: Params, loss_fn: LossFn, batch: Batch) -> Scores:
  return jax.tree.map(lambda w, h: -w * h, params, hessian_gradient_product(params, loss_fn, batch))


def synflow_scores(params: Params, apply_fn: Callable[[Params, jax.Array], jax.Array],
                   input_shape: Sequence[int], masks: Any = None) -> Scores:
  """SynFlow ``theta * dR/dtheta`` with ``R = 1^T (prod_l |W_l|) 1`` (Tanaka et al. 2020, eq. 2).

  ``R`` is the network's summed output on one all-ones input with every
  parameter replaced by its absolute value (times ``masks``); no data needed.
  The network must be positively homogeneous through relu/pooling (no
  BatchNorm in train mode).
  """
  input_shape = tuple(int(d) for d in input_shape)
  absp = jax.tree.map(jnp.abs, params)
  if masks is not None:
    absp = masks_lib.apply_masks(absp, masks)
  ones = jnp.ones((1, *input_shape), jnp.float32)

  def r(p):
    return jnp.sum(apply_fn(p, ones))

  return jax.jit(lambda p: jax.tree.map(jnp.multiply, p, jax.grad(r)(p)))(absp)


def per_example_grads(params: Params, loss_fn: LossFn, batch: Batch) -> Params:
  """Gradients of each example's loss, stacked on a leading axis (``jax.vmap`` of ``jax.grad``)."""
  check_batch(batch, "per-example gradient")
  check_loss(loss_fn, params, batch)
  return _per_example_grads(params, loss_fn, batch)


@functools.partial(jax.jit, static_argnums=1)
def _per_example_grads(params: Params, loss_fn: LossFn, batch: Batch) -> Params:
  one = lambda p, example: jax.grad(loss_fn)(p, jax.tree.map(lambda a: a[None], example))
  return jax.vmap(one, in_axes=(None, 0))(params, batch)


def empirical_fisher_diag(params: Params, loss_fn: LossFn, batch: Batch) -> Params:
  """Diagonal of the empirical Fisher ``1/N sum_i g_i * g_i`` (per-example gradients g_i)."""
  g = per_example_grads(params, loss_fn, batch)
  return jax.tree.map(lambda a: jnp.mean(jnp.square(a), axis=0), g)


def hutchinson_diag_hessian(params: Params, loss_fn: LossFn, batch: Batch, key: jax.Array,
                            num_samples: int = 32) -> Params:
  """Hutchinson's estimate ``1/S sum_s z_s * (H z_s)`` of diag(H), Rademacher z (Bekas et al. 2007)."""
  check_batch(batch, "Hutchinson")
  check_loss(loss_fn, params, batch)
  if not isinstance(num_samples, (int, np.integer)) or num_samples <= 0:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  grad_fn = jax.grad(lambda p: loss_fn(p, batch))
  leaves, treedef = jax.tree.flatten(params)

  def sample(k):
    z = jax.tree.unflatten(treedef, [
        jax.random.rademacher(jax.random.fold_in(k, i), jnp.shape(l), jnp.result_type(l))
        for i, l in enumerate(leaves)])
    hz = jax.jvp(grad_fn, (params,), (z,))[1]
    return jax.tree.map(jnp.multiply, z, hz)

  est = jax.jit(lambda keys: jax.lax.map(sample, keys))(jax.random.split(key, num_samples))
  return jax.tree.map(lambda a: jnp.mean(a, axis=0), est)


def obd_scores(params: Params, loss_fn: LossFn, batch: Batch, *, curvature: str = "fisher",
               key: jax.Array | None = None, num_samples: int = 32) -> Scores:
  """OBD saliency ``1/2 * theta_q^2 * H_qq`` (LeCun et al. 1990, eq. 5).

  ``curvature="fisher"``: H_qq from the empirical Fisher's diagonal;
  ``"hutchinson"``: from Hutchinson's estimate (needs ``key``).
  """
  if curvature not in CURVATURES:
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
  if curvature == "fisher":
    h = empirical_fisher_diag(params, loss_fn, batch)
  else:
    if key is None:
      raise ValueError("key: curvature='hutchinson' needs a PRNG key")
    h = hutchinson_diag_hessian(params, loss_fn, batch, key, num_samples)
  return jax.tree.map(lambda p, d: 0.5 * jnp.square(p) * d, params, h)


# ------------------------------------------------------------------ scores -> masks


def _counts(params: Params, sparsity: float, distribution, filter, keep_dense, overrides):
  return dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                          keep_dense=keep_dense, overrides=overrides)


def snip_masks(params: Params, loss_fn: LossFn, batch: Batch, sparsity: float, *,
               scope: str = "global", **kwargs: Any) -> Any:
  """SNIP "prune at init" masks: keep the largest ``|theta * g|`` (global by default)."""
  return score_masks(snip_scores(params, loss_fn, batch), sparsity, scope=scope, **kwargs)


def grasp_masks(params: Params, loss_fn: LossFn, batch: Batch, sparsity: float, *,
                scope: str = "global", **kwargs: Any) -> Any:
  """GraSP "prune at init" masks: remove the highest ``S = -theta * Hg`` (keep the lowest)."""
  s = grasp_scores(params, loss_fn, batch)
  return score_masks(jax.tree.map(jnp.negative, s), sparsity, scope=scope, **kwargs)


def synflow_masks(params: Params, apply_fn: Callable[[Params, jax.Array], jax.Array],
                  input_shape: Sequence[int], sparsity: float, *, iterations: int = 100,
                  scope: str = "global", distribution: dist.Distribution = "uniform",
                  filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                  overrides: Mapping[str, float] | None = None) -> Any:
  """SynFlow (Tanaka et al. 2020, alg. 1): ``iterations`` rounds of score-and-prune.

  Round k (1..n) keeps a ``(1 - sparsity) ** (k / n)`` fraction of the
  weights (each leaf under ``scope="local"``), rescoring with the current mask.
  """
  _check_scope(scope)
  s = dist.check_sparsity(sparsity)
  if not isinstance(iterations, (int, np.integer)) or iterations <= 0:
    raise ValueError(f"iterations must be a positive int, got {iterations!r}")
  counts = _counts(params, s, distribution, filter, keep_dense, overrides)
  masks = core.masks_from_fn(params, counts, lambda n, leaf, i: jnp.ones(jnp.shape(leaf), bool))
  if s == 0.0:
    return masks
  # Per-leaf densities follow the same exponential schedule towards each leaf's final count:
  # the kept count after round k is size * d^(k/n), i.e. a fraction (1 - d^(k/n)) / (1 - d)
  # of the final pruning (d = 1 - sparsity).
  d = 1.0 - s

  @jax.jit
  def round_(masks, frac):
    scores = synflow_scores(params, apply_fn, input_shape, masks)
    return prune_to_fraction(scores, masks, counts, frac, scope, params)

  for k in range(1, int(iterations) + 1):
    frac = (1.0 - d ** (k / iterations)) / (1.0 - d)
    masks = round_(masks, jnp.float32(frac))
  return masks


# ------------------------------------------------------------------ in-training transform


def batch_score_fn(criterion: str, loss_fn: LossFn | None = None, batch: Batch = None, *,
                   key: jax.Array | None = None, num_samples: int = 32) -> ScoreFn:
  """A ``MaskUpdateInputs -> keep scores`` function for :func:`score_pruning`.

  ``criterion``: ``"magnitude"`` (``|theta|``), ``"taylor"`` (first order,
  ``|theta * g|`` on the training step's own gradient), or on a fixed
  calibration ``batch`` with ``loss_fn``: ``"snip"``, ``"grasp"`` (keep ``-S``),
  ``"obd"`` (empirical Fisher) or ``"obd_hutchinson"``.
  """
  if criterion == "magnitude":
    return lambda x: magnitude_scores(x.params)
  if criterion == "taylor":
    return lambda x: jax.tree.map(lambda p, g: jnp.abs(p * g), x.params, x.grads)
  needs_data = {"snip": "SNIP", "grasp": "GraSP", "obd": "OBD", "obd_hutchinson": "OBD"}
  if criterion not in needs_data:
    raise ValueError(f"criterion must be one of {['magnitude', 'taylor', *needs_data]}, "
                     f"got {criterion!r}")
  check_batch(batch, needs_data[criterion])
  if loss_fn is None:
    raise ValueError(f"loss_fn: the {needs_data[criterion]} score needs a loss_fn(params, batch)")
  if criterion == "snip":
    return lambda x: snip_scores(x.params, loss_fn, batch)
  if criterion == "grasp":
    return lambda x: jax.tree.map(jnp.negative, grasp_scores(x.params, loss_fn, batch))
  if criterion == "obd":
    return lambda x: obd_scores(x.params, loss_fn, batch)
  if key is None:
    raise ValueError("key: criterion='obd_hutchinson' needs a PRNG key")
  return lambda x: obd_scores(x.params, loss_fn, batch, curvature="hutchinson",
                              key=jax.random.fold_in(key, x.step), num_samples=num_samples)


def score_pruning(inner: optax.GradientTransformation, sparsity: float, score_fn: ScoreFn, *,
                  prune_steps: Sequence[int] = (0,), scope: str = "local",
                  distribution: dist.Distribution = "uniform",
                  filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                  overrides: Mapping[str, float] | None = None,
                  sparsity_schedule: schedules.Schedule | None = None, seed: int = 0
                  ) -> optax.GradientTransformationExtraArgs:
  """Pruning with any criterion: at each of ``prune_steps`` keep the highest ``score_fn(x)``.

  One-shot by default (``prune_steps=(k,)``, pruning straight to ``sparsity``).
  Iterative: several steps, with ``sparsity_schedule(step)`` giving the target
  at each (e.g. :func:`jaxsparse.core.schedules.polynomial_sparsity`); masks only
  ever lose weights. ``score_fn`` sees the step's ``MaskUpdateInputs``
  (masked params, the step's dense gradient), see :func:`batch_score_fn`.
  """
  _check_scope(scope)
  s_f = dist.check_sparsity(sparsity)
  if not callable(score_fn):
    raise ValueError(f"score_fn must be a callable MaskUpdateInputs -> scores, got {score_fn!r}")
  prune_steps = tuple(prune_steps)
  if not prune_steps:
    raise ValueError("prune_steps must name at least one step")
  sched = sparsity_schedule if sparsity_schedule is not None else (lambda step: jnp.float32(s_f))
  return magnitude.score_transform(
      inner, sched, s_f, schedules.at_steps(*prune_steps), score_fn, scope=scope,
      distribution=distribution, filter=filter, keep_dense=keep_dense, overrides=overrides,
      seed=seed, sparsity_name="sparsity")
