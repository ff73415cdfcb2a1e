"""Exact-count selection of the k smallest / largest scores, with a traced k.

Mask updates need "the k smallest |w| among the active weights" where k is
often only known on device (it depends on the step, or on how many weights
are positive). :func:`smallest_k_mask` answers that in O(n) passes instead of
a full sort: it finds the k-th value by a two-pass radix select (histograms of
the high and then the low 16 bits of each float32 score's order-preserving
integer key), takes every score below it and breaks ties at it by lower flat
index, so exactly
``min(k, count(valid))`` entries are selected.

:func:`top_k_mask` does the same with ``jax.lax.top_k`` when k is a static
Python int; both agree exactly, including on ties (lower index first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


_BINS = 1 << 16


def _order_key(x: jax.Array) -> jax.Array:
  """Maps float32 to uint32 so that unsigned order equals float order (-0.0 < +0.0)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  sign = bits >> 31
  return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def _check_k(k, n: int) -> None:
  """A concrete k must lie in [0, n]; a traced k is clipped to [0, count(valid)]."""
  if isinstance(k, (int, np.integer)) and not 0 <= int(k) <= n:
    raise ValueError(f"k must be in [0, {n}], got {k}")


def _per_element(values: jax.Array, group: jax.Array) -> jax.Array:
  """``values[group]`` for a small static number of groups, by selects (no gather)."""
  out = jnp.broadcast_to(values[0], group.shape)
  for g in range(1, values.shape[0]):
    out = jnp.where(group == g, values[g], out)
  return out


def _kth_keys(key: jax.Array, group: jax.Array, ok: jax.Array, k: jax.Array,
              num_groups: int) -> jax.Array:
  """Per group g, the smallest uint32 ``t_g`` with ``count(ok & group == g & key <= t_g) >= k[g]``.

  A two-pass radix select: pass 1 histograms the high 16 bits of the valid
  keys (one 65536-bin histogram per group, filled by one scatter-add) and
  finds the bucket holding each group's k-th key; pass 2 histograms the low
  16 bits inside those buckets.
  """
  ones = ok.astype(jnp.int32)
  hi = (key >> 16).astype(jnp.int32)
  offset = 0 if num_groups == 1 else group * _BINS
  h1 = jnp.zeros(num_groups * _BINS, jnp.int32).at[offset + hi].add(ones, mode="promise_in_bounds")
  h1 = h1.reshape(num_groups, _BINS)
  c1 = jnp.cumsum(h1, axis=1)
  b = jax.vmap(lambda c, kk: jnp.searchsorted(c, kk, side="left"))(c1, k)
  b = jnp.clip(b, 0, _BINS - 1)
  rows = jnp.arange(num_groups)
  need = k - (c1[rows, b] - h1[rows, b])
  lo = (key & 0xFFFF).astype(jnp.int32)
  in_bucket = ones * (hi == _per_element(b, group))
  h2 = jnp.zeros(num_groups * _BINS, jnp.int32).at[offset + lo].add(in_bucket, mode="promise_in_bounds")
  c2 = jnp.cumsum(h2.reshape(num_groups, _BINS), axis=1)
  l = jnp.clip(jax.vmap(lambda c, kk: jnp.searchsorted(c, kk, side="left"))(c2, need), 0, _BINS - 1)
  return (b.astype(jnp.uint32) << 16) | l.astype(jnp.uint32)


def smallest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                    ) -> jax.Array:
  """Boolean mask of the ``k`` smallest ``scores`` among ``valid`` entries.

  Exactly ``min(k, count(valid))`` entries are True; ties at the threshold go
  to the lower flat (row-major) index. ``k`` may be traced. NaN scores are
  never valid. Cost: two histogram passes over ``scores`` (a cumsum more when
  there are ties at the threshold).
  """
  _check_k(k, scores.size)
  x = scores.reshape(-1)
  ok = ~jnp.isnan(x) if valid is None else valid.reshape(-1) & ~jnp.isnan(x)
  group = jnp.zeros(x.shape, jnp.int32)
  return _select_smallest(_order_key(x), group, ok, jnp.reshape(k, (1,)), 1).reshape(scores.shape)


def smallest_k_per_group(scores: jax.Array, groups: jax.Array, k: jax.Array,
                         valid: jax.Array | None = None) -> jax.Array:
  """The ``k[g]`` smallest ``scores`` within each group ``g`` (``groups`` int in [0, len(k))).

  Same exactness and tie rule as :func:`smallest_k_mask`, for all groups in the
  same two passes (e.g. SET's positive and negative sides at once).
  """
  x = scores.reshape(-1)
  ok = ~jnp.isnan(x) if valid is None else valid.reshape(-1) & ~jnp.isnan(x)
  return _select_smallest(_order_key(x), groups.reshape(-1).astype(jnp.int32), ok,
                          jnp.asarray(k, jnp.int32), len(k)).reshape(scores.shape)


def _select_smallest(key: jax.Array, group: jax.Array, ok: jax.Array, k: jax.Array,
                     num_groups: int) -> jax.Array:
  """Flat mask of the ``k[g]`` smallest uint32 ``key`` among ``ok`` in each group (ties: lower index)."""
  def per_group_sum(x):  # G is small and static: G cheap reductions beat a scatter
    if num_groups == 1:
      return jnp.sum(x, dtype=jnp.int32)[None]
    return jnp.stack([jnp.sum(x & (group == g), dtype=jnp.int32) for g in range(num_groups)])

  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, per_group_sum(ok))
  t = _kth_keys(key, group, ok, k, num_groups)
  t = _per_element(t, group)
  below = ok & (key < t)
  at = ok & (key == t)
  need = k - per_group_sum(below)
  n_at = per_group_sum(at)

  def break_ties():  # rank of each tie within its group, by flat index
    one_hot = at[:, None] & (group[:, None] == jnp.arange(num_groups))
    rank = jnp.take_along_axis(jnp.cumsum(one_hot, axis=0, dtype=jnp.int32), group[:, None], 1)[:, 0]
    return at & (rank <= _per_element(need, group))

  # Ties at the threshold are rare: only then pay for a cumsum over n.
  take_at = lax.cond(jnp.all(n_at <= need), lambda: at, break_ties)
  return (below | take_at) & (_per_element(k, group) > 0)


def largest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                   ) -> jax.Array:
  """Boolean mask of the ``k`` largest ``scores`` among ``valid`` (ties: lower index first)."""
  return smallest_k_mask(-scores.astype(jnp.float32), k, valid)


def top_k_mask(scores: jax.Array, k: int, valid: jax.Array | None = None) -> jax.Array:
  """Static-k variant of :func:`largest_k_mask` with ``jax.lax.top_k``.

  Invalid entries are never chosen; if fewer than ``k`` are valid, only the
  valid ones are returned. Ties at equal score go to the lower flat index.
  """
  if not isinstance(k, int) or k < 0 or k > scores.size:
    raise ValueError(f"k must be a static int in [0, {scores.size}], got {k!r}")
  x = scores.reshape(-1).astype(jnp.float32)
  ok = ~jnp.isnan(x) if valid is None else valid.reshape(-1) & ~jnp.isnan(x)
  if k == 0:
    return jnp.zeros(scores.shape, bool)
  # Rank invalid entries below every valid one while keeping their relative order.
  key = _order_key(x).astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)
  _, idx = lax.top_k(jnp.where(ok, key, 0), k)
  out = jnp.zeros(x.shape, bool).at[idx].set(True) & ok
  return out.reshape(scores.shape)


def random_k_mask(key: jax.Array, k: jax.Array | int, valid: jax.Array) -> jax.Array:
  """Exactly ``min(k, count(valid))`` entries of ``valid``, uniformly at random without replacement.

  Each valid entry draws 32 random bits; the k smallest are taken (equal draws,
  probability ~n/2^32 per pair, go to the lower index).
  """
  _check_k(k, valid.size)
  bits = jax.random.bits(key, (valid.size,), jnp.uint32)
  group = jnp.zeros((valid.size,), jnp.int32)
  return _select_smallest(bits, group, valid.reshape(-1), jnp.reshape(k, (1,)), 1).reshape(valid.shape)


def random_k_positions(key: jax.Array, k: jax.Array, allowed: jax.Array, size: int) -> jax.Array:
  """``size`` int32 slots: the first ``k`` hold distinct uniformly random flat indices of ``allowed``.

  Slots from ``k`` on hold ``allowed.size`` (an out-of-range filler). Exactly
  ``min(k, count(allowed))`` distinct positions, uniformly at random without
  replacement. Fast path: rejection sampling with ``2 * size + 1024`` uniform
  draws over the flat index range, keeping the first ``k`` draws that are
  allowed and not repeated (the first k distinct allowed draws of an i.i.d.
  uniform sequence are a uniform k-subset); it costs O(size) work plus one
  O(n) fill. When the draws hold fewer than ``k`` such positions (rare unless
  ``allowed`` is sparse), it falls back to :func:`random_k_mask` (O(n) passes),
  under ``lax.cond``.
  """
  n = allowed.size
  flat = allowed.reshape(-1)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, jnp.minimum(size, jnp.sum(flat, dtype=jnp.int32)))
  draws = min(2 * size + 1024, 4 * n)
  order = jnp.arange(draws, dtype=jnp.int32)
  c = jax.random.randint(key, (draws,), 0, n, jnp.int32)
  first = jnp.full((n,), draws, jnp.int32).at[c].min(order)[c] == order
  ok = first & flat[c]
  rank = jnp.cumsum(ok, dtype=jnp.int32)

  def fast():
    slot = jnp.where(ok & (rank <= k), rank - 1, size)
    return jnp.full((size,), n, jnp.int32).at[slot].set(c, mode="drop")

  def exact():
    chosen = random_k_mask(jax.random.fold_in(key, 1), k, allowed).reshape(-1)
    return jnp.nonzero(chosen, size=size, fill_value=n)[0].astype(jnp.int32)

  return lax.cond(rank[-1] >= k, fast, exact)
