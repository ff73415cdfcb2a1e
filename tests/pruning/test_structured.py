"""Structured sparsity: N:M, blocks, filters, input neurons, channel propagation, network slimming."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.core import masks as masks_lib
from jaxsparse.pruning import structured


def rand(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("shape,axis", [((8, 6), -2), ((3, 3, 8, 5), -2), ((6, 12), -1)])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 2)])
def test_every_nm_group_keeps_exactly_n_largest(shape, axis, n, m):
  s = rand(shape)
  mask = structured.nm_mask(s, n, m, axis)
  g = np.moveaxis(np.asarray(mask), axis, -1).reshape(-1, m)
  assert (g.sum(1) == n).all()
  sv = np.moveaxis(np.asarray(s), axis, -1).reshape(-1, m)
  # kept entries are the n largest of their group
  assert (np.where(g, sv, np.inf).min(1) >= np.where(g, -np.inf, sv).max(1)).all()


def test_nm_masks_on_a_tree_keep_biases_dense():
  params = {"fc1": {"kernel": rand((8, 3)), "bias": rand((3,))}}
  m = structured.nm_masks(jax.tree.map(jnp.abs, params), 2, 4)
  assert jnp.ndim(m["fc1"]["bias"]) == 0
  assert masks_lib.sparsity(masks_lib.apply_masks(params, m), m) == 0.5


def test_block_mask_is_constant_on_each_block_and_keeps_the_top_blocks():
  s = rand((8, 12))
  st = structured.blocks((2, 3))
  pooled = st.pool(s)
  np.testing.assert_allclose(pooled, np.asarray(s).reshape(4, 2, 4, 3).sum((1, 3)), rtol=1e-5)
  mask = np.asarray(structured.structure_mask(s, st, 5))
  tiles = mask.reshape(4, 2, 4, 3).transpose(0, 2, 1, 3).reshape(16, 6)
  assert ((tiles.all(1)) | (~tiles.any(1))).all()     # constant on each block
  kept = tiles.all(1)
  assert kept.sum() == 5
  assert np.asarray(pooled).ravel()[kept].min() > np.asarray(pooled).ravel()[~kept].max()


def test_filter_l1_zeroes_whole_filters_with_the_smallest_l1():
  params = {"conv": {"kernel": rand((3, 3, 4, 10)), "bias": rand((10,))},
            "fc": {"kernel": rand((10, 6), 1), "bias": rand((6,))}}
  m = structured.filter_l1_masks(params, 0.5, output_layer=None)
  k = np.asarray(m["conv"]["kernel"])
  per_filter = k.reshape(-1, 10)
  assert ((per_filter.all(0)) | (~per_filter.any(0))).all()
  kept = per_filter.all(0)
  assert kept.sum() == 5
  l1 = np.abs(np.asarray(params["conv"]["kernel"])).reshape(-1, 10).sum(0)
  assert l1[kept].min() > l1[~kept].max()
  assert np.asarray(m["fc"]["kernel"]).all(0).sum() == 3


def test_input_neurons_remove_whole_rows():
  s = rand((7, 5))
  mask = np.asarray(structured.structure_mask(s, structured.input_neurons(), 3))
  assert (mask.all(1) | ~mask.any(1)).all() and mask.all(1).sum() == 3


def test_channel_propagation_removes_producer_bias_and_consumer_rows():
  params = {"conv": {"kernel": rand((3, 3, 1, 4)), "bias": rand((4,))},
            "fc": {"kernel": rand((2 * 2 * 4, 5)), "bias": rand((5,))}}
  masks = structured.filter_l1_masks(params, 0.5, filter=lambda n, l: n == "conv/kernel")
  gone = np.asarray(structured.removed_channels(masks["conv"]["kernel"]))
  assert gone.sum() == 2
  out = structured.propagate_channels(
      params, masks, [structured.ChannelLink("conv/kernel", "fc/kernel", ("conv/bias",))])
  np.testing.assert_array_equal(out["conv"]["bias"], ~gone)
  rows = np.asarray(out["fc"]["kernel"]).all(1)
  np.testing.assert_array_equal(rows, ~np.tile(gone, 4))         # NHWC flatten: row r is channel r % 4
  assert not np.asarray(out["fc"]["kernel"])[np.tile(gone, 4)].any()
  # The removed channels' contribution is exactly zero: outputs equal with and without those rows.
  x = rand((2, 4, 4, 1), 3)

  def net(p, drop_rows):
    h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["conv"]["bias"]
    h = jax.nn.relu(h).reshape(2, -1)
    w = p["fc"]["kernel"] * (jnp.asarray(~np.tile(gone, 4))[:, None] if drop_rows else 1.0)
    return h @ w + p["fc"]["bias"]

  pruned = masks_lib.apply_masks(params, out)
  np.testing.assert_allclose(net(pruned, False), net(pruned, True), rtol=1e-6)


def test_network_slimming_global_threshold_and_l1_penalty():
  params = {"fc1": {"kernel": rand((5, 6)), "bias": rand((6,))},
            "bn1": {"scale": jnp.asarray([0.1, 2.0, 0.3, 1.5, 0.01, 0.9]), "bias": rand((6,))},
            "fc2": {"kernel": rand((6, 4)), "bias": rand((4,))},
            "bn2": {"scale": jnp.asarray([0.05, 1.2, 0.2, 3.0]), "bias": rand((4,))},
            "fc3": {"kernel": rand((4, 3)), "bias": rand((3,))}}
  m = structured.slimming_masks(params, 0.5)                     # 10 scales -> keep 5 largest
  np.testing.assert_array_equal(m["bn1"]["scale"], [False, True, False, True, False, True])
  np.testing.assert_array_equal(m["bn2"]["scale"], [False, True, False, True])
  links = structured.mlp_links(3, batch_norm=True)
  full = structured.channel_masks_to_filters(params, m, links)
  np.testing.assert_array_equal(np.asarray(full["fc1"]["kernel"]).all(0), m["bn1"]["scale"])
  np.testing.assert_array_equal(np.asarray(full["fc2"]["kernel"]).any(1), m["bn1"]["scale"])
  np.testing.assert_array_equal(full["bn2"]["bias"], m["bn2"]["scale"])
  np.testing.assert_array_equal(np.asarray(full["fc3"]["kernel"]).all(1), m["bn2"]["scale"])
  tx = structured.bn_scale_l1(1e-2)
  grads = jax.tree.map(jnp.zeros_like, params)
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(u["bn1"]["scale"], 1e-2 * np.sign(params["bn1"]["scale"]))
  assert not np.asarray(u["fc1"]["kernel"]).any()


# ------------------------------------------------------------------ bad input


def test_nm_bad_arguments():
  with pytest.raises(ValueError, match="n must be <= m"):
    structured.nm_mask(rand((8, 4)), 5, 4)
  with pytest.raises(ValueError, match="m=3 does not divide"):
    structured.nm_mask(rand((8, 4)), 2, 3)


def test_block_shape_must_divide_the_leaf():
  with pytest.raises(ValueError, match=r"block_shape \(3, 3\) does not divide"):
    structured.structure_mask(rand((8, 6)), structured.blocks((3, 3)), 2)


def test_sparsity_that_removes_every_filter_is_refused():
  params = {"conv": {"kernel": rand((3, 3, 1, 4)), "bias": rand((4,))}}
  with pytest.raises(ValueError, match="remove every group.*conv/kernel"):
    structured.filter_l1_masks(params, 0.9, output_layer=None)
  big = {"a": {"kernel": rand((2, 100)) * 10}, "b": {"kernel": rand((2, 2)) * 1e-3}}
  with pytest.raises(ValueError, match="every group.*b/kernel"):
    structured.filter_l1_masks(big, 0.5, scope="global", output_layer=None)
  with pytest.raises(ValueError, match="every channel"):
    structured.slimming_masks({"bn1": {"scale": jnp.asarray([1.0, 2.0])},
                               "bn2": {"scale": jnp.asarray([1e-3, 1e-3])}}, 0.5)
