"""Dropout on the weights as ephemeral sparsity: DropConnect and targeted dropout.

Both are pure functions ``(params, key, ...) -> params`` to call inside the loss, on the
params the forward pass uses: a fresh sparse pattern is drawn every step, the gradient of a
dropped weight is zero for that step, and the stored params stay dense. They act on the leaves
that the methods make sparse: ``filter(name, leaf) -> bool`` (default: rank >= 2, dense and conv
kernels) and ``keep_dense`` (:func:`jaxsparse.core.distributions.leaf_flags`); other leaves
pass through unchanged. A kernel's last axis indexes its output units (columns), the other axes
are its fan-in::

  def loss_fn(params, x, y, key):
    dropped = targeted_dropout(params, key, gamma=0.9, alpha=0.5)
    return cross_entropy(net.apply({"params": dropped}, x), y)

* :func:`drop_connect` (Wan et al. 2013, "Regularization of Neural Networks using
  DropConnect", sec. 2-3): every weight is kept with probability ``1 - rate`` (``r = a((M * W)
  v)``, ``M_ij ~ Bernoulli(1 - rate)``). ``rescale=True`` (default) divides the kept weights
  by ``1 - rate`` (inverted dropout), so evaluation uses the plain weights; ``rescale=False``
  is the paper's training form, whose evaluation (sec. 3.2: a Gaussian moment-matched to the
  pre-activation, mean ``(1 - rate) W v``) needs the weights scaled by ``1 - rate``.
* :func:`targeted_dropout` (Gomez et al. 2019, "Learning Sparse Networks Using Targeted
  Dropout", sec. 3): the targeting proportion ``gamma`` of lowest-magnitude weights (or units)
  are candidates, and each candidate is dropped with probability ``alpha``; the others are
  never dropped and nothing is rescaled (as the paper's dropout on the targeted set). Weight
  granularity targets, in each column, the ``floor(gamma * fan_in)`` weights of smallest
  ``|w|`` (the paper's per-unit magnitude pruning); unit granularity targets the ``floor(gamma
  * n_out)`` columns of smallest L2 norm and drops a whole column. Ties go to the lower
  index. :func:`targeting_masks` gives the candidates; pruning them (or magnitude pruning at
  ``gamma``) after training is what targeted dropout prepares the network for.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxsparse.core import distributions as dist

GRANULARITIES = ("weight", "unit")
"""What targeted dropout targets: single weights (per column) or whole units (columns)."""


def _check_fraction(value: Any, name: str, *, open_right: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
  v = float(value)
  if math.isnan(v) or v < 0.0 or v > 1.0 or (open_right and v == 1.0):
    raise ValueError(f"{name} must be in [0, {'1)' if open_right else '1]'}, got {value!r}")
  return v


def _check_granularity(granularity: str) -> None:
  if granularity not in GRANULARITIES:
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def _check_key(key: Any) -> None:
  if not isinstance(key, jax.Array):
    raise TypeError(f"key must be a jax.random key, got {type(key).__name__}")


def _columns(leaf: jax.Array) -> jax.Array:
  """The leaf as ``[fan_in, n_out]`` (a vector is one column)."""
  return leaf.reshape(-1, 1) if leaf.ndim < 2 else leaf.reshape(-1, leaf.shape[-1])


def _floor(fraction: float, n: int) -> int:
  # round() first: 0.7 * 10 is 7.000000000000001 and 0.57 * 100 is 56.99999999999999.
  return int(math.floor(round(fraction * n, 9)))


def _leaf_candidates(leaf: jax.Array, gamma: float, granularity: str) -> jax.Array:
  w = jax.lax.stop_gradient(_columns(leaf))
  fan_in, n_out = w.shape
  if granularity == "weight":
    k = _floor(gamma, fan_in)
    mask = jnp.zeros((n_out, fan_in), bool)
    if k:
      _, idx = jax.lax.top_k(-jnp.abs(w.T), k)            # k smallest |w| of each column
      mask = jnp.put_along_axis(mask, idx, True, axis=1, inplace=False)
    mask = mask.T
  else:
    k = _floor(gamma, n_out)
    units = jnp.zeros(n_out, bool)
    if k:
      _, idx = jax.lax.top_k(-jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=0)), k)
      units = units.at[idx].set(True)
    mask = jnp.broadcast_to(units, w.shape)
  return mask.reshape(leaf.shape)


def _flags(params: Any, filter: dist.LeafFilter | None, keep_dense: Sequence[str]) -> list[bool]:
  if filter is not None and not callable(filter):
    raise TypeError(f"filter must be a callable (name, leaf) -> bool, got {filter!r}")
  return dist.leaf_flags(params, filter=filter, keep_dense=keep_dense)


def targeting_masks(params: Any, gamma: float, *, granularity: str = "weight",
                    filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()) -> Any:
  """The candidates of targeted dropout (Gomez et al. 2019, sec. 3): True = targeted.

  A selected leaf's mask has its shape: in each column the ``floor(gamma * fan_in)`` smallest
  ``|w|`` (``granularity="weight"``) or the ``floor(gamma * n_out)`` columns of smallest L2 norm
  (``"unit"``); other leaves get the scalar False.
  """
  gamma = _check_fraction(gamma, "gamma")
  _check_granularity(granularity)
  leaves, treedef = jax.tree.flatten(params)
  flags = _flags(params, filter, keep_dense)
  return jax.tree.unflatten(treedef, [
      _leaf_candidates(jnp.asarray(p), gamma, granularity) if f else jnp.asarray(False)
      for p, f in zip(leaves, flags)])


def targeted_dropout(params: Any, key: jax.Array, gamma: float, alpha: float, *,
                     granularity: str = "weight", filter: dist.LeafFilter | None = None,
                     keep_dense: Sequence[str] = ()) -> Any:
  """Targeted dropout (Gomez et al. 2019, sec. 3): drops each candidate of
  :func:`targeting_masks` with probability ``alpha`` (a whole column for ``"unit"``); returns
  the params with the dropped weights set to zero (no rescaling). ``alpha=0`` or ``gamma=0``
  returns ``params`` unchanged.
  """
  _check_fraction(gamma, "gamma")
  _check_granularity(granularity)
  alpha = _check_fraction(alpha, "alpha")
  _check_key(key)
  if alpha == 0.0:
    _flags(params, filter, keep_dense)  # still reports a bad filter or keep_dense
    return params
  candidates = targeting_masks(params, gamma, granularity=granularity, filter=filter,
                               keep_dense=keep_dense)
  leaves, treedef = jax.tree.flatten(params)
  cands = treedef.flatten_up_to(candidates)
  keys = jax.random.split(key, len(leaves))
  out = []
  for p, c, k in zip(leaves, cands, keys):
    if jnp.ndim(c) == 0:
      out.append(p)
      continue
    shape = jnp.shape(p)
    if granularity == "unit":  # one draw per unit, shared by its whole column
      shape = (1,) * (len(shape) - 1) + shape[-1:]
    drop = c & jax.random.bernoulli(k, alpha, shape)
    out.append(jnp.where(drop, jnp.zeros_like(p), p))
  return jax.tree.unflatten(treedef, out)


def drop_connect(params: Any, key: jax.Array, rate: float, *, rescale: bool = True,
                 filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()) -> Any:
  """DropConnect (Wan et al. 2013, sec. 2): each selected weight is zeroed with probability
  ``rate`` (``M ~ Bernoulli(1 - rate)``); with ``rescale`` the kept weights are divided by
  ``1 - rate`` (inverted dropout: evaluate with the plain weights). ``rate=0`` is the identity.
  """
  rate = _check_fraction(rate, "rate", open_right=True)
  _check_key(key)
  leaves, treedef = jax.tree.flatten(params)
  flags = _flags(params, filter, keep_dense)
  if rate == 0.0:
    return params
  keys = jax.random.split(key, len(leaves))
  out = []
  for p, f, k in zip(leaves, flags, keys):
    if not f:
      out.append(p)
      continue
    keep = jax.random.bernoulli(k, 1.0 - rate, jnp.shape(p))
    kept = p / (1.0 - rate) if rescale else p
    out.append(jnp.where(keep, kept, jnp.zeros_like(p)).astype(jnp.result_type(p)))
  return jax.tree.unflatten(treedef, out)
