"""ResNet-20 and WRN-16-4 (jaxsparse.nn.models) and CIFAR through TFDS (experiments.data).

Exact parameter and FLOP counts against hand counts, output shapes and BatchNorm
statistics, a sparse jitted train step, and the CIFAR loaders with mocked TFDS.
Shapes come from ``jax.eval_shape`` (nothing compiled) wherever values are not needed.
"""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from experiments import data
from jaxsparse.analysis import flops
from jaxsparse.nn import models
from tests.helpers import digits

CIFAR_SHAPE = (32, 32, 3)
FMNIST_SHAPE = (28, 28, 1)


def _abstract_variables(net, input_shape):
  return jax.eval_shape(lambda: models.init_params(net, input_shape))


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _bn(c):
  return 2 * c  # scale and bias


# ------------------------------------------------------------------ parameter counts

# ResNet-20 (He et al. 2016, sec. 4.2) with option-B shortcuts, 32x32x3 input, 10 classes.
# Convs have no bias; every conv is followed by a BatchNorm (2 params per channel).
#   conv1 3*3*3*16 = 432, bn1 32                                                   ->     464
#   stage1 (16): 3 blocks x (2 x 3*3*16*16 = 2,304, + 2 x 32)                      ->  14,016
#   stage2 (32): block1 3*3*16*32 = 4,608 + 3*3*32*32 = 9,216 + 2 x 64
#                + projection 1*1*16*32 = 512 + its BN 64 = 14,528;
#                blocks 2-3: 2 x (2 x 9,216 + 2 x 64) = 37,120                     ->  51,648
#   stage3 (64): block1 3*3*32*64 = 18,432 + 3*3*64*64 = 36,864 + 2 x 128
#                + projection 1*1*32*64 = 2,048 + 128 = 57,728;
#                blocks 2-3: 2 x (2 x 36,864 + 2 x 128) = 147,968                  -> 205,696
#   fc 64*10 + 10                                                                  ->     650
#   total 272,474 (the paper's "0.27M"); on 28x28x1 conv1 is 3*3*1*16, 288 fewer.
RESNET20_CIFAR = 464 + 14_016 + 51_648 + 205_696 + 650
# WRN-16-4 (Zagoruyko & Komodakis 2016): n = (16-4)/6 = 2 blocks per group, widths 64, 128, 256.
# Pre-activation blocks BN-relu-conv-BN-relu-conv; 1x1 shortcut where the shape changes.
#   conv1 3*3*3*16                                                                 ->        432
#   group1: block1 BN(16) 32 + 3*3*16*64 = 9,216 + BN(64) 128 + 3*3*64*64 = 36,864
#           + shortcut 1*1*16*64 = 1,024 = 47,264; block2 2 x (128 + 36,864) = 73,984 ->   121,248
#   group2: block1 128 + 3*3*64*128 = 73,728 + 256 + 3*3*128*128 = 147,456
#           + 1*1*64*128 = 8,192 = 229,760; block2 2 x (256 + 147,456) = 295,424   ->   525,184
#   group3: block1 256 + 3*3*128*256 = 294,912 + 512 + 3*3*256*256 = 589,824
#           + 1*1*128*256 = 32,768 = 918,272; block2 2 x (512 + 589,824) = 1,180,672 -> 2,098,944
#   final BN(256) 512, fc 256*10 + 10 = 2,570                                       ->      3,082
#   total 2,748,890 (the paper's "2.7M").
WRN16_4_CIFAR = 432 + 121_248 + 525_184 + 2_098_944 + 3_082


def _resnet_count(depth, c_in, classes):
  """Params of CifarResNet by the formula above, for any depth 6n+2."""
  n = (depth - 2) // 6
  total = 9 * c_in * 16 + _bn(16) + 64 * classes + classes
  prev = 16
  for width in (16, 32, 64):
    for b in range(n):
      total += 9 * (prev if b == 0 else width) * width + 9 * width * width + 2 * _bn(width)
      if b == 0 and prev != width:
        total += prev * width + _bn(width)
    prev = width
  return total


def _wrn_count(depth, k, c_in, classes):
  """Params of WideResNet by the formula above, for any depth 6n+4 and widen factor k."""
  n = (depth - 4) // 6
  total = 9 * c_in * 16
  prev = 16
  for width in (16 * k, 32 * k, 64 * k):
    for b in range(n):
      c = prev if b == 0 else width
      total += _bn(c) + 9 * c * width + _bn(width) + 9 * width * width
      if b == 0 and prev != width:
        total += prev * width
    prev = width
  return total + _bn(64 * k) + 64 * k * classes + classes


@pytest.mark.parametrize("name,kwargs,shape,classes,expected", [
    ("resnet20", {}, CIFAR_SHAPE, 10, 272_474),
    ("resnet20", {}, FMNIST_SHAPE, 10, 272_474 - 288),
    ("wrn", {}, CIFAR_SHAPE, 10, 2_748_890),
    ("wrn", {}, FMNIST_SHAPE, 10, 2_748_890 - 288),
    ("resnet20", {"depth": 32}, FMNIST_SHAPE, 100, _resnet_count(32, 1, 100)),
    ("wrn", {"depth": 22, "widen_factor": 2}, CIFAR_SHAPE, 100, _wrn_count(22, 2, 3, 100)),
])
def test_param_counts_equal_hand_counts(name, kwargs, shape, classes, expected):
  assert RESNET20_CIFAR == _resnet_count(20, 3, 10) == 272_474
  assert WRN16_4_CIFAR == _wrn_count(16, 4, 3, 10) == 2_748_890
  v = _abstract_variables(models.create_model(name, classes, **kwargs), shape)
  assert _count(v["params"]) == expected
  convs = [x for x in jax.tree.leaves(v["params"]) if x.ndim == 4]
  assert all(c.shape[:2] in ((3, 3), (1, 1)) for c in convs)
  # Convs are bias-free: the only rank-1 params are BN scales/biases and the fc bias.
  assert _count([x for x in jax.tree.leaves(v["params"]) if x.ndim == 1]) == classes + _count(
      v["batch_stats"])  # BN: (scale, bias) params and (mean, var) stats, channel for channel


def test_registry_defaults_layer_names_and_bad_arguments():
  assert models.MODELS["resnet20"] is models.CifarResNet
  assert models.MODELS["wrn"] is models.WideResNet
  wrn = models.create_model("wrn", 10)
  assert (wrn.depth, wrn.widen_factor) == (16, 4) and models.create_model("resnet20").depth == 20
  p = _abstract_variables(models.create_model("resnet20", 10), FMNIST_SHAPE)["params"]
  assert set(p) == {"conv1", "bn1", "fc"} | {f"stage{s}_block{b}" for s in (1, 2, 3)
                                               for b in (1, 2, 3)}
  assert set(p["stage2_block1"]) == {"conv1", "bn1", "conv2", "bn2", "shortcut_conv",
                                     "shortcut_bn"}
  assert set(p["stage2_block2"]) == {"conv1", "bn1", "conv2", "bn2"}  # identity shortcut
  assert set(p["stage1_block1"]) == {"conv1", "bn1", "conv2", "bn2"}  # 16 -> 16, stride 1
  p = _abstract_variables(wrn, FMNIST_SHAPE)["params"]
  assert set(p) == {"conv1", "bn", "fc"} | {f"group{g}_block{b}" for g in (1, 2, 3)
                                              for b in (1, 2)}
  assert "shortcut" in p["group1_block1"] and "shortcut" not in p["group1_block2"]
  x = jnp.zeros((1, 8, 8, 1))
  for name, kwargs, match in (("resnet20", {"depth": 21}, "depth"),
                              ("resnet20", {"depth": 2}, "depth"),
                              ("wrn", {"depth": 20}, "depth"),
                              ("wrn", {"depth": 4}, "depth"),
                              ("wrn", {"widen_factor": 0}, "widen_factor")):
    with pytest.raises(ValueError, match=match):
      models.create_model(name, 10, **kwargs).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="num_classes"):
    models.create_model("wrn", 0).init(jax.random.key(0), x)


# ------------------------------------------------------------------ shapes and BatchNorm


@pytest.mark.parametrize("name,kwargs", [("resnet20", {}), ("wrn", {})])
@pytest.mark.parametrize("shape", [FMNIST_SHAPE, CIFAR_SHAPE, (28, 28)], ids=str)
def test_output_shapes_train_and_eval(name, kwargs, shape):
  net = models.create_model(name, 7, **kwargs)
  v = _abstract_variables(net, shape)
  x = jax.ShapeDtypeStruct((3, *shape), jnp.float32)
  out = jax.eval_shape(lambda v, x: net.apply(v, x, train=False), v, x)
  assert out.shape == (3, 7) and out.dtype == jnp.float32
  out, upd = jax.eval_shape(
      lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]), v, x)
  assert out.shape == (3, 7)
  assert jax.tree.map(lambda a: a.shape, upd["batch_stats"]) == jax.tree.map(
      lambda a: a.shape, v["batch_stats"])


def test_flops_of_resnet20_on_cifar_equal_hand_count():
  # Multiply-adds per example on 32x32x3 (3x3 convs pad 1, so stride 1 keeps the size and
  # stride 2 halves it; 32 -> 16 -> 8; each weight is used once per output position):
  #   conv1:          1,024 positions x 3*3*3*16 (432)                      =    442,368
  #   stage1 (32x32): 6 convs x 1,024 x 3*3*16*16 (2,304)                   = 14,155,776
  #   stage2 (16x16): 256 x (3*3*16*32 + 5 x 3*3*32*32 + 1*1*16*32)
  #                 = 256 x (4,608 + 46,080 + 512)                          = 13,107,200
  #   stage3 (8x8):   64 x (18,432 + 5 x 36,864 + 2,048)                    = 13,107,200
  #   fc:             64 x 10                                               =        640
  #   total 40,813,184 MACs = 81,626,368 FLOPs at 2 FLOPs per MAC (BN, relu, the residual
  #   additions and the pool are not counted: flops.py's convention).
  net = models.create_model("resnet20", 10)
  v = _abstract_variables(net, CIFAR_SHAPE)
  layers = flops.count_flops(net, v["params"], CIFAR_SHAPE, batch_stats=v["batch_stats"])
  assert len(layers) == 22  # 19 3x3 convs, 2 projections, fc
  assert flops.total_flops(layers) == (2 * 40_813_184, 2 * 40_813_184)
  positions = {l.name: l.positions for l in layers}
  assert positions["conv1/kernel"] == positions["stage1_block3/conv2/kernel"] == 1024
  assert positions["stage2_block1/conv1/kernel"] == positions[
      "stage2_block1/shortcut_conv/kernel"] == 256
  assert positions["stage3_block3/conv2/kernel"] == 64 and positions["fc/kernel"] == 1
  # With a mask, every layer costs 2 x positions x kept weights: keep a random ~10% of each
  # kernel (at least one weight), leave BN and biases dense.
  rng = np.random.default_rng(0)
  kept, mask_leaves = {}, []
  for name, leaf in zip(js.core.masks.leaf_names(v["params"]), jax.tree.leaves(v["params"])):
    if leaf.ndim < 2:
      mask_leaves.append(js.core.masks.dense_mask())
      continue
    m = rng.uniform(size=leaf.shape) < 0.1
    m.flat[0] = True
    kept[name] = int(m.sum())
    mask_leaves.append(jnp.asarray(m))
  masks = jax.tree.unflatten(jax.tree.structure(v["params"]), mask_leaves)
  sparse_layers = flops.count_flops(net, v["params"], CIFAR_SHAPE, masks,
                                    batch_stats=v["batch_stats"])
  assert {l.name: l.kept for l in sparse_layers} == kept
  sparse = 2 * sum(positions[name] * kept[name] for name in positions)
  assert flops.total_flops(sparse_layers) == (2 * 40_813_184, sparse)
  assert 0.08 < sparse / (2 * 40_813_184) < 0.12


@pytest.fixture(scope="module")
def resnet8():
  """ResNet-8 (one block per stage) and its variables for 1-channel inputs of any size."""
  net = models.create_model("resnet20", 10, depth=8)
  return net, jax.jit(lambda x: net.init(jax.random.key(0), x))(jnp.zeros((1, 8, 8, 1)))


def test_batch_stats_update_in_train_mode_only(resnet8):
  net, variables = resnet8
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, *FMNIST_SHAPE)), jnp.float32)
  apply_train = jax.jit(lambda v, x: net.apply(v, x, train=True, mutable=["batch_stats"]))
  logits, upd = apply_train(variables, x)
  stats, new = variables["batch_stats"], upd["batch_stats"]
  assert logits.shape == (4, 10)
  # bn1 normalises conv1's output: its running mean moves 10% of the way to the batch mean
  # (BN_MOMENTUM = 0.9 keeps 90% of the initial 0), the variance from 1 towards the batch's.
  conv1 = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (1, 1),
                                       ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(new["bn1"]["mean"], 0.1 * conv1.mean((0, 1, 2)), rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_allclose(new["bn1"]["var"], 0.9 + 0.1 * conv1.var((0, 1, 2)), rtol=1e-4)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), stats, new)
  assert all(jax.tree.leaves(changed))  # every BN of the net saw the batch
  # Eval mode uses the running statistics: an example's logits do not depend on the rest of
  # the batch (in train mode they do).
  apply_eval = jax.jit(lambda v, x: net.apply(v, x, train=False))
  other = x.at[2:].set(1.0 - x[2:])
  np.testing.assert_allclose(apply_eval(variables, x)[:2], apply_eval(variables, other)[:2],
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(logits[:2], apply_train(variables, other)[0][:2], atol=1e-4)


# ------------------------------------------------------------------ sparse training


@pytest.mark.e2e
def test_sparse_mask_trains_with_masked_weights_exactly_zero(resnet8):
  xs, ys = digits()
  xs = xs.reshape(-1, 8, 8, 1)  # 8x8 digits: the three stages run at 8, 4 and 2
  net, variables = resnet8
  params, stats = variables["params"], variables["batch_stats"]
  # jaxsparse's default leaf filter and ERK densities at 90% sparsity (host-side, from the
  # shapes), a random mask with exactly those counts, trained with js.keep_masks.
  counts = js.kept_counts(params, 0.9, distribution="erk")
  # Every conv kernel (conv1, 3 stages x 2, 2 projections) and the fc kernel; BN stays dense.
  assert len(counts) == 10 and all(n.endswith("/kernel") for n in counts)
  rng = np.random.default_rng(0)
  mask_leaves = []
  for name, leaf in zip(js.core.masks.leaf_names(params), jax.tree.leaves(params)):
    if name not in counts:
      mask_leaves.append(js.core.masks.dense_mask())
      continue
    m = np.zeros(leaf.size, bool)
    m[rng.permutation(leaf.size)[:counts[name]]] = True
    mask_leaves.append(jnp.asarray(m.reshape(leaf.shape)))
  masks = jax.tree.unflatten(jax.tree.structure(params), mask_leaves)
  tx = js.keep_masks(optax.sgd(0.1, momentum=0.9), masks)
  opt_state = tx.init(params)
  params = js.apply_masks(params, js.get_masks(opt_state))
  assert js.sparsity(params, masks) == pytest.approx(0.9, abs=1e-4)

  def loss_fn(p, s, x, y):
    logits, upd = net.apply({"params": p, "batch_stats": s}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

  @jax.jit
  def step(p, s, opt_state, x, y):
    (loss, s), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, s, x, y)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), s, opt_state, loss

  start = params
  for i in range(2):
    x, y = jnp.asarray(xs[16 * i:16 * (i + 1)]), jnp.asarray(ys[16 * i:16 * (i + 1)])
    params, stats, opt_state, loss = step(params, stats, opt_state, x, y)
    assert np.isfinite(float(loss))
    for name, w, m in zip(js.core.masks.leaf_names(params), jax.tree.leaves(params),
                          jax.tree.leaves(masks)):
      if name in counts:
        w, m = np.asarray(w), np.asarray(m)
        assert not np.any(w[~m]), name  # exactly zero
        assert np.count_nonzero(w) == counts[name], name  # every kept weight nonzero
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), start, params)
  assert all(jax.tree.leaves(moved))  # kept weights and BN params all trained
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                          variables["batch_stats"], stats)))


# ------------------------------------------------------------------ CIFAR through TFDS


@pytest.fixture
def no_tfds(monkeypatch):
  """Makes `import tensorflow_datasets` fail, whatever is installed."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def _assert_helpful(message, tfds_name):
  assert "TensorFlow Datasets" in message and "internet" in message
  assert "pip install tensorflow-datasets" in message
  assert f"tensorflow_datasets/{tfds_name}/" in message and "data_dir=" in message
  assert "'digits'" in message and "dataset-fashion-mnist" in message


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_with_tfds_mock_data(name, classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow", reason="TFDS's mock_data needs TensorFlow (tensorflow-cpu)")
  with tfds.testing.mock_data(num_examples=9):
    ds = data.load_dataset(name)
  assert ds.name == name and ds.num_classes == classes and ds.input_shape == CIFAR_SHAPE
  assert ds.x_train.shape == (9, 32, 32, 3) and ds.x_test.shape == (9, 32, 32, 3)
  assert ds.y_train.shape == (9,) and ds.y_test.shape == (9,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.x_train.std() > 0.1  # random uint8 pixels, scaled by 1/255
  np.testing.assert_array_equal(ds.x_train * 255, np.round(ds.x_train * 255))
  assert 0 <= ds.y_train.min() and ds.y_train.max() < classes


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_without_tfds_is_a_clear_error(no_tfds, name):
  with pytest.raises(FileNotFoundError, match="TensorFlow Datasets is not installed") as info:
    data.load_dataset(name)
  _assert_helpful(str(info.value), name)
  assert isinstance(info.value.__cause__, ImportError)


def test_cifar_offline_download_failure_is_a_clear_error(tmp_path, monkeypatch):
  calls = []

  def load(name, **kwargs):  # what TFDS raises when the download host cannot be resolved
    calls.append((name, kwargs))
    raise ConnectionError("HTTPSConnectionPool(host='www.cs.toronto.edu', port=443): Max "
                          "retries exceeded with url: /~kriz/cifar-10-binary.tar.gz")

  fake = types.ModuleType("tensorflow_datasets")
  fake.load = load
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(FileNotFoundError, match="could not download it") as info:
    data.load_dataset("cifar10", data_dir=str(tmp_path), source="tfds")
  message = str(info.value)
  _assert_helpful(message, "cifar10")
  assert message.startswith("CIFAR-10 could not be loaded") and "Max retries exceeded" in message
  assert str(tmp_path) in message  # where it looked
  assert isinstance(info.value.__cause__, ConnectionError)
  assert calls == [("cifar10", {"split": "train", "as_supervised": True,
                                "data_dir": str(tmp_path)})]
  with pytest.raises(FileNotFoundError, match="TFDS's data folder"):
    data.load_dataset("cifar10")  # no data_dir: TFDS's default folder
  assert calls[-1] == ("cifar10", {"split": "train", "as_supervised": True})
  with pytest.raises(ValueError, match="source='local' is not available for 'cifar10'"):
    data.load_dataset("cifar10", source="local")
