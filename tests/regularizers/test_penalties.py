"""Regularisers as optax transforms: hand examples, exact zeros, groups, sensitivity, freezing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jaxsparse as js
from jaxsparse.regularizers import penalties as reg
from tests.helpers import batches, make_step, mlp_params

W = np.float32([[0.5, -0.05, 0.2],
                [-0.3, 0.01, 0.0]])
G = np.float32([[1.0, 0.0, -1.0],
                [0.5, 0.2, 0.3]])


def _one_step(tx, params, grads, **extra):
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, **extra)
  return optax.apply_updates(params, updates), state


def test_l1_proximal_matches_closed_form_soft_threshold_with_exact_zeros():
  params = {"w": jnp.asarray(W), "b": jnp.float32([1.0, -2.0, 0.0])}
  grads = {"w": jnp.asarray(G), "b": jnp.float32([1.0, 1.0, 1.0])}
  lr, lam = 0.1, 1.0  # threshold lr * lam = 0.1
  new, _ = _one_step(optax.chain(optax.sgd(lr), reg.l1_proximal(lam, lr)), params, grads)
  v = W - lr * G  # [[0.4, -0.05, 0.3], [-0.35, -0.01, -0.03]]
  expected = np.sign(v) * np.maximum(np.abs(v) - 0.1, 0.0)
  np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(new["w"]), [[0.3, 0.0, 0.2], [-0.25, 0.0, 0.0]], atol=1e-6)
  # exactly zero, not merely small
  assert (np.asarray(new["w"]) == 0.0).sum() == 3
  # the bias (rank 1) is not regularized by default: plain sgd step
  np.testing.assert_allclose(np.asarray(new["b"]), [0.9, -2.1, -0.1], rtol=1e-6)


_soft_threshold = jax.jit(reg.soft_threshold)


@given(st.lists(st.floats(-3, 3, width=32), min_size=16, max_size=16), st.floats(0, 2, width=32))
def test_soft_threshold_is_the_l1_prox(xs, tau):
  v = np.float32(xs)
  out = np.asarray(_soft_threshold(jnp.asarray(v), jnp.float32(tau)))
  ref = np.sign(v) * np.maximum(np.abs(v) - np.float32(tau), 0)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
  assert np.all(out[np.abs(v) <= np.float32(tau)] == 0)


def test_group_lasso_proximal_zeroes_whole_groups_and_shrinks_the_rest():
  # output groups = columns; norms: col0 = 5, col1 = 0.5, col2 = sqrt(0.08)
  w = jnp.float32([[3.0, 0.3, 0.2], [4.0, -0.4, 0.2]])
  params = {"w": w}
  tau = 1.0  # lr * lam
  new, _ = _one_step(optax.chain(optax.sgd(0.0), reg.group_lasso_proximal(1.0, 1.0, "output")),
                     params, {"w": jnp.zeros_like(w)})
  out = np.asarray(new["w"])
  np.testing.assert_allclose(out[:, 0], np.float32([3.0, 4.0]) * (1 - tau / 5.0), rtol=1e-6)
  assert np.all(out[:, 1:] == 0.0)
  # input groups = rows; norms ~ 3.02 and 4.03: both shrink, none vanishes
  new, _ = _one_step(optax.chain(optax.sgd(0.0), reg.group_lasso_proximal(1.0, 1.0, "input")),
                     params, {"w": jnp.zeros_like(w)})
  norms = np.linalg.norm(np.asarray(w), axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(new["w"]), np.asarray(w) * (1 - tau / norms), rtol=1e-5)


def test_user_grouping_and_group_lasso_subgradient():
  w = jnp.float32([[3.0, 0.0, 1.0], [4.0, 0.0, 2.0]])
  ids = np.int32([[0, 1, 2], [0, 1, 2]])
  params = {"w": w}
  tx = reg.add_group_lasso(0.5, groups={"w": ids})
  u, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init(params), params)
  norms = np.float32([5.0, 1.0, np.sqrt(5.0)])
  expected = 0.5 * np.asarray(w) / np.where(norms > 0, norms, 1)
  expected[:, 1] = 0.0  # subgradient 0 at a zero group
  np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=1e-6)


def _central_difference(f, x, eps=1e-3):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = eps
    g[i] = (float(f(jnp.float32(x + e))) - float(f(jnp.float32(x - e)))) / (2 * eps)
  return g


def test_penalty_gradients_match_finite_differences_and_the_transforms():
  w = jnp.float32([[0.7, -0.2, 0.4], [0.3, 0.9, -0.6]])
  for penalty, tx in [
      (lambda x: reg.l1_penalty({"w": x}, 0.3), reg.add_l1(0.3)),
      (lambda x: reg.group_lasso_penalty({"w": x}, 0.3, "output"), reg.add_group_lasso(0.3, "output")),
      (lambda x: reg.group_lasso_penalty({"w": x}, 0.3, "input"), reg.add_group_lasso(0.3, "input")),
  ]:
    fd = _central_difference(penalty, w)
    np.testing.assert_allclose(np.asarray(jax.grad(penalty)(w)), fd, rtol=2e-2, atol=1e-3)
    u, _ = tx.update({"w": jnp.zeros_like(w)}, tx.init({"w": w}), {"w": w})
    np.testing.assert_allclose(np.asarray(u["w"]), fd, rtol=2e-2, atol=1e-3)


def test_output_sensitivity_of_a_linear_model_by_hand():
  # y = x @ W: d(mean_n y_k) / dW_ik = mean_n x_ni if k == j else 0, so S_ij = alpha_j |mean x_i|.
  x = jnp.float32([[1.0, -2.0], [3.0, 0.0]])
  params = {"w": jnp.ones((2, 3))}
  alpha = jnp.float32([0.5, 1.0, 2.0])
  s = reg.output_sensitivity(lambda p, x: x @ p["w"], params, x, alpha)
  np.testing.assert_allclose(np.asarray(s["w"]), np.outer([2.0, 1.0], [0.5, 1.0, 2.0]), rtol=1e-6)
  s = reg.output_sensitivity(lambda p, x: x @ p["w"], params, x)  # alpha = 1 / C
  np.testing.assert_allclose(np.asarray(s["w"]), np.outer([2.0, 1.0], [1 / 3] * 3), rtol=1e-6)


def test_sensitivity_decay_implements_the_paper_update():
  x = jnp.float32([[1.0, -2.0], [3.0, 0.0]])
  w = jnp.float32([[0.5, -1.0, 2.0], [0.25, 0.1, -0.3]])
  params = {"w": w}
  g = {"w": jnp.full((2, 3), 0.1)}
  eta, lam = 0.5, 0.2
  out_fn = lambda p, x: x @ p["w"]
  tx = optax.chain(optax.sgd(eta), reg.sensitivity_decay(lam, out_fn))
  new, _ = _one_step(tx, params, g, inputs=x)
  s = np.outer([2.0, 1.0], [1 / 3] * 3)  # as above, alpha = 1/3
  expected = np.asarray(w) - eta * 0.1 - lam * np.asarray(w) * np.maximum(0, 1 - s)
  np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-5)
  # insensitive rows decay, the row with S = 2/3 < 1 too, but less
  with pytest.raises(ValueError, match="inputs"):
    tx.update(g, tx.init(params), params)


def test_threshold_and_freeze_continues_with_keep_masks():
  params = mlp_params(jax.random.key(0), (64, 32, 10))
  lr = 0.1
  tx = optax.chain(optax.sgd(lr), reg.l1_proximal(5e-3, lr))
  state = tx.init(params)
  step = make_step(tx)
  for x, y in batches(20):
    params, state = step(params, state, x, y)
  frozen, masks = reg.threshold_and_freeze(params)
  kernels = [p for p in jax.tree.leaves(params) if p.ndim == 2]
  zeros = sum(int((k == 0).sum()) for k in kernels)
  assert zeros > 0  # the proximal step produced exact zeros
  assert sum(c.total - c.kept for c in js.count_leaves(frozen, masks) if c.sparse) == zeros
  assert all(jnp.ndim(masks[k]["bias"]) == 0 for k in masks)  # biases dense
  tx2 = js.keep_masks(optax.sgd(0.1), masks)
  state2 = tx2.init(frozen)
  step2 = make_step(tx2)
  for x, y in batches(3, seed=1):
    frozen, state2 = step2(frozen, state2, x, y)
  for p, m in zip(jax.tree.leaves(frozen), jax.tree.leaves(masks)):
    if jnp.ndim(m):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match="strength"):
    reg.add_l1(-0.1)
  with pytest.raises(ValueError, match="strength"):
    reg.l1_proximal(-1.0, 0.1)
  with pytest.raises(ValueError, match="learning_rate"):
    reg.group_lasso_proximal(0.1, -0.1)
  with pytest.raises(TypeError, match="strength"):
    reg.add_group_lasso("big")
  with pytest.raises(ValueError, match="groups"):
    reg.add_group_lasso(0.1, groups="columns")
  params = {"w": jnp.ones((2, 3)), "v": jnp.ones((3, 3))}
  tx = reg.add_group_lasso(0.1, groups={"w": np.zeros((2, 3), np.int32)})
  with pytest.raises(ValueError, match="groups.*'v'"):  # the grouping does not cover leaf v
    tx.init(params)
  tx = reg.group_lasso_proximal(0.1, 0.1, groups={"w": np.zeros((2, 2), np.int32),
                                                  "v": np.zeros((3, 3), np.int32)})
  with pytest.raises(ValueError, match="groups.*'w'.*shape"):
    tx.init(params)
  tx = reg.add_group_lasso(0.1, groups={"w": np.zeros((2, 3), np.int32)},
                           keep_dense=("v",))  # excluded leaves need no ids
  tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="groups.*'b'.*rank"):
    reg.add_group_lasso(0.1, "output", filter=lambda n, p: n == "b").init({"b": jnp.ones(3)})
  with pytest.raises(ValueError, match="keep_dense: 'u' matches no leaf"):
    reg.add_l1(0.1, keep_dense=("u",)).update(params, reg.add_l1(0.1).init(params), params)
  with pytest.raises(TypeError, match="filter"):
    reg.l1_proximal(0.1, 0.1, filter="kernels")
  with pytest.raises(ValueError, match="threshold"):
    reg.threshold_and_freeze(params, -1.0)
  with pytest.raises(TypeError, match="output_fn"):
    reg.sensitivity_decay(0.1, None)


# ------------------------------------------------------------------ one way to choose leaves


def _mlp_and_grads():
  params = mlp_params(jax.random.key(0))
  return params, jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)


# (name, build from (mask, filter, keep_dense), how to run it on params and grads)
_SELECTING = [
    ("add_l1", lambda **kw: reg.add_l1(0.01, **kw), None),
    ("l1_proximal", lambda **kw: reg.l1_proximal(0.5, 0.1, **kw), None),
    ("add_group_lasso", lambda **kw: reg.add_group_lasso(0.01, **kw), None),
    ("group_lasso_proximal", lambda **kw: reg.group_lasso_proximal(0.5, 0.1, **kw), None),
    ("l1_penalty", None, lambda p, **kw: reg.l1_penalty(p, 0.1, **kw)),
    ("group_lasso_penalty", None, lambda p, **kw: reg.group_lasso_penalty(p, 0.1, **kw)),
    ("threshold_and_freeze", None, lambda p, **kw: reg.threshold_and_freeze(p, 0.05, **kw)),
    ("group_ids", None, lambda p, **kw: [None if g is None else g.ids
                                         for g in reg.group_ids(p, "output", **kw)]),
]


@pytest.mark.parametrize("name,make,call", _SELECTING, ids=[s[0] for s in _SELECTING])
def test_regularizers_choose_leaves_as_the_methods_do_and_mask_is_deprecated(name, make, call):
  params, grads = _mlp_and_grads()
  run = ((lambda **kw: _one_step(make(**kw), params, grads)[0]) if make is not None
         else (lambda **kw: call(params, **kw)))
  # filter / keep_dense as the methods take them; the same leaves as the old optax-style mask
  only_fc2 = {k: {"kernel": k == "fc2", "bias": False} for k in params}
  new = run(filter=lambda n, p: jnp.ndim(p) >= 2, keep_dense=("fc1", "fc3"))
  with pytest.warns(DeprecationWarning, match=f"{name}\\(\\): 'mask' is deprecated; use 'filter'"):
    old = run(mask=only_fc2)
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # and the selection matters: the default (every kernel) differs
  default = run()
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(default), jax.tree.leaves(new)))
  with pytest.raises(TypeError, match="not mask"):
    run(mask=only_fc2, keep_dense=("fc1",))


def test_sensitivity_decay_takes_filter_and_mask_is_deprecated():
  r = np.random.default_rng(0)
  params = {"fc1": {"kernel": jnp.asarray(r.normal(size=(4, 3)), jnp.float32),
                    "bias": jnp.zeros(3)},
            "fc2": {"kernel": jnp.asarray(r.normal(size=(3, 2)), jnp.float32)}}
  x = jnp.asarray(r.normal(size=(5, 4)), jnp.float32)
  out = lambda p, x: (x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"]
  grads = jax.tree.map(jnp.zeros_like, params)
  run = lambda **kw: _one_step(reg.sensitivity_decay(0.1, out, **kw), params, grads, inputs=x)[0]
  new = run(keep_dense=("fc1",))
  with pytest.warns(DeprecationWarning, match=r"sensitivity_decay\(\): 'mask' is deprecated"):
    old = run(mask={"fc1": {"kernel": False, "bias": False}, "fc2": {"kernel": True}})
  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(new["fc1"]["kernel"], params["fc1"]["kernel"])
  assert not np.array_equal(np.asarray(run()["fc1"]["kernel"]), np.asarray(params["fc1"]["kernel"]))


def test_bn_scale_l1_is_add_l1_on_the_batchnorm_scales():
  from jaxsparse.pruning import structured
  params = {"fc1": {"kernel": -jnp.ones((3, 4)), "bias": jnp.ones(4)},
            "bn1": {"scale": jnp.float32([1.0, -2.0, 0.0, 3.0]), "bias": jnp.ones(4)}}
  grads = jax.tree.map(jnp.zeros_like, params)
  got, _ = _one_step(structured.bn_scale_l1(1e-2), params, grads)
  want, _ = _one_step(reg.add_l1(1e-2, filter=structured.is_bn_scale), params, grads)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got["bn1"]["scale"]) - 1e-2 * np.float32([1, -1, 0, 1]),
                                np.asarray(params["bn1"]["scale"]))
