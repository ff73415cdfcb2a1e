"""FLOPs counting against hand counts for LeNet-300-100 and LeNet-5-Caffe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.analysis import flops
from jaxsparse.core import masks as masks_lib
from jaxsparse.nn import models


def _abstract_params(net, input_shape):
  """Shapes only (``jax.eval_shape``): counting FLOPs needs no weights, and this compiles nothing."""
  x = jnp.zeros((1, *input_shape), jnp.float32)
  return jax.eval_shape(lambda: net.init(jax.random.key(0), x))["params"]


def _masks_keeping(params, kept: dict[str, int]):
  """A mask tree keeping the first ``kept[name]`` weights of the named kernels, others dense."""
  names = masks_lib.leaf_names(params)
  leaves = []
  for name, p in zip(names, jax.tree.leaves(params)):
    if name in kept:
      m = np.zeros(int(np.prod(p.shape)), bool)
      m[:kept[name]] = True
      leaves.append(jnp.asarray(m.reshape(p.shape)))
    else:
      leaves.append(masks_lib.dense_mask())
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def test_lenet300_dense_and_masked_equal_hand_count():
  net = models.create_model("lenet300", 10)
  params = _abstract_params(net, (28, 28, 1))
  layers = flops.count_flops(net, params, (28, 28, 1))
  # 784*300 + 300*100 + 100*10 multiply-adds, 2 FLOPs each.
  assert [(l.name, l.dense) for l in layers] == [
      ("fc1/kernel", 2 * 784 * 300), ("fc2/kernel", 2 * 300 * 100), ("fc3/kernel", 2 * 100 * 10)]
  assert flops.total_flops(layers) == (532_400, 532_400)
  masks = _masks_keeping(params, {"fc1/kernel": 23_520, "fc2/kernel": 3_000, "fc3/kernel": 500})
  layers = flops.count_flops(net, params, (28, 28, 1), masks)
  assert flops.total_flops(layers) == (532_400, 2 * (23_520 + 3_000 + 500))
  assert layers[0].speedup == pytest.approx(10.0)


def test_lenet5_caffe_dense_and_masked_equal_hand_count():
  net = models.create_model("lenet5", 10)
  params = _abstract_params(net, (28, 28, 1))
  layers = flops.count_flops(net, params, (28, 28, 1))
  # conv1: 24x24 outputs x 5*5*1*20; conv2: 8x8 outputs x 5*5*20*50; fc1 800x500; fc2 500x10.
  hand = {"conv1/kernel": 576 * 500, "conv2/kernel": 64 * 25_000, "fc1/kernel": 400_000,
          "fc2/kernel": 5_000}
  assert {l.name: l.dense for l in layers} == {k: 2 * v for k, v in hand.items()}
  assert flops.total_flops(layers)[0] == 2 * 2_293_000
  kept = {"conv1/kernel": 100, "conv2/kernel": 2_500, "fc1/kernel": 4_000}
  layers = flops.count_flops(net, params, (28, 28, 1), _masks_keeping(params, kept))
  sparse = 2 * (576 * 100 + 64 * 2_500 + 4_000 + 5_000)  # fc2 left dense
  assert flops.total_flops(layers) == (2 * 2_293_000, sparse)
  assert "total" in flops.flops_summary(layers)


def test_lenet5_on_digits_uses_same_padding_positions_and_batchnorm_models_work():
  net = models.create_model("lenet5", 10)
  params = _abstract_params(net, (8, 8, 1))
  conv1, conv2, fc1, _ = flops.count_flops(net, params, (8, 8, 1))
  assert (conv1.positions, conv2.positions, fc1.dense) == (64, 16, 2 * 200 * 500)
  bn = models.create_model("lenet300", 10, batch_norm=True, use_bias=False)
  v = jax.eval_shape(lambda: bn.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
  layers = flops.count_flops(bn, v["params"], (8, 8, 1), batch_stats=v["batch_stats"])
  assert flops.total_flops(layers)[0] == 2 * (64 * 300 + 300 * 100 + 100 * 10)


def test_mismatched_masks_are_rejected():
  net = models.create_model("lenet300", 10)
  params = _abstract_params(net, (8, 8, 1))
  with pytest.raises(ValueError, match="mask"):
    flops.count_flops(net, params, (8, 8, 1), {"fc1": True})
