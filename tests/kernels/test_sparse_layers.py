"""Sparse Dense layers (linen, nnx): kernel path == masked dense path, masks from jaxsparse."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse
from jaxsparse.kernels import (SparseDense, SparseLinear, choose_path, expand_block_mask,
                               load_masks, sparse_dense)

BLOCK = (16, 16)


def block_mask_leaf(rng, shape, density):
  bm = rng.random((shape[0] // BLOCK[0], shape[1] // BLOCK[1])) < density
  bm[0, 0] = True
  return expand_block_mask(jnp.asarray(bm), BLOCK)


def make_linen(mode):
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(SparseDense(48, block_shape=BLOCK, mode=mode, backend="interpret",
                              name="fc1")(x))
      return nn.Dense(10, name="fc2")(x)

  return MLP()


@pytest.mark.e2e
def test_linen_kernel_path_trains_like_masked_dense_with_jaxsparse_masks():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(24, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 24))
  sparse, dense = make_linen("bsr"), make_linen("masked_dense")
  params = sparse.init(jax.random.key(0), x)["params"]
  masks = jax.tree.map(lambda p: jnp.asarray(True), params)
  masks["fc1"]["kernel"] = block_mask_leaf(rng, (64, 48), 0.4)
  tx = jaxsparse.keep_masks(optax.sgd(0.1), masks)
  update = jax.jit(tx.update)
  traces = []

  def make_grad(model, count):
    @jax.jit
    def grad_fn(params, masks, x, y):
      count.append(1)
      def loss(p):
        logits = model.apply({"params": p, "masks": masks}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return jax.value_and_grad(loss)(params)
    return grad_fn

  grad_sparse, grad_dense = make_grad(sparse, traces), make_grad(dense, [])
  p_s = p_d = jaxsparse.apply_masks(params, masks)
  s_s = s_d = tx.init(params)
  for _ in range(2):
    (l_s, g_s) = grad_sparse(p_s, jaxsparse.get_masks(s_s), x, y)
    (l_d, g_d) = grad_dense(p_d, jaxsparse.get_masks(s_d), x, y)
    np.testing.assert_allclose(l_s, l_d, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), g_s, g_d)
    u, s_s = update(g_s, s_s, p_s)
    p_s = optax.apply_updates(p_s, u)
    u, s_d = update(g_d, s_d, p_d)
    p_d = optax.apply_updates(p_d, u)
  m = np.asarray(masks["fc1"]["kernel"])
  assert not np.any(np.asarray(p_s["fc1"]["kernel"])[~m])
  assert not np.any(np.asarray(g_s["fc1"]["kernel"])[~m])
  # a mask update (another block mask) reuses the compiled step
  new = dict(masks, fc1=dict(masks["fc1"], kernel=block_mask_leaf(rng, (64, 48), 0.7)))
  l_new, _ = grad_sparse(p_s, new, x, y)
  l_ref, _ = grad_dense(p_s, new, x, y)
  np.testing.assert_allclose(l_new, l_ref, rtol=1e-5)
  assert len(traces) == 1


def test_nnx_sparse_linear_with_load_masks():
  rng = np.random.default_rng(1)

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = SparseLinear(32, 48, block_shape=BLOCK, mode="bsr", rngs=rngs)
      self.fc2 = nnx.Linear(48, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  model = Model(nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  params = nnx.state(model, nnx.Param)
  masks = jax.tree.map(lambda p: jnp.asarray(True), params)
  mask = block_mask_leaf(rng, (32, 48), 0.5)
  masks["fc1"]["kernel"] = mask
  load_masks(model, masks)
  np.testing.assert_array_equal(model.fc1.mask[...], mask)
  assert model.fc1.kernel_path().path == "bsr"

  kernel, bias = model.fc1.kernel[...], model.fc1.bias[...]
  ref = lambda k, x: model.fc2(jax.nn.relu(x @ jnp.where(mask, k, 0) + bias))
  val, g = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2)))(model)
  val_ref, g_ref = jax.value_and_grad(lambda k: jnp.sum(ref(k, x) ** 2))(kernel)
  np.testing.assert_allclose(val, val_ref, rtol=1e-5)
  np.testing.assert_allclose(g["fc1"]["kernel"][...], g_ref, atol=1e-4, rtol=1e-4)

  with pytest.raises(ValueError, match="no mask for SparseLinear kernel 'fc1/kernel'"):
    load_masks(model, {"fc2": masks["fc2"]})
  with pytest.raises(ValueError, match="expected a bool mask of shape"):
    load_masks(model, dict(masks, fc1=dict(masks["fc1"], kernel=jnp.ones((32, 47), bool))))


def test_path_choice_and_reasons():
  # on this CPU, auto falls back to the masked dense matmul (Pallas would only interpret)
  p = SparseDense(64, block_shape=BLOCK).kernel_path(64)
  assert p.path == "masked_dense" and "cpu" in p.reason
  # the density rule, for a compiled backend
  assert choose_path((256, 256), (64, 64), 4, backend="triton").path == "bsr"
  dense_budget = choose_path((256, 256), (64, 64), 14, backend="triton")
  assert dense_budget.path == "masked_dense" and "max_density" in dense_budget.reason
  odd = choose_path((100, 64), (16, 16), backend="triton")
  assert odd.path == "masked_dense" and "does not divide" in odd.reason
  assert choose_path((64, 64), BLOCK, mode="masked_dense").path == "masked_dense"
  with pytest.raises(ValueError, match="block_shape .* does not divide"):
    choose_path((100, 64), (16, 16), mode="bsr")
  with pytest.raises(ValueError, match="mode must be one of"):
    choose_path((64, 64), BLOCK, mode="fast")
  with pytest.raises(ValueError, match="mode must be one of"):
    SparseLinear(32, 32, mode="fast", rngs=nnx.Rngs(0))
  # no "masks" collection: every weight is used
  layer = SparseDense(32, block_shape=BLOCK, mode="bsr", backend="xla")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32)), jnp.float32)
  v = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(layer.apply(v, x), x @ v["params"]["kernel"] + v["params"]["bias"],
                             atol=1e-5)
  # a layer whose block does not divide its kernel still works (masked dense fallback)
  layer = SparseDense(20, block_shape=BLOCK)
  x = jnp.ones((2, 24))
  v = layer.init(jax.random.key(0), x)
  assert layer.apply(v, x).shape == (2, 20)


def test_sparse_dense_bad_input():
  x = jnp.ones((4, 32))
  with pytest.raises(ValueError, match="kernel must be 2D"):
    sparse_dense(x, jnp.ones((32, 4, 4)))
  with pytest.raises(ValueError, match="kernel must be 2D"):
    choose_path((32, 4, 4), BLOCK)
  with pytest.raises(ValueError, match="last axis"):
    sparse_dense(jnp.ones((4, 16)), jnp.ones((32, 32)))
  with pytest.raises(ValueError, match="dtype"):
    sparse_dense(x.astype(jnp.bfloat16), jnp.ones((32, 32)), path="masked_dense")
  with pytest.raises(ValueError, match="dtype"):
    sparse_dense(x.astype(jnp.bfloat16), jnp.ones((32, 32)), block_shape=BLOCK, backend="xla")
  with pytest.raises(ValueError, match="path must be"):
    sparse_dense(x, jnp.ones((32, 32)), path="sparse")
  with pytest.raises(ValueError, match="block_shape"):
    sparse_dense(x, jnp.ones((32, 32)), block_shape=(24, 16), path="bsr")
  # a block mask is accepted by both paths and gives the same result
  w = jnp.asarray(np.random.default_rng(0).normal(size=(32, 32)), jnp.float32)
  bm = jnp.asarray([[True, False], [False, True]])
  np.testing.assert_allclose(
      sparse_dense(x, w, bm, block_shape=BLOCK, backend="xla"),
      sparse_dense(x, w, bm, block_shape=BLOCK, path="masked_dense"), atol=1e-5)
