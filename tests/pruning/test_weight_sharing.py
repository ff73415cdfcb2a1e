"""Deep Compression's weight sharing (Han et al. 2016, Sec. 3): k-means, summed centroid
gradients, pruned weights at zero, and accuracy kept on a trained MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.pruning import weight_sharing as ws


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  fc = jax.random.normal(k1, (64, 48))
  fc = jnp.where(jnp.abs(fc) > 0.7, fc, 0.0)           # pruned: about half the weights zero
  conv = jax.random.normal(k2, (5, 5, 4, 8))
  conv = jnp.where(jax.random.uniform(k3, conv.shape) < 0.6, conv, 0.0)
  return {"fc": {"kernel": fc, "bias": jnp.ones(48)}, "conv": {"kernel": conv}}


def _distinct_kept(p):
  p = np.asarray(p)
  return len(np.unique(p[p != 0]))


def test_exactly_2_to_the_b_values_per_layer_before_and_after_fine_tuning():
  params = _params()
  tx = ws.weight_sharing(optax.sgd(0.01, momentum=0.9))   # defaults: conv 8 bits, fc 5 bits
  state = tx.init(params)
  shared = ws.share_weights(params, state)
  assert _distinct_kept(shared["fc"]["kernel"]) == 2 ** 5
  assert _distinct_kept(shared["conv"]["kernel"]) == 2 ** 8
  np.testing.assert_array_equal(shared["fc"]["bias"], params["fc"]["bias"])
  for _ in range(3):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), shared)
    upd, state = tx.update(grads, state, shared)
    shared = optax.apply_updates(shared, upd)
  for name, b in (("fc", 5), ("conv", 8)):
    w = np.asarray(shared[name]["kernel"])
    assert _distinct_kept(w) == 2 ** b
    np.testing.assert_array_equal(w == 0, np.asarray(params[name]["kernel"]) == 0)  # pruned: 0
    idx = np.asarray(state.indices[name]["kernel"])
    centroids = np.asarray(state.centroids[name]["kernel"])
    np.testing.assert_array_equal(w[idx >= 0], centroids[idx[idx >= 0]])  # bit-equal
  assert not np.allclose(shared["fc"]["bias"], 1.0)           # biases train through the inner


def test_kmeans_linear_init_and_fixed_point():
  w = jnp.array([0.0, 1.0, 1.1, 5.0, 5.2, 9.0, 0.0])
  kept = w != 0
  c, idx = ws.kmeans_1d(w, kept, 2, iterations=1)
  # Linear init: centroids 1.0 and 9.0 -> clusters {1, 1.1, 5} (5 ties, first wins) and
  # {5.2, 9}, means 7.1/3 and 7.1; the final assignment moves 5 over: means 1.05 and 6.4.
  np.testing.assert_allclose(np.asarray(c), [1.05, 6.4], rtol=1e-6)
  assert idx[0] == -1 and idx[-1] == -1
  c, idx = ws.kmeans_1d(w, kept, 4, iterations=30)
  np.testing.assert_allclose(np.sort(np.asarray(c)), [1.05, 5.0, 5.2, 9.0], rtol=1e-6)


def test_centroid_gradient_is_the_sum_over_the_cluster():
  params = _params(1)
  tx = ws.weight_sharing(optax.identity(), bits={"fc/kernel": 3, "conv/kernel": 2})
  state = tx.init(params)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(7), p.shape), params)
  _, new = tx.update(grads, state, ws.share_weights(params, state))
  for name, k in (("fc", 8), ("conv", 4)):
    g = np.asarray(grads[name]["kernel"]).ravel()
    idx = np.asarray(state.indices[name]["kernel"]).ravel()
    want = np.array([g[idx == j].sum() for j in range(k)])
    got = np.asarray(new.centroids[name]["kernel"] - state.centroids[name]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_masks_choose_the_kept_weights_and_bad_input_names_the_argument():
  params = _params(2)
  masks = {"fc": {"kernel": jnp.abs(params["fc"]["kernel"]) > 1.5, "bias": True},
           "conv": {"kernel": params["conv"]["kernel"] != 0}}
  state = ws.weight_sharing(optax.identity(), masks, bits=4).init(params)
  idx = np.asarray(state.indices["fc"]["kernel"])
  np.testing.assert_array_equal(idx >= 0, np.asarray(masks["fc"]["kernel"]))
  with pytest.raises(ValueError, match="bits must be >= 1, got 0"):
    ws.weight_sharing(optax.identity(), bits=0)
  with pytest.raises(ValueError, match=r"bits\['fc/kernel'\] must be >= 1, got -1"):
    ws.weight_sharing(optax.identity(), bits={"fc/kernel": -1}).init(params)
  with pytest.raises(ValueError, match=r"bits: \['fc/bias'\] name no shared leaf"):
    ws.weight_sharing(optax.identity(), bits={"fc/bias": 4}).init(params)
  with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
    ws.weight_sharing(optax.identity(), iterations=0)
  with pytest.raises(ValueError, match="num_clusters must be an integer >= 1, got 0"):
    ws.kmeans_1d(params["fc"]["kernel"], True, 0)
  with pytest.raises(ValueError, match="bits must be <= 16"):
    ws.weight_sharing(optax.identity(), bits=17)


def test_weight_sharing_keeps_a_trained_mlps_accuracy_at_5_bits():
  from experiments import data, training
  from jaxsparse.nn import models
  ds = data.load_dataset("digits", seed=0)
  net = models.create_model("mlp", ds.num_classes, features=(64,))
  params = models.init_params(net, ds.input_shape, 0)["params"]
  evaluate = training.make_evaluate(net)
  tx = js.dense(optax.adam(3e-3))
  state = training.TrainState(params, {}, tx.init(params))
  epoch = training.make_train_epoch(net, tx, 64, return_losses=True)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  for _, state, *_ in training.iterate_epochs(epoch, state, x, y, jax.random.key(0), stop=15):
    pass
  params = state.params
  acc = evaluate(params, {}, ds.x_test, ds.y_test)
  masks = js.magnitude_masks(params, 0.5)
  pruned = js.apply_masks(params, masks)
  tx = ws.weight_sharing(optax.sgd(1e-3), bits=5)
  shared = ws.share_weights(pruned, tx.init(pruned))
  for leaf in jax.tree.leaves(shared):
    if leaf.ndim == 2:
      assert _distinct_kept(leaf) == 32
  acc_shared = evaluate(shared, {}, ds.x_test, ds.y_test)
  assert acc > 0.9 and acc_shared > acc - 0.03, (acc, acc_shared)
