"""Ephemeral sparsity: sparse gradients with error feedback, sparse activations.

* :func:`topk_gradients`: an optax transform that sends only the ``k``
  largest-magnitude entries of ``g + residual`` (per leaf, or over all leaves
  together) and keeps the rest as the residual for the next step (error
  feedback / memory: Strom 2015; Aji & Heafield 2017; Lin et al. 2018 "Deep
  Gradient Compression"; Stich et al. 2018). Nothing is lost: after ``T`` steps
  ``sum_t sent_t + residual_T == sum_t g_t``. :func:`communication_bytes`
  gives the bytes one step would send (values plus int32 indices) against the
  dense gradient.
* :func:`activation_sparsity`: the fraction of exactly-zero entries in the
  input of every layer with a ``kernel`` (Dense, Conv, ...) of a flax.linen
  model, measured with ``flax.linen.intercept_methods`` without changing the
  model (the input of layer ``l + 1`` is the activation of layer ``l``).
* :class:`TopKActivation` / :class:`TopKActivationNNX`: keep the ``k``
  largest activations of each example (k-winners-take-all) and zero the rest.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsparse.core import masks as masks_lib
from jaxsparse.core import selection as topk

INDEX_BYTES = 4
"""Bytes per transmitted index (int32)."""


class TopKGradientState(NamedTuple):
  """State of :func:`topk_gradients`.

  Attributes:
    count: number of steps so far.
    residual: the error-feedback memory, the entries not sent so far (params' shape).
  """
  count: jax.Array
  residual: optax.Updates


def _check_k(k: int | None, fraction: float | None, scope: str) -> None:
  if scope == "leaf":  # this module's old name for "local" (one scope vocabulary now)
    warnings.warn('scope="leaf" is deprecated: use scope="local" (the same: each leaf on its '
                  'own)', DeprecationWarning, stacklevel=3)
  else:
    masks_lib.check_scope(scope)
  if (k is None) == (fraction is None):
    raise ValueError(f"give exactly one of k and fraction, got k={k!r}, fraction={fraction!r}")
  if k is not None and (isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0):
    raise ValueError(f"k must be a positive int, got {k!r}")
  if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
                               or not 0.0 < fraction <= 1.0):
    raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")


def kept_per_leaf(params: Any, k: int | None = None, fraction: float | None = None,
                  scope: str = "local") -> list[int] | int:
  """The static number of sent entries: a list per leaf (``"local"``) or one int (``"global"``).

  With ``fraction``, a leaf (or the whole tree) of size n sends ``ceil(fraction * n)``.
  Raises ValueError (naming the leaf) when ``k`` exceeds a leaf's (or the tree's) size.
  """
  _check_k(k, fraction, scope)
  names = masks_lib.leaf_names(params)
  sizes = [int(np.prod(jnp.shape(p))) for p in jax.tree.leaves(params)]
  if scope == "global":
    n = sum(sizes)
    kk = k if k is not None else math.ceil(fraction * n)
    if kk > n:
      raise ValueError(f"k={kk} is larger than the {n} entries of all leaves together")
    return kk
  out = []
  for name, n in zip(names, sizes):
    kk = k if k is not None else math.ceil(fraction * n)
    if kk > n:
      raise ValueError(f"k={kk} is larger than leaf '{name}' ({n} entries); use fraction= or "
                       "scope='global'")
    out.append(kk)
  return out


class CommunicationBytes(NamedTuple):
  """Bytes per step: sparse (values + int32 indices) and the dense gradient."""
  sparse: int
  dense: int

  @property
  def ratio(self) -> float:
    return self.dense / self.sparse if self.sparse else float("inf")


def communication_bytes(params: Any, k: int | None = None, fraction: float | None = None,
                        scope: str = "local", index_bytes: int = INDEX_BYTES) -> CommunicationBytes:
  """What one step of :func:`topk_gradients` would communicate, in bytes.

  Each sent entry costs its value (the leaf's itemsize) plus an ``index_bytes``
  index; the dense gradient costs every value.
  """
  kept = kept_per_leaf(params, k, fraction, scope)
  leaves = jax.tree.leaves(params)
  items = [jnp.dtype(jnp.result_type(p)).itemsize for p in leaves]
  dense = sum(int(np.prod(jnp.shape(p))) * s for p, s in zip(leaves, items))
  if scope == "global":
    sparse = kept * (max(items) + index_bytes)
  else:
    sparse = sum(kk * (s + index_bytes) for kk, s in zip(kept, items))
  return CommunicationBytes(int(sparse), int(dense))


def topk_gradients(k: int | None = None, *, fraction: float | None = None, scope: str = "local",
                   error_feedback: bool = True) -> optax.GradientTransformation:
  """Top-k gradient sparsification with error feedback, as an optax transform.

  Each step ``a = g + residual``; the ``k`` largest ``|a|`` (per leaf, or over
  all leaves with ``scope="global"``; ties to the lower index) are passed on,
  the rest is kept: ``residual <- a - sent``. Put it first in the chain (it
  models what a worker would send): ``optax.chain(topk_gradients(...), optax.sgd(lr))``.
  With ``error_feedback=False`` the rest is dropped (residual stays 0).

  Args:
    k: entries sent per leaf (``"local"``) or in total (``"global"``).
    fraction: alternatively the fraction of entries sent.
    scope: ``"local"`` or ``"global"`` (:data:`jaxsparse.core.masks.SCOPES`).
    error_feedback: keep the unsent entries for the next step.
  """
  _check_k(k, fraction, scope)

  def init_fn(params):
    kept_per_leaf(params, k, fraction, scope)  # errors early: k larger than a leaf
    return TopKGradientState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    kept = kept_per_leaf(updates, k, fraction, scope)
    acc = jax.tree.map(lambda g, r: g + r.astype(g.dtype), updates, state.residual)
    leaves, treedef = jax.tree.flatten(acc)
    if scope == "global":
      flat = jnp.concatenate([jnp.abs(x).reshape(-1).astype(jnp.float32) for x in leaves])
      keep = topk.top_k_mask(flat, kept)
      offsets = np.cumsum([0] + [x.size for x in leaves])
      masks = [keep[offsets[i]:offsets[i + 1]].reshape(x.shape) for i, x in enumerate(leaves)]
    else:
      masks = [topk.top_k_mask(jnp.abs(x), kk) for x, kk in zip(leaves, kept)]
    sent = [jnp.where(m, x, jnp.zeros_like(x)) for x, m in zip(leaves, masks)]
    residual = [jnp.where(m, jnp.zeros_like(x), x) if error_feedback else jnp.zeros_like(x)
                for x, m in zip(leaves, masks)]
    return (jax.tree.unflatten(treedef, sent),
            TopKGradientState(optax.safe_int32_increment(state.count),
                              jax.tree.unflatten(treedef, residual)))

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ activations


def _has_kernel(module: nn.Module) -> bool:
  return module.has_variable("params", "kernel")


def activation_sparsity(model: nn.Module, variables: Any, x: Any, *, batch_size: int = 1000,
                        **apply_kwargs: Any) -> dict[str, float]:
  """Fraction of exactly-zero entries in the input of every kernel layer, over ``x``.

  Layers are named by their module path (e.g. ``"fc2"``); a layer called
  several times reports the mean over its calls. ``apply_kwargs`` go to
  ``model.apply`` (e.g. ``train=False``, ``rngs=...``).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

  @jax.jit
  def counts(variables, xb):
    found: dict[str, list] = {}

    def interceptor(next_fun, args, kwargs, context):
      if (context.method_name == "__call__" and args and _has_kernel(context.module)
          and hasattr(args[0], "shape")):
        name = "/".join(context.module.path)
        found.setdefault(name, []).append(
            (jnp.sum(args[0] == 0, dtype=jnp.float32), jnp.float32(np.prod(args[0].shape))))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, xb, **apply_kwargs)
    return {n: (sum(z for z, _ in v), sum(t for _, t in v)) for n, v in found.items()}

  zeros: dict[str, float] = {}
  totals: dict[str, float] = {}
  for i in range(0, len(x), batch_size):
    for name, (z, t) in counts(variables, x[i:i + batch_size]).items():
      zeros[name] = zeros.get(name, 0.0) + float(z)
      totals[name] = totals.get(name, 0.0) + float(t)
  return {n: zeros[n] / totals[n] for n in zeros}


def topk_activation(x: jax.Array, k: int) -> jax.Array:
  """Keeps the ``k`` largest entries of each row (last axis) and zeroes the rest (ties: lower index)."""
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
    raise ValueError(f"k must be a positive int, got {k!r}")
  n = x.shape[-1]
  if k > n:
    raise ValueError(f"k={k} is larger than the {n} features on the last axis")
  if k == n:
    return x
  _, idx = jax.lax.top_k(x, k)
  keep = jnp.put_along_axis(jnp.zeros(x.shape, bool), idx, True, axis=-1, inplace=False)
  return jnp.where(keep, x, jnp.zeros_like(x))


class TopKActivation(nn.Module):
  """k-winners-take-all: keep the ``k`` largest activations per example (last axis)."""

  k: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return topk_activation(x, self.k)


class TopKActivationNNX(nnx.Module):
  """nnx twin of :class:`TopKActivation`."""

  def __init__(self, k: int):
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
      raise ValueError(f"k must be a positive int, got {k!r}")
    self.k = int(k)

  def __call__(self, x: jax.Array) -> jax.Array:
    return topk_activation(x, self.k)



