"""Exact-count selection against a numpy stable-sort reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp

from jaxsparse.core import selection as topk

floats = hnp.arrays(np.float32, st.integers(1, 60),
                    elements=st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0])
                    | st.floats(-10, 10, width=32))


def reference_smallest(x, k, valid):
  idx = np.flatnonzero(valid)
  order = idx[np.argsort(x[idx], kind="stable")]
  out = np.zeros(x.shape, bool)
  out[order[:min(k, len(idx))]] = True
  return out


# Hypothesis examples of any length run padded to PAD entries (padding invalid), so each
# jitted selection compiles once for all examples (k is traced).
PAD = 64
_smallest = jax.jit(topk.smallest_k_mask)
_largest = jax.jit(topk.largest_k_mask)
_top_k = jax.jit(topk.top_k_mask, static_argnums=1)
_per_group = jax.jit(topk.smallest_k_per_group)


def padded(x, valid):
  n = x.size
  return (jnp.asarray(np.pad(x, (0, PAD - n))), jnp.asarray(np.pad(valid, (0, PAD - n))))


@given(floats, st.integers(0, 70), st.integers(0, 2**31 - 1))
def test_smallest_k_matches_stable_sort(x, k, seed):
  x = x + 0.0  # no negative zeros: numpy sorts -0.0 == 0.0 by index
  valid = np.random.default_rng(seed).random(x.shape) < 0.7
  xp, vp = padded(x, valid)
  got = np.asarray(_smallest(xp, jnp.int32(k), vp))
  assert not got[x.size:].any()
  np.testing.assert_array_equal(got[:x.size], reference_smallest(x, k, valid))
  assert got.sum() == min(k, valid.sum())


@given(floats, st.sampled_from([0, 1, 2, 7, 30, 60]))
def test_top_k_and_bisection_agree_on_ties(x, k):
  x = x + 0.0
  k = min(k, x.size)
  xp, vp = padded(x, np.ones(x.shape, bool))
  a = np.asarray(_largest(xp, jnp.int32(k), vp))
  b = np.asarray(_top_k(xp, k, vp))        # static k: one compile per sampled k
  np.testing.assert_array_equal(a, b)
  assert not a[x.size:].any()
  np.testing.assert_array_equal(a[:x.size], reference_smallest(-x, k, np.ones(x.shape, bool)))


def test_all_equal_values_take_lowest_indices():
  got = np.asarray(topk.smallest_k_mask(jnp.ones((4, 5)), 7))
  assert got.reshape(-1).tolist() == [True] * 7 + [False] * 13


def test_nan_never_selected():
  x = jnp.array([jnp.nan, 1.0, jnp.nan, 0.5])
  assert np.asarray(topk.smallest_k_mask(x, 4)).tolist() == [False, True, False, True]


def test_random_k_exact_and_uniform():
  valid = jnp.arange(10) % 2 == 0
  keys = jax.random.split(jax.random.key(0), 400)
  ms = np.asarray(jax.jit(jax.vmap(lambda k: topk.random_k_mask(k, 2, valid)))(keys))
  assert (ms.sum(1) == 2).all() and not ms[:, ~np.asarray(valid)].any()
  counts = ms.sum(0)
  # each of the 5 valid entries is chosen with probability 2/5: 160 +- ~30 over 400 draws
  assert np.all(np.abs(counts[::2] - 160) < 40), counts


def test_rejects_k_outside_range():
  with pytest.raises(ValueError, match="k must be"):
    topk.top_k_mask(jnp.ones(3), 4)
  with pytest.raises(ValueError, match="k must be"):
    topk.smallest_k_mask(jnp.ones(3), -1)
  with pytest.raises(ValueError, match="k must be"):
    topk.random_k_mask(jax.random.key(0), 5, jnp.ones(3, bool))


@given(floats, st.integers(0, 30), st.integers(0, 30), st.integers(0, 2**31 - 1))
def test_per_group_selection_matches_numpy(x, k0, k1, seed):
  x = x + 0.0
  rng = np.random.default_rng(seed)
  groups = (rng.random(x.shape) < 0.5).astype(np.int32)
  valid = rng.random(x.shape) < 0.8
  xp, vp = padded(x, valid)
  got = np.asarray(_per_group(xp, jnp.asarray(np.pad(groups, (0, PAD - x.size))),
                              jnp.array([k0, k1]), vp))
  expected = (reference_smallest(x, k0, valid & (groups == 0))
              | reference_smallest(x, k1, valid & (groups == 1)))
  assert not got[x.size:].any()
  np.testing.assert_array_equal(got[:x.size], expected)


@pytest.mark.parametrize("n_allowed", [3, 5000])  # 3: the exact fallback; 5000: rejection sampling
def test_random_k_positions_exact_distinct_allowed(n_allowed):
  n = 10000
  allowed = np.zeros(n, bool)
  allowed[np.random.default_rng(0).choice(n, n_allowed, replace=False)] = True
  k, size = min(3, n_allowed) if n_allowed == 3 else 400, 500
  fn = jax.jit(topk.random_k_positions, static_argnums=3)
  for seed in range(5):
    pos = np.asarray(fn(jax.random.key(seed), k, jnp.asarray(allowed), size))
    chosen = pos[:k]
    assert len(set(chosen.tolist())) == k and allowed[chosen].all()
    assert (pos[k:] == n).all()


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1, 1), (3, 5), (2, 1, 4), (300, 257)])
def test_count_true_matches_numpy(shape):
  x = np.random.default_rng(len(shape)).random(shape) < 0.4
  assert int(jax.jit(topk.count_true)(jnp.asarray(x))) == int(x.sum())


def test_count_true_rejects_float_input():
  with pytest.raises(TypeError, match="x: count_true takes a bool or integer array"):
    topk.count_true(jnp.ones(3))


def _reduction_ops(compiled_text: str) -> list[str]:
  return [line.strip()[:120] for line in compiled_text.splitlines()
          if " reduce(" in line or " reduce-window(" in line]


def test_selections_compile_without_reductions():
  # XLA:CPU's PjRt client pays ~0.2 us per call for every value of every reduction
  # computation in a program, whether its branch runs or not; the selections are
  # written with scans and dots so that a never-taken mask update costs nothing.
  x = jnp.linspace(-1.0, 1.0, 3000).reshape(60, 50)
  fns = {
      "smallest_k_mask": (lambda x: topk.smallest_k_mask(x, 100), (x,)),
      "smallest_k_per_group": (lambda x: topk.smallest_k_per_group(
          x, (x < 0).astype(jnp.int32), jnp.array([10, 20]), x != 0), (x,)),
      "random_k_positions": (lambda a: topk.random_k_positions(jax.random.key(0), 30, a, 200),
                             (x > 0,)),
  }
  for name, (fn, args) in fns.items():
    ops = _reduction_ops(jax.jit(fn).lower(*args).compile().as_text())
    assert not ops, f"{name}: {ops}"


def test_finiteness_check_is_one_sum_over_all_float_leaves():
  # The check in every method's mask update: one plain sum over all float leaves (XLA:CPU
  # may split a large one into a short tree): cheap per step, and its compile time does not grow with
  # the number of leaves.
  from jaxsparse.core import transform as core
  x = jnp.linspace(-1.0, 1.0, 3000).reshape(60, 50)
  tree = {"w": x, "b": jnp.ones(7), "n": jnp.arange(3)}
  ops = _reduction_ops(jax.jit(core._all_finite).lower(tree).compile().as_text())
  many = {f"w{i}": x[6 * i:6 * i + 6] for i in range(10)}      # the same entries, 10 leaves
  ops_many = _reduction_ops(jax.jit(core._all_finite).lower(many).compile().as_text())
  assert 1 <= len(ops) <= 3 and 1 <= len(ops_many) <= 3, (ops, ops_many)
  assert bool(core._all_finite(tree))
  for bad in (jnp.nan, jnp.inf, -jnp.inf):
    assert not bool(jax.jit(core._all_finite)({**tree, "b": tree["b"].at[3].set(bad)}))


# ------------------------------------------- both lowering branches, above 2**24 entries


@pytest.fixture(params=["this_platform", "gpu_tpu_branch"])
def branch(request, monkeypatch):
  """Runs a test with the CPU's lowering choices, then with the GPU/TPU branch forced on the CPU
  (``topk.cpu_or_default`` is the one switch): both must give the same exact results."""
  if request.param == "gpu_tpu_branch":
    monkeypatch.setattr(topk, "cpu_or_default", lambda cpu, default, *args: default(*args))
  # The selections are jitted functions: without this, one traced under the other branch
  # earlier in the process would be reused from jax's cache.
  jax.clear_caches()
  yield request.param
  jax.clear_caches()


def test_global_selection_exact_above_2_to_the_24(branch):
  """A global selection over 2**24 + 2**18 entries with heavy ties: every count, prefix sum and
  histogram total exceeds what an f32 accumulator holds exactly (an H200 miscounted here)."""
  rng = np.random.default_rng(0)
  a = rng.integers(0, 1000, (4096, 4096)).astype(np.float32)
  b = rng.integers(0, 1000, (1 << 18,)).astype(np.float32)
  k = (1 << 24) + 12_345                      # threshold inside a tied value, ~16.8k ties
  select = jax.jit(lambda a, b, k: topk.smallest_k_masks([a, b], k))
  ma, mb = select(jnp.asarray(a), jnp.asarray(b), jnp.int32(k))
  flat = np.concatenate([a.reshape(-1), b])
  want = np.zeros(flat.size, bool)
  want[np.argsort(flat, kind="stable")[:k]] = True
  got = np.concatenate([np.asarray(ma).reshape(-1), np.asarray(mb)])
  assert int(got.sum()) == k
  np.testing.assert_array_equal(got, want)
  assert int(jax.jit(topk.count_true)(ma)) == int(want[:a.size].sum())


def test_branches_agree_on_small_selections(branch):
  """The per-group selection and the random positions, through the branch under test."""
  rng = np.random.default_rng(1)
  x = rng.integers(-5, 5, 407).astype(np.float32)
  groups = (x > 0).astype(np.int32)
  got = np.asarray(jax.jit(topk.smallest_k_per_group)(jnp.asarray(x), jnp.asarray(groups),
                                                      jnp.array([30, 40])))
  for g, k in ((0, 30), (1, 40)):
    np.testing.assert_array_equal(got & (groups == g), reference_smallest(x, k, groups == g))
  allowed = jnp.asarray(rng.random(500) < 0.3)
  pos = np.asarray(jax.jit(topk.random_k_positions, static_argnums=3)(jax.random.key(2), 50,
                                                                      allowed, 64))
  assert len(set(pos[:50].tolist())) == 50 and np.asarray(allowed)[pos[:50]].all()
  assert (pos[50:] == 500).all()
  # Several arrays: per-array selections and counts (on one CPU device, from four arrays on,
  # over their concatenation).
  xs = [rng.integers(-3, 3, s).astype(np.float32) for s in ((7, 9), (40,), (3, 3, 2, 5), (1,))]
  valid = [rng.random(x.shape) < 0.7 for x in xs]
  ks = np.array([20, 11, 90, 1], np.int32)
  got = jax.jit(topk.smallest_k_each)([jnp.asarray(x) for x in xs], jnp.asarray(ks),
                                      [jnp.asarray(v) for v in valid])
  for x, v, k, g in zip(xs, valid, ks, got):
    np.testing.assert_array_equal(np.asarray(g).reshape(-1),
                                  reference_smallest(x.reshape(-1), k, v.reshape(-1)))
  ints = [rng.integers(0, 5, x.shape).astype(np.int32) for x in xs]
  for arrays in (valid, ints):
    counts = jax.jit(topk.count_true_each)([jnp.asarray(a) for a in arrays])
    np.testing.assert_array_equal(np.asarray(counts), [int(a.sum()) for a in arrays])


# ------------------------------------------- every layer in one selection

_each = jax.jit(topk.smallest_k_each)
_largest_each = jax.jit(topk.largest_k_each)
_random_each = jax.jit(topk.random_k_masks_each)
_positions_each = jax.jit(topk.random_k_positions_each, static_argnums=3)
EACH_SHAPES = [(5, 9), (64,), (2, 3, 4)]


@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]) | st.floats(-4, 4, width=32),
                min_size=sum(int(np.prod(s)) for s in EACH_SHAPES),
                max_size=sum(int(np.prod(s)) for s in EACH_SHAPES)),
       st.lists(st.integers(0, 70), min_size=3, max_size=3), st.integers(0, 2**31 - 1))
def test_each_array_gets_its_own_k_like_the_single_selection(values, ks, seed):
  flat = np.asarray(values, np.float32) + 0.0
  ends = np.cumsum([int(np.prod(s)) for s in EACH_SHAPES])
  xs = [flat[e - int(np.prod(s)):e].reshape(s) for s, e in zip(EACH_SHAPES, ends)]
  rng = np.random.default_rng(seed)
  valid = [rng.random(s) < 0.7 for s in EACH_SHAPES]
  got = _each([jnp.asarray(x) for x in xs], jnp.asarray(ks, jnp.int32),
              [jnp.asarray(v) for v in valid])
  big = _largest_each([jnp.asarray(x) for x in xs], jnp.asarray(ks, jnp.int32),
                      [jnp.asarray(v) for v in valid])
  for x, v, k, g, b in zip(xs, valid, ks, got, big):
    want = reference_smallest(x.reshape(-1), k, v.reshape(-1)).reshape(x.shape)
    np.testing.assert_array_equal(np.asarray(g), want)
    np.testing.assert_array_equal(
        np.asarray(b), reference_smallest(-x.reshape(-1), k, v.reshape(-1)).reshape(x.shape))
  rand = _random_each(jax.random.key(seed), jnp.asarray(ks, jnp.int32),
                      [jnp.asarray(v) for v in valid])
  for v, k, r in zip(valid, ks, rand):
    r = np.asarray(r)
    assert r.sum() == min(k, v.sum()) and not (r & ~v).any()


@pytest.mark.parametrize("fraction", [0.95, 0.04])  # 0.04 allowed: the exact fallback runs
def test_positions_each_are_distinct_allowed_and_uniform(fraction):
  shapes, sizes = [(40, 30), (500,), (7, 7)], (60, 25, 10)
  rng = np.random.default_rng(0)
  allowed = [rng.random(s) < fraction for s in shapes]
  ks = [min(s - 3, int(0.75 * a.sum())) for s, a in zip(sizes, allowed)]
  hits = [np.zeros(int(np.prod(s))) for s in shapes]
  for seed in range(200):
    out = _positions_each(jax.random.key(seed), jnp.asarray(ks, jnp.int32),
                          [jnp.asarray(a) for a in allowed], sizes)
    for a, k, size, o, h in zip(allowed, ks, sizes, out, hits):
      o = np.asarray(o)
      assert o.shape == (size,)
      chosen = o[:k]
      assert len(set(chosen.tolist())) == k and a.reshape(-1)[chosen].all()
      assert (o[k:] == a.size).all()
      h[chosen] += 1
  # uniform over the allowed positions: each is chosen in k / count(allowed) of the draws
  for a, k, h in zip(allowed, ks, hits):
    p = k / a.sum()
    freq = h[a.reshape(-1)] / 200
    assert abs(freq.mean() - p) < 1e-9
    assert np.abs(freq - p).max() < 5 * np.sqrt(p * (1 - p) / 200) + 1e-9
    assert not h[~a.reshape(-1)].any()


def test_per_array_selections_name_their_bad_arguments():
  xs = [jnp.ones((3, 4)), jnp.ones(5)]
  with pytest.raises(ValueError, match="k: one count per array \\(2\\), got shape \\(3,\\)"):
    topk.smallest_k_each(xs, jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match="valid must hold one array per score array"):
    topk.largest_k_each(xs, jnp.array([1, 2]), [xs[0] > 0])
  valid = [x > 0 for x in xs]
  with pytest.raises(ValueError, match="k: one count per array \\(2\\), got shape \\(\\)"):
    topk.random_k_masks_each(jax.random.key(0), 3, valid)
  with pytest.raises(ValueError, match="k: one count per array \\(2\\)"):
    topk.random_k_positions_each(jax.random.key(0), jnp.array([1]), valid, (4, 4))
  with pytest.raises(ValueError, match="sizes: one per allowed array"):
    topk.random_k_positions_each(jax.random.key(0), jnp.array([1, 1]), valid, (4,))
  with pytest.raises(ValueError, match="allowed: one or more non-empty arrays"):
    topk.random_k_positions_each(jax.random.key(0), jnp.array([1]), [jnp.ones(0, bool)], (1,))
  flat = jnp.concatenate([v.reshape(-1) for v in valid])
  with pytest.raises(ValueError, match="flat: the concatenation of 2 non-empty arrays of sizes n, "
                                       "got shape \\(17,\\) for n=\\[12, 4\\]"):
    topk.random_k_positions_flat(jax.random.key(0), jnp.array([1, 1]), flat, (12, 4), (4, 4))
  # the same draws and positions as from the arrays themselves
  want = topk.random_k_positions_each(jax.random.key(3), jnp.array([2, 3]), valid, (4, 4))
  got = topk.random_k_positions_flat(jax.random.key(3), jnp.array([2, 3]), flat, (12, 5), (4, 4))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(TypeError, match="xs\\[1\\]: count_true_each takes bool or integer"):
    topk.count_true_each([valid[0], xs[1]])
  with pytest.raises(ValueError, match="xs: count_true_each takes one or more arrays"):
    topk.count_true_each([])


# Several arrays of one shape (a network's repeated layers): each keeps its own k, its own
# ties and its place in the global order.
SAME_SHAPES = [(4, 5), (4, 5), (7,), (4, 5)]
_global = jax.jit(topk.smallest_k_masks)


@given(st.lists(st.sampled_from([-1.0, 0.0, 0.5]) | st.floats(-4, 4, width=32),
                min_size=67, max_size=67),
       st.lists(st.integers(0, 25), min_size=4, max_size=4), st.integers(0, 80),
       st.integers(0, 2**31 - 1))
def test_same_shaped_arrays_select_as_if_apart(values, ks, k_all, seed):
  flat = np.asarray(values, np.float32) + 0.0
  ends = np.cumsum([int(np.prod(s)) for s in SAME_SHAPES])
  xs = [flat[e - int(np.prod(s)):e].reshape(s) for s, e in zip(SAME_SHAPES, ends)]
  rng = np.random.default_rng(seed)
  valid = [rng.random(s) < 0.8 for s in SAME_SHAPES]
  jx, jv, jk = [jnp.asarray(x) for x in xs], [jnp.asarray(v) for v in valid], jnp.asarray(ks)
  for got, sign in ((_each(jx, jk, jv), 1), (_largest_each(jx, jk, jv), -1)):
    for x, v, k, g in zip(xs, valid, ks, got):
      want = reference_smallest(sign * x.reshape(-1), k, v.reshape(-1)).reshape(x.shape)
      np.testing.assert_array_equal(np.asarray(g), want)
  # One k over all arrays: ties go to the earlier array, then the lower flat index.
  want = reference_smallest(flat, k_all, np.concatenate([v.reshape(-1) for v in valid]))
  got = _global(jx, k_all, jv)
  np.testing.assert_array_equal(np.concatenate([np.asarray(g).reshape(-1) for g in got]), want)
  got = _global(jx, k_all)  # no validity given
  want = reference_smallest(flat, k_all, np.ones(flat.size, bool))
  np.testing.assert_array_equal(np.concatenate([np.asarray(g).reshape(-1) for g in got]), want)
  # Random masks: each array's k smallest of its slice of one draw of 32-bit keys.
  key = jax.random.key(seed)
  bits = np.asarray(jax.random.bits(key, (flat.size,), jnp.uint32))
  for i, r in enumerate(_random_each(key, jk, jv)):
    b = bits[ends[i] - valid[i].size:ends[i]]
    want = reference_smallest(b.astype(np.float64), ks[i], valid[i].reshape(-1))
    np.testing.assert_array_equal(np.asarray(r).reshape(-1), want)


@pytest.mark.parametrize("sizes", [[5], [3, 0, 4], [0, 2], [1, 1, 1, 1, 1, 300]])
def test_segment_ids_and_lookup_match_numpy(sizes, branch):
  """``lookup(values, segment_ids(sizes))`` is np.repeat(values, sizes) in both branches,
  built in the program (no array constant as long as the segments) for static and traced
  values, including sizes of 0 and uint32 values past 2**31."""
  from jaxsparse.analysis import lowering
  values = np.arange(len(sizes)) * 7 + 3
  ids = topk.segment_ids(sizes)
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(ids), np.repeat(np.arange(len(sizes)), sizes))
  np.testing.assert_array_equal(np.asarray(topk.lookup(values, ids, jnp.int32)),
                                np.repeat(values, sizes))
  big = np.asarray(values + (1 << 31) + 5, np.uint32)
  repeat = lambda v: topk.lookup(v, topk.segment_ids(sizes))
  got = jax.jit(repeat)(jnp.asarray(big))
  assert got.dtype == jnp.uint32
  np.testing.assert_array_equal(np.asarray(got), np.repeat(big, sizes))
  module = lowering.lower(repeat, jnp.asarray(big), platform="cuda")
  assert lowering.large_constants(module, min_elements=2) == []   # no array constant at all
  module = lowering.lower(lambda: topk.lookup(values, topk.segment_ids(sizes), jnp.int32),
                          platform="cpu")
  assert lowering.large_constants(module, min_elements=len(sizes) + 1) == []   # only values


def test_segment_ids_and_lookup_name_their_bad_arguments():
  with pytest.raises(ValueError, match=r"sizes: one or more non-negative sizes, got \[3, -1\]"):
    topk.segment_ids([3, -1])
  with pytest.raises(ValueError, match=r"sizes: .* got \[\]"):
    topk.segment_ids([])
  with pytest.raises(ValueError, match=r"values and ids: 1-D, got shapes \(2, 1\) and \(3,\)"):
    topk.lookup(np.ones((2, 1)), topk.segment_ids([1, 2]))


@pytest.mark.parametrize("n", [4096, 4000])   # 4096 divides 2**32: its bound wrapped to 0
def test_random_positions_take_the_rejection_draws_for_any_size(n):
  """With most positions allowed, the positions are the first k distinct allowed draws of
  ``bits % n`` (draws with ``bits >= (2**32 // n) * n`` rejected), as a numpy reference of
  the fast path computes them, for a power-of-two n too (all its draws were rejected, so
  every update fell back to a sort of the whole layer: 5 s per update of a 10M-parameter
  MLP on CPU)."""
  rng = np.random.default_rng(n)
  allowed = rng.random(n) < 0.9
  k, size = 100, 200
  key = jax.random.key(7)
  draws = min(2 * size + 1024, 4 * n)
  bits = np.asarray(jax.random.bits(key, (draws,), jnp.uint32)).astype(np.int64)
  fair = bits < (1 << 32) // n * n
  want, seen = [], set()
  for b, f in zip(bits % n, fair):
    if f and b not in seen and allowed[b]:
      want.append(int(b))
    seen.add(int(b)) if f else None
    if len(want) == k:
      break
  got = np.asarray(jax.jit(topk.random_k_positions, static_argnums=3)(
      key, k, jnp.asarray(allowed), size))
  assert got[:k].tolist() == want
  assert (got[k:] == n).all()


@pytest.mark.parametrize("sizes", [[5, 0, 70_001], [1], [3, 3]])
def test_random_bits_each_are_jax_draws_in_one_hash(sizes, branch):
  """``random_bits_each`` gives each key's ``jax.random.bits`` exactly, in both branches; the
  GPU/TPU program holds one threefry hash for all draws (each hash: ~220 ops on GPU), the CPU
  program one per draw (jax's own), unless the GPU/TPU branch is forced on it."""
  from jaxsparse.analysis import lowering
  keys = [jax.random.fold_in(jax.random.key(3), i) for i in range(len(sizes))]
  draw = jax.jit(lambda ks: topk.random_bits_each(ks, sizes))
  for got, key, n in zip(draw(keys), keys, sizes):
    assert got.dtype == jnp.uint32 and got.shape == (n,)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(jax.random.bits(key, (n,), jnp.uint32)))
  for platform in ("cpu", "cuda"):
    text = str(lowering.lower(draw, keys, platform=platform))
    hashes = text.count("func.func private @threefry2x32")
    one = platform == "cuda" or branch == "gpu_tpu_branch"
    assert hashes == (1 if one else len(set(sizes))), (platform, hashes)
    one_each = str(lowering.lower(lambda ks: [jax.random.bits(k, (n,), jnp.uint32)
                                              for k, n in zip(ks, sizes)], keys, platform=platform))
    assert one_each.count("func.func private @threefry2x32") == len(set(sizes))


def test_random_bits_each_draws_one_by_one_off_jax_default():
  """With ``jax_threefry_partitionable`` off, or a raw uint32 key, the draws are made one by one
  (jax's bits then follow another layout), and are still jax's; bad arguments are named."""
  keys = [jax.random.key(1), jax.random.key(2)]
  with jax.threefry_partitionable(False):
    got = topk.random_bits_each(keys, [10, 4])
    want = [jax.random.bits(k, (n,), jnp.uint32) for k, n in zip(keys, [10, 4])]
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  raw = jax.random.PRNGKey(5)
  np.testing.assert_array_equal(np.asarray(topk.random_bits_each([raw], [7])[0]),
                                np.asarray(jax.random.bits(raw, (7,), jnp.uint32)))
  with pytest.raises(ValueError, match=r"keys and sizes: as many keys as sizes \(>= 0\), got 2 "
                                       r"keys and sizes \[3\]"):
    topk.random_bits_each(keys, [3])
  with pytest.raises(ValueError, match=r"keys and sizes: .* got 1 keys and sizes \[-1\]"):
    topk.random_bits_each(keys[:1], [-1])


def test_positions_from_the_callers_bits_are_the_same():
  """``bits`` drawn by the caller (``random_bits_each`` with ``position_draws``) give the same
  positions as the positions' own draw; bits of another length or dtype are named."""
  rng = np.random.default_rng(0)
  allowed = [jnp.asarray(rng.random(s) < 0.8) for s in (300, 4096, 50)]
  n, sizes, k = [300, 4096, 50], (40, 100, 20), jnp.array([30, 90, 20])
  key = jax.random.key(11)
  bits, _ = topk.random_bits_each([key, jax.random.key(0)], [topk.position_draws(n, sizes), 9])
  assert bits.shape == (min(2 * 40 + 1024, 1200) + 2 * 100 + 1024 + min(2 * 20 + 1024, 200),)
  each = jax.jit(topk.random_k_positions_each, static_argnums=3)
  for got, want in zip(each(key, k, allowed, sizes, bits=bits), each(key, k, allowed, sizes)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # the draws come from bits, not key (with 80% allowed, the fallback, seeded by key, is not run)
  other = jax.random.key(12)
  bits_other = jax.random.bits(other, bits.shape, jnp.uint32)
  for got, want in zip(each(key, k, allowed, sizes, bits=bits_other), each(other, k, allowed, sizes)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  with pytest.raises(ValueError, match=r"bits: uint32 of shape \(2528,\) \(position_draws\(n, "
                                       r"sizes\)\), got uint32 of shape \(2527,\)"):
    topk.random_k_positions_each(key, k, allowed, sizes, bits=bits[:-1])
  with pytest.raises(ValueError, match=r"n and sizes: .* got n=\[300, 4096\] and sizes=\[40\]"):
    topk.position_draws([300, 4096], [40])
  flat = jnp.concatenate(allowed)
  with pytest.raises(ValueError, match=r"bits: uint32 .* got int32 of shape \(2528,\)"):
    topk.random_k_positions_flat(key, k, flat, n, sizes, bits=bits.astype(jnp.int32))


@pytest.mark.parametrize("size,block", [(7, 7), (5, 9), (4097, 1000), (3000, 1000)])
def test_bits_in_blocks_are_jax_draws(size, block):
  """The exact fallback's bits on GPU and TPU, hashed in blocks (one block, a short one, a
  ragged last block, whole blocks), are ``jax.random.bits`` for the same key, with either key
  layout."""
  key = jax.random.key(5)
  want = np.asarray(jax.random.bits(key, (size,), jnp.uint32))
  for per_entry in (False, True):
    got = jax.jit(topk._bits_in_blocks, static_argnums=(1, 2, 3))(key, size, block, per_entry)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_exact_fallback_is_the_same_in_both_branches(monkeypatch):
  """With too few allowed positions for the fast path, the exact fallback runs: on GPU and TPU
  it hashes its bits in blocks as long as the fast path's hash (one hash body in the program;
  two blocks here), and must pick the same positions as on CPU, with and without the
  caller's bits."""
  rng = np.random.default_rng(3)
  n, sizes, k = [4000, 300, 50], (10, 5, 3), jnp.array([10, 5, 3])
  allowed = [np.zeros(m, bool) for m in n]
  for a in allowed:
    a[rng.choice(a.size, 12, replace=False)] = True    # 12 allowed of 4,000: the fallback runs
  allowed = [jnp.asarray(a) for a in allowed]
  key = jax.random.key(4)
  draws = topk.position_draws(n, sizes)
  assert -(-sum(n) // (draws + sum(sizes))) == 2 and -(-sum(n) // draws) == 2

  def both():
    bits, _ = topk.random_bits_each([key, jax.random.key(1)], [draws, sum(sizes)])
    each = jax.jit(topk.random_k_positions_each, static_argnums=3)
    return ([np.asarray(o) for o in each(key, k, allowed, sizes)],
            [np.asarray(o) for o in each(key, k, allowed, sizes, bits=bits)])

  jax.clear_caches()
  cpu = both()
  monkeypatch.setattr(topk, "cpu_or_default", lambda cpu, default, *args: default(*args))
  jax.clear_caches()
  default = both()
  jax.clear_caches()
  for got, want in zip(default[0] + default[1], cpu[0] + cpu[1]):
    np.testing.assert_array_equal(got, want)
  for out, a, kk in zip(cpu[0], allowed, k):
    assert len(set(out[:int(kk)].tolist())) == int(kk) and np.asarray(a)[out[:int(kk)]].all()
