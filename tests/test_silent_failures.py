"""Issue 20, "No silent failures": one test per item, each failing on the code before the fix.

Small on purpose: one- or two-leaf models and a single jitted update where that is enough.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import jaxsparse as js
from jaxsparse.core import distributions as dist
from jaxsparse.methods import dst
from jaxsparse.pruning import structured
from tests.helpers import batches, loss_fn, make_step, mlp_params


def removed_and_zero(params, masks):
  """Numpy reference of js.sparsity: fraction of sparse-leaf weights masked *and* zero."""
  gone = total = 0
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
    if np.ndim(m):
      p, m = np.asarray(p), np.asarray(m)
      gone += np.count_nonzero(~m & (p == 0))
      total += p.size
  return gone / total


# ---------------------------------------------------------------- 1. method not last in a chain

def test_1_a_transform_after_the_method_is_detected_and_the_reports_count_real_zeros():
  params = mlp_params(jax.random.key(0))
  # gradual pruning with an update at every step (steps 0-3; the first prune at step 1), so
  # that the state's check, made at mask updates, finds the leak at steps 2 and 3
  method = lambda inner: js.gradual_pruning(inner, 0.9, num_updates=3, update_period=1)
  wrong = optax.chain(method(optax.scale_by_adam()), optax.scale_by_learning_rate(1e-2))
  right = method(optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-2)))
  out = {}
  for name, tx in (("wrong", wrong), ("right", right)):
    state = tx.init(params)
    p = params
    step = make_step(tx)
    for x, y in batches(4):
      p, state = step(p, state, x, y)
    out[name] = p, state
  p, state = out["wrong"]
  masks = js.get_sparse_state(state).masks
  real = removed_and_zero(p, masks)
  assert real < 0.5                           # most masked weights are non-zero now
  with pytest.warns(RuntimeWarning, match="non-zero in params"):
    assert js.sparsity(p, masks) == pytest.approx(real, abs=1e-12)
  with pytest.warns(RuntimeWarning):
    assert "WARNING" in js.summary(p, masks)
  assert int(js.get_sparse_state(state).health.unmasked) == 2  # found at steps 2 and 3
  with pytest.warns(RuntimeWarning, match="put the method last"):
    js.get_masks(state)
  # The same optimizer with the method last: silent, and the target sparsity is real.
  p, state = out["right"]
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)
    masks = js.get_masks(state)
    assert js.sparsity(p, masks) == pytest.approx(0.9, abs=1e-3)
    assert js.sparsity(p, masks) == pytest.approx(removed_and_zero(p, masks), abs=1e-12)
    assert "WARNING" not in js.summary(p, masks)
  assert int(js.get_sparse_state(state).health.unmasked) == 0


# ---------------------------------------------------------------- 2. non-finite update steps

def test_2_a_one_shot_prune_hit_by_a_nan_runs_at_the_next_finite_step():
  params = mlp_params(jax.random.key(0))
  tx = js.magnitude_pruning(optax.apply_if_finite(optax.sgd(0.01), 10), 0.5, prune_step=1)
  state = tx.init(params)
  update = jax.jit(tx.update)
  x, y = next(iter(batches(1)))
  nan = lambda g: jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), g)
  for t in range(4):
    g = jax.grad(loss_fn)(params, x, y)
    u, state = update(nan(g) if t in (1, 2) else g, state, params)  # NaN at the prune step
    params = optax.apply_updates(params, u)
    h = js.get_sparse_state(state).health
    if t in (1, 2):
      assert bool(h.pending) and int(h.skipped) == t
      with pytest.warns(RuntimeWarning, match="pending"):
        masks = js.get_masks(state)
      assert js.sparsity(params, masks) == 0.0
  assert not bool(h.pending) and int(h.skipped) == 2
  masks = js.get_masks(state)
  assert js.sparsity(params, masks) == pytest.approx(0.5, abs=1e-3)


def test_2_a_nan_gradient_only_at_removed_weights_does_not_block_a_dst_update():
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  tx = js.rigl(optax.sgd(0.01), 0.5, update_stop=100, update_period=5)
  state = tx.init(params)
  m0 = state.masks["w"]
  params = js.apply_masks(params, state.masks)
  g = jax.random.normal(jax.random.key(1), (16, 8))
  g = jnp.where(m0, g, jnp.nan).at[jnp.unravel_index(jnp.argmin(m0), m0.shape)].set(1e3)
  state = state._replace(count=jnp.int32(5))                 # an update step
  _, new = jax.jit(tx.update)({"w": g}, state, params)
  m1 = np.asarray(new.masks["w"])
  assert (m1 != np.asarray(m0)).any()                          # the update ran
  assert int(new.health.skipped) == 0
  grown = m1 & ~np.asarray(m0)
  # the one finite absent gradient (1e3) is grown; NaN scores never win over it
  assert grown[np.unravel_index(int(jnp.argmin(m0)), m0.shape)]
  assert m1.sum() == int(m0.sum())


# ---------------------------------------------------------------- 3. filter pruning

def test_3_filter_l1_never_removes_the_output_layers_units_by_default():
  params = mlp_params(jax.random.key(0))                     # fc1, fc2, fc3 (10 classes)
  masks = structured.filter_l1_masks(params, 0.5)
  assert jnp.ndim(masks["fc3"]["kernel"]) == 0               # dense: every class kept
  kept = np.asarray(masks["fc2"]["kernel"]).all(0)
  assert kept.sum() == 16                                     # hidden layers still pruned
  masks = structured.filter_l1_masks(params, 0.5, output_layer="fc2")
  assert jnp.ndim(masks["fc2"]["kernel"]) == 0 and np.asarray(masks["fc3"]["kernel"]).all(0).sum() == 5


# ---------------------------------------------------------------- 4. trees that do not match

def test_4_reports_refuse_a_mask_tree_that_lacks_a_leaf():
  params = mlp_params(jax.random.key(0))
  masks = js.get_masks(js.static_sparse(optax.sgd(0.1), 0.5).init(params))
  params = js.apply_masks(params, masks)
  short = {k: v for k, v in masks.items() if k != "fc2"}
  for fn in (js.summary, js.sparsity, js.count_leaves, js.apply_masks):
    with pytest.raises(ValueError, match="leaf 'fc2/bias' of params is missing from masks"):
      fn(params, short)
  extra = {**masks, "fc9": {"kernel": jnp.ones((2, 2), bool)}}
  with pytest.raises(ValueError, match="leaf 'fc9/kernel' is not in params"):
    js.summary(params, extra)


# ---------------------------------------------------------------- 5. degenerate input

def test_5_degenerate_inputs_are_refused_or_warned_about():
  params = mlp_params(jax.random.key(0))
  with pytest.raises(ValueError, match="initial_sparsity=0.8 is above final_sparsity=0.5"):
    js.gradual_pruning(optax.sgd(0.1), 0.5, initial_sparsity=0.8)
  with pytest.raises(ValueError, match="n must be >= 1"):
    js.nm_masks(jax.tree.map(jnp.abs, params), 0, 4)
  masks = jax.tree.map(lambda p: jnp.ones(p.shape, bool) if p.ndim == 2 else jnp.asarray(True),
                       params)
  masks["fc2"]["kernel"] = jnp.zeros((64, 32), bool)
  with pytest.raises(ValueError, match="leaf 'fc2/kernel' removes every weight"):
    js.keep_masks(optax.sgd(0.1), masks)
  with pytest.warns(UserWarning, match="'fc3/kernel' of shape \\(32, 10\\) keeps only 1 weight"):
    dist.kept_counts(params, 0.5, overrides={"fc3": 0.997})
  for build in (lambda: js.sparse_evolutionary_training(optax.sgd(0.1), "0.9"), lambda: js.static_sparse(optax.sgd(0.1), "0.9"),
                lambda: dist.kept_counts(params, "0.9")):
    with pytest.raises(TypeError, match="sparsity must be a number, got '0.9'"):
      build()


# ---------------------------------------------------------------- 6. first update one period in

@pytest.mark.parametrize("name", ["set", "rigl"])
def test_6_set_and_rigl_first_rewire_one_period_in(name):
  params = {"w": jax.random.normal(jax.random.key(0), (16, 8))}
  build = {"set": lambda: js.sparse_evolutionary_training(optax.sgd(0.1), 0.5, update_period=3),
           "rigl": lambda: js.rigl(optax.sgd(0.1), 0.5, update_stop=100, update_period=3)}[name]
  tx = build()
  state = tx.init(params)
  params = js.apply_masks(params, state.masks)
  update = jax.jit(tx.update)
  g = {"w": jax.random.normal(jax.random.key(1), (16, 8))}
  changed = []
  for _ in range(4):
    old = state.masks["w"]
    _, state = update(g, state, params)
    changed.append(bool(jnp.any(old != state.masks["w"])))
  assert changed == [False, False, False, True]


# ---------------------------------------------------------------- 7. flax.nnx

def test_7_nnx_state_works_with_apply_masks_get_masks_summary_and_export():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(64, 32, rngs=rngs)
      self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, js.static_sparse(optax.sgd(0.1), 0.8), wrt=nnx.Param)
  masks = js.get_masks(opt.opt_state)
  nnx.update(model, js.apply_masks(nnx.state(model, nnx.Param), masks))
  kernel, mask = np.asarray(model.fc1.kernel[...]), np.asarray(masks["fc1"]["kernel"][...])
  assert not kernel[~mask].any() and kernel[mask].all()
  state = nnx.state(model, nnx.Param)
  assert js.sparsity(state, masks) == pytest.approx(0.8, abs=1e-3)
  assert "fc1/kernel" in js.summary(state, masks)
  exported = js.export_sparse(state, masks)
  np.testing.assert_array_equal(np.asarray(exported["fc1"]["kernel"].get_value().todense()), kernel)


# ---------------------------------------------------------------- 8. error messages

def test_8_error_messages_say_what_is_wrong():
  params = mlp_params(jax.random.key(0))
  with pytest.raises(TypeError, match="inject_hyperparams inside it instead, as the inner optimizer"):
    optax.inject_hyperparams(js.sparse_evolutionary_training)(
        optax.sgd(0.1), sparsity=0.9, drop_fraction=0.3).init(params)
  with pytest.raises(ValueError, match=r"first update step, update_period=100 \(update_start defaults"):
    js.rigl(optax.sgd(0.1), 0.9, update_stop=100)
  masks = js.get_masks(js.static_sparse(optax.sgd(0.1), 0.5).init(params))
  wrong = {**masks, "fc1": {**masks["fc1"], "kernel": jnp.ones((3, 3), bool)}}
  with pytest.raises(ValueError, match="leaf 'fc1/kernel' has mask shape \\(3, 3\\)"):
    js.apply_masks(params, wrong)
  tx = js.static_sparse(optax.sgd(0.1), 0.5)
  state = tx.init(params)
  grads = {**params, "fc2": {**params["fc2"], "kernel": jnp.zeros((32, 64))}}
  with pytest.raises(ValueError, match="updates: leaf 'fc2/kernel' has shape \\(32, 64\\)"):
    tx.update(grads, state, params)
  with pytest.raises(TypeError, match="distribution: the callable must return a dict"):
    js.static_sparse(optax.sgd(0.1), 0.5, distribution=lambda shapes, s: [0.5] * 3).init(params)


# ---------------------------------------------------------------- 9. CLI

def test_9_a_bad_override_leaves_no_results_folder(tmp_path, capsys):
  from experiments import run
  out = tmp_path / "run"
  for override, message in (("method_kwargs.drop_fraction=2",
                             "drop_fraction must be in [0, 1], got 2"),
                            ("method_kwargs.drop_fractoin=0.5", "did you mean 'drop_fraction'")):
    for _ in range(2):  # the same command twice: the same real error, no "already exists"
      assert run.main(["smoke", override, "--out", str(out), "--no-progress"]) == 2
      assert message in capsys.readouterr().err
      assert not out.exists()


# ---------------------------------------------------------------- 11. SET's regrowth values

def _one_set_update(regrowth, shape=(128, 64)):
  params = {"w": jax.random.normal(jax.random.key(0), shape) * 0.3, "b": jnp.zeros(shape[-1])}
  kw = {} if regrowth is None else {"regrowth": regrowth}
  tx = js.sparse_evolutionary_training(optax.sgd(0.1, momentum=0.9), 0.5, update_period=2, **kw)
  state = tx.init(params)
  params = js.apply_masks(params, state.masks)
  g = {"w": jax.random.normal(jax.random.key(1), shape), "b": jnp.ones(shape[-1])}
  update = jax.jit(tx.update)
  u, state = update(g, state, params)                        # step 0 (momentum builds up)
  params = optax.apply_updates(params, u)
  old = state.masks["w"]
  u, state = update(g, state, params)                        # step 1
  params = optax.apply_updates(params, u)
  u, new_state = update(g, state, params)                    # step 2: the first rewiring
  new = optax.apply_updates(params, u)
  grown = np.asarray(new_state.masks["w"] & ~state.masks["w"])
  trace = np.asarray(optax.tree_utils.tree_get(new_state.inner_state, "trace")["w"])
  return new, grown, trace, params, np.asarray(old)


def test_11_set_regrows_at_random_values_like_the_layers_init_with_zero_momentum():
  new, grown, trace, before, m0 = _one_set_update(None)       # the default is "init"
  assert grown.sum() > 800
  values = np.asarray(new["w"])[grown]
  std0 = np.std(np.asarray(jax.random.normal(jax.random.key(0), (128, 64)) * 0.3)[m0])
  # drawn from N(0, std of the layer's initial weights), at 8 bits: steps of 4 / 126 std
  assert stats.kstest(values / std0, "norm").pvalue > 1e-3
  step = 4 * std0 / 126
  np.testing.assert_allclose(values / step, np.round(values / step), atol=1e-3)
  assert abs(np.std(values) / std0 - 1) < 0.06
  assert not trace[grown].any()                              # zero optimizer state
  assert np.abs(trace[np.asarray(new["w"]) != 0]).sum() > 0  # (the others keep theirs)
  new, grown, trace, _, _ = _one_set_update(lambda key, shape, dtype: jnp.full(shape, 0.25, dtype))
  assert grown.sum() > 0 and not trace[grown].any()
  np.testing.assert_allclose(np.asarray(new["w"])[grown], 0.25, rtol=1e-6)
  new, grown, _, _, _ = _one_set_update("zero")
  assert grown.sum() > 0 and not np.asarray(new["w"])[grown].any()
  with pytest.raises(ValueError, match="regrowth must be one of"):
    js.sparse_evolutionary_training(optax.sgd(0.1), 0.5, regrowth="randn")


def test_11_dynamic_sparse_takes_the_same_regrowth_values():
  params = {"w": jax.random.normal(jax.random.key(0), (32, 16))}
  tx = dst.dynamic_sparse(optax.sgd(0.1), 0.5, drop=dst.drop_magnitude(0.5), grow=dst.grow_random(),
                          is_update_step=js.core.schedules.periodic(1), regrowth="init")
  state = tx.init(params)
  params = js.apply_masks(params, state.masks)
  u, new = jax.jit(tx.update)({"w": jnp.zeros((32, 16))}, state, params)
  grown = np.asarray(new.masks["w"] & ~state.masks["w"])
  values = np.asarray(optax.apply_updates(params, u)["w"])[grown]
  unit = 4 * float(new.aux.scale[0]) / 126
  assert grown.sum() > 50 and np.count_nonzero(values) > 0.9 * values.size
  np.testing.assert_allclose(values / unit, np.round(values / unit), atol=1e-3)
  assert 0.7 < np.std(values) / float(new.aux.scale[0]) < 1.3


# ---------------------------------------------------------------- 12. full-density layers

@pytest.mark.parametrize("name", ["set", "rigl"])
def test_12_a_layer_at_density_one_passes_through_an_update_unchanged(name):
  # ER / ERK give the tiny layer a density > 1: it is capped at 1 (all 8 weights kept).
  params = {"big": jax.random.normal(jax.random.key(0), (64, 64)),
            "small": jax.random.normal(jax.random.key(1), (4, 2))}
  inner = optax.sgd(0.1, momentum=0.9)
  tx = {"set": lambda: js.sparse_evolutionary_training(inner, 0.5, update_period=1, update_start=1, regrowth="zero"),
        "rigl": lambda: js.rigl(inner, 0.5, update_stop=100, update_period=1, update_start=1)}[name]()
  state = tx.init(params)
  assert dist.kept_counts(params, 0.5, distribution="er" if name == "set" else "erk")["small"] == 8
  params = js.apply_masks(params, state.masks)
  grads = [{"big": jax.random.normal(jax.random.key(k), (64, 64)),
            "small": jax.random.normal(jax.random.key(k + 1), (4, 2))} for k in (2, 4)]
  update = jax.jit(tx.update)
  ref_state = inner.init(params["small"])
  ref = params["small"]
  p = params
  for g in grads:                                              # step 0: none, step 1: an update
    old = state.masks["big"]
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    du, ref_state = inner.update(g["small"], ref_state, ref)
    ref = optax.apply_updates(ref, du)
  assert bool(jnp.any(old != state.masks["big"]))             # the big layer was rewired
  assert bool(jnp.all(state.masks["small"]))
  np.testing.assert_allclose(np.asarray(p["small"]), np.asarray(ref), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(optax.tree_utils.tree_get(state.inner_state, "trace")["small"]),
                             np.asarray(ref_state[0].trace), rtol=1e-6, atol=1e-7)
