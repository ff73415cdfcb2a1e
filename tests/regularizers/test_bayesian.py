"""L0 hard-concrete gates and sparse variational dropout: distributions, constants, layers, training."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxsparse as js
from jaxsparse.regularizers import bayesian as bz
from experiments import data
from jaxsparse.nn import models


def _hard_concrete_mean(log_alpha, beta=bz.BETA, gamma=bz.GAMMA, zeta=bz.ZETA):
  """E[z] = int_0^1 P(z > t) dt from the analytic CDF of s: P(s <= c) = sigmoid(beta logit(c) - la)."""
  t = np.linspace(0.0, 1.0, 200001)
  c = (t - gamma) / (zeta - gamma)
  cdf = 1.0 / (1.0 + np.exp(-(beta * np.log(c / (1 - c)) - log_alpha)))
  return np.trapezoid(1.0 - cdf, t)


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5])
def test_hard_concrete_sample_mean_and_zero_mass_match_the_analytic_values(log_alpha):
  z = np.asarray(bz.hard_concrete_sample(jax.random.key(0), jnp.float32(log_alpha), (400_000,)))
  assert z.min() >= 0.0 and z.max() <= 1.0
  assert abs(z.mean() - _hard_concrete_mean(log_alpha)) < 3e-3
  p_nonzero = float(bz.hard_concrete_prob_nonzero(jnp.float32(log_alpha)))
  assert abs((z != 0).mean() - p_nonzero) < 3e-3
  # the closed form of eq. 12
  assert p_nonzero == pytest.approx(1 / (1 + math.exp(-(log_alpha - (2 / 3) * math.log(0.1 / 1.1)))),
                                    rel=1e-6)


def test_expected_l0_penalty_equals_the_formula_for_weight_and_neuron_gates():
  x = jnp.ones((2, 4))
  for gates, group in (("weight", 1), ("neuron", 3)):
    layer = bz.L0Dense(3, gates=gates, droprate_init=0.3)
    params = layer.init({"params": jax.random.key(0), "gates": jax.random.key(1)}, x)["params"]
    la = np.asarray(params["log_alpha"], np.float64)
    assert la.shape == ((4, 3) if gates == "weight" else (4, 1))
    np.testing.assert_allclose(la.mean(), math.log(0.7 / 0.3), atol=0.01)  # Louizos init
    formula = group * np.sum(1 / (1 + np.exp(-(la - (2 / 3) * np.log(0.1 / 1.1)))))
    assert float(bz.l0_penalty(params)) == pytest.approx(formula, rel=1e-5)
  # test-time gate, eq. 13, and exact zeros
  la = jnp.float32([-10.0, -2.5, 0.0, 2.0, 10.0])
  z = np.asarray(bz.hard_concrete_test_gate(la))
  ref = np.clip(1 / (1 + np.exp(-np.asarray(la))) * 1.2 - 0.1, 0, 1)
  np.testing.assert_allclose(z, ref, rtol=1e-6)
  assert z[0] == 0.0 and z[1] == 0.0 and z[-1] == 1.0
  params = {"fc": {"kernel": jnp.ones((5, 2)), "log_alpha": la[:, None]}}
  assert bz.l0_zero_gates(params) == (2, 5)


def _true_neg_kl_plus_const(log_alpha):
  """0.5 log alpha - E_{eps ~ N(1, alpha)} log|eps| (the exact -KL up to the constant)."""
  s = math.exp(0.5 * log_alpha)
  e = np.linspace(1 - 12 * s, 1 + 12 * s, 1_000_001)
  pdf = np.exp(-0.5 * (e - 1) ** 2 / s ** 2) / (math.sqrt(2 * math.pi) * s)
  with np.errstate(divide="ignore"):
    f = np.log(np.abs(e))
  f[~np.isfinite(f)] = 0.0
  return 0.5 * log_alpha - np.trapezoid(f * pdf, e)


def test_sparse_vd_kl_approximation_constants():
  assert (bz.K1, bz.K2, bz.K3) == (0.63576, 1.87320, 1.48695)
  la = jnp.float32([-4.0, 0.0, 3.0, 8.0])
  out = np.asarray(bz.vd_neg_kl(la))
  k1, k2, k3 = 0.63576, 1.87320, 1.48695
  ref = [k1 / (1 + math.exp(-(k2 + k3 * a))) - 0.5 * math.log1p(math.exp(-a)) - k1
         for a in np.asarray(la, np.float64)]
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out[1], -0.4312389509903089, rtol=1e-5)
  assert abs(out[-1]) < 1e-3  # -KL -> 0 as alpha -> infinity (C = -k1)
  # the approximation is within 0.012 of the exact -KL (with C = -k1), as the paper reports
  for a in (-2.0, 0.0, 1.0, 3.0):
    assert abs(_true_neg_kl_plus_const(a) - k1 - float(bz.vd_neg_kl(jnp.float32(a)))) < 0.012


def _fd(f, x, eps=1e-2):
  x = np.asarray(x, np.float64)
  g = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    e = np.zeros_like(x)
    e[i] = eps
    g[i] = (float(f(jnp.float32(x + e))) - float(f(jnp.float32(x - e)))) / (2 * eps)
  return g


def test_penalty_gradients_match_finite_differences():
  la = jnp.float32([[-1.0, 0.5], [2.0, -3.0]])
  kernel = jnp.ones((2, 2))
  f = lambda a: bz.l0_penalty({"fc": {"kernel": kernel, "log_alpha": a}})
  np.testing.assert_allclose(np.asarray(jax.grad(f)(la)), _fd(f, la), rtol=1e-3, atol=1e-4)
  theta = jnp.float32([[0.5, -0.1], [1.2, 0.03]])
  ls2 = jnp.float32([[-3.0, -1.0], [0.5, -6.0]])
  kl_t = lambda t: bz.sparse_vd_kl({"fc": {"kernel": t, "log_sigma2": ls2}})
  kl_s = lambda s: bz.sparse_vd_kl({"fc": {"kernel": theta, "log_sigma2": s}})
  np.testing.assert_allclose(np.asarray(jax.grad(kl_t)(theta)), _fd(kl_t, theta, 1e-3),
                             rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(np.asarray(jax.grad(kl_s)(ls2)), _fd(kl_s, ls2), rtol=1e-3, atol=1e-4)


def test_vd_local_reparameterisation_moments_and_test_time_pruning():
  layer = bz.SparseVDDense(2, use_bias=False)
  x = jnp.float32([[1.0, -2.0, 0.5]])
  params = {"kernel": jnp.float32([[0.5, 1e-3], [-0.2, 0.3], [1.0, 0.0]]),
            "log_sigma2": jnp.full((3, 2), -2.0)}
  keys = jax.random.split(jax.random.key(0), 20000)
  ys = jax.vmap(lambda k: layer.apply({"params": params}, x, rngs={"noise": k}))(keys)[:, 0]
  mean = np.asarray(x @ params["kernel"])[0]
  var = np.asarray((x ** 2) @ jnp.exp(params["log_sigma2"]))[0]
  np.testing.assert_allclose(np.asarray(ys.mean(0)), mean, atol=0.03)
  np.testing.assert_allclose(np.asarray(ys.var(0)), var, rtol=0.05)
  # deterministic: log alpha > 3 removed (here the 1e-3 and 0.0 weights)
  y = layer.apply({"params": params}, x, deterministic=True)
  np.testing.assert_allclose(np.asarray(y)[0], [0.5 + 0.4 + 0.5, -0.6], rtol=1e-6)
  plain, masks = bz.sparse_vd_to_masked({"fc": params})
  np.testing.assert_array_equal(np.asarray(masks["fc"]["kernel"]),
                                [[True, False], [True, True], [True, False]])


def test_linen_and_nnx_layers_agree_and_convert_to_plain_models():
  x = jax.random.normal(jax.random.key(3), (4, 5))
  for nnx_layer, linen_layer, kw in [
      (bz.SparseVDDenseNNX(5, 3, rngs=nnx.Rngs(0)), bz.SparseVDDense(3), {}),
      (bz.L0DenseNNX(5, 3, gates="neuron", rngs=nnx.Rngs(0)), bz.L0Dense(3, gates="neuron"), {}),
      (bz.L0DenseNNX(5, 3, rngs=nnx.Rngs(0)), bz.L0Dense(3), {}),
  ]:
    state = nnx.to_pure_dict(nnx.state(nnx_layer, nnx.Param))
    # make some weights prunable: big log_sigma2 / negative log_alpha on the first row
    key = "log_sigma2" if "log_sigma2" in state else "log_alpha"
    state[key] = state[key].at[0].set(8.0 if key == "log_sigma2" else -6.0)
    st = nnx.state(nnx_layer, nnx.Param)
    nnx.replace_by_pure_dict(st, state)
    nnx.update(nnx_layer, st)
    y_nnx = nnx_layer(x, deterministic=True)
    y_linen = linen_layer.apply({"params": state}, x, deterministic=True)
    np.testing.assert_allclose(np.asarray(y_nnx), np.asarray(y_linen), rtol=1e-5, atol=1e-6)
    convert = bz.sparse_vd_to_masked if key == "log_sigma2" else bz.l0_to_masked
    plain, masks = convert(nnx_layer)
    assert not np.asarray(masks["kernel"])[0].any()
    y_plain = nn.Dense(3).apply({"params": plain}, x)
    np.testing.assert_allclose(np.asarray(y_plain), np.asarray(y_linen), rtol=1e-5, atol=1e-6)
    # stochastic mode draws from the layer's own stream
    assert not np.allclose(np.asarray(nnx_layer(x)), np.asarray(nnx_layer(x)))


def test_conv_layers_shapes_and_penalties():
  x = jnp.ones((2, 6, 6, 3))
  conv = bz.L0Conv(4, (3, 3), gates="channel")
  params = conv.init({"params": jax.random.key(0), "gates": jax.random.key(1)}, x)["params"]
  assert params["log_alpha"].shape == (1, 1, 1, 4)
  assert conv.apply({"params": params}, x, rngs={"gates": jax.random.key(2)}).shape == (2, 6, 6, 4)
  la = np.asarray(params["log_alpha"], np.float64)
  assert float(bz.l0_penalty(params)) == pytest.approx(
      27 * np.sum(1 / (1 + np.exp(-(la - (2 / 3) * np.log(0.1 / 1.1))))), rel=1e-5)
  vd = bz.SparseVDConvNNX(3, 4, (3, 3), padding="VALID", rngs=nnx.Rngs(0))
  assert vd(x).shape == (2, 4, 4, 4)
  ref = jax.lax.conv_general_dilated(x, vd.kernel[...], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + vd.bias[...]
  np.testing.assert_allclose(np.asarray(vd(x, deterministic=True)), np.asarray(ref), rtol=1e-5)


def test_bad_inputs():
  layer = bz.SparseVDDense(3)
  params = layer.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, jnp.ones((1, 2)))
  with pytest.raises(TypeError, match="x: .*int32"):
    layer.apply(params, jnp.ones((1, 2), jnp.int32), deterministic=True)
  with pytest.raises(TypeError, match="x: .*float16"):
    bz.SparseVDDenseNNX(2, 3, rngs=nnx.Rngs(0))(jnp.ones((1, 2), jnp.float16))
  with pytest.raises(ValueError, match="gates"):
    bz.L0DenseNNX(2, 3, gates="channel", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="droprate_init"):
    bz.L0DenseNNX(2, 3, droprate_init=1.0, rngs=nnx.Rngs(0))


class _VDMLP(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic=False):
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(bz.SparseVDDense(300, name="fc1")(x, deterministic))
    x = nn.relu(bz.SparseVDDense(100, name="fc2")(x, deterministic))
    return bz.SparseVDDense(10, name="fc3")(x, deterministic)


@pytest.mark.e2e
def test_sparse_vd_on_digits_reaches_90_percent_sparsity_and_90_percent_accuracy():
  ds = data.load_dataset("digits")
  net = _VDMLP()
  params = net.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                    jnp.zeros((1, 8, 8, 1)))["params"]
  n, batch, epochs = len(ds.x_train), 128, 40
  steps = epochs * (n // batch)
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps, alpha=0.1))

  def loss_fn(p, x, y, key, t):
    logits = net.apply({"params": p}, x, rngs={"noise": key})
    beta = jnp.minimum(1.0, t / (steps // 3))  # KL warm-up
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + beta * bz.sparse_vd_kl(p) / n)

  @jax.jit
  def train(params):
    def epoch(carry, e):
      params, opt_state, t = carry
      xs, ys = data.epoch_batches(x_tr, y_tr, batch, jax.random.key(e))
      def step(c, b):
        params, opt_state, t = c
        g = jax.grad(loss_fn)(params, b[0], b[1], jax.random.fold_in(jax.random.key(9), t), t)
        u, opt_state = tx.update(g, opt_state, params)
        return (optax.apply_updates(params, u), opt_state, t + 1), None
      return jax.lax.scan(step, (params, opt_state, t), (xs, ys))[0], None
    return jax.lax.scan(epoch, (params, tx.init(params), 0), jnp.arange(epochs))[0][0]

  x_tr, y_tr = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  params = train(params)
  sparsity = bz.sparse_vd_sparsity(params)
  plain, masks = bz.sparse_vd_to_masked(params)
  logits = models.LeNet300100(10).apply({"params": plain}, ds.x_test)
  acc = float(jnp.mean(jnp.argmax(logits, -1) == ds.y_test))
  assert sparsity > 0.9, sparsity
  assert acc >= 0.9, acc
  assert js.sparsity(plain, masks) == pytest.approx(sparsity)
  # the converted masked model equals the VD model at test time
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(net.apply({"params": params}, ds.x_test, True)),
                             rtol=1e-4, atol=1e-4)
