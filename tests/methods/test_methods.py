"""SET and magnitude pruning against hand-computed references on tiny inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.methods import sparse_evolutionary as se
from tests.helpers import batches, make_step, mlp_params


def test_set_drop_and_rewire_hand_example():
  w = jnp.array([[0.5, -0.2, 0.0, 0.1],
                 [-0.9, 0.3, 0.7, -0.05],
                 [0.2, -0.4, 9.0, 0.0]])
  m = jnp.array([[1, 1, 1, 1],
                 [1, 1, 1, 1],
                 [1, 1, 0, 0]], bool)
  active = jnp.flatnonzero(m, size=10).astype(jnp.int32)
  # active positives: 0.5, 0.1, 0.3, 0.7, 0.2 -> floor(0.5 * 5) = 2 smallest: 0.1, 0.2
  # active negatives: -0.2, -0.9, -0.05, -0.4 -> floor(0.5 * 4) = 2 closest to 0: -0.05, -0.2
  # the active exact zero at [0, 2] is removed as well; 9.0 is masked and stays absent.
  drop = np.asarray(se.set_drop(w.reshape(-1)[active], jnp.float32(0.5)))
  np.testing.assert_array_equal(np.asarray(active)[drop],
                                [1, 2, 3, 7, 8])
  new, kept, new_active = se.set_rewire(jax.random.key(0), w, m, active, jnp.float32(0.5))
  expected_kept = np.array([[1, 0, 0, 0],
                            [1, 1, 1, 0],
                            [0, 1, 0, 0]], bool)
  np.testing.assert_array_equal(np.asarray(kept), expected_kept)
  new = np.asarray(new)
  assert new.sum() == 10 and np.all(new[expected_kept])
  np.testing.assert_array_equal(np.sort(np.asarray(new_active)), np.flatnonzero(new))

  # zeta= is the deprecated name of drop_fraction: it warns and gives the same result.
  for fn, args in ((se.set_drop, (w.reshape(-1)[active],)),
                   (se.set_drop_each, ([w.reshape(-1)[active]],)),
                   (se.set_rewire, (jax.random.key(0), w, m, active)),
                   (se.set_rewire_each, (jax.random.key(0), [w], [m], [active]))):
    with pytest.warns(DeprecationWarning, match="'zeta' is deprecated; use 'drop_fraction'"):
      old = fn(*args, zeta=jnp.float32(0.5))
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(fn(*args, jnp.float32(0.5)))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

def test_set_regrowth_is_uniform_over_absent_connections():
  # 2 of 8 weights active; both are dropped every update (drop_fraction=1), so 2 of the 8 positions
  # are drawn anew each time: each position should be chosen with probability 1/4.
  mask = jnp.zeros((2, 4), bool).at[0, 0].set(True).at[1, 3].set(True)
  w = jnp.where(mask, 1.0, 0.0)
  active = jnp.flatnonzero(mask, size=2).astype(jnp.int32)
  keys = jax.random.split(jax.random.key(0), 2000)
  new = jax.jit(jax.vmap(lambda k: se.set_rewire(k, w, mask, active, jnp.float32(1.0))[0]))(keys)
  new = np.asarray(new).reshape(2000, -1)
  assert (new.sum(1) == 2).all()
  freq = new.mean(0)
  assert np.all(np.abs(freq - 0.25) < 0.04), freq


def test_set_transform_one_update_by_hand():
  w = jnp.array([[0.5, -0.2, 0.1, 0.0], [-0.9, 0.3, -0.05, 0.0]])
  params = {"w": w, "b": jnp.zeros(4)}
  tx = js.sparse_evolutionary_training(optax.sgd(0.0), 0.25, drop_fraction=0.5, update_period=1,
                                       update_start=0, regrowth="zero")
  state = tx.init(params)
  mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
  active = jnp.flatnonzero(mask, size=6).astype(jnp.int32)
  state = state._replace(masks={"w": mask, "b": state.masks["b"]},
                         aux=state.aux._replace(active=active))
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  new = np.asarray(optax.apply_updates(params, updates)["w"])
  m = np.asarray(state.masks["w"])
  # positives 0.5, 0.1, 0.3 -> drop floor(1.5) = 1: 0.1; negatives -0.2, -0.9, -0.05 -> drop -0.05.
  # Two removed, two regrown among the four absent positions (the two just dropped and the
  # two never active), at exactly zero.
  kept = np.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)
  assert m.sum() == 6 and np.all(m[kept])
  np.testing.assert_array_equal(new, np.where(kept, np.asarray(w), 0.0))
  np.testing.assert_array_equal(np.sort(np.asarray(state.aux.active)), np.flatnonzero(m))


def test_set_state_holds_one_index_array_for_its_rewired_layers():
  """SET keeps the active indices of every rewired layer in one int32 array, end to end in
  leaf order (an update writes one output, not one per layer); a layer at density 1 is not
  rewired and holds none. With four rewired layers the CPU program takes the concatenated
  path; each layer's slots must stay its own active weights over the updates."""
  import warnings
  params = mlp_params(jax.random.key(0), sizes=(64, 48, 40, 32, 24, 10))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    counts = js.kept_counts(params, 0.5, distribution="er")
  rewired = [n for n in counts if counts[n] < params[n.split("/")[0]]["kernel"].size]
  assert rewired == ["fc1/kernel", "fc2/kernel", "fc3/kernel", "fc4/kernel"]  # fc5 is full
  tx = js.sparse_evolutionary_training(optax.sgd(0.05, momentum=0.9), 0.5, update_period=2,
                                       update_start=0)
  step = make_step(tx)
  state = tx.init(params)
  for t, (x, y) in enumerate(batches(7)):
    active = js.get_sparse_state(state).aux.active
    assert active.dtype == jnp.int32 and active.shape == (sum(counts[n] for n in rewired),), t
    masks = js.get_masks(state)
    pieces = np.split(np.asarray(active), np.cumsum([counts[n] for n in rewired])[:-1])
    for name, idx in zip(rewired, pieces):
      m = np.asarray(masks[name.split("/")[0]]["kernel"]).reshape(-1)
      np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(m), err_msg=f"{name}, step {t}")
    assert np.all(np.asarray(masks["fc5"]["kernel"]))
    params, state = step(params, state, x, y)


def test_gradual_pruning_follows_zhu_gupta_schedule():
  s_f, s_i, t0, n, dt = 0.9, 0.1, 4, 5, 3
  tx = js.gradual_pruning(optax.sgd(0.05), s_f, initial_sparsity=s_i, begin_step=t0,
                          num_updates=n, update_period=dt)
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)
  step = make_step(tx)
  final = js.kept_counts(params, s_f)
  for t, (x, y) in enumerate(batches(t0 + n * dt + 5)):
    params, state = step(params, state, x, y)
    if t < t0:
      s_t = 0.0
    else:
      last = t0 + min((t - t0) // dt, n) * dt
      s_t = s_f + (s_i - s_f) * (1 - (last - t0) / (n * dt)) ** 3
    for c in js.count_leaves(params, js.get_masks(state)):
      if c.sparse:  # each leaf prunes the fraction s_t / s_f of its final pruning
        assert c.kept == c.total - round((c.total - final[c.name]) * s_t / s_f), (t, c)
        assert abs(c.sparsity - s_t) <= 1.0 / c.total + 1e-9
  assert js.sparsity(params, js.get_masks(state)) == pytest.approx(s_f, abs=1e-3)


def numpy_magnitude(params, sparsity, scope):
  ws = {k: np.abs(np.asarray(v["kernel"])) for k, v in params.items()}
  if scope == "local":
    out = {}
    for k, w in ws.items():
      keep = w.size - round(w.size * sparsity)
      order = np.argsort(-w.reshape(-1), kind="stable")[:keep]
      m = np.zeros(w.size, bool)
      m[order] = True
      out[k] = m.reshape(w.shape)
    return out
  flat = np.concatenate([w.reshape(-1) for w in ws.values()])
  keep = round(flat.size * (1 - sparsity))
  m = np.zeros(flat.size, bool)
  m[np.argsort(-flat, kind="stable")[:keep]] = True
  out, off = {}, 0
  for k, w in ws.items():
    out[k] = m[off:off + w.size].reshape(w.shape)
    off += w.size
  return out


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_shot_magnitude_matches_numpy(scope, seed):
  params = mlp_params(jax.random.key(seed))
  masks = js.magnitude_masks(params, 0.8, scope=scope)
  ref = numpy_magnitude(params, 0.8, scope)
  for k in params:
    np.testing.assert_array_equal(np.asarray(masks[k]["kernel"]), ref[k])
    assert masks[k]["bias"].shape == ()
  if scope == "global":  # layer densities differ, the total is exact
    assert len({float(m.mean()) for m in ref.values()}) > 1


def test_magnitude_pruning_transform_prunes_once_then_keeps_mask():
  tx = js.magnitude_pruning(optax.sgd(0.05), 0.7, prune_step=3, scope="global")
  params = mlp_params(jax.random.key(0))
  state = tx.init(params)
  step = make_step(tx)
  history = []
  for x, y in batches(10):
    params, state = step(params, state, x, y)
    history.append(js.sparsity(params, js.get_masks(state)))
  assert history[:3] == [0.0, 0.0, 0.0]
  assert all(h == pytest.approx(0.7, abs=1e-3) for h in history[3:])


def test_random_pruning_counts_and_seed():
  params = mlp_params(jax.random.key(0))
  tx = js.random_pruning(optax.sgd(0.05), 0.5, prune_step=0, seed=3)
  state = tx.init(params)
  updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  params = optax.apply_updates(params, updates)
  counts = {c.name: c.kept for c in js.count_leaves(params, state.masks) if c.sparse}
  assert counts == {"fc1/kernel": 2048, "fc2/kernel": 1024, "fc3/kernel": 160}


def test_lottery_rewind_keeps_mask_and_init_values():
  init = mlp_params(jax.random.key(0))
  tx = js.gradual_pruning(optax.sgd(0.1), 0.8, num_updates=2, update_period=5)
  params, state = init, tx.init(init)
  step = make_step(tx)
  for x, y in batches(15):
    params, state = step(params, state, x, y)
  masks = js.get_masks(state)
  ticket = js.rewind(init, masks)
  for w0, w, m in zip(jax.tree.leaves(init), jax.tree.leaves(ticket), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(np.asarray(w), np.where(np.asarray(m), np.asarray(w0), 0))
  tx2 = js.keep_masks(optax.sgd(0.1), masks)
  state2 = tx2.init(ticket)
  step2 = make_step(tx2)
  for x, y in batches(5):
    ticket, state2 = step2(ticket, state2, x, y)
  assert js.sparsity(ticket, js.get_masks(state2)) == pytest.approx(0.8, abs=1e-3)


def test_pruning_bad_input():
  with pytest.raises(ValueError, match="scope"):
    js.magnitude_pruning(optax.sgd(0.1), 0.5, scope="layer")
  with pytest.raises(ValueError, match="update_period"):
    js.gradual_pruning(optax.sgd(0.1), 0.5, update_period=-1)
  with pytest.raises(ValueError, match="final_sparsity"):
    js.gradual_pruning(optax.sgd(0.1), 1.2)
  with pytest.raises(ValueError, match="num_updates"):
    js.gradual_pruning(optax.sgd(0.1), 0.5, num_updates=0)

