"""Dynamic sparse training: RigL, SNFS, DSR, DeepR and the shared vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, strategies as st

import jaxsparse as js
from jaxsparse.methods import deep_rewiring, dst
from jaxsparse.regularizers import penalties
from jaxsparse.core import schedules
from tests.helpers import batches, loss_fn, mlp_params


def one_update(tx, params, masks, grads, aux=None):
  """Runs one ``update`` at step 0 from the given masks; returns (new params, new state)."""
  state = tx.init(params)
  state = state._replace(masks=masks, **({} if aux is None else {"aux": aux}))
  params = js.apply_masks(params, masks)
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def flat_mask(n, on):
  m = np.zeros(n, bool)
  m[list(on)] = True
  return m


# ---------------------------------------------------------------- hand-computed single updates

def test_rigl_update_matches_hand_reference():
  w = np.array([0.5, -0.1, 0.3, 0.05, -0.7, 0.2, 0, 0, 0, 0, 0, 0], np.float32)
  g = np.array([0, 0.9, 0, 0, 0, 0, 0.8, 0.1, 0.7, 0, 0, 0.05], np.float32)
  params = {"a": {"kernel": jnp.asarray(w.reshape(3, 4) + 1.0)}}  # dense init, masked below
  masks = {"a": {"kernel": jnp.asarray(flat_mask(12, range(6)).reshape(3, 4))}}
  params = {"a": {"kernel": jnp.where(masks["a"]["kernel"], w.reshape(3, 4), 0.0)}}
  tx = dst.rigl(optax.sgd(0.0), 0.5, update_stop=10, drop_fraction=0.5, update_period=1,
                update_start=0)
  # f(0) = 0.5 -> drop floor(0.5 * 6) = 3 smallest |w|: positions 3, 1, 5; grow the 3
  # absent-after-drop positions of largest |g|: 1 (just dropped: keeps its value), 6, 8.
  new, state = one_update(tx, params, masks, {"a": {"kernel": jnp.asarray(g.reshape(3, 4))}})
  np.testing.assert_array_equal(np.asarray(js.get_masks(state)["a"]["kernel"]).ravel(),
                                flat_mask(12, [0, 1, 2, 4, 6, 8]))
  expect = np.zeros(12, np.float32)
  expect[[0, 1, 2, 4]] = [0.5, -0.1, 0.3, -0.7]
  np.testing.assert_array_equal(np.asarray(new["a"]["kernel"]).ravel(), expect)


def test_snfs_update_matches_hand_reference():
  wa = np.zeros(16, np.float32)
  wa[:8] = np.arange(1, 9) * 0.1
  wb = np.array([0.4, -0.3, 0.2, -0.1, 0, 0, 0, 0], np.float32)
  ga = np.zeros(16, np.float32)
  ga[:8] = 1.0                                     # mean |m| over A's active weights: 1
  ga[8:] = [0.5, 3.0, 0.1, 2.5, 0, 0, 0, 0]
  gb = np.array([2.0, -2.0, 2.0, -2.0, 1.5, 0.2, 1.0, 0.3], np.float32)  # B's mean: 2
  params = {"a": {"kernel": jnp.asarray(wa.reshape(4, 4))}, "b": {"kernel": jnp.asarray(wb.reshape(2, 4))}}
  masks = {"a": {"kernel": jnp.asarray(flat_mask(16, range(8)).reshape(4, 4))},
           "b": {"kernel": jnp.asarray(flat_mask(8, range(4)).reshape(2, 4))}}
  grads = {"a": {"kernel": jnp.asarray(ga.reshape(4, 4))}, "b": {"kernel": jnp.asarray(gb.reshape(2, 4))}}
  tx = dst.snfs(optax.sgd(0.0), 0.5, total_steps=100, update_period=1, update_start=0,
                momentum=0.0, distribution="uniform")
  # p(0) = 0.5: A drops ceil(4) = 4 (0..3), B drops ceil(2) = 2 (3, 2); the 6 are shared 1:2
  # by mean |momentum| -> A grows 2, B grows 4, each by largest |momentum| among its absent
  # weights (just-dropped included; those keep their values).
  new, state = one_update(tx, params, masks, grads)
  m = js.get_masks(state)
  np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]).ravel(), flat_mask(16, [4, 5, 6, 7, 9, 11]))
  np.testing.assert_array_equal(np.asarray(m["b"]["kernel"]).ravel(), flat_mask(8, [0, 1, 2, 3, 4, 6]))
  np.testing.assert_array_equal(np.asarray(new["b"]["kernel"]).ravel(),
                                np.array([0.4, -0.3, 0.2, -0.1, 0, 0, 0, 0], np.float32))
  assert not np.any(np.asarray(new["a"]["kernel"]).ravel()[[0, 1, 2, 3, 9, 11]])


def test_dsr_update_matches_hand_reference():
  wa = np.zeros(16, np.float32)
  wa[:8] = [0.1, -0.05, 0.3, 0.4, -0.5, 0.6, 0.7, 0.8]
  wb = np.array([0.12, -0.2, 0.3, -0.01, 0, 0, 0, 0], np.float32)
  params = {"a": {"kernel": jnp.asarray(wa.reshape(4, 4))}, "b": {"kernel": jnp.asarray(wb.reshape(2, 4))}}
  masks = {"a": {"kernel": jnp.asarray(flat_mask(16, range(8)).reshape(4, 4))},
           "b": {"kernel": jnp.asarray(flat_mask(8, range(4)).reshape(2, 4))}}
  grads = jax.tree.map(jnp.zeros_like, params)
  tx = dst.dsr(optax.sgd(0.0), 0.5, target_pruned=3, initial_threshold=0.15, tolerance=0.1,
               update_period=1, update_start=0)
  # |w| < 0.15 prunes A{0, 1} and B{0, 3}: K = 4 > 1.1 * 3, so H halves to 0.075. Survivors
  # R = (6, 2) share the K = 4 regrowths 3 : 1, at positions absent before the update.
  new, state = one_update(tx, params, masks, grads)
  m = jax.device_get(js.get_masks(state))
  ma, mb = np.asarray(m["a"]["kernel"]).ravel(), np.asarray(m["b"]["kernel"]).ravel()
  assert ma.sum() == 9 and mb.sum() == 3
  np.testing.assert_array_equal(ma[:8], flat_mask(8, range(2, 8)))  # pruned ones not regrown
  np.testing.assert_array_equal(mb[:4], flat_mask(4, [1, 2]))
  assert ma[8:].sum() == 3 and mb[4:].sum() == 1
  assert float(js.get_sparse_state(state).aux.drop.threshold) == pytest.approx(0.075)
  new_a = np.asarray(new["a"]["kernel"]).ravel()
  np.testing.assert_array_equal(new_a[:8], np.where(flat_mask(8, range(2, 8)), wa[:8], 0))
  assert not np.any(new_a[8:])  # regrown at zero


def test_set_drop_rule_matches_hand_reference():
  w = jnp.asarray([0.5, 0.1, 0.2, -0.3, -0.05, 0.0, 0.7, -0.9])
  m = jnp.asarray([1, 1, 1, 1, 1, 1, 0, 0], bool)
  layers = dst.Layers(("w",), (w,), (w,), (), (m,), jnp.int32(0), jax.random.key(0))
  (drop,), _ = dst.drop_set(0.5).apply(layers, ())
  # positives {0.5, 0.1, 0.2}: floor(1.5) = 1 -> 0.1; negatives {-0.3, -0.05}: 1 -> -0.05;
  # the active exact zero goes too.
  np.testing.assert_array_equal(np.asarray(drop), [0, 1, 0, 0, 1, 1, 0, 0])


def test_deepr_step_matches_hand_reference():
  init = jnp.asarray([[0.5, -0.2, 0.1], [0.3, -0.4, 0.6]])   # fixed signs + - + / + - +
  mask = jnp.asarray([[1, 1, 1], [0, 0, 0]], bool)
  tx = deep_rewiring.deep_r(optax.sgd(1.0), 0.5, seed=3)
  state = tx.init({"k": init})
  state = state._replace(masks={"k": mask})
  params = {"k": jnp.where(mask, init, 0.0)}
  grads = {"k": jnp.asarray([[0.1, -0.1, 0.3], [0.0, 0.0, 0.0]])}
  # w + u = (0.4, -0.1, -0.2): the third crosses its (+) sign -> dormant at exactly zero, and
  # one dormant connection (the just-dormant one included) is reactivated at zero.
  updates, state = tx.update(grads, state, params)
  new = np.asarray(optax.apply_updates(params, updates)["k"])
  m = np.asarray(js.get_masks(state)["k"])
  assert m.sum() == 3 and m[0, 0] and m[0, 1]
  np.testing.assert_allclose(new.ravel(), [0.4, -0.1, 0, 0, 0, 0], atol=1e-7)


def test_langevin_noise_has_the_stated_scale():
  tx = deep_rewiring.add_langevin_noise(temperature=0.5, learning_rate=0.02, seed=1)
  zeros = {"w": jnp.zeros(200_000)}
  u, _ = tx.update(zeros, tx.init(zeros))
  assert float(jnp.std(u["w"])) == pytest.approx(np.sqrt(2 * 0.02 * 0.5), rel=0.01)
  assert abs(float(jnp.mean(u["w"]))) < 0.002


# ---------------------------------------------------------------- redistribution

apportion = jax.jit(dst.apportion)


def test_apportion_hand_cases():
  np.testing.assert_array_equal(apportion(10, jnp.asarray([1., 1., 1.]), jnp.asarray([10, 10, 10])),
                                [4, 3, 3])                       # largest remainder, ties low index
  np.testing.assert_array_equal(apportion(10, jnp.asarray([1., 1.]), jnp.asarray([2, 100])),
                                [2, 8])                          # a capped leaf passes the excess on
  np.testing.assert_array_equal(apportion(7, jnp.asarray([0., 0.]), jnp.asarray([3, 5])),
                                [3, 4])                          # all shares zero: by free capacity
  np.testing.assert_array_equal(apportion(20, jnp.asarray([1., 3.]), jnp.asarray([4, 6])),
                                [4, 6])                          # not enough room: everything fills


@given(st.integers(0, 5000), st.lists(st.floats(0, 100), min_size=1, max_size=8),
       st.lists(st.integers(0, 3000), min_size=8, max_size=8))
@example(10, [0.0, 0.0, 0.0, 0.0, 1.175494351e-38], [0, 0, 0, 0, 10, 0, 0, 0])  # tiny shares
@example(10, [4.2e-32], [10] * 8)
def test_apportion_properties(total, shares, caps):
  shares = np.asarray(shares, np.float32)
  cap = np.asarray(caps[:len(shares)], np.int32)
  pad = 8 - len(shares)   # fixed length 8 (empty leaves get nothing): one compilation
  got = np.asarray(apportion(total, jnp.asarray(np.pad(shares, (0, pad))),
                             jnp.asarray(np.pad(cap, (0, pad)))))
  assert not got[len(shares):].any()
  got = got[:len(shares)]
  assert got.sum() == min(total, cap.sum())
  assert np.all(got >= 0) and np.all(got <= cap)
  if np.all(cap >= total) and shares.sum() > 0:   # no cap binds: within one of the exact share
    quota = total * shares / shares.sum()
    assert np.all(np.abs(got - quota) < 1 + 1e-3)


_ranks = jax.jit(dst._stable_ranks)


@given(st.lists(st.sampled_from([-1.0, -0.0, 0.0, 0.25, 2.0])
                | st.floats(-3, 3, width=32, allow_subnormal=False), min_size=12, max_size=12))
def test_stable_ranks_are_a_stable_argsort(values):
  # apportion's largest-remainder ranks: position in a stable ascending sort, ties (and
  # -0.0 == 0.0, as in jnp.argsort) to the lower index. (XLA:CPU flushes subnormals to zero
  # in comparisons, in jnp.argsort as here; numpy does not.)
  x = np.asarray(values, np.float32)
  want = np.empty(x.size, np.int64)
  want[np.argsort(x + 0.0, kind="stable")] = np.arange(x.size)
  np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(x))), want)
  by_argsort = jnp.zeros(x.size, jnp.int32).at[jnp.argsort(jnp.asarray(x), stable=True)].set(
      jnp.arange(x.size, dtype=jnp.int32))
  np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(x))), np.asarray(by_argsort))


def test_stable_ranks_of_many_leaves_sort_instead():
  # past _PAIRWISE_RANKS_MAX entries the ranks come from an argsort: the same ranks
  rng = np.random.default_rng(0)
  x = rng.choice([0.0, 0.5, 1.0], dst._PAIRWISE_RANKS_MAX + 50).astype(np.float32)
  want = np.empty(x.size, np.int64)
  want[np.argsort(x, kind="stable")] = np.arange(x.size)
  np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(x))), want)
  small = x[:dst._PAIRWISE_RANKS_MAX]                        # the pairwise path, same ties
  np.testing.assert_array_equal(np.asarray(_ranks(jnp.asarray(small))),
                                np.argsort(np.argsort(small, kind="stable"), kind="stable"))


def test_apportion_compiles_without_sorts_or_scatters():
  # a mask update's compile time goes by XLA kernels; sorts and scatters each start new ones
  text = apportion.lower(10, jnp.ones(5), jnp.full(5, 4)).compile().as_text()
  assert " sort(" not in text and " scatter(" not in text


# ---------------------------------------------------------------- DSR threshold dynamics

@pytest.mark.parametrize("h0", [1e-3, 1.0])
def test_dsr_threshold_converges_into_the_tolerance_band(h0):
  # |w| evenly spread on (0, 1): K(H) ~ 10000 H, so Np = 320 is reached from H0 = 1e-3 after
  # five doublings (H = 0.032) and from H0 = 1 after five halvings (H = 1/32).
  n, np_target = 10_000, 320
  w = (jnp.arange(n) + 0.5) / n * jnp.where(jnp.arange(n) % 2 == 0, 1.0, -1.0)
  rule = dst.drop_threshold(np_target, initial_threshold=h0, tolerance=0.1)
  layers = dst.Layers(("w",), (w,), (w,), (), (jnp.ones(n, bool),), jnp.int32(0), jax.random.key(0))
  state, ks, hs = rule.init(), [], []
  apply = jax.jit(lambda state: rule.apply(layers, state))
  for _ in range(12):
    (drop,), state = apply(state)
    ks.append(int(drop.sum()))
    hs.append(float(state.threshold))
  assert hs[-1] == pytest.approx(0.032 if h0 < 1 else 1 / 32)
  assert len(set(hs[6:])) == 1                                # H stays put once in the band
  assert all(0.9 * np_target <= k <= 1.1 * np_target for k in ks[6:])


def _reference_threshold_drops(ws, ms, h):
  """DSR's drop from the paper and the authors' code, in numpy: each active |w| < h, and a
  leaf that would lose every active weight keeps its largest (the first on ties)."""
  out = []
  for w, m in zip(ws, ms):
    a = np.abs(w).reshape(-1)
    d = m.reshape(-1) & (a < h)
    if not (m.reshape(-1) & ~d).any() and m.any():
      d[np.argmax(np.where(m.reshape(-1), a, -1.0))] = False
    out.append(d.reshape(w.shape))
  return out


def test_dsr_drop_matches_numpy_on_many_leaves():
  """Five leaves: one whose weights all fall under H keeps its largest, the first of two tied;
  one with no active weight; a 4-D one. The same drops as a numpy reference of the rule."""
  rng = np.random.default_rng(0)
  shapes = [(6, 5), (3, 3, 2, 4), (40,), (7,), (12,)]
  ws = [rng.normal(0, 0.2, s).astype(np.float32) for s in shapes]
  ms = [rng.random(s) < 0.6 for s in shapes]
  ws[2] = np.where(np.arange(40) % 2, 0.01, -0.01).astype(np.float32)  # all under H,
  ws[2][[5, 17]] = [0.04, -0.04]                                     # two tied largest
  ms[2] = np.ones(40, bool)
  ms[3] = np.zeros(7, bool)                                          # no active weight
  h = 0.05
  rule = dst.drop_threshold(10, initial_threshold=h)
  layers = dst.Layers(tuple("abcde"), tuple(map(jnp.asarray, ws)), tuple(map(jnp.asarray, ws)),
                      (), tuple(map(jnp.asarray, ms)), jnp.int32(0), jax.random.key(0))
  drops, _ = jax.jit(lambda state: rule.apply(layers, state))(rule.init())
  want = _reference_threshold_drops(ws, ms, h)
  assert not want[2][5] and want[2].sum() == 39
  for got, w in zip(drops, want):
    np.testing.assert_array_equal(np.asarray(got), w)


# ---------------------------------------------------------------- invariants over 500 jitted steps

def _stats_fn(tx):
  @jax.jit
  def stats(params, opt_state, signs):
    masks = js.get_masks(opt_state)
    out = []
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
      if m.ndim:
        out.append((jnp.sum(m), jnp.max(jnp.abs(jnp.where(m, 0.0, p)))))
    viol = sum(jnp.sum(jnp.where(s, p < 0, p > 0)) for p, s in
               zip([p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)) if m.ndim], signs))
    return out, viol
  return stats


def _methods():
  return {
      "rigl": lambda inner: dst.rigl(inner, 0.9, update_stop=400, update_period=10),
      "snfs": lambda inner: dst.snfs(inner, 0.9, total_steps=500, update_period=10),
      "dsr": lambda inner: dst.dsr(inner, 0.9, target_pruned=40, update_period=10,
                                   doubling_steps=(250,), update_stop=450),
      "deepr": lambda inner: deep_rewiring.deep_r(
          optax.chain(penalties.add_l1(1e-5), inner,
                      deep_rewiring.add_langevin_noise(1e-6, 0.05)), 0.9),
      "set+gradient growth, DSR reallocation": lambda inner: dst.dynamic_sparse(
          inner, 0.9, drop=dst.drop_set(0.3), grow=dst.grow_gradient(),
          redistribute=dst.by_nonzeros(), is_update_step=schedules.periodic(10, 10)),
  }


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(_methods()))
def test_invariants_over_500_jitted_steps(name):
  tx = optax.chain(optax.clip_by_global_norm(5.0),
                   _methods()[name](optax.sgd(0.05, momentum=0.9, nesterov=True)))
  params = mlp_params(jax.random.key(1))
  state = tx.init(params)
  params = js.apply_masks(params, js.get_masks(state))
  aux = js.get_sparse_state(state).aux
  signs = aux if name == "deepr" else tuple(jnp.zeros(()) > 1 for _ in range(3))
  budget = sum(int(m.sum()) for m in jax.tree.leaves(js.get_masks(state)) if m.ndim)
  first = [int(m.sum()) for m in jax.tree.leaves(js.get_masks(state)) if m.ndim]
  traces = []

  @jax.jit
  def step(params, opt_state, x, y):
    traces.append(1)
    updates, opt_state = tx.update(jax.grad(loss_fn)(params, x, y), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  stats = _stats_fn(tx)
  per_layer_moved = False
  old = js.get_masks(state)
  changed = 0
  for t, (x, y) in enumerate(batches(500, seed=2)):
    params, state = step(params, state, x, y)
    leaves, viol = jax.device_get(stats(params, state, signs if name == "deepr" else ()))
    counts = [int(c) for c, _ in leaves]
    assert sum(counts) == budget, (t, counts)
    assert all(float(mx) == 0.0 for _, mx in leaves), f"masked weight non-zero at step {t}"
    if name in ("rigl", "deepr"):
      assert counts == first, (t, counts)
    per_layer_moved |= counts != first
    if name == "deepr":
      assert int(viol) == 0, f"a weight disagrees with its fixed sign at step {t}"
    if t % 50 == 0:
      new = js.get_masks(state)
      changed += sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
      old = new
  assert len(traces) == 1, "the train step recompiled"
  assert changed > 0, "the masks never changed"
  if name in ("dsr", "snfs", "set+gradient growth, DSR reallocation"):
    assert per_layer_moved, "per-layer counts never moved"
  assert np.isfinite(float(loss_fn(params, x, y)))


# ---------------------------------------------------------------- composition

@pytest.mark.parametrize("name", ["rigl", "snfs", "dsr", "deepr"])
def test_composes_with_clip_adam_and_multisteps(name):
  # (the 500-step invariant test above runs each method after a clip, around sgd+nesterov)
  tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), _methods()[name](optax.adam(1e-2))),
                        every_k_schedule=2)
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)
  params = js.apply_masks(params, js.get_masks(state))
  budget = sum(int(m.sum()) for m in jax.tree.leaves(js.get_masks(state)) if m.ndim)
  first = js.get_masks(state)
  step = jax.jit(lambda p, s, x, y: (lambda u_s: (optax.apply_updates(p, u_s[0]), u_s[1]))(
      tx.update(jax.grad(loss_fn)(p, x, y), s, p)))
  l0 = None
  for x, y in batches(80, seed=1):
    l0 = float(loss_fn(params, x, y)) if l0 is None else l0
    params, state = step(params, state, x, y)
  masks = js.get_masks(state)
  assert sum(int(m.sum()) for m in jax.tree.leaves(masks) if m.ndim) == budget
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(masks)))
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    if m.ndim:
      assert not bool(jnp.any(jnp.where(m, 0.0, p)))
  assert float(loss_fn(params, x, y)) < l0


# ---------------------------------------------------------------- bad input

def test_bad_input_names_the_argument():
  inner = optax.sgd(0.1)
  with pytest.raises(ValueError, match="target_pruned"):
    dst.dsr(inner, 0.9, target_pruned=0)
  for bad in (0.0, 1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match="tolerance"):
      dst.dsr(inner, 0.9, tolerance=bad)
  with pytest.raises(ValueError, match="initial_threshold"):
    dst.dsr(inner, 0.9, initial_threshold=-1.0)
  with pytest.raises(ValueError, match="temperature"):
    deep_rewiring.add_langevin_noise(-1e-5, 0.1)
  with pytest.raises(ValueError, match="temperature"):
    deep_rewiring.deep_r_optimizer(0.1, temperature=-1.0)
  with pytest.raises(ValueError, match="drop_fraction"):
    dst.rigl(inner, 0.9, update_stop=100, drop_fraction=1.5)
  with pytest.raises(ValueError, match="drop_fraction"):
    dst.drop_magnitude(-0.1)
  with pytest.raises(ValueError, match="drop_fraction"):
    dst.drop_set(2.0)
  with pytest.raises(ValueError, match="drop_fraction"):
    dst.snfs(inner, 0.9, total_steps=100, update_period=10, drop_fraction=1.2)
  with pytest.raises(ValueError, match="min_drop_fraction"):
    dst.snfs(inner, 0.9, total_steps=100, update_period=10, min_drop_fraction=0.6)
  with pytest.raises(ValueError, match="regrown"):
    dst.dynamic_sparse(inner, 0.9, drop=dst.drop_magnitude(), grow=dst.grow_random(),
                       is_update_step=schedules.periodic(10), regrown="sometimes")
  with pytest.raises(TypeError, match="grow"):
    dst.dynamic_sparse(inner, 0.9, drop=dst.drop_magnitude(), grow="random",
                       is_update_step=schedules.periodic(10))
  with pytest.raises(ValueError, match="sparsity"):
    dst.rigl(inner, 1.0, update_stop=100, update_period=10)


@pytest.mark.parametrize("name", ["rigl", "snfs", "dsr"])
def test_nan_gradient_at_an_update_step_leaves_the_masks_alone(name):
  tx = _methods()[name](optax.sgd(0.05))
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)
  params = js.apply_masks(params, js.get_masks(state))
  grads = jax.grad(loss_fn)(params, *next(iter(batches(1))))
  grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  state = state._replace(count=jnp.int32(10))                      # an update step
  _, new = jax.jit(tx.update)(grads, state, params)
  for a, b in zip(jax.tree.leaves(js.get_masks(state)), jax.tree.leaves(js.get_masks(new))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  if name == "dsr":
    assert float(new.aux.drop.threshold) == float(state.aux.drop.threshold)


# ---------------------------------------------------------------- block granularity

@pytest.mark.parametrize("name", ["rigl", "dsr", "block_set"])
def test_block_granularity_keeps_masks_constant_on_blocks(name):
  bs = (8, 8)
  make = {"rigl": lambda i: dst.rigl(i, 0.8, update_stop=150, update_period=10, block_shape=bs),
          "dsr": lambda i: dst.dsr(i, 0.8, target_pruned=4, update_period=10, block_shape=bs),
          "block_set": lambda i: dst.block_set(i, 0.8, block_shape=bs, update_period=10)}[name]
  tx = make(optax.sgd(0.05, momentum=0.9))
  params = mlp_params(jax.random.key(0), sizes=(64, 64, 32, 16))
  state = tx.init(params)
  params = js.apply_masks(params, js.get_masks(state))
  budget = sum(int(m.sum()) for m in jax.tree.leaves(js.get_masks(state)) if m.ndim)
  assert budget % 64 == 0
  first = js.get_masks(state)
  traces = []

  @jax.jit
  def step(p, s, x, y):
    traces.append(1)
    u, s = tx.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, u), s

  for x, y in batches(150, seed=3):
    params, state = step(params, state, x, y)
    masks = js.get_masks(state)
    for m in jax.tree.leaves(masks):
      if m.ndim:
        blocks = np.asarray(m).reshape(m.shape[0] // 8, 8, m.shape[1] // 8, 8)
        assert np.all(blocks.all(axis=(1, 3)) == blocks.any(axis=(1, 3)))
    assert sum(int(m.sum()) for m in jax.tree.leaves(masks) if m.ndim) == budget
  assert len(traces) == 1, "the train step recompiled"
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(masks)))
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    if m.ndim:
      assert not bool(jnp.any(jnp.where(m, 0.0, p)))


def test_block_shape_must_divide_the_leaves():
  params = mlp_params(jax.random.key(0))           # fc3 is 32 x 10
  with pytest.raises(ValueError, match="fc3"):
    dst.rigl(optax.sgd(0.1), 0.8, update_stop=100, update_period=10, block_shape=(8, 8)).init(params)
  with pytest.raises(ValueError, match="block_shape"):
    dst.rigl(optax.sgd(0.1), 0.8, update_stop=100, update_period=10, block_shape=(8,))


# ---------------------------------------------------------------- deprecated keyword names

def _masks_after(tx, steps=3):
  params = mlp_params(jax.random.key(0))
  state, update = tx.init(params), jax.jit(tx.update)
  for x, y in batches(steps, batch=16):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return js.get_masks(state)


_RENAMED = [  # (factory, deprecated keywords, the same under their new names)
    (lambda **kw: js.sparse_evolutionary_training(optax.sgd(0.1), 0.8, update_period=1,
                                                  update_start=1, **kw),
     {"zeta": 0.5}, {"drop_fraction": 0.5}),
    (lambda **kw: dst.snfs(optax.sgd(0.1, 0.9), 0.8, total_steps=3, update_period=1,
                           update_start=1, **kw),
     {"prune_rate": 0.4, "min_prune_rate": 0.1}, {"drop_fraction": 0.4, "min_drop_fraction": 0.1}),
    (lambda **kw: dst.block_set(optax.sgd(0.1), 0.5, block_shape=(2, 2), update_period=1,
                                update_start=1, filter=lambda n, p: n == "fc2/kernel", **kw),
     {"zeta": 0.5}, {"drop_fraction": 0.5}),
    (lambda **kw: dst.dynamic_sparse(optax.sgd(0.1), 0.8, drop=dst.drop_magnitude(**kw),
                                     grow=dst.grow_gradient(),
                                     is_update_step=schedules.periodic(1, 1)),
     {"fraction": 0.4}, {"drop_fraction": 0.4}),
    (lambda **kw: dst.dynamic_sparse(optax.sgd(0.1), 0.8, drop=dst.drop_set(**kw),
                                     grow=dst.grow_random(),
                                     is_update_step=schedules.periodic(1, 1)),
     {"zeta": 0.4}, {"drop_fraction": 0.4}),
]


@pytest.mark.parametrize("make,old,new", _RENAMED, ids=["set", "snfs", "block_set",
                                                        "drop_magnitude", "drop_set"])
def test_deprecated_drop_fraction_names_warn_and_give_the_same_masks(make, old, new):
  for o, n in zip(old, new):
    with pytest.warns(DeprecationWarning, match=f"'{o}' is deprecated; use '{n}'"):
      make(**{o: old[o]})
  with pytest.warns(DeprecationWarning):
    deprecated = _masks_after(make(**old))
  expected = _masks_after(make(**new))
  for a, b in zip(jax.tree.leaves(deprecated), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.all(np.asarray(m)) for m in jax.tree.leaves(expected))  # a sparse leaf
  o, n = next(iter(old)), next(iter(new))
  with pytest.raises(TypeError, match=f"got both '{o}' and '{n}'"):
    make(**{o: old[o], n: new[n]})
