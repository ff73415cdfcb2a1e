"""Trained quantization by weight sharing (Han, Mao & Dally 2016, "Deep Compression", ICLR).

Each selected leaf's kept (non-zero, or ``masks``-kept) weights are clustered by 1-D k-means
into ``2**bits`` clusters (Sec. 3.1), with centroids initialised linearly between the min and
max kept weight (Sec. 3.2: linear initialisation keeps the rare large weights, which matter
most, and works best in the paper). Every kept weight is then replaced by its centroid, and
fine-tuning updates the centroids only: the gradient of a centroid is the sum of the gradients
of the weights in its cluster (Sec. 3.3, Eq. 3, Fig. 3). :func:`weight_sharing` does that as an
optax transform; pruned weights stay exactly zero.

    tx = weight_sharing(optax.sgd(1e-3, momentum=0.9))     # 8 bits conv, 5 bits fc (Sec. 3)
    state = tx.init(pruned_params)                          # k-means on the kept weights
    params = share_weights(pruned_params, state)            # weights <- their centroids
    ... train with tx: every kept weight stays equal to its (moving) centroid ...

Storage of the result (codebook, cluster indices, relative positions, Huffman coding) is in
:mod:`jaxsparse.analysis.compression`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib

CONV_BITS = 8
"""Paper's default cluster-index bits for conv kernels (Sec. 3, 256 shared weights)."""
FC_BITS = 5
"""Paper's default cluster-index bits for fully connected kernels (Sec. 3, 32 shared weights)."""

Bits = int | Mapping[str, int] | Callable[[str, Any], int] | None


class WeightSharingState(NamedTuple):
  """``indices``: per leaf, the int32 cluster of every weight (-1 where pruned; a scalar -1
  for leaves that are not shared); ``centroids``: per leaf, the ``2**bits`` float32 shared
  values (shape ``(0,)`` for leaves that are not shared); ``inner_state``: the inner
  optimizer's state over the tree of centroids (shared leaves) and params (the others)."""
  indices: Any
  centroids: Any
  inner_state: optax.OptState


def default_bits(name: str, leaf: Any) -> int:
  """The paper's bits for a leaf (Sec. 3): 8 for conv kernels (rank 4), 5 otherwise."""
  del name
  return CONV_BITS if jnp.ndim(leaf) == 4 else FC_BITS


def _check_int(value: Any, argname: str, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{argname} must be an integer >= {minimum}, got {value!r}")
  return value


def leaf_bits(bits: Bits, name: str, leaf: Any) -> int:
  """Resolves ``bits`` (None: :func:`default_bits`; an int; a mapping name -> bits, where a
  missing name takes the default; or a callable ``(name, leaf) -> bits``) for one leaf.

  Raises:
    ValueError: naming ``bits`` (and the leaf) when a value is not an integer >= 1 or > 16.
  """
  if bits is None:
    b = default_bits(name, leaf)
  elif callable(bits):
    b = bits(name, leaf)
  elif isinstance(bits, Mapping):
    b = bits.get(name, default_bits(name, leaf))
  else:
    b = bits
  where = f"bits['{name}']" if isinstance(bits, Mapping) or callable(bits) else "bits"
  if isinstance(b, bool) or not isinstance(b, int) or b < 1:
    raise ValueError(f"{where} must be >= 1, got {b!r}")
  if b > 16:  # 2**b centroids are held densely; more than 65536 is no longer a codebook
    raise ValueError(f"{where} must be <= 16, got {b!r}")
  return b


def kmeans_1d(weights: jax.Array, kept: jax.Array, num_clusters: int, *,
              iterations: int = 30) -> tuple[jax.Array, jax.Array]:
  """1-D k-means of the ``kept`` entries of ``weights`` (Deep Compression Sec. 3.1, Eq. 1).

  Centroids start evenly spaced over ``[min, max]`` of the kept weights (linear
  initialisation, Sec. 3.2); each of the ``iterations`` Lloyd steps assigns every kept
  weight to its nearest centroid and moves each centroid to its cluster's mean. A cluster
  left empty takes the kept weight farthest from its centroid, so that ``num_clusters``
  clusters stay in use whenever the kept weights hold at least that many distinct values.
  Returns ``(centroids[num_clusters] float32, indices int32)`` with ``indices`` of
  ``weights``' shape and -1 where not kept. Pure and jittable.

  Raises:
    ValueError: naming ``num_clusters`` or ``iterations`` when < 1.
  """
  _check_int(num_clusters, "num_clusters", 1)
  _check_int(iterations, "iterations", 1)
  w = jnp.asarray(weights, jnp.float32).ravel()
  kept = jnp.broadcast_to(jnp.asarray(kept, bool), jnp.shape(weights)).ravel()
  lo = jnp.min(jnp.where(kept, w, jnp.inf))
  hi = jnp.max(jnp.where(kept, w, -jnp.inf))
  any_kept = jnp.any(kept)
  lo, hi = jnp.where(any_kept, lo, 0.0), jnp.where(any_kept, hi, 0.0)
  k = num_clusters
  c0 = lo + (hi - lo) * jnp.arange(k, dtype=jnp.float32) / max(k - 1, 1)

  def assign(c):
    return jnp.argmin(jnp.abs(w[:, None] - c[None, :]), axis=1).astype(jnp.int32)

  def step(_, c):
    idx = assign(c)
    sums = jax.ops.segment_sum(jnp.where(kept, w, 0.0), idx, k)
    counts = jax.ops.segment_sum(kept.astype(jnp.float32), idx, k)
    c = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)
    # Empty clusters: the e-th one takes the e-th farthest kept weight (a standard k-means
    # repair; otherwise fewer than 2**b shared values would be used).
    err = jnp.where(kept, jnp.abs(w - c[assign(c)]), -jnp.inf)
    far = w[jax.lax.top_k(err, min(k, w.size))[1]]
    empty = counts == 0
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far.size - 1)
    repair = empty & (jnp.arange(k) < jnp.sum(kept))
    return jnp.where(repair, far[rank], c)

  c = jax.lax.fori_loop(0, iterations, step, c0)
  idx = assign(c)
  # Final centroids: the means of the final clusters (a cluster's weights all share its value).
  sums = jax.ops.segment_sum(jnp.where(kept, w, 0.0), idx, k)
  counts = jax.ops.segment_sum(kept.astype(jnp.float32), idx, k)
  c = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), c)
  return c, jnp.where(kept, idx, -1).reshape(jnp.shape(weights))


def cluster_gradients(grads: jax.Array, indices: jax.Array, num_clusters: int) -> jax.Array:
  """The gradient of each centroid: the sum of the gradients of its cluster's weights
  (Sec. 3.3, Eq. 3); entries with index -1 (pruned) are left out."""
  g = jnp.asarray(grads).ravel()
  idx = jnp.asarray(indices).ravel()
  # segment_sum drops ids outside [0, num_clusters), so pruned (-1) entries add nothing.
  return jax.ops.segment_sum(jnp.where(idx >= 0, g, 0.0), idx, num_clusters)


def _shared_flags(params: Any, filter: dist.LeafFilter | None) -> list[bool]:
  filt = dist.default_filter if filter is None else filter
  names, leaves, _ = masks_lib.flatten_named(params)
  return [bool(filt(n, p)) for n, p in zip(names, leaves)]


def _gather(centroids: jax.Array, indices: jax.Array, dtype: Any) -> jax.Array:
  """``centroids[indices]`` where kept, exactly 0 where pruned."""
  return jnp.where(indices >= 0, centroids[jnp.maximum(indices, 0)], 0).astype(dtype)


def share_weights(params: Any, state: WeightSharingState) -> Any:
  """``params`` with every shared leaf's kept weights set to their centroid and its pruned
  weights to 0 (call once after ``init``, as ``apply_masks`` after a method's init)."""
  state = _find_state(state)
  return jax.tree.map(lambda p, i, c: p if c.size == 0 else _gather(c, i, jnp.result_type(p)),
                      params, state.indices, state.centroids)


def _find_state(state: Any) -> WeightSharingState:
  if isinstance(state, WeightSharingState):
    return state
  for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, WeightSharingState)):
    if isinstance(s, WeightSharingState):
      return s
  raise ValueError("state: no WeightSharingState found (is it weight_sharing's state?)")


def weight_sharing(inner: optax.GradientTransformation, masks: Any = None, *,
                   bits: Bits = None, iterations: int = 30,
                   filter: dist.LeafFilter | None = None) -> optax.GradientTransformation:
  """Deep Compression's trained quantization (Han et al. 2016, Sec. 3) as an optax transform.

  ``init(params)`` runs :func:`kmeans_1d` on every leaf selected by ``filter`` (default: rank
  >= 2, the kernels) over its kept weights (``masks``, or the non-zero weights when ``masks``
  is None), with ``2**bits`` clusters (``bits``: see :func:`leaf_bits`; default 8 for conv
  kernels, 5 for the others, as in the paper). ``update`` sums the gradients per cluster
  (:func:`cluster_gradients`), lets ``inner`` update the centroids (and, as usual, the leaves
  that are not shared: biases), and returns updates that move every kept weight by its
  centroid's update and keep pruned weights at zero. Starting from :func:`share_weights`'
  params, every kept weight stays bit-equal to its centroid; from other params the update
  also pulls each kept weight to its centroid.

  Raises:
    ValueError: naming ``bits`` or ``iterations`` when invalid, or a leaf whose ``masks`` does
      not fit ``params``.
  """
  _check_int(iterations, "iterations", 1)
  if bits is not None and not callable(bits) and not isinstance(bits, Mapping):
    leaf_bits(bits, "", jnp.zeros(()))  # fail at construction for a bad int

  def init_fn(params):
    names, leaves, treedef = masks_lib.flatten_named(params)
    if masks is not None:
      masks_lib.check_masks(params, masks)
      mask_leaves = jax.tree.leaves(masks)
    else:
      mask_leaves = [p != 0 for p in leaves]
    flags = _shared_flags(params, filter)
    if isinstance(bits, Mapping):
      unknown = sorted(set(bits) - {n for n, f in zip(names, flags) if f})
      if unknown:  # a typo would silently fall back to the default bits
        raise ValueError(f"bits: {unknown} name no shared leaf; shared leaves are "
                         f"{[n for n, f in zip(names, flags) if f]}")
    indices, centroids = [], []
    for name, p, m, shared in zip(names, leaves, mask_leaves, flags):
      if not shared:
        indices.append(jnp.full((), -1, jnp.int32))
        centroids.append(jnp.zeros((0,), jnp.float32))
        continue
      c, i = kmeans_1d(p, m, 2 ** leaf_bits(bits, name, p), iterations=iterations)
      indices.append(i)
      centroids.append(c)
    indices = jax.tree.unflatten(treedef, indices)
    centroids = jax.tree.unflatten(treedef, centroids)
    inner_params = jax.tree.map(lambda p, c: p if c.size == 0 else c, params, centroids)
    return WeightSharingState(indices, centroids, inner.init(inner_params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: weight_sharing's update needs the params (they keep the biases "
                       "and correct kept weights that are off their centroid)")
    grads = jax.tree.map(
        lambda g, i, c: g if c.size == 0 else cluster_gradients(g, i, c.shape[0]),
        updates, state.indices, state.centroids)
    inner_params = jax.tree.map(lambda p, c: p if c.size == 0 else c, params, state.centroids)
    inner_updates, inner_state = inner.update(grads, state.inner_state, inner_params)
    new_centroids = jax.tree.map(lambda c, u: c if c.size == 0 else c + u.astype(c.dtype),
                                 state.centroids, inner_updates)

    def weight_update(p, u, i, c):
      if c.size == 0:
        return u
      du = _gather(u, i, jnp.float32)
      # (old centroid - p) is exactly 0 for a weight on its centroid, so then p + update is
      # bit-equal to the new centroid (c + u, computed the same way above).
      off = _gather(c, i, jnp.float32) - p.astype(jnp.float32)
      return jnp.where(i >= 0, du + off, -p.astype(jnp.float32)).astype(jnp.result_type(p))

    out = jax.tree.map(weight_update, params, inner_updates, state.indices, state.centroids)
    return out, WeightSharingState(state.indices, new_centroids, inner_state)

  return optax.GradientTransformation(init_fn, update_fn)
