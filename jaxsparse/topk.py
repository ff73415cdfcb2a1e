"""Exact-count selection of the k smallest / largest scores, with a traced k.

Mask updates need "the k smallest |w| among the active weights" where k is
often only known on device (it depends on the step, or on how many weights
are positive). :func:`smallest_k_mask` answers that in O(n) passes instead of
a full sort: it finds the k-th value by a two-pass radix select (histograms of
the high and then the low 16 bits of each float32 score's order-preserving
integer key), takes every score below it and breaks ties at it by lower flat
index, so exactly
``min(k, count(valid))`` entries are selected. :func:`smallest_k_masks` /
:func:`largest_k_masks` select over several arrays at once (a global
criterion over many leaves) with the same result as on their concatenation.

No selection flattens or concatenates its inputs: the histograms are filled
from arrays of any shape, and ties at the threshold are broken by one more
radix select, on the flat indices (built from iotas). So under ``jax.jit`` a
sharded input gives a mask with the same sharding, and the devices exchange
only the 65536-bin histograms and a few counts (XLA inserts the all-reduces).

:func:`top_k_mask` does the same with ``jax.lax.top_k`` when k is a static
Python int; both agree exactly, including on ties (lower index first).
"""

from __future__ import annotations

from typing import Sequence

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


def _per_element(values: jax.Array, group: jax.Array | None) -> jax.Array:
  """``values[group]`` for a small static number of groups, by selects (no gather).

  ``group=None`` means a single group: ``values[0]``, broadcasting.
  """
  if group is None:
    return values[0]
  out = jnp.broadcast_to(values[0], group.shape)
  for g in range(1, values.shape[0]):
    out = jnp.where(group == g, values[g], out)
  return out


def _histogram(digits: list[jax.Array], groups: list, weights: list[jax.Array],
               num_groups: int) -> jax.Array:
  """int32[G, 65536]: ``weights`` summed per (group, 16-bit digit), one scatter-add per array.

  The arrays keep their shapes (no flattening), so sharded inputs stay sharded;
  under SPMD each device fills the histogram of its shard and XLA adds them.
  """
  h = jnp.zeros(num_groups * _BINS, jnp.int32)
  for d, g, w in zip(digits, groups, weights):
    h = h.at[d if g is None else g * _BINS + d].add(w, mode="promise_in_bounds")
  return h.reshape(num_groups, _BINS)


# Backend-specific lowering choices live here, behind :func:`cpu_or_default`, and nowhere
# else. On CPU, counts and prefix sums are int32 dots and associative scans: XLA on CPU
# lowers a cumsum to a tree of reduce-windows and a large sum to a reduce-window plus a
# reduce, each with its own reduction computation, and PjRt's CPU client makes a small
# aligned allocation at every call for every value of every such computation in the
# program, in taken branches or not (~0.2 us each; SET's never-taken update branch held
# ~1,400 of them on LeNet-300-100: ~0.3 ms on each 2 ms step). On GPU and TPU those dots
# would be wrong: XLA runs an integer dot on floating-point units, exact only below 2**24
# (global magnitude pruning kept 99,957,120 of 99,957,146 weights at 100M on an H200).
# There every count is a reduction and every prefix sum a cumsum, both exact in int32.


def cpu_or_default(cpu, default, *args):
  """``cpu(*args)`` when lowered for CPU, ``default(*args)`` for every other platform.

  The one switch for backend-specific lowering choices (``lax.platform_dependent``): a
  program lowered for one platform holds only that platform's branch, so neither side
  costs the other anything. Both must compute the same result exactly.
  """
  return lax.platform_dependent(*args, cpu=cpu, default=default)


def _prefix_sum(x: jax.Array) -> jax.Array:
  """Exact inclusive prefix sum along the last axis of an integer array."""
  return cpu_or_default(lambda x: lax.associative_scan(jnp.add, x, axis=x.ndim - 1),
                        lambda x: jnp.cumsum(x, axis=-1, dtype=x.dtype), x)


def _cpu_row_sum(x: jax.Array) -> jax.Array:
  # A dot with ones; XLA rewrites a one-row dot into a reduction, so a single row gets a
  # zero row added.
  lead = x.shape[:-1]
  if int(np.prod(lead)) == 1:
    x = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), jnp.int32)])
    return jnp.dot(x, jnp.ones(x.shape[-1], jnp.int32))[:1].reshape(lead)
  return jnp.dot(x, jnp.ones(x.shape[-1], jnp.int32))


def _row_sum(x: jax.Array) -> jax.Array:
  """Exact int32 sum along the last axis of an int or bool array of rank >= 2."""
  return cpu_or_default(_cpu_row_sum, lambda x: jnp.sum(x, axis=-1, dtype=jnp.int32),
                        x.astype(jnp.int32))


def _row_prefix_sum_256(x: jax.Array) -> jax.Array:
  """Exact inclusive prefix sums along 256-long int32 rows (the radix histograms' rows)."""
  # On CPU a dot with an upper-triangular matrix of ones (one op, no reduction computation).
  upper = (jnp.arange(256)[:, None] <= jnp.arange(256)[None, :]).astype(jnp.int32)
  return cpu_or_default(lambda x: jnp.dot(x, upper),
                        lambda x: jnp.cumsum(x, axis=-1, dtype=jnp.int32), x)


_DOT_COUNT_MAX = 1 << 16  # larger arrays: a reduction's fixed per-call cost is negligible


def _cpu_count(x: jax.Array) -> jax.Array:
  if x.size > _DOT_COUNT_MAX:
    return jnp.sum(x, dtype=jnp.int32)
  while x.ndim > 1:
    x = _cpu_row_sum(x)
  return _cpu_row_sum(x.reshape(1, -1))[0] if x.ndim == 1 else x


def count_true(x: jax.Array) -> jax.Array:
  """Exact int32 count of the True entries of a bool array (or sum of an int array).

  No flattening, so a sharded ``x`` stays sharded. On CPU, up to 65536 entries, as dots
  over the last axis one axis at a time (see :func:`cpu_or_default`); elsewhere a sum.
  """
  x = jnp.asarray(x)
  if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"x: count_true takes a bool or integer array, got dtype {x.dtype}")
  return cpu_or_default(_cpu_count, lambda x: jnp.sum(x, dtype=jnp.int32), x.astype(jnp.int32))


def _bucket_of_kth(h: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per row g of the histogram ``h[G, 65536]``, with ``k[g]`` clipped to ``[0, sum(h[g])]``:
  the first bucket ``b`` whose running count reaches it, the count in the buckets below
  ``b``, and the clipped ``k``.

  Two levels of 256 x 256 instead of one 65536-long prefix sum (cheaper on CPU). Within
  a level the bucket is the count of running sums below ``k`` (256 compares, not a
  ``searchsorted`` loop). The bucket is ``searchsorted(cumsum(h), k)``.
  """
  g = h.shape[0]
  rows = jnp.arange(g)
  hh = h.reshape(g, 256, 256)
  per_row = _row_sum(hh)
  c_row = _row_prefix_sum_256(per_row)
  k = jnp.clip(k, 0, c_row[:, 255])
  r = jnp.minimum(_row_sum(c_row < k[:, None]), 255)
  below_r = c_row[rows, r] - per_row[rows, r]
  within = hh[rows, r]
  c_in = _row_prefix_sum_256(within)
  j = jnp.minimum(_row_sum(c_in < (k - below_r)[:, None]), 255)
  return r * 256 + j, below_r + c_in[rows, j] - within[rows, j], k


def _kth_keys(keys: list[jax.Array], groups: list, oks: list[jax.Array], k: jax.Array,
              num_groups: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Per group g, with ``k[g]`` clipped to ``[0, count(ok & group == g)]``: the smallest
  uint32 ``t_g`` with ``count(ok & group == g & key <= t_g) >= k[g]``.

  A two-pass radix select: pass 1 histograms the high 16 bits of the valid
  keys (one 65536-bin histogram per group, filled by scatter-adds) and
  finds the bucket holding each group's k-th key; pass 2 histograms the low
  16 bits inside those buckets.

  Returns ``(t, k, below, at)``: the thresholds, the clipped ``k``, and per group the
  counts of valid keys ``< t`` and ``== t`` (read off the histograms).
  """
  ones = [ok.astype(jnp.int32) for ok in oks]
  his = [(key >> 16).astype(jnp.int32) for key in keys]
  b, below_b, k = _bucket_of_kth(_histogram(his, groups, ones, num_groups), k)
  los = [(key & 0xFFFF).astype(jnp.int32) for key in keys]
  in_bucket = [o * (hi == _per_element(b, g)) for o, hi, g in zip(ones, his, groups)]
  h2 = _histogram(los, groups, in_bucket, num_groups)
  l, below_l, _ = _bucket_of_kth(h2, k - below_b)
  t = (b.astype(jnp.uint32) << 16) | l.astype(jnp.uint32)
  return t, k, below_b + below_l, h2[jnp.arange(num_groups), l]


def _flat_index(shape: tuple[int, ...], offset: int) -> jax.Array:
  """uint32 ``offset +`` row-major flat index of each element, built from iotas (no reshape)."""
  idx = jnp.full(shape, offset, jnp.uint32)
  stride = 1
  for d in range(len(shape) - 1, -1, -1):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
    stride *= shape[d]
  return idx


def _as_nd(x: jax.Array) -> jax.Array:
  return x.reshape(1) if x.ndim == 0 else x


def smallest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                    ) -> jax.Array:
  """Boolean mask of the ``k`` smallest ``scores`` among ``valid`` entries.

  Exactly ``min(k, count(valid))`` entries are True; ties at the threshold go
  to the lower flat (row-major) index. ``k`` may be traced. NaN scores are
  never valid. Cost: two histogram passes over ``scores`` (two more when
  there are ties at the threshold). The result has the shape (and, under
  ``jax.jit``, the sharding) of ``scores``.
  """
  return smallest_k_masks([scores], k, None if valid is None else [valid])[0]


def smallest_k_masks(scores: Sequence[jax.Array], k: jax.Array | int,
                     valid: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """The ``k`` smallest over several arrays together: one mask per array.

  The same selection as :func:`smallest_k_mask` on the concatenation of the
  flattened arrays (ties: earlier array first, then lower flat index), without
  building the concatenation: the histograms of all arrays are added, so each
  array keeps its own shape and sharding (a global magnitude criterion over
  sharded leaves moves only the 65536-bin histograms between devices).
  """
  scores = list(scores)
  if not scores:
    raise ValueError("scores must hold at least one array")
  valid = [None] * len(scores) if valid is None else list(valid)
  if len(valid) != len(scores):
    raise ValueError(f"valid must hold one array per score array ({len(scores)}), got {len(valid)}")
  _check_k(k, sum(int(np.prod(jnp.shape(s))) for s in scores))
  shapes = [jnp.shape(s) for s in scores]
  xs = [_as_nd(jnp.asarray(s)) for s in scores]
  oks = [~jnp.isnan(x) if v is None else _as_nd(jnp.asarray(v)) & ~jnp.isnan(x)
         for x, v in zip(xs, valid)]
  out = _select_smallest([_order_key(x) for x in xs], [None] * len(xs), oks, jnp.reshape(k, (1,)), 1)
  return [m.reshape(shape) for m, shape in zip(out, shapes)]


def smallest_k_per_group(scores: jax.Array, groups: jax.Array, k: jax.Array,
                         valid: jax.Array | None = None) -> jax.Array:
  """The ``k[g]`` smallest ``scores`` within each group ``g`` (``groups`` int in [0, len(k))).

  Same exactness and tie rule as :func:`smallest_k_mask`, for all groups in the
  same two passes (e.g. SET's positive and negative sides at once).
  """
  x = _as_nd(scores)
  ok = ~jnp.isnan(x) if valid is None else _as_nd(valid) & ~jnp.isnan(x)
  return _select_smallest([_order_key(x)], [_as_nd(groups).astype(jnp.int32)], [ok],
                          jnp.asarray(k, jnp.int32), len(k))[0].reshape(jnp.shape(scores))


def _select_smallest(keys: list[jax.Array], groups: list, oks: list[jax.Array], k: jax.Array,
                     num_groups: int) -> list[jax.Array]:
  """Masks of the ``k[g]`` smallest uint32 ``keys`` among ``oks`` in each group, over all arrays
  together (ties: earlier array, then lower flat index). ``groups[i]`` is None when G == 1."""
  t, k, n_below, n_at = _kth_keys(keys, groups, oks, jnp.asarray(k, jnp.int32), num_groups)
  below = [ok & (key < _per_element(t, g)) for key, g, ok in zip(keys, groups, oks)]
  at = [ok & (key == _per_element(t, g)) for key, g, ok in zip(keys, groups, oks)]
  need = k - n_below

  def break_ties():
    # Among the ties, the need[g] of lowest flat index (over all arrays in order): one more
    # radix select, on the flat indices (distinct, so exact); histograms, not a cumsum over
    # n, so sharded inputs are not gathered.
    offsets = np.cumsum([0] + [a.size for a in at])
    if offsets[-1] > np.iinfo(np.uint32).max:
      raise ValueError(f"scores: at most 2**32 entries in all, got {offsets[-1]}")
    idx = [_flat_index(a.shape, int(o)) for a, o in zip(at, offsets)]
    last = _kth_keys(idx, groups, at, need, num_groups)[0]
    return tuple(a & (i <= _per_element(last, g)) & (_per_element(need, g) > 0)
                 for a, i, g in zip(at, idx, groups))

  # Ties at the threshold are rare: only then pay for two more histogram passes.
  all_fit = count_true(n_at > need) == 0
  take_at = lax.cond(all_fit, lambda: tuple(at), break_ties)
  return [(b | ta) & (_per_element(k, g) > 0) for b, ta, g in zip(below, take_at, groups)]


def largest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                   ) -> jax.Array:
  """Boolean mask of the ``k`` largest ``scores`` among ``valid`` (ties: lower index first)."""
  return smallest_k_mask(-scores.astype(jnp.float32), k, valid)


def largest_k_masks(scores: Sequence[jax.Array], k: jax.Array | int,
                    valid: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """The ``k`` largest over several arrays together (see :func:`smallest_k_masks`)."""
  return smallest_k_masks([-jnp.asarray(s).astype(jnp.float32) for s in scores], k, valid)


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
  # Drawn in valid's shape (no flattening, so a sharded ``valid`` stays sharded): threefry's
  # bits for a shape are those for its flat size, reshaped, so this equals a flat draw.
  bits = jax.random.bits(key, _as_nd(valid).shape, jnp.uint32)
  return _select_smallest([bits], [None], [_as_nd(valid)], jnp.reshape(k, (1,)), 1)[0].reshape(
      valid.shape)


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
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, jnp.minimum(size, count_true(flat)))
  draws = min(2 * size + 1024, 4 * n)
  order = jnp.arange(draws, dtype=jnp.int32)
  c = jax.random.randint(key, (draws,), 0, n, jnp.int32)
  first = jnp.full((n,), draws, jnp.int32).at[c].min(order)[c] == order
  ok = first & flat[c]
  rank = _prefix_sum(ok.astype(jnp.int32))

  def fast():
    slot = jnp.where(ok & (rank <= k), rank - 1, size)
    return jnp.full((size,), n, jnp.int32).at[slot].set(c, mode="drop")

  def exact():
    chosen = random_k_mask(jax.random.fold_in(key, 1), k, allowed).reshape(-1)
    # jnp.nonzero(chosen, size=size, fill_value=n), with a scan instead of a cumsum
    slot = jnp.where(chosen, _prefix_sum(chosen.astype(jnp.int32)) - 1, size)
    return jnp.full((size,), n, jnp.int32).at[slot].set(jnp.arange(n, dtype=jnp.int32),
                                                       mode="drop")

  return lax.cond(rank[-1] >= k, fast, exact)
