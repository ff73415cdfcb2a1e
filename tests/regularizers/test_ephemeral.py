"""Ephemeral sparsity: top-k gradients with error feedback, activation sparsity, top-k activations."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.regularizers import ephemeral as eph


def _int_grads(t, shapes):
  """Small integer-valued float gradients: every sum below is exact in float32."""
  rng = np.random.default_rng(t)
  return {k: jnp.asarray(rng.integers(-8, 9, s).astype(np.float32)) for k, s in shapes.items()}


@pytest.mark.parametrize("scope,k", [("local", 3), ("global", 5)])
def test_error_feedback_conserves_the_gradient_sum(scope, k):
  shapes = {"w": (4, 5), "b": (5,)}
  params = {n: jnp.zeros(s) for n, s in shapes.items()}
  tx = eph.topk_gradients(k, scope=scope)
  state = tx.init(params)
  update = jax.jit(tx.update)
  sent_sum = jax.tree.map(jnp.zeros_like, params)
  raw_sum = jax.tree.map(jnp.zeros_like, params)
  for t in range(12):
    g = _int_grads(t, shapes)
    sent, state = update(g, state, params)
    nnz = [int(jnp.count_nonzero(x)) for x in jax.tree.leaves(sent)]
    if scope == "local":
      assert all(n <= k for n in nnz)
    else:
      assert sum(nnz) <= k
    sent_sum = jax.tree.map(jnp.add, sent_sum, sent)
    raw_sum = jax.tree.map(jnp.add, raw_sum, g)
  total = jax.tree.map(jnp.add, sent_sum, state.residual)
  for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(raw_sum)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # nothing is lost
  assert int(state.count) == 12


def test_topk_sends_the_largest_accumulated_entries():
  params = {"w": jnp.zeros(4)}
  tx = eph.topk_gradients(2)
  state = tx.init(params)
  sent, state = tx.update({"w": jnp.float32([1.0, -5.0, 2.0, 0.5])}, state, params)
  np.testing.assert_array_equal(np.asarray(sent["w"]), [0.0, -5.0, 2.0, 0.0])
  np.testing.assert_array_equal(np.asarray(state.residual["w"]), [1.0, 0.0, 0.0, 0.5])
  # next step: accumulated [1 + 1, 0, 0, 0.5 + 0.25] -> 2 and 0.75 go out
  sent, state = tx.update({"w": jnp.float32([1.0, 0.0, 0.0, 0.25])}, state, params)
  np.testing.assert_array_equal(np.asarray(sent["w"]), [2.0, 0.0, 0.0, 0.75])
  np.testing.assert_array_equal(np.asarray(state.residual["w"]), [0.0, 0.0, 0.0, 0.0])
  # without error feedback the rest is dropped
  tx = eph.topk_gradients(1, error_feedback=False)
  sent, state = tx.update({"w": jnp.float32([1.0, -5.0, 2.0, 0.5])}, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(sent["w"]), [0.0, -5.0, 0.0, 0.0])
  assert not np.asarray(state.residual["w"]).any()


def test_communication_bytes_by_hand():
  params = {"w": jnp.zeros((10, 10)), "b": jnp.zeros(10)}
  c = eph.communication_bytes(params, fraction=0.1)
  assert c.dense == 110 * 4
  assert c.sparse == (10 + 1) * (4 + 4)  # ceil(0.1 * 100) + ceil(0.1 * 10) values + int32 indices
  assert c.ratio == pytest.approx(440 / 88)
  c = eph.communication_bytes(params, 7, scope="global")
  assert c.sparse == 7 * 8
  assert eph.kept_per_leaf(params, fraction=0.1) == [1, 10]  # flattening order: b, w


def test_topk_gradients_bad_input():
  params = {"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)}
  with pytest.raises(ValueError, match="k=4 is larger than leaf 'b'"):
    eph.topk_gradients(4).init(params)
  with pytest.raises(ValueError, match="k=13 is larger"):
    eph.topk_gradients(13, scope="global").init(params)
  with pytest.raises(ValueError, match="exactly one of k and fraction"):
    eph.topk_gradients()
  with pytest.raises(ValueError, match="k must be"):
    eph.topk_gradients(-1)
  with pytest.raises(ValueError, match="fraction"):
    eph.topk_gradients(fraction=1.5)
  with pytest.raises(ValueError, match="scope"):
    eph.topk_gradients(2, scope="layer")


def test_topk_gradients_train_with_optax_chain():
  from tests.helpers import batches, loss_fn, mlp_params
  params = mlp_params(jax.random.key(0), (64, 32, 10))
  tx = optax.chain(eph.topk_gradients(fraction=0.05), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, g = jax.value_and_grad(loss_fn)(params, x, y)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  losses = []
  for x, y in batches(60):
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(4, name="fc1")(x))
    return nn.Dense(2, name="fc2")(h)


def test_activation_sparsity_per_layer_matches_a_numpy_reference():
  x = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
  x[:, 0] = 0.0  # a third of the first layer's input is zero
  net = _Net()
  v = net.init(jax.random.key(0), x)
  out = eph.activation_sparsity(net, v, x, batch_size=16)
  p = v["params"]
  h = np.maximum(x @ np.asarray(p["fc1"]["kernel"]) + np.asarray(p["fc1"]["bias"]), 0)
  assert set(out) == {"fc1", "fc2"}
  assert out["fc1"] == pytest.approx(1 / 3)
  assert out["fc2"] == pytest.approx((h == 0).mean())
  assert 0 < out["fc2"] < 1


def test_topk_activation_layers():
  x = jnp.float32([[3.0, 1.0, 2.0, 5.0], [-1.0, -2.0, 0.5, 4.0]])
  out = eph.TopKActivation(2).apply({}, x)
  np.testing.assert_array_equal(np.asarray(out), [[3.0, 0, 0, 5.0], [0, 0, 0.5, 4.0]])
  np.testing.assert_array_equal(np.asarray(eph.TopKActivationNNX(2)(x)), np.asarray(out))
  g = jax.grad(lambda x: eph.topk_activation(x, 2).sum())(x)
  np.testing.assert_array_equal(np.asarray(g), [[1, 0, 0, 1], [0, 0, 1, 1]])
  with pytest.raises(ValueError, match="k=5 is larger than the 4 features"):
    eph.TopKActivation(5).apply({}, x)
  with pytest.raises(ValueError, match="k must be"):
    eph.TopKActivationNNX(0)


def test_one_scope_vocabulary_and_the_old_leaf_name_warns():
  params = {"w": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
  assert eph.kept_per_leaf(params, 3) == [3, 3]                     # default: "local"
  with pytest.warns(DeprecationWarning, match='scope="local"'):
    assert eph.kept_per_leaf(params, 3, scope="leaf") == [3, 3]     # still works, for now
  for bad in ("per_leaf", "Local"):
    with pytest.raises(ValueError, match=r"scope must be one of \('local', 'global'\)"):
      eph.topk_gradients(3, scope=bad)
    with pytest.raises(ValueError, match=r"scope must be one of \('local', 'global'\)"):
      js.magnitude_masks(params, 0.5, scope=bad)
