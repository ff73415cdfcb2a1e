"""The optax wrapper engine, exercised through SET and the baselines."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import jaxsparse as js
from tests.helpers import batches, make_step, mlp_params


def run(tx, n_steps, params=None, seed=0, on_step=None):
  params = mlp_params(jax.random.key(seed)) if params is None else params
  state = tx.init(params)
  traces = []
  step = make_step(tx, traces)
  for t, (x, y) in enumerate(batches(n_steps, seed=seed)):
    old = js.get_masks(state) if on_step is not None else None
    params, state = step(params, state, x, y)
    if on_step is not None:
      on_step(t, params, state, old)
  return params, state, traces


def sparse_leaves(tree, masks):
  return [(p, m) for p, m in zip(jax.tree.leaves(tree), jax.tree.leaves(masks)) if m.ndim]


def test_set_invariants_over_200_jitted_steps():
  tx = js.sparse_evolutionary_training(optax.sgd(0.05, momentum=0.9), 0.9, update_period=10,
                                       drop_fraction=0.3)
  params0 = mlp_params(jax.random.key(0))
  expected = js.kept_counts(params0, 0.9, distribution="er")
  changed = []

  def check(t, params, state, old):
    params, masks, old = jax.device_get((params, js.get_masks(state), old))
    counts = {c.name: c.kept for c in js.count_leaves(params, masks) if c.sparse}
    assert counts == expected, t
    for p, m in sparse_leaves(params, masks):
      assert not np.any(np.asarray(p)[~np.asarray(m)]), f"masked weight non-zero at step {t}"
    # SET's active indices (the rewired leaves', end to end) stay in sync with the masks
    rewired = [np.asarray(m) for m in jax.tree.leaves(masks) if m.ndim and not np.all(m)]
    active = np.asarray(js.get_sparse_state(state).aux.active)
    assert active.shape == (sum(int(m.sum()) for m in rewired),)
    for idx, m in zip(np.split(active, np.cumsum([m.sum() for m in rewired])[:-1]), rewired):
      np.testing.assert_array_equal(np.sort(idx), np.flatnonzero(m))
    diff = sum(int(np.sum(np.asarray(a) != np.asarray(b)))
               for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(masks)))
    if t % 10 == 0 and t > 0:  # the first update is one period in
      changed.append(diff)
    else:
      assert diff == 0, f"mask changed off-schedule at step {t}"

  params, state, traces = run(tx, 200, params0, on_step=check)
  assert len(traces) == 1, "the train step recompiled"
  assert all(c > 0 for c in changed), changed  # every update step rewired something
  # Same seed, same everything: bit-identical masks and params.
  params2, state2, _ = run(tx, 200, params0)
  for a, b in zip(jax.tree.leaves((params, js.get_masks(state))),
                  jax.tree.leaves((params2, js.get_masks(state2)))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A different seed gives a different mask.
  _, state3, _ = run(js.sparse_evolutionary_training(optax.sgd(0.05, momentum=0.9), 0.9, update_period=10, seed=1), 1,
                     params0)
  assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(js.get_masks(state3)),
                                                   jax.tree.leaves(js.get_masks(state))))


@pytest.mark.parametrize("make_inner,field_names", [
    (lambda: optax.sgd(0.05, momentum=0.9), ("trace",)),
    (lambda: optax.adam(1e-2), ("mu", "nu")),
])
def test_optimizer_state_of_pruned_and_regrown_weights_is_zero(make_inner, field_names):
  tx = js.sparse_evolutionary_training(make_inner(), 0.8, update_period=5, update_start=5, regrowth="zero")
  seen = []

  def check(t, params, state, old):
    if t != 5:
      return
    new = js.get_masks(state)
    inner = state.inner_state
    for name in field_names:
      s = optax.tree_utils.tree_get(inner, name)
      for st_leaf, m_old, m_new in zip(jax.tree.leaves(s), jax.tree.leaves(old),
                                       jax.tree.leaves(new)):
        if m_new.ndim == 0:
          continue
        regrown = np.asarray(m_new & ~m_old)
        assert regrown.sum() > 0
        assert np.all(np.asarray(st_leaf)[regrown] == 0), name
        assert np.all(np.asarray(st_leaf)[~np.asarray(m_new)] == 0), name
        # survivors keep a non-trivial state
        assert np.any(np.asarray(st_leaf)[np.asarray(m_new & m_old)] != 0), name
        seen.append(name)
    # regrown weights start at exactly zero
    for p, m_old, m_new in zip(jax.tree.leaves(params), jax.tree.leaves(old), jax.tree.leaves(new)):
      if m_new.ndim:
        assert np.all(np.asarray(p)[np.asarray(m_new & ~m_old)] == 0)

  run(tx, 7, on_step=check)
  assert seen


def test_dense_is_bit_identical_to_plain_optax():
  p_dense, _, _ = run(js.dense(optax.adam(1e-2)), 20)
  p_plain, _, _ = run(optax.adam(1e-2), 20)
  for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_plain)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_static_sparse_mask_never_changes_and_first_update_masks_params():
  tx = js.static_sparse(optax.sgd(0.1), 0.75, distribution="erk")
  params0 = mlp_params(jax.random.key(3))
  m0 = js.get_masks(tx.init(params0))
  params, state, _ = run(tx, 30, params0)
  for a, b in zip(jax.tree.leaves(m0), jax.tree.leaves(js.get_masks(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert js.sparsity(params, m0) == pytest.approx(0.75, abs=1e-3)
  for p, m in sparse_leaves(params, m0):
    assert np.count_nonzero(np.asarray(p)) <= int(m.sum())
    assert not np.any(np.asarray(p)[~np.asarray(m)])


@pytest.mark.parametrize("build", [
    lambda: optax.chain(optax.clip_by_global_norm(1.0),
                        js.sparse_evolutionary_training(optax.sgd(0.05, momentum=0.9, nesterov=True), 0.9, update_period=4)),
    lambda: js.sparse_evolutionary_training(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2), 0.9, update_period=4),
    lambda: optax.MultiSteps(js.sparse_evolutionary_training(optax.adam(1e-2), 0.9, update_period=2), every_k_schedule=2),
    lambda: js.gradual_pruning(optax.adam(1e-2), 0.9, num_updates=3, update_period=4),
])
def test_composes_with_optax(build):
  tx = build()
  params, state, traces = run(tx, 24)
  masks = js.get_masks(state)
  assert len(traces) == 1
  assert js.sparsity(params, masks) == pytest.approx(0.9, abs=1e-3)
  for p, m in sparse_leaves(params, masks):
    assert not np.any(np.asarray(p)[~np.asarray(m)])
  nnz = sum(np.count_nonzero(np.asarray(p)) for p, m in sparse_leaves(params, masks))
  assert nnz <= sum(int(m.sum()) for _, m in sparse_leaves(params, masks))


def test_nnx_optimizer():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(64, 32, rngs=rngs)
      self.fc2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, js.sparse_evolutionary_training(optax.adam(1e-2), 0.8, update_period=3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    grads = nnx.grad(loss)(model)
    opt.update(model, grads)

  for x, y in batches(10):
    step(model, opt, x, y)
  masks = js.get_masks(opt.opt_state)
  kernel = np.asarray(model.fc1.kernel[...])
  mask = np.asarray(masks["fc1"]["kernel"][...])
  assert mask.shape == kernel.shape and mask.mean() < 0.5
  assert not np.any(kernel[~mask])


def test_bad_input_errors():
  with pytest.raises(ValueError, match="update_period"):
    js.sparse_evolutionary_training(optax.sgd(0.1), 0.9, update_period=0)
  with pytest.raises(ValueError, match="sparsity"):
    js.sparse_evolutionary_training(optax.sgd(0.1), 1.0)
  with pytest.raises(ValueError, match="drop_fraction"):
    js.sparse_evolutionary_training(optax.sgd(0.1), 0.5, drop_fraction=1.5)
  params = mlp_params(jax.random.key(0))
  bad_masks = {"fc1": {"kernel": jnp.ones((3, 3), bool), "bias": jnp.asarray(True)}}
  with pytest.raises(ValueError, match="masks: leaf 'fc2/bias' of params is missing from masks"):
    js.keep_masks(optax.sgd(0.1), bad_masks).init(params)
  wrong_shape = jax.tree.map(lambda p: jnp.ones((2,), bool), params)
  with pytest.raises(ValueError, match="masks: leaf 'fc1/bias' has mask shape"):
    js.keep_masks(optax.sgd(0.1), wrong_shape).init(params)
  with pytest.raises(ValueError, match="filter: selected no leaf"):
    js.sparse_evolutionary_training(optax.sgd(0.1), 0.5, filter=lambda n, l: False).init(params)
  with pytest.raises(TypeError, match="inner"):
    js.sparse_evolutionary_training("sgd", 0.5)


def _conv_params(key):
  ks = jax.random.split(key, 5)
  return {"conv": {"kernel": jax.random.normal(ks[0], (3, 3, 4, 16)) * 0.3},
          "fc": {"kernel": jax.random.normal(ks[1], (64, 10)) * 0.3,
                 "bias": jax.random.normal(ks[2], (10,)) * 0.1},
          "fc2": {"kernel": jax.random.normal(ks[3], (10, 24)) * 0.3},
          "out": {"kernel": jax.random.normal(ks[4], (24, 3)) * 0.3}}


def _dst(drop, grow, redistribute, regrowth):
  from jaxsparse.core import schedules
  return js.methods.dst.dynamic_sparse(optax.adam(0.05), 0.7, drop=drop, grow=grow,
                                       redistribute=redistribute, regrowth=regrowth,
                                       is_update_step=schedules.periodic(3))


# Between them: every drop rule (magnitude, SET's, DSR's threshold), grow rule (momentum,
# gradient, random) and redistribution, the tracked momentum, "init" (int8 codes) and
# callable regrowth values, and SET's own rewiring with and without codes; with four sparse
# leaves, the per-leaf counts (count_true_each) and the selections over the leaves'
# concatenation.
FLAT_METHODS = {
    "set_init": lambda: js.sparse_evolutionary_training(optax.sgd(0.1, 0.9), 0.7,
                                                        update_period=3),
    "set_zero": lambda: js.sparse_evolutionary_training(optax.sgd(0.1, 0.9), 0.7,
                                                        update_period=3, regrowth="zero"),
    "dsr": lambda: js.dsr(optax.sgd(0.1, 0.9), 0.7, target_pruned=20, update_period=3),
    "snfs_init": lambda: _dst(js.methods.dst.drop_magnitude(0.3, rounding="ceil"),
                              js.methods.dst.grow_momentum(), js.methods.dst.by_momentum(),
                              "init"),
    "set_drop_gradient_grow_callable": lambda: _dst(
        js.methods.dst.drop_set(0.3), js.methods.dst.grow_gradient(), None,
        jax.nn.initializers.lecun_normal()),
}


@pytest.mark.parametrize("method", sorted(FLAT_METHODS))
def test_flat_update_on_cpu_equals_the_shaped_update(method, monkeypatch):
  """On one CPU device, the DST methods' updates see flattened leaves (``flat_update``), and
  SET's rewiring, the selections and the per-leaf counts work on the leaves' concatenation
  (faster to compile there); on GPU/TPU the leaves keep their shapes and stay apart. Both
  programs, run here, give the same masks, params and method state bit for bit over 20 steps
  with 6 updates, on 4-D, short-axis and ERK-dense leaves (a callable regrowth is drawn in the
  leaf's shape: an initializer's fan-in)."""
  from jaxsparse.core import selection as topk
  params = _conv_params(jax.random.key(1))
  # targets: per step a tree like the params (distinct gradients at every weight)
  xs = [_conv_params(jax.random.key(10 + i)) for i in range(20)]

  def loss(p, x):
    return sum(jnp.sum((jnp.tanh(a) - b) ** 2) for a, b in zip(jax.tree.leaves(p),
                                                                jax.tree.leaves(x)))

  def train():
    tx = FLAT_METHODS[method]()
    state = tx.init(params)

    @jax.jit
    def step(p, s, x):
      g = jax.grad(loss)(p, x)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    p = params
    for x in xs:
      p, state = step(p, state, x)
    return p, js.get_masks(state), js.get_sparse_state(state).aux

  jax.clear_caches()     # the selections and SET's rewiring are jitted: trace them anew
  flat = train()
  monkeypatch.setattr(topk, "cpu_or_default", lambda cpu, default, *args: default(*args))
  jax.clear_caches()
  shaped = train()
  jax.clear_caches()
  masks = jax.tree.leaves(flat[1])
  assert sum(int(np.sum(~np.asarray(m))) for m in masks if np.ndim(m)) > 0
  for a, b in zip(jax.tree.leaves(flat), jax.tree.leaves(shaped)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=method)


def test_flat_update_is_cpu_only():
  """Lowered for CUDA and TPU, the update works on the leaves in their shapes (a reshape could
  copy there, or regather a sharded leaf, at every step); lowered for CPU, on them flattened:
  the 3x3x4x16 conv kernel appears as 576 entries in most of the CPU program's values, and in
  few of the others' (the finiteness and leak checks ravel it on every platform)."""
  params = _conv_params(jax.random.key(1))
  tx = js.rigl(optax.sgd(0.1, 0.9), 0.7, update_stop=60, update_period=3)
  state = tx.init(params)
  fn = jax.jit(lambda g, s, p: tx.update(g, s, p))
  texts = {p: fn.trace(params, state, params).lower(lowering_platforms=(p,)).as_text()
           for p in ("cpu", "cuda", "tpu")}
  flat, shaped = {p: t.count("tensor<576x") for p, t in texts.items()}, {
      p: t.count("tensor<3x3x4x16x") for p, t in texts.items()}
  assert flat["cpu"] > 2 * shaped["cpu"], (flat, shaped)   # the selections' concatenation too
  for p in ("cuda", "tpu"):
    assert shaped[p] > 10 * flat[p], (p, flat, shaped)


def test_sparse_transform_names_its_bad_arguments():
  init = lambda params, key: (jax.tree.map(lambda _: js.core.masks.dense_mask(), params), ())
  build = lambda **kw: js.sparse_transform(optax.sgd(0.1), init_masks=init, update_masks=None,
                                           is_update_step=lambda step: jnp.bool_(False), **kw)
  with pytest.raises(TypeError, match="inner must be an optax.GradientTransformation"):
    js.sparse_transform(lambda g: g, init_masks=init, update_masks=None,
                        is_update_step=lambda step: jnp.bool_(False))
  with pytest.raises(TypeError, match="seed must be an int"):
    build(seed="0")
  with pytest.raises(TypeError, match="flat_update must be a bool"):
    build(flat_update="yes")
  build(flat_update=True)   # accepted


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_normal_bf16_from_bits_is_jax_normal(seed):
  """``normal_bf16(jax.random.bits(key, shape))`` is ``jax.random.normal(key, shape, bfloat16)``
  bit for bit (SET draws its regrowth values' bits in one hash with its positions' bits), for
  any key; one compile for all examples."""
  key = jax.random.key(seed)
  got, want = _normal_pair(key)
  np.testing.assert_array_equal(np.asarray(got).view(np.uint16), np.asarray(want).view(np.uint16))


def test_normal_bf16_and_draw_regrowth_name_bad_bits():
  from jaxsparse.core import transform
  with pytest.raises(ValueError, match=r"bits: jax.random.bits' uint32 words, got dtype int32"):
    transform.normal_bf16(jnp.zeros(4, jnp.int32))
  with pytest.raises(ValueError, match=r"bits: one word per value of shape \(2, 3\), got shape \(5,\)"):
    transform.draw_regrowth("init", jax.random.key(0), (2, 3), jnp.float32, jnp.float32(1.0),
                            bits=jnp.zeros(5, jnp.uint32))
  with pytest.raises(ValueError, match=r"bits: only regrowth='init' draws its values from given"):
    transform.draw_regrowth(jax.nn.initializers.normal(), jax.random.key(0), (2, 3), jnp.float32,
                            None, bits=jnp.zeros(6, jnp.uint32))
  key = jax.random.key(4)   # bits of the right size: the values of the key itself
  np.testing.assert_array_equal(
      np.asarray(transform.draw_regrowth("init", key, (2, 3), jnp.float32, jnp.float32(0.5),
                                         bits=jax.random.bits(key, (6,), jnp.uint32))),
      np.asarray(transform.draw_regrowth("init", key, (2, 3), jnp.float32, jnp.float32(0.5))))


@jax.jit
def _normal_pair(key):
  from jaxsparse.core import transform
  shape = (3, 700)
  return (transform.normal_bf16(jax.random.bits(key, shape, jnp.uint32)),
          jax.random.normal(key, shape, jnp.bfloat16))


@pytest.mark.parametrize("as_codes", [False, True])
def test_int8_regrowth_values_as_floats_or_codes(as_codes):
  """``grow_values="int8"``: a grown weight starts at ``unit * clip(round(value / unit), -126,
  126)`` for float values, and at ``unit * value`` for int8 codes (SET's, quantised by the
  method: no second rounding); survivors keep their values."""
  unit = 0.1
  codes = np.array([9, 9, 9, 9, 126, -7, 3, 0], np.int8)
  floats = np.array([9, 9, 9, 9, 0.37, -0.04, 20.0, -0.26], np.float32)
  want_grown = (codes[4:].astype(np.float32) * np.float32(unit) if as_codes else
                np.clip(np.round(floats[4:] / np.float32(unit)), -126, 126) * np.float32(unit))

  def update(x):
    return js.core.transform.MaskUpdate(
        {"w": jnp.ones(8, bool)}, x.masks, (),
        {"w": jnp.asarray(codes if as_codes else floats)}, {"w": jnp.float32(unit)})

  tx = js.sparse_transform(optax.sgd(0.0), init_masks=lambda p, key: ({"w": jnp.arange(8) < 4}, ()),
                           update_masks=update, is_update_step=lambda step: step == 1,
                           grow_values="int8")
  params = {"w": jnp.arange(1.0, 9.0)}
  state = tx.init(params)
  step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(jax.tree.map(jnp.ones_like, p), s, p)))
  for _ in range(2):
    params, state = step(params, state)
  w = np.asarray(params["w"])
  np.testing.assert_array_equal(w[:4], [1.0, 2.0, 3.0, 4.0])
  np.testing.assert_allclose(w[4:], want_grown, rtol=1e-6)
  assert np.asarray(js.get_masks(state)["w"]).all()
