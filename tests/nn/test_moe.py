"""Sparsely-gated MoE (Shazeer et al. 2017): routing, capacity, the balancing losses against
their formulas, compiled FLOPs that scale with k and not with E, linen/nnx agreement, errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsparse.nn import moe

PHI = lambda z: 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def _params(seed, d=6, e=4, h=5, o=3):
  rng = np.random.default_rng(seed)  # numpy: no compilation for test data
  n = lambda *shape: (0.5 * rng.standard_normal(shape)).astype(np.float32)
  return {"w_gate": n(d, e), "w_noise": n(d, e), "wi": n(e, d, h), "bi": n(e, h),
          "wo": n(e, h, o), "bo": n(e, o)}


def _normal(seed, *shape):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _expert_np(p, e, x):
  h = np.maximum(x @ np.asarray(p["wi"][e]) + np.asarray(p["bi"][e]), 0.0)
  return h @ np.asarray(p["wo"][e]) + np.asarray(p["bo"][e])


def test_each_token_reaches_exactly_k_experts_and_matches_a_per_token_reference():
  p, k, t = _params(0), 2, 12
  x = _normal(1, t, 6)
  key = jax.random.key(2)
  # capacity_factor 4: capacity = min(T, ceil(4 * 2 * 12 / 4)) = T, nothing can overflow.
  capacity = moe.expert_capacity(t, 4, k, 4.0)

  @jax.jit
  def run(p, x, key):
    y, stats = moe.moe_apply(p, x, k=k, capacity_factor=4.0, key=key)
    g = moe.noisy_top_k_gating(x, p["w_gate"], p["w_noise"], k, key)
    return y, stats, g, moe.dispatch(x, g.experts, 4, capacity)

  y, stats, g, (buffers, slots) = run(p, x, key)
  experts, gates = np.asarray(g.experts), np.asarray(g.gates)
  assert all(len(set(row)) == k for row in experts)                 # k distinct experts each
  np.testing.assert_allclose(gates.sum(1), 1.0, rtol=1e-6)
  logits = np.asarray(g.logits)
  top = np.sort(logits, axis=1)[:, ::-1][:, :k]                      # softmax(KeepTopK(H, k))
  np.testing.assert_allclose(gates, np.exp(top) / np.exp(top).sum(1, keepdims=True), rtol=1e-5)
  assert int(stats.dropped) == 0 and int(stats.expert_counts.sum()) == t * k
  np.testing.assert_array_equal(stats.expert_counts, np.bincount(experts.ravel(), minlength=4))
  ref = np.stack([sum(gates[i, j] * _expert_np(p, experts[i, j], np.asarray(x[i]))
                      for j in range(k)) for i in range(t)])
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  # The dispatch itself: every pair has its own row of its expert's buffer, holding its token.
  slots = np.asarray(slots)
  assert capacity == t and len(set(slots.ravel())) == t * k
  np.testing.assert_array_equal(slots // capacity, experts)
  flat = np.asarray(buffers).reshape(-1, 6)
  for i in range(t):
    for j in range(k):
      np.testing.assert_array_equal(flat[slots[i, j]], x[i])
  unused = np.setdiff1d(np.arange(4 * capacity), slots.ravel())
  assert not flat[unused].any()


def test_over_capacity_pairs_are_dropped_by_priority_and_counted():
  x = jnp.ones((16, 6))
  # Every token chooses expert 0: capacity ceil(1 * 1 * 16 / 4) = 4 keeps tokens 0-3.
  p = _params(3)
  p["w_gate"] = np.zeros((6, 4), np.float32)
  p["w_gate"][:, 0] = 1.0
  # k = 2: all first choices before any second choice. Tokens 0-7 prefer expert 0, 8-15
  # expert 1; capacity 8 each: every token keeps its first choice and loses its second.
  experts = jnp.asarray([[0, 1]] * 8 + [[1, 0]] * 8, jnp.int32)
  run = jax.jit(lambda p, x, e: (moe.moe_apply(p, x, k=1, capacity_factor=1.0),
                                 moe.dispatch(x, e, 2, 8)[1]))
  (y, stats), slots = run(p, x, experts)
  np.testing.assert_array_equal(stats.expert_counts, [4, 0, 0, 0])
  assert int(stats.dropped) == 12
  np.testing.assert_allclose(y[:4], np.tile(_expert_np(p, 0, np.ones(6)), (4, 1)), rtol=1e-5)
  assert not np.asarray(y[4:]).any()
  slots = np.asarray(slots)
  assert (slots[:, 0] < 16).all() and (slots[:, 1] == 16).all()


def test_balancing_losses_equal_their_formulas_on_hand_cases():
  clean = np.asarray([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
  noisy = np.asarray([[1.2, 0.1, -0.3], [0.5, 1.5, 1.8]], np.float32)
  std = np.asarray([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], np.float32)
  switch_logits = np.log(np.asarray([[3.0, 1.0]] * 3 + [[1.0, 3.0]], np.float32))
  p, x = _params(4), _normal(5, 10, 6)

  @jax.jit
  def run(key):
    def gating(k):
      top, experts = jax.lax.top_k(noisy, k)
      return moe.Gating(jax.nn.softmax(top), experts, noisy, clean, std)
    sw = moe.Gating(jnp.ones((4, 1)), jnp.argmax(switch_logits, 1)[:, None], switch_logits,
                    switch_logits, None)
    imp, load = jnp.asarray([1.5, 0.5, 1.0]), jnp.asarray([3.0, 1.0, 2.0])
    _, stats = moe.moe_apply(p, x, k=2, capacity_factor=2.0, key=key, w_importance=0.3,
                             w_load=0.7)
    g = moe.noisy_top_k_gating(x, p["w_gate"], p["w_noise"], 2, key)
    want = 0.3 * moe.cv_squared(moe.importance(g, 4)) + 0.7 * moe.cv_squared(
        moe.load_estimate(g, 2))
    return dict(cv=moe.cv_squared(imp), cv1=moe.cv_squared(jnp.asarray([2.0])),
                load1=moe.load_estimate(gating(1), 1), imp1=moe.importance(gating(1), 3),
                load2=moe.load_estimate(gating(2), 2), load3=moe.load_estimate(gating(3), 3),
                shazeer=moe.shazeer_balance_loss(imp, load, 0.1, 0.2),
                switch=moe.switch_balance_loss(sw, 0.01), layer=stats.aux_loss, want=want)

  r = run(jax.random.key(6))
  assert float(r["cv"]) == pytest.approx(1 / 6, rel=1e-6) and float(r["cv1"]) == 0.0
  # k = 1 (eq. 9): a chosen expert competes with the 2nd largest H, the others with the largest.
  np.testing.assert_allclose(r["load1"], [PHI(0.9) + PHI(-3.6), PHI(-1.2) + PHI(0.4),
                                          PHI(-1.2) + PHI(-1.0)], rtol=1e-5)
  np.testing.assert_allclose(r["imp1"], [1.0, 0.0, 1.0])
  # k = 2: chosen experts compete with the 3rd largest, the other with the 2nd.
  np.testing.assert_allclose(r["load2"], [PHI(1.3) + PHI(-3.0), PHI(0.3) + PHI(3.0),
                                          PHI(-0.1) + PHI(1.0)], rtol=1e-5)
  np.testing.assert_allclose(r["load3"], [2.0, 2.0, 2.0])    # k = E: always chosen
  # CV^2([3, 1, 2]) = (2/3) / 4.
  assert float(r["shazeer"]) == pytest.approx(0.1 / 6 + 0.2 * (2 / 3) / 4, rel=1e-6)
  # Switch: f = [3/4, 1/4], P = [0.625, 0.375]; alpha * E * sum f P = 0.01 * 2 * 0.5625.
  assert float(r["switch"]) == pytest.approx(0.01125, rel=1e-5)
  # The layer's loss is this formula of its own (noisy) gate.
  assert float(r["layer"]) == pytest.approx(float(r["want"]), rel=1e-5)


def _flops(num_experts, k, d=32, h=64, tokens=128):
  p = _params(0, d, num_experts, h, d)
  f = lambda p, x: moe.moe_apply(p, x, k=k, capacity_factor=1.0)[0]
  cost = jax.jit(f).lower(p, np.ones((tokens, d), np.float32)).compile().cost_analysis()
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_compiled_flops_scale_with_k_not_with_the_number_of_experts():
  d, h, t = 32, 64, 128
  f4, f16, f16k2 = _flops(4, 1), _flops(16, 1), _flops(16, 2)
  expert = 2 * t * (d * h + h * d)          # one expert MLP per token: k * capacity_factor = 1
  assert expert <= f4 <= 1.2 * expert       # the experts' matmuls, plus the gate and routing
  assert f16 / f4 < 1.2                     # 4x the experts: only the gate x W_g grows
  assert 1.8 < f16k2 / f16 < 2.05           # k doubles the expert rows
  dense_same_params = 2 * t * 16 * (d * h + h * d)
  assert f16 < dense_same_params / 12       # a dense layer with the 16 experts' params: 16x


def test_linen_and_nnx_share_params_and_outputs():
  x = _normal(7, 2, 5, 6)                   # leading axes are all tokens
  lin = moe.MoE(features=3, num_experts=4, k=2, hidden_features=5)
  params = _params(9)

  @jax.jit
  def run_linen(params, key):
    init = lin.init({"params": key}, x, deterministic=True)["params"]
    y, cols = lin.apply({"params": params}, x, deterministic=True,
                        mutable=["losses", "intermediates"])
    noisy, _ = lin.apply({"params": params}, x, rngs={"gating": key}, mutable=["losses"])
    return init, y, cols, noisy

  init, y_lin, cols, y1 = run_linen(params, jax.random.key(1))
  _, _, _, y2 = run_linen(params, jax.random.key(1))
  assert jax.tree.map(jnp.shape, init) == jax.tree.map(jnp.shape, params)
  assert not np.asarray(init["w_gate"]).any() and not np.asarray(init["w_noise"]).any()
  net = nnx.jit(lambda: moe.MoENNX(6, 3, 4, k=2, hidden_features=5, rngs=nnx.Rngs(0)))()
  assert (jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
          == jax.tree.map(jnp.shape, params))
  nnx.update(net, jax.tree.map(jnp.asarray, params))
  y_nnx, inter = nnx.jit(lambda m, x: nnx.capture(m, nnx.Intermediate)(x, deterministic=True))(
      net, x)
  np.testing.assert_allclose(y_lin, y_nnx, rtol=1e-6, atol=1e-6)
  assert y_lin.shape == (2, 5, 3)
  aux = float(moe.total_aux_loss(cols["losses"]))
  assert aux == pytest.approx(float(moe.total_aux_loss(inter)), rel=1e-6)
  assert aux == pytest.approx(float(cols["intermediates"]["moe_stats"][0].aux_loss)) and aux > 0
  # Training: noise from the "gating" stream changes the output; the same key, the same output.
  np.testing.assert_array_equal(y1, y2)
  assert not np.allclose(y1, y_lin)
  # Dense experts (hidden_features=None): one Dense layer per expert, no wi / bi.
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: moe.MoE(features=3, num_experts=4, hidden_features=None).init(
          jax.random.key(0), x, deterministic=True))["params"])
  assert shapes == {"w_gate": (6, 4), "w_noise": (6, 4), "wo": (4, 6, 3), "bo": (4, 3)}


def test_gradients_reach_the_gate_the_noise_and_the_experts():
  p, x = _params(10), _normal(11, 16, 6)

  def loss(p):
    y, stats = moe.moe_apply(p, x, k=2, capacity_factor=1.0, key=jax.random.key(12))
    return jnp.sum(y ** 2) + stats.aux_loss

  grads = jax.jit(jax.grad(loss))(p)
  for name, g in grads.items():
    assert np.isfinite(g).all() and np.abs(g).sum() > 0, name


def test_bad_arguments_are_named():
  p, x = _params(0), np.ones((3, 6), np.float32)
  with pytest.raises(ValueError, match=r"k must be <= num_experts \(4\), got 5"):
    moe.moe_apply(p, x, k=5, capacity_factor=1.0)
  with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
    moe.moe_apply(p, x, k=0, capacity_factor=1.0)
  with pytest.raises(ValueError, match="capacity_factor must be > 0, got 0"):
    moe.moe_apply(p, x, k=1, capacity_factor=0)
  with pytest.raises(ValueError, match=r"x must have shape .* got shape \(6,\)"):
    moe.moe_apply(p, np.ones(6), k=1, capacity_factor=1.0)
  with pytest.raises(ValueError, match="x has 5 features on its last axis; the layer's "
                                       "in_features is 6"):
    moe.moe_apply(p, np.ones((3, 5)), k=1, capacity_factor=1.0)
  with pytest.raises(ValueError, match="balance must be one of"):
    moe.moe_apply(p, x, k=1, capacity_factor=1.0, balance="gshard")
  with pytest.raises(ValueError, match=r"k must be <= num_experts \(2\), got 3"):
    moe.MoENNX(6, 3, 2, k=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="capacity_factor must be > 0, got -1"):
    moe.MoE(features=3, num_experts=2, k=1, capacity_factor=-1.0).init(jax.random.key(0), x)
  lin = moe.MoE(features=3, num_experts=2, k=1)
  with pytest.raises(ValueError, match="x has 4 features on its last axis; the layer's "
                                       "in_features is 6"):
    shapes = jax.eval_shape(lambda: lin.init(jax.random.key(0), x))["params"]
    lin.apply({"params": jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)},
              np.ones((3, 4)))
  net = nnx.eval_shape(lambda: moe.MoENNX(6, 3, 2, k=1, rngs=nnx.Rngs(0)))  # checks first
  with pytest.raises(ValueError, match="in_features is 6"):
    net(np.ones((3, 4)))
