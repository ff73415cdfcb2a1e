"""Exact-count selection of the k smallest / largest scores, with a traced k.

Mask updates need "the k smallest |w| among the active weights" where k is
often only known on device (it depends on the step, or on how many weights
are positive). :func:`smallest_k_mask` answers that in O(n) passes instead of
a full sort: a radix select of the k-th smallest composite key (the float32
score's order-preserving integer key, then the flat index), 16 bits per pass
(a 65536-bin histogram per pass), so that exactly ``min(k, count(valid))``
entries are selected and ties at the threshold go to the lower flat index.
The index passes run only when the ties at the threshold do not all fit, and
all passes are one ``while_loop`` body, so a selection compiles once.
:func:`smallest_k_masks` / :func:`largest_k_masks` select over several arrays
at once (a global criterion over many leaves) with the same result as on
their concatenation; :func:`smallest_k_per_group` selects within groups (SET's
positive and negative weights of every layer) in the same passes.

No selection flattens or concatenates its inputs: the histograms are filled
from arrays of any shape and the flat indices are built from iotas. So under
``jax.jit`` a sharded input gives a mask with the same sharding, and the
devices exchange only the 65536-bin histograms and a few counts (XLA inserts
the all-reduces). The exception is a process with one CPU device
(:func:`one_device`), where nothing is sharded: there a selection over four
arrays or more runs on their concatenation, which compiles to one kernel per
step instead of one per array (XLA:CPU compiles each kernel on its own), with
the same result (:func:`concatenate_on_cpu`).

:func:`top_k_mask` does the same with ``jax.lax.top_k`` when k is a static
Python int; both agree exactly, including on ties (lower index first).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p


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
  """``values[group]``: by selects for two groups, by a gather from the small table beyond.

  ``group=None`` means a single group: ``values[0]``, broadcasting; an int, that group.
  """
  if group is None:
    return values[0]
  if isinstance(group, int):
    return values[group]
  if values.shape[0] > 2:
    return values.at[group].get(mode="promise_in_bounds")
  return jnp.where(group == 1, values[-1], values[0])


def _histogram(digits: list[jax.Array], groups: list, counted: list[jax.Array],
               num_groups: int) -> jax.Array:
  """int32[G, 65536]: how many ``counted`` entries fall in each (group, 16-bit digit), one
  scatter-add per array.

  The entries not counted go to a bin past the end, which the scatter drops: its updates are
  then a constant 1, and each array's indices one kernel (not two, indices and weights).
  The arrays keep their shapes (no flattening), so sharded inputs stay sharded;
  under SPMD each device fills the histogram of its shard and XLA adds them.
  """
  h = jnp.zeros(num_groups * _BINS, jnp.int32)
  for d, g, c in zip(digits, groups, counted):
    h = h.at[jnp.where(c, d if g is None else g * _BINS + d, num_groups * _BINS)].add(
        1, mode="drop")
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


def one_device() -> bool:
  """Whether this process has a single device. The CPU branches that flatten or concatenate
  leaves (they compile faster) are taken only then: with several devices a leaf may be
  sharded, and flattening or concatenating it would regather it (with explicitly sharded
  axes it would not even trace). Either way the results are the same."""
  return jax.device_count() == 1


def concatenate_on_cpu(num_arrays: int) -> bool:
  """Whether the CPU branch of an operation over ``num_arrays`` arrays (one per layer) runs on
  their concatenation: one kernel to compile where there would be one per array. From four
  arrays on, and on one device (:func:`one_device`). With fewer, the kernels saved do not pay
  for the copies: on LeNet-300-100 (two or three arrays) RigL's update step ran ~30% slower
  with its selections concatenated, for no compile time saved."""
  return num_arrays >= 4 and one_device()


def _cpu_prefix_sum(x: jax.Array) -> jax.Array:
  # Blocked: rows of 256 summed by a dot with an upper-triangular matrix of ones, the row
  # totals' exclusive prefix by the same recursion. A few ops per 256x level, where an
  # associative scan (exact too) unrolls into ~10 ops per halving and took ~1 s to compile.
  n = x.shape[-1]
  upper = (jnp.arange(256)[:, None] <= jnp.arange(256)[None, :]).astype(jnp.int32)
  if n <= 256:
    return jnp.dot(x, upper[:n, :n])
  rows = -(-n // 256)
  within = jnp.dot(jnp.pad(x, (0, rows * 256 - n)).reshape(rows, 256), upper)
  totals = within[:, 255]
  return (within + (_cpu_prefix_sum(totals) - totals)[:, None]).reshape(-1)[:n]


def prefix_sum(x: jax.Array) -> jax.Array:
  """Exact inclusive prefix sum of a 1-D int32 array (a cumsum; on CPU by dots)."""
  return cpu_or_default(functools.partial(_prefix_sum, cpu=True),
                        functools.partial(_prefix_sum, cpu=False), x)


def _prefix_sum(x: jax.Array, cpu: bool) -> jax.Array:
  return _cpu_prefix_sum(x) if cpu else jnp.cumsum(x, dtype=x.dtype)


# The helpers below take the platform choice as a static ``cpu`` flag: a whole selection
# is one cpu_or_default (each switch adds two conditionals to the program, ~10 ms of CPU
# compile time apiece), and its helpers follow the branch they are traced in.


def _cpu_row_sum(x: jax.Array) -> jax.Array:
  # A dot with ones; XLA rewrites a one-row dot into a reduction, so a single row gets a
  # zero row added.
  lead = x.shape[:-1]
  if int(np.prod(lead)) == 1:
    x = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), jnp.int32)])
    return jnp.dot(x, jnp.ones(x.shape[-1], jnp.int32))[:1].reshape(lead)
  return jnp.dot(x, jnp.ones(x.shape[-1], jnp.int32))


def _row_sum(x: jax.Array, cpu: bool) -> jax.Array:
  """Exact int32 sum along the last axis of an int or bool array of rank >= 2."""
  x = x.astype(jnp.int32)
  return _cpu_row_sum(x) if cpu else jnp.sum(x, axis=-1, dtype=jnp.int32)


def _row_prefix_sum_256(x: jax.Array, cpu: bool) -> jax.Array:
  """Exact inclusive prefix sums along 256-long int32 rows (the radix histograms' rows)."""
  # On CPU a dot with an upper-triangular matrix of ones (one op, no reduction computation).
  if cpu:
    return jnp.dot(x, (jnp.arange(256)[:, None] <= jnp.arange(256)[None, :]).astype(jnp.int32))
  return jnp.cumsum(x, axis=-1, dtype=jnp.int32)


_DOT_COUNT_MAX = 1 << 16  # larger arrays: a reduction's fixed per-call cost is negligible


def _count(x: jax.Array, cpu: bool) -> jax.Array:
  x = x.astype(jnp.int32)
  if not cpu or x.size > _DOT_COUNT_MAX:
    return jnp.sum(x, dtype=jnp.int32)
  if x.ndim > 1:
    # One dot over all axes but the first (not one per axis: a dot is a kernel to compile);
    # contracting, not reshaping, so that a sharded x is never regathered.
    axes = tuple(range(1, x.ndim))
    x = lax.dot_general(x, jnp.ones(x.shape[1:], jnp.int32), ((axes, tuple(a - 1 for a in axes)),
                                                               ((), ())))
  return _cpu_row_sum(x.reshape(1, -1))[0]


def count_true(x: jax.Array) -> jax.Array:
  """Exact int32 count of the True entries of a bool array (or sum of an int array).

  One int32 sum: exact on every backend up to 2**31 entries, and one kernel to compile. (The
  selections count their own small vectors with dots on CPU instead, so that their never-taken
  update branches hold no reduction; see :func:`cpu_or_default`.)
  """
  x = jnp.asarray(x)
  if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
    raise TypeError(f"x: count_true takes a bool or integer array, got dtype {x.dtype}")
  return jnp.sum(x.astype(jnp.int32), dtype=jnp.int32)


def count_true_each(xs: Sequence[jax.Array]) -> jax.Array:
  """int32 ``[count_true(x) for x in xs]`` as one array: one sum per array (on one CPU device,
  from four arrays on, all of them from one pass over their concatenation: see
  :func:`concatenate_on_cpu`).

  (Counted with dots on CPU until this release, to save ~0.5 us per reduction per step: two
  to six kernels per array to compile, 240 of the 662 LLVM modules of a ResNet-20 RigL step;
  see README, "Where the compile time goes".)
  """
  xs = [jnp.asarray(x) for x in xs]
  if not xs:
    raise ValueError("xs: count_true_each takes one or more arrays, got none")
  for i, x in enumerate(xs):
    if not (x.dtype == jnp.bool_ or jnp.issubdtype(x.dtype, jnp.integer)):
      raise TypeError(f"xs[{i}]: count_true_each takes bool or integer arrays, got dtype {x.dtype}")
  sums = lambda xs: jnp.stack([count_true(x) for x in xs])
  if not concatenate_on_cpu(len(xs)):
    return sums(xs)
  # On one CPU device, many arrays are counted in one pass over their concatenation: a few
  # kernels to compile, where a sum per array is two or three kernels each.
  return cpu_or_default(lambda xs: _cpu_count_segments(_concat_flat(xs), [x.size for x in xs]),
                        sums, [x.astype(jnp.int32) for x in xs])


def _count_each(xs: Sequence[jax.Array]) -> jax.Array:
  """:func:`count_true_each` inside a selection: by dots on CPU (no reduction), one switch."""
  counts = lambda xs, cpu: jnp.stack([_count(x, cpu) for x in xs])
  return cpu_or_default(functools.partial(counts, cpu=True), functools.partial(counts, cpu=False),
                        xs)


def _count_segments(flat: jax.Array, n: Sequence[int]) -> jax.Array:
  """int32 count of the True entries (sum, for ints) of each consecutive segment of ``flat``
  (of sizes ``n``): on CPU in one pass (:func:`_cpu_count_segments`: a fixed number of kernels
  however many segments, where a sum per segment is two or three kernels each), elsewhere one
  sum per segment."""
  return cpu_or_default(functools.partial(_count_segments_on, n=n, cpu=True),
                        functools.partial(_count_segments_on, n=n, cpu=False),
                        flat.astype(jnp.int32))


def _count_segments_on(flat: jax.Array, n: Sequence[int], cpu: bool) -> jax.Array:
  """:func:`_count_segments` in the branch ``cpu`` says (an int32 ``flat``)."""
  if cpu:
    return _cpu_count_segments(flat, n)
  ends = np.cumsum(n)
  return jnp.stack([jnp.sum(flat[e - m:e], dtype=jnp.int32) for m, e in zip(n, ends)])


def _cpu_count_segments(flat: jax.Array, n: Sequence[int]) -> jax.Array:
  # Each segment padded with zeros to whole rows of 256 (one fusion), the rows summed by a
  # dot with ones, and the row sums' prefix sum read at each segment's last row: a few
  # kernels, no reduction, O(n) work (a prefix sum of the entries themselves by dots would
  # cost 256 multiply-adds per entry: 8 ms for two LeNet-300-100 masks).
  n = [int(m) for m in n]
  rows = [-(-m // 256) for m in n]
  ends = np.cumsum(n)
  padded = jnp.concatenate([jnp.pad(flat[e - m:e].astype(jnp.int32), (0, r * 256 - m))
                            for m, e, r in zip(n, ends, rows)]).reshape(-1, 256)
  total = _cpu_prefix_sum(_cpu_row_sum(padded))[jnp.asarray(np.cumsum(rows) - 1)]
  return total - jnp.concatenate([jnp.zeros(1, jnp.int32), total[:-1]])


def _take(x: jax.Array, i: jax.Array) -> jax.Array:
  """``x[g, i[g]]`` for each row g (``i`` in bounds): one gather, no index normalisation."""
  idx = i.reshape(i.shape + (1,) * (x.ndim - 1))
  return jnp.take_along_axis(x, idx, axis=1, mode="promise_in_bounds")[:, 0]


def _bucket_of_kth(h: jax.Array, k: jax.Array, cpu: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per row g of the histogram ``h[G, 65536]``, with ``k[g]`` clipped to ``[0, sum(h[g])]``:
  the first bucket ``b`` whose running count reaches it, the count in the buckets below
  ``b``, and the clipped ``k``.

  Two levels of 256 x 256 instead of one 65536-long prefix sum (cheaper on CPU). Within
  a level the bucket is the count of running sums below ``k`` (256 compares, not a
  ``searchsorted`` loop). The bucket is ``searchsorted(cumsum(h), k)``.
  """
  hh = h.reshape(h.shape[0], 256, 256)
  per_row = _row_sum(hh, cpu)
  c_row = _row_prefix_sum_256(per_row, cpu)
  k = jnp.clip(k, 0, c_row[:, 255])
  r = jnp.minimum(_row_sum(c_row < k[:, None], cpu), 255)
  below_r = _take(c_row - per_row, r)
  within = _take(hh, r)
  c_in = _row_prefix_sum_256(within, cpu)
  j = jnp.minimum(_row_sum(c_in < (k - below_r)[:, None], cpu), 255)
  return r * 256 + j, below_r + _take(c_in - within, j), k


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


# Per radix pass: which bits of the composite key (score key, flat index) are already
# fixed (compared with the threshold), and which 16 bits the pass histograms.
_PASS_FIXED_KEY = (0, 0xFFFF0000, 0xFFFFFFFF, 0xFFFFFFFF)
_PASS_FIXED_INDEX = (0, 0, 0, 0xFFFF0000)


def smallest_k_each(scores: Sequence[jax.Array], k: jax.Array,
                    valid: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """Per array ``i``, the mask of its ``k[i]`` smallest ``scores[i]`` among ``valid[i]``.

  As :func:`smallest_k_mask` on each array, but all arrays in the same passes
  (one histogram row per array), so a program with many layers holds one selection.
  """
  scores = [_as_nd(jnp.asarray(s)) for s in scores]
  valid = [None] * len(scores) if valid is None else list(valid)
  if len(valid) != len(scores):
    raise ValueError(f"valid must hold one array per score array ({len(scores)}), got {len(valid)}")
  k = _counts_per_array(k, len(scores))
  oks = [~jnp.isnan(x) if v is None else jnp.asarray(v).reshape(x.shape) & ~jnp.isnan(x)
         for x, v in zip(scores, valid)]
  return _select_smallest([_order_key(x) for x in scores], list(range(len(scores))), oks, k,
                          len(scores))


def _counts_per_array(k: jax.Array, n: int) -> jax.Array:
  """``k`` as int32 of shape ``(n,)``: one count per array, else a ValueError naming ``k``."""
  k = jnp.asarray(k, jnp.int32)
  if k.shape != (n,):
    raise ValueError(f"k: one count per array ({n}), got shape {k.shape}")
  return k


def largest_k_each(scores: Sequence[jax.Array], k: jax.Array,
                   valid: Sequence[jax.Array] | None = None) -> list[jax.Array]:
  """Per array ``i``, the mask of its ``k[i]`` largest ``scores[i]`` (see :func:`smallest_k_each`)."""
  return smallest_k_each([-jnp.asarray(s).astype(jnp.float32) for s in scores], k, valid)


def random_k_masks_each(key: jax.Array, k: jax.Array, valid: Sequence[jax.Array]
                        ) -> list[jax.Array]:
  """Per array ``i``, exactly ``min(k[i], count(valid[i]))`` of its valid entries, uniformly at
  random without replacement: one draw of 32 bits per entry for all arrays, one selection."""
  k = _counts_per_array(k, len(valid))
  sizes = [int(np.prod(jnp.shape(v))) for v in valid]
  bits = jax.random.bits(key, (sum(sizes),), jnp.uint32)
  ends = np.cumsum(sizes)
  keys = [bits[e - n:e].reshape(jnp.shape(v)) for n, e, v in zip(sizes, ends, valid)]
  return _select_smallest([_as_nd(b) for b in keys], list(range(len(valid))),
                          [_as_nd(jnp.asarray(v)) for v in valid], k, len(valid))


def _select_smallest(keys: list[jax.Array], groups: list, oks: list[jax.Array], k: jax.Array,
                     num_groups: int) -> list[jax.Array]:
  """See :func:`_select`; one platform switch for the whole selection."""
  static = tuple(g if g is None or isinstance(g, int) else "array" for g in groups)
  arrays = [g for g, st in zip(groups, static) if st == "array"]
  return _select_jit(keys, arrays, oks, jnp.asarray(k, jnp.int32), static=static,
                     num_groups=num_groups)


# A selection is one jitted function, inlined into an enclosing jit (the program is the same
# as without it), so that an eager call (a notebook, a test) compiles it once per shape
# instead of dispatching its ~100 ops one by one (3x slower to compile on CPU).
@functools.partial(jax.jit, static_argnames=("static", "num_groups"), inline=True)
def _select_jit(keys, arrays, oks, k, *, static, num_groups):

  def branch(keys, arrays, oks, k, cpu):
    it = iter(arrays)   # static groups (None, int) stay Python values, not switch operands
    gs = [next(it) if st == "array" else st for st in static]
    return _select(keys, gs, oks, k, num_groups=num_groups, cpu=cpu)

  return cpu_or_default(functools.partial(branch, cpu=True), functools.partial(branch, cpu=False),
                        keys, arrays, oks, k)


def _select(keys: list[jax.Array], groups: list, oks: list[jax.Array], k: jax.Array, *,
            num_groups: int, cpu: bool) -> list[jax.Array]:
  """Masks of the ``k[g]`` smallest uint32 ``keys`` among ``oks`` in each group, over all arrays
  together (ties: earlier array, then lower flat index). ``groups[i]`` is None when G == 1,
  an int when all of array i is one group, else an int32 array of its entries' groups.

  A radix select of the k-th smallest composite key ``(key, flat index)`` (distinct, so
  the count is exact), 16 bits per pass: passes 0 and 1 fix the key's high and low
  halves (one 65536-bin histogram per group each, filled by scatter-adds over the
  candidates still matching the bits fixed so far, and a search for the bucket of the
  k-th); passes 2 and 3 fix the flat index's, and run only when the ties at the key's
  threshold do not all fit. The passes are one ``while_loop`` body, so they compile once.
  """
  offsets = np.cumsum([0] + [x.size for x in keys])
  if offsets[-1] > np.iinfo(np.uint32).max:
    raise ValueError(f"scores: at most 2**32 entries in all, got {offsets[-1]}")
  if cpu and concatenate_on_cpu(len(keys)):
    return _select_concatenated(keys, groups, oks, k, num_groups=num_groups)
  idx = [_flat_index(x.shape, int(o)) for x, o in zip(keys, offsets)]
  fixed_key = jnp.asarray(_PASS_FIXED_KEY, jnp.uint32)
  fixed_index = jnp.asarray(_PASS_FIXED_INDEX, jnp.uint32)

  def body(carry):
    p, t_key, t_index, k_rem, k_all, fits = carry
    shift = jnp.where(lax.rem(p, 2) == 0, 16, 0).astype(jnp.uint32)   # (p >= 0)
    digits, counted = [], []
    for key, i, g, ok in zip(keys, idx, groups, oks):
      match = (((key ^ _per_element(t_key, g)) & fixed_key[p]) == 0) & (
          ((i ^ _per_element(t_index, g)) & fixed_index[p]) == 0)
      digits.append(((jnp.where(p < 2, key, i) >> shift) & 0xFFFF).astype(jnp.int32))
      counted.append(ok & match)
    h = _histogram(digits, groups, counted, num_groups)
    b, below, k_clipped = _bucket_of_kth(h, k_rem, cpu)
    k_all = jnp.where(p == 0, k_clipped, k_all)
    need = k_clipped - below
    bits = b.astype(jnp.uint32) << shift
    t_key = jnp.where(p < 2, t_key | bits, t_key)
    t_index = jnp.where(p < 2, t_index, t_index | bits)
    # After pass 1: do all of each group's ties at its threshold key fit in what it needs?
    fits = jnp.where(p == 1, _count(_take(h, b) > need, cpu) == 0, fits)
    return p + 1, t_key, t_index, need, k_all, fits

  zeros = jnp.zeros(num_groups, jnp.uint32)
  init = (jnp.int32(0), zeros, zeros, jnp.asarray(k, jnp.int32), jnp.zeros(num_groups, jnp.int32),
          jnp.bool_(False))
  _, t_key, t_index, _, k, fits = lax.while_loop(
      lambda c: (c[0] < 2) | ((c[0] < 4) & ~c[5]), body, init)
  t_index = jnp.where(fits, jnp.uint32(0xFFFFFFFF), t_index)
  return [ok & ((key < _per_element(t_key, g)) | ((key == _per_element(t_key, g))
                                                  & (i <= _per_element(t_index, g))))
          & (_per_element(k, g) > 0)
          for key, i, g, ok in zip(keys, idx, groups, oks)]


def _select_concatenated(keys, groups, oks, k, *, num_groups):
  """:func:`_select` over the arrays concatenated flat (see :func:`concatenate_on_cpu`); the
  same composite keys, so the same masks."""
  sizes = [x.size for x in keys]
  flat = lambda xs: jnp.concatenate([x.reshape(-1) for x in xs])
  if all(g is None for g in groups):
    g = None
  elif all(isinstance(gi, int) for gi in groups):
    # one group per array: read off each entry's array (fuses into its consumers, where a
    # concatenation of broadcasts is one kernel per array to compile; see segment_ids)
    g = _lookup(np.asarray(groups, np.int32), _segment_ids(sizes, cpu=True), cpu=True)
  else:
    g = jnp.concatenate([jnp.full(n, gi, jnp.int32) if isinstance(gi, int) else gi.reshape(-1)
                         for gi, n in zip(groups, sizes)])
  out = _select([flat(keys)], [g], [flat(oks)], k, num_groups=num_groups, cpu=True)[0]
  ends = np.cumsum(sizes)
  return [out[e - n:e].reshape(x.shape) for n, e, x in zip(sizes, ends, keys)]


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
  draws over the flat index range (``bits % n``, with the few ``bits`` past the last
  multiple of ``n`` rejected), keeping the first ``k`` draws that are
  allowed and not repeated (the first k distinct allowed draws of an i.i.d.
  uniform sequence are a uniform k-subset); it costs O(size) work plus one
  O(n) fill. When the draws hold fewer than ``k`` such positions (rare unless
  ``allowed`` is sparse), it falls back to a sort of ``n`` random keys (the ``k``
  allowed positions of smallest key), under ``lax.cond``.
  """
  return random_k_positions_each(key, jnp.reshape(k, (1,)), [allowed], [size])[0]


def random_k_positions_each(key: jax.Array, k: jax.Array, allowed: Sequence[jax.Array],
                            sizes: Sequence[int], *, bits: jax.Array | None = None
                            ) -> list[jax.Array]:
  """:func:`random_k_positions` for several arrays at once: ``sizes[i]`` slots for
  ``allowed[i]``, of which the first ``k[i]`` are filled. One set of draws over all arrays
  (each array's draws are its own slice of them), and one fallback sort for all, so a
  program with many layers holds these ops once.

  ``bits``: the draws' random bits, ``jax.random.bits(key, (position_draws(n, sizes),),
  jnp.uint32)`` (``n``: the arrays' sizes), drawn by the caller in one hash with its other
  draws (:func:`random_bits_each`); the positions are then the same as without it. ``key``
  still seeds the fallback.
  """
  allowed = [jnp.asarray(a).reshape(-1) for a in allowed]
  sizes = [int(s) for s in sizes]
  if len(sizes) != len(allowed):
    raise ValueError(f"sizes: one per allowed array ({len(allowed)}), got {len(sizes)}")
  n = np.array([a.size for a in allowed])
  if not len(n) or (n == 0).any():
    raise ValueError(f"allowed: one or more non-empty arrays, got sizes {n.tolist()}")
  n = tuple(int(x) for x in n)
  return _random_positions_jit(key, _counts_per_array(k, len(n)), _concat_flat(allowed),
                               _check_bits(bits, n, sizes), sizes=tuple(sizes), n=n)


def random_k_positions_flat(key: jax.Array, k: jax.Array, flat: jax.Array, n: Sequence[int],
                            sizes: Sequence[int], *, bits: jax.Array | None = None
                            ) -> list[jax.Array]:
  """:func:`random_k_positions_each` with the allowed arrays given as ``flat``, their
  flattened concatenation, of sizes ``n`` (the same draws and positions; ``bits`` as there)."""
  n = tuple(int(x) for x in n)
  sizes = tuple(int(s) for s in sizes)
  if len(sizes) != len(n) or not n or min(n) == 0 or jnp.shape(flat) != (sum(n),):
    raise ValueError(f"flat: the concatenation of {len(sizes)} non-empty arrays of sizes n, "
                     f"got shape {jnp.shape(flat)} for n={list(n)}")
  return _random_positions_jit(key, _counts_per_array(k, len(n)), flat,
                               _check_bits(bits, n, sizes), sizes=sizes, n=n)


def _draws(n: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
  """The fast path's uniform draws per array: twice its slots and 1024 more, at most 4 n."""
  return np.array([min(2 * int(s) + 1024, 4 * int(m)) for s, m in zip(sizes, n)], np.int64)


def position_draws(n: Sequence[int], sizes: Sequence[int]) -> int:
  """How many random 32-bit words :func:`random_k_positions_each` draws for arrays of sizes
  ``n`` with ``sizes`` slots each (the length of its ``bits``)."""
  n, sizes = [int(m) for m in n], [int(m) for m in sizes]
  if len(n) != len(sizes) or not n or min(n) < 1 or min(sizes) < 0:
    raise ValueError(f"n and sizes: one non-empty array size and one slot count (>= 0) per "
                     f"array, got n={n} and sizes={sizes}")
  return int(_draws(n, sizes).sum())


def _check_bits(bits, n, sizes):
  if bits is None:
    return None
  want = (position_draws(n, sizes),)
  if jnp.shape(bits) != want or jnp.result_type(bits) != jnp.uint32:
    raise ValueError(f"bits: uint32 of shape {want} (position_draws(n, sizes)), got "
                     f"{jnp.result_type(bits)} of shape {jnp.shape(bits)}")
  return bits


def random_bits_each(keys: Sequence[jax.Array], sizes: Sequence[int]) -> list[jax.Array]:
  """``[jax.random.bits(key, (n,), jnp.uint32) for key, n in zip(keys, sizes)]``, the same bits,
  on GPU and TPU from one threefry hash over all of them.

  Each call of jax's threefry is a hash of its own in the program, unrolled into ~220 ops on
  GPU and TPU. jax's threefry bits for ``(key, n)`` are the hash of ``(key, counter i)`` for
  i < n (with ``jax_threefry_partitionable``, jax's default), so several draws are one hash
  over their keys and counters laid end to end. On CPU, where XLA runs the hash as a loop,
  the draws stay one by one: there the merged hash saved no kernel to compile (SET's
  LeNet-300-100 step had 175 either way), and its per-entry key arrays are memory traffic the
  loop does not need. With another key implementation, or that flag off, the draws are made
  one by one everywhere.
  """
  keys, sizes = list(keys), [int(m) for m in sizes]
  if len(keys) != len(sizes) or not keys or min(sizes) < 0:
    raise ValueError(f"keys and sizes: as many keys as sizes (>= 0), got {len(keys)} keys and "
                     f"sizes {sizes}")
  if not all(_hashable(k) for k in keys):
    return [jax.random.bits(k, (m,), jnp.uint32) for k, m in zip(keys, sizes)]

  def one_by_one(data):
    return [jax.random.bits(jax.random.wrap_key_data(d, impl="threefry2x32"), (m,), jnp.uint32)
            for d, m in zip(data, sizes)]

  def one_hash(data):   # each entry's key words and counter, then one hash
    ids = _segment_ids(sizes, cpu=False)
    at = lambda values, dtype=None: _lookup(values, ids, False, dtype)
    counter = lax.iota(jnp.uint32, sum(sizes)) - at(np.cumsum(sizes) - sizes, jnp.uint32)
    hi, lo = threefry2x32_p.bind(at(data[:, 0]), at(data[:, 1]), jnp.zeros_like(counter), counter)
    ends = np.cumsum(sizes)
    return [(hi ^ lo)[e - m:e] for m, e in zip(sizes, ends)]

  return cpu_or_default(one_by_one, one_hash,
                        jnp.stack([jax.random.key_data(k) for k in keys]))   # uint32[keys, 2]


def _hashable(key) -> bool:
  """Whether ``jax.random.bits(key, ...)`` is the threefry hash of ``(key, counter i)``, which
  this module may then compute itself: a typed scalar threefry key, with
  ``jax_threefry_partitionable`` on (jax's default)."""
  return (bool(jax.config.jax_threefry_partitionable)
          and jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key) and jnp.shape(key) == ()
          and str(jax.random.key_impl(key)) == "threefry2x32")


def _bits_in_blocks(key, size: int, block: int, per_entry_keys: bool) -> jax.Array:
  """``jax.random.bits(key, (size,), jnp.uint32)`` for a :func:`_hashable` key, hashed in
  blocks of ``block`` words by one threefry call in a loop, so that this hash and another of
  ``block`` words with the same key layout (scalar words as in ``jax.random.bits``, or one
  word per entry as in :func:`random_bits_each`) are one hash body in a GPU or TPU program
  (~220 ops each there)."""
  data = jax.random.key_data(key)
  words = [(jnp.full((block,), w) if per_entry_keys else w) for w in (data[0], data[1])]

  def one(start):
    hi, lo = threefry2x32_p.bind(*words, jnp.zeros((block,), jnp.uint32),
                                 lax.iota(jnp.uint32, block) + start)
    return hi ^ lo

  blocks = -(-size // block)
  if blocks == 1:
    return one(jnp.uint32(0))[:size]
  return lax.map(one, jnp.arange(blocks, dtype=jnp.uint32) * jnp.uint32(block)).reshape(-1)[:size]


def _concat_flat(xs: Sequence[jax.Array]) -> jax.Array:
  xs = [x.reshape(-1) for x in xs]
  return jnp.concatenate(xs) if len(xs) > 1 else xs[0]


def segment_ids(sizes: Sequence[int]) -> jax.Array:
  """``np.repeat(np.arange(len(sizes)), sizes)`` (int32) for static ``sizes``, built in the
  program: entry i is the index of the segment (of ``sizes[s]`` entries) that holds i.

  Not that array as a constant: constants as long as the layers made SET's train step on a
  10M-parameter MLP 214 MB of StableHLO, through which XLA then folded gathers at compile
  time. On CPU a sum of compares over an iota, which fuses into its consumer (XLA:CPU copies
  a concatenation's operands, so each broadcast below would be a kernel to compile: 18 more
  in SET's ResNet-20 step); elsewhere a concatenation of broadcasts, 2 ops per segment.
  """
  sizes = [int(m) for m in sizes]
  if not sizes or min(sizes) < 0:
    raise ValueError(f"sizes: one or more non-negative sizes, got {sizes}")
  return cpu_or_default(functools.partial(_segment_ids, sizes, cpu=True),
                        functools.partial(_segment_ids, sizes, cpu=False))


def _segment_ids(sizes: Sequence[int], cpu: bool) -> jax.Array:
  """:func:`segment_ids` (valid ``sizes``) in the branch ``cpu`` says."""
  ends = np.cumsum(sizes)
  if cpu:
    i = lax.iota(jnp.int32, int(ends[-1]))
    return sum(((i >= e).astype(jnp.int32) for e in ends[:-1]), jnp.zeros_like(i))
  return jnp.concatenate([jnp.full((m,), s, jnp.int32) for s, m in enumerate(sizes)])


def lookup(values, ids: jax.Array, dtype=None) -> jax.Array:
  """``values[ids]``: a short table (one value per segment, static or traced) read at each
  entry's segment index ``ids`` (from :func:`segment_ids`; in range).

  On CPU a chain of ``len(values) - 1`` selects, which fuses into its consumer (a gather is
  a kernel of its own there). Elsewhere one gather, without the index wrapping and clamping
  that ``jnp`` indexing adds.
  """
  values = jnp.asarray(values, dtype)
  if values.ndim != 1 or jnp.ndim(ids) != 1:
    raise ValueError(f"values and ids: 1-D, got shapes {values.shape} and {jnp.shape(ids)}")
  return cpu_or_default(functools.partial(_lookup, cpu=True), functools.partial(_lookup, cpu=False),
                        values, ids)


def _lookup(values, ids: jax.Array, cpu: bool, dtype=None) -> jax.Array:
  """:func:`lookup` (1-D ``values`` and ``ids``) in the branch ``cpu`` says."""
  values = jnp.asarray(values, dtype)
  if cpu:
    out = jnp.broadcast_to(values[0], ids.shape)
    for s in range(1, values.shape[0]):
      out = jnp.where(ids >= s, values[s], out)
    return out
  dims = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,))
  return lax.gather(values, ids[:, None], dims, (1,), mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


@functools.partial(jax.jit, static_argnames=("sizes", "n"), inline=True)  # see _select_jit
def _random_positions_jit(key, k, flat, bits, *, sizes, n):
  """:func:`random_k_positions_each` on ``flat``, the allowed arrays (of sizes ``n``)
  concatenated; ``bits``: the draws' bits, or None to draw them from ``key``. One platform
  switch for all of it (its helpers follow the branch), not one per lookup: each switch is
  8 ops in a GPU or TPU program."""
  positions = functools.partial(_random_positions, sizes=sizes, n=n)
  return cpu_or_default(functools.partial(positions, cpu=True),
                        functools.partial(positions, cpu=False), key, k, flat, bits)


def _random_positions(key, k, flat, bits, *, sizes, n, cpu):
  draws = _draws(n, sizes)
  n = np.array(n)
  offsets = np.concatenate([[0], np.cumsum(n)])
  starts = np.concatenate([[0], np.cumsum(draws)])
  slot_starts = np.concatenate([[0], np.cumsum(sizes)])
  draw_leaf, slot_leaf = _segment_ids(draws, cpu), _segment_ids(sizes, cpu)  # each draw's, slot's array
  per_draw = lambda values, dtype=jnp.int32: _lookup(values, draw_leaf, cpu, dtype)
  per_slot = lambda values: _lookup(values, slot_leaf, cpu, jnp.int32)
  k = jnp.clip(k, 0, jnp.minimum(jnp.asarray(sizes, jnp.int32),
                                 _count_segments_on(flat.astype(jnp.int32), n, cpu)))
  order = jnp.arange(starts[-1], dtype=jnp.int32)
  # Uniform draws in [0, n) from 32 random bits: ``bits % n``, exactly uniform on the draws
  # with ``bits < (2**32 // n) * n`` (the others, a fraction below n / 2**32, are rejected
  # like repeats); cheaper to compile than jax.random.randint. The bound is compared as
  # ``bits <= bound - 1``: for n a power of two the bound is 2**32, which uint32 wraps to 0
  # (every draw was rejected, and every update of such a layer took the exact fallback's sort).
  given = bits
  if bits is None:
    bits = jax.random.bits(key, order.shape, jnp.uint32)
  fair = bits <= per_draw(np.asarray((1 << 32) // n * n - 1, np.uint32), jnp.uint32)
  local = lax.rem(bits, per_draw(np.asarray(n, np.uint32), jnp.uint32)).astype(jnp.int32)
  c = jnp.where(fair, local + per_draw(offsets[:-1]), offsets[-1])
  first = jnp.full((offsets[-1],), starts[-1], jnp.int32).at[c].min(order, mode="drop")
  ok = (first.at[c].get(mode="fill", fill_value=-1) == order) & flat.at[c].get(
      mode="fill", fill_value=False)
  total = _prefix_sum(ok.astype(jnp.int32), cpu)
  before = jnp.concatenate([jnp.zeros(1, jnp.int32), total[starts[1:-1] - 1]])
  at_end = total[starts[1:] - 1] - before          # distinct allowed draws of each array
  rank = total - per_draw(before)
  filler = per_slot(n)

  def fast():
    take = ok & (rank <= per_draw(k))
    slot = jnp.where(take, per_draw(slot_starts[:-1]) + rank - 1, slot_starts[-1])
    return filler.at[slot].set(local, mode="drop")

  def exact():
    # Per array, the k allowed positions of smallest random bits (ties: lower index), in
    # one sort by (array, not allowed, bits): rare, so its O(n log n) does not matter,
    # and it compiles to a handful of ops. Array i's entries sort into its own range.
    fallback_key = jax.random.fold_in(key, 1)
    if cpu or not _hashable(key):
      bits = jax.random.bits(fallback_key, flat.shape, jnp.uint32)
    else:
      # The same bits, in blocks as long as the fast path's hash (the caller's one hash over
      # the draws and one word per slot, or the draws'): one hash body in the program, not two.
      bits = _bits_in_blocks(fallback_key, int(offsets[-1]),
                             int(starts[-1]) + (0 if given is None else int(slot_starts[-1])),
                             per_entry_keys=given is not None)
    *_, idx = lax.sort((_segment_ids(n, cpu), ~flat, bits, jnp.arange(offsets[-1], dtype=jnp.int32)),
                       num_keys=3)
    # Slot j of array i takes the j-th entry of its sorted range while j < min(k[i], n[i]),
    # else the filler: one gather over all slots, not a slice per array.
    j = jnp.arange(slot_starts[-1], dtype=jnp.int32) - per_slot(slot_starts[:-1])
    in_range = j < filler
    offset = per_slot(offsets[:-1])
    chosen = idx.at[jnp.where(in_range, offset + j, 0)].get(mode="promise_in_bounds") - offset
    return jnp.where(in_range & (j < per_slot(k)), chosen, filler)

  slots = lax.cond(jnp.all(at_end >= k), fast, exact)
  return [slots[a:b] for a, b in zip(slot_starts[:-1], slot_starts[1:])]
