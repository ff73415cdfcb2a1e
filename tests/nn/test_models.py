"""Tests of jaxsparse.nn.models: exact sizes, linen/nnx agreement, reference forwards, training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import data
from jaxsparse.nn import models

FMNIST = (28, 28, 1)
DIGITS = (8, 8, 1)


def _leaf_names(tree, ndim_at_least=0):
  """Sorted '/'-joined leaf paths (nnx's trailing 'value' dropped) of leaves with ndim >= n."""
  names = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if keys[-1] == "value":
      keys = keys[:-1]
    if jnp.ndim(leaf) >= ndim_at_least:
      names.append("/".join(keys))
  return sorted(names)


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _linen_variables(name, shape, seed=0, **kwargs):
  return models.init_params(models.create_model(name, 10, **kwargs), shape, seed)


def _nnx_to_match(name, shape, variables, **kwargs):
  """An nnx twin carrying the linen variables (params and batch stats)."""
  # Abstract construction (no random init to compile), then every variable is filled in.
  model = nnx.eval_shape(lambda: models.create_nnx_model(name, shape, 10, seed=123, **kwargs))
  for collection, var_type in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    if collection in variables:
      state = nnx.state(model, var_type)
      nnx.replace_by_pure_dict(state, variables[collection])
      nnx.update(model, state)
  return model


# Hand counts. LeNet-300-100, 28x28: 784*300+300 + 300*100+100 + 100*10+10 = 266,610.
# LeNet-5-Caffe, 28x28 (VALID): conv1 5*5*1*20+20 = 520; 28-4=24 -> pool 12; conv2 5*5*20*50+50 =
# 25,050; 12-4=8 -> pool 4; fc1 4*4*50*500+500 = 400,500; fc2 500*10+10 = 5,010; total 431,080.
# 8x8 digits: LeNet-300-100 64*300+300 + 30,100 + 1,010 = 50,610; LeNet-5 (SAME) 8 -> 4 -> 2,
# fc1 2*2*50*500+500 = 100,500, total 131,080. MLP 784-2048-2048-2048-10:
# 1,607,680 + 2*4,196,352 + 20,490 = 10,020,874.
CASES = [
    ("lenet300", FMNIST, {}, 266_610),
    ("lenet300", FMNIST, {"use_bias": False}, 266_610 - 410),
    ("lenet300", FMNIST, {"use_bias": False, "batch_norm": True}, 266_200 + 2 * (300 + 100)),
    ("lenet300", DIGITS, {}, 50_610),
    ("lenet5", FMNIST, {}, 431_080),
    ("lenet5", DIGITS, {}, 131_080),
    ("lenet5", FMNIST, {"padding": "SAME"}, 431_080 - 400_500 + (7 * 7 * 50 * 500 + 500)),
    ("mlp", FMNIST, {"features": (2048, 2048, 2048)}, 10_020_874),
    ("mlp", DIGITS, {"features": (32,), "use_bias": False}, 64 * 32 + 32 * 10),
]


@pytest.mark.parametrize("name,shape,kwargs,expected", CASES)
def test_param_counts_linen_and_nnx(name, shape, kwargs, expected):
  model = models.create_model(name, 10, **kwargs)
  variables = jax.eval_shape(lambda: models.init_params(model, shape))
  assert _count(variables["params"]) == expected
  nnx_model = nnx.eval_shape(lambda: models.create_nnx_model(name, shape, 10, **kwargs))
  nnx_params = nnx.state(nnx_model, nnx.Param)
  assert _count(nnx_params) == expected
  assert _leaf_names(nnx_params) == _leaf_names(variables["params"])
  assert (jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx_params))
          == jax.tree.map(lambda a: a.shape, variables["params"]))


def test_readable_layer_names_and_kernel_filter():
  params = jax.eval_shape(lambda: _linen_variables("lenet300", FMNIST))["params"]
  assert _leaf_names(params) == ["fc1/bias", "fc1/kernel", "fc2/bias", "fc2/kernel",
                                 "fc3/bias", "fc3/kernel"]
  # "Kernels of rank >= 2" picks exactly the weight matrices / conv kernels.
  assert _leaf_names(params, ndim_at_least=2) == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]
  conv = jax.eval_shape(lambda: _linen_variables("lenet5", FMNIST))["params"]
  assert _leaf_names(conv, ndim_at_least=2) == ["conv1/kernel", "conv2/kernel", "fc1/kernel",
                                                "fc2/kernel"]
  assert conv["conv2"]["kernel"].shape == (5, 5, 20, 50)
  bn = jax.eval_shape(lambda: _linen_variables("lenet300", FMNIST, use_bias=False,
                                                batch_norm=True))["params"]
  assert _leaf_names(bn, ndim_at_least=2) == ["fc1/kernel", "fc2/kernel", "fc3/kernel"]


@pytest.mark.parametrize("name,shape", [("lenet300", FMNIST), ("lenet300", DIGITS),
                                        ("lenet5", FMNIST), ("lenet5", DIGITS), ("mlp", DIGITS)])
def test_output_shapes(name, shape):
  kwargs = {"features": (16, 8)} if name == "mlp" else {}
  # Shapes only (abstract evaluation); the numerics are checked against references below.
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  linen_model = models.create_model(name, 7, **kwargs)
  logits = jax.eval_shape(
      lambda x: linen_model.apply(models.init_params(linen_model, shape), x), x)
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32
  nnx_logits = jax.eval_shape(lambda x: models.create_nnx_model(name, shape, 7, **kwargs)(x), x)
  assert nnx_logits.shape == (3, 7) and nnx_logits.dtype == jnp.float32


def test_lenet5_accepts_images_without_channel_axis():
  model = models.LeNet5Caffe()
  variables = models.init_params(model, FMNIST)
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28))
  np.testing.assert_allclose(model.apply(variables, x), model.apply(variables, x[..., None]))


# ------------------------------------------------------------------ exact architecture


def _ref_mlp(params, x, num_layers):
  """Plain-jnp LeNet-300-100 / MLP forward."""
  h = x.reshape(x.shape[0], -1)
  for i in range(1, num_layers + 1):
    p = params[f"fc{i}"]
    h = h @ p["kernel"] + p.get("bias", 0.0)
    if i < num_layers:
      h = jax.nn.relu(h)
  return h


def _ref_lenet5(params, x, padding):
  """Plain-lax LeNet-5-Caffe forward: no nonlinearity except the relu after fc1."""

  def conv(h, p):
    out = jax.lax.conv_general_dilated(h, p["kernel"], (1, 1), padding,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + p["bias"]

  def pool(h):
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")

  h = pool(conv(x, params["conv1"]))
  h = pool(conv(h, params["conv2"]))
  h = h.reshape(h.shape[0], -1)
  h = jax.nn.relu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


@pytest.mark.parametrize("shape,padding", [(FMNIST, "VALID"), (DIGITS, "SAME")])
def test_lenet5_matches_reference_in_linen_and_nnx(shape, padding):
  x = jax.random.normal(jax.random.key(2), (4, *shape))  # Negative inputs: no hidden relus.
  variables = _linen_variables("lenet5", shape)
  expected = _ref_lenet5(variables["params"], x, padding)
  got = models.LeNet5Caffe().apply(variables, x)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  nnx_model = _nnx_to_match("lenet5", shape, variables)
  assert nnx_model.padding == padding
  np.testing.assert_allclose(nnx_model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kwargs,layers", [("lenet300", {}, 3),
                                                ("lenet300", {"use_bias": False}, 3),
                                                ("mlp", {"features": (20, 30, 40)}, 4)])
def test_mlps_match_reference_in_linen_and_nnx(name, kwargs, layers):
  x = jax.random.normal(jax.random.key(3), (5, *DIGITS))
  variables = _linen_variables(name, DIGITS, **kwargs)
  expected = _ref_mlp(variables["params"], x, layers)
  model = models.create_model(name, 10, **kwargs)
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
  nnx_model = _nnx_to_match(name, DIGITS, variables, **kwargs)
  np.testing.assert_allclose(nnx_model(x), expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_variant():
  model = models.LeNet300100(use_bias=False, batch_norm=True)
  variables = models.init_params(model, FMNIST)
  assert set(variables) == {"params", "batch_stats"}
  params, stats = variables["params"], variables["batch_stats"]
  assert set(params) == {"fc1", "fc2", "fc3", "bn1", "bn2"}
  for fc in ("fc1", "fc2", "fc3"):
    assert set(params[fc]) == {"kernel"}  # No biases.
  assert set(params["bn1"]) == {"scale", "bias"} and params["bn2"]["scale"].shape == (100,)
  assert set(stats) == {"bn1", "bn2"} and set(stats["bn1"]) == {"mean", "var"}

  x = jax.random.normal(jax.random.key(4), (32, *FMNIST))
  # Eval mode uses the running stats (mean 0, var 1): a plain MLP up to BN's eps.
  eval_out = model.apply(variables, x)
  plain = _ref_mlp(params, x * (1 + 1e-5) ** -1, 3)
  np.testing.assert_allclose(eval_out, plain, rtol=1e-3, atol=1e-3)
  # Train mode normalizes with batch stats and updates the running mean by momentum 0.9;
  # BN sits after fc1 and before the relu, so bn1 sees fc1's (signed) pre-activations.
  train_out, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(train_out, eval_out)
  pre = x.reshape(32, -1) @ params["fc1"]["kernel"]
  np.testing.assert_allclose(updates["batch_stats"]["bn1"]["mean"], 0.1 * pre.mean(0),
                             rtol=1e-4, atol=1e-5)
  assert (updates["batch_stats"]["bn1"]["mean"] < 0).any()

  # The nnx twin with the same variables agrees in both modes and updates its stats alike.
  nnx_model = _nnx_to_match("lenet300", FMNIST, variables, use_bias=False, batch_norm=True)
  np.testing.assert_allclose(nnx_model(x), eval_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(nnx_model(x, train=True), train_out, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(nnx_model.bn1.mean[...], updates["batch_stats"]["bn1"]["mean"],
                             rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ registry and errors


def test_registry_and_unknown_names():
  from jaxsparse.nn import transformer
  assert models.MODELS == {"lenet300": models.LeNet300100, "lenet5": models.LeNet5Caffe,
                           "mlp": models.MLP, "resnet20": models.CifarResNet,
                           "wrn": models.WideResNet, "gpt": transformer.GPT}
  assert set(models.NNX_MODELS) == set(models.MODELS) - {"resnet20", "wrn"}  # linen only
  assert isinstance(models.create_model("lenet5", 3, padding="SAME"), models.LeNet5Caffe)
  with pytest.raises(ValueError, match=r"known names.*lenet300.*lenet5.*mlp"):
    models.create_model("resnet50", 10)
  with pytest.raises(ValueError, match=r"known names.*lenet300"):
    models.create_nnx_model("vgg", FMNIST, 10)


def test_lenet5_padding_rules():
  assert models.resolve_lenet5_padding(None, 28, 28) == "VALID"
  assert models.resolve_lenet5_padding(None, 27, 28) == "SAME"
  assert models.resolve_lenet5_padding("SAME", 28, 28) == "SAME"
  assert models.resolve_lenet5_padding("VALID", 16, 16) == "VALID"  # 16->12->6->2->1.
  with pytest.raises(ValueError, match="padding"):
    models.resolve_lenet5_padding("VALID", 8, 8)
  with pytest.raises(ValueError, match="padding"):
    models.resolve_lenet5_padding("valid", 28, 28)
  with pytest.raises(ValueError, match="padding"):
    models.init_params(models.LeNet5Caffe(padding="VALID"), DIGITS)
  with pytest.raises(ValueError, match="padding"):
    models.LeNet5CaffeNNX(DIGITS, padding="FULL", rngs=nnx.Rngs(0))


def test_bad_widths_named():
  with pytest.raises(ValueError, match="features"):
    models.init_params(models.MLP((300, 0)), DIGITS)
  with pytest.raises(ValueError, match="num_classes"):
    models.MLPNNX(DIGITS, (10,), 0, rngs=nnx.Rngs(0))


def test_init_params_seeds():
  a = _linen_variables("lenet300", DIGITS, seed=0)["params"]["fc1"]["kernel"]
  b = _linen_variables("lenet300", DIGITS, seed=0)["params"]["fc1"]["kernel"]
  c = _linen_variables("lenet300", DIGITS, seed=1)["params"]["fc1"]["kernel"]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


# ------------------------------------------------------------------ training on real digits


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@pytest.fixture(scope="module")
def digits():
  return data.load_dataset("digits", seed=0)


@pytest.mark.parametrize("kwargs", [{}, {"use_bias": False, "batch_norm": True}],
                         ids=["plain", "batchnorm"])
def test_linen_lenet300_learns_digits(digits, kwargs):
  model = models.LeNet300100(**kwargs)
  variables = models.init_params(model, digits.input_shape, seed=0)
  params, stats = variables["params"], variables.get("batch_stats", {})
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)

  def loss_fn(params, stats, xb, yb):
    if stats:
      logits, new = model.apply({"params": params, "batch_stats": stats}, xb, train=True,
                                mutable=["batch_stats"])
      return _cross_entropy(logits, yb), new["batch_stats"]
    return _cross_entropy(model.apply({"params": params}, xb, train=True), yb), stats

  def epoch(carry, batch):
    params, stats, opt_state = carry
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), stats, opt_state), loss

  @jax.jit
  def run_epoch(carry, key):
    return jax.lax.scan(epoch, carry, data.epoch_batches(digits.x_train, digits.y_train, 64, key))

  def test_loss(params, stats):
    logits = model.apply({"params": params, "batch_stats": stats} if stats else {"params": params},
                         digits.x_test)
    return float(_cross_entropy(logits, digits.y_test)), float(
        (logits.argmax(-1) == digits.y_test).mean())

  initial_loss, _ = test_loss(params, stats)
  carry = (params, stats, opt_state)
  for i in range(3):
    carry, losses = run_epoch(carry, jax.random.key(i))
  final_loss, accuracy = test_loss(carry[0], carry[1])
  assert initial_loss > 2.0 and final_loss < 0.35 * initial_loss
  assert float(losses[-5:].mean()) < float(losses[:5].mean())
  assert accuracy > 0.9


def test_nnx_lenet300_learns_digits(digits):
  model = models.create_nnx_model("lenet300", digits.input_shape, 10, seed=0)
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    loss, grads = nnx.value_and_grad(lambda m: _cross_entropy(m(xb, train=True), yb))(model)
    optimizer.update(model, grads)
    return loss

  initial = float(_cross_entropy(model(digits.x_test), digits.y_test))
  rng = np.random.default_rng(0)
  for _ in range(2):
    for xb, yb in data.iterate_batches(digits.x_train, digits.y_train, 64, rng=rng):
      step(model, optimizer, xb, yb)
  final = float(_cross_entropy(model(digits.x_test), digits.y_test))
  assert initial > 2.0 and final < 0.4 * initial
