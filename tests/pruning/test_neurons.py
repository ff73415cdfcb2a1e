"""Neuron pruning: merge-and-scale, APoZ, mean |a|, output sensitivity, correlation (numpy refs)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse.nn import models
from jaxsparse.pruning import neurons, structured

LINKS = structured.mlp_links(3)          # fc1 -> fc2, fc2 -> fc3 (fc3 is the output layer)


def rand(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def mlp_params(seed=0, sizes=(5, 6, 4, 3)):
  return {f"fc{i + 1}": {"kernel": jnp.asarray(rand((a, b), seed + i)),
                         "bias": jnp.asarray(rand((b,), seed + 10 + i))}
          for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}


def forward(p, x):
  h = jnp.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  h = jnp.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
  return h @ p["fc3"]["kernel"] + p["fc3"]["bias"]


# ------------------------------------------------------------------ merge-and-scale


def test_merge_saliency_matches_the_papers_formula():
  w_in, w_out = rand((5, 4), 1), rand((5, 3), 2)
  s = neurons.merge_saliency(w_in, w_out)
  for i in range(5):
    for j in range(5):
      want = np.inf if i == j else np.mean(w_out[j].astype(np.float64) ** 2) * np.sum(
          (w_in[i].astype(np.float64) - w_in[j]) ** 2)
      assert s[i, j] == pytest.approx(want, rel=1e-9)


def test_merging_two_identical_neurons_leaves_the_output_unchanged():
  p = mlp_params()
  k1, b1 = np.array(p["fc1"]["kernel"]), np.array(p["fc1"]["bias"])
  k1[:, 4], b1[4] = k1[:, 1], b1[1]               # neurons 1 and 4 of fc1 are the same
  p["fc1"] = {"kernel": jnp.asarray(k1), "bias": jnp.asarray(b1)}
  x = jnp.asarray(rand((16, 5), 3))
  new, masks = js.merge_and_scale(p, 1 / 6, LINKS[:1])   # 6 -> 5 neurons of fc1
  np.testing.assert_allclose(forward(new, x), forward(p, x), rtol=1e-5, atol=1e-5)
  # j = 4 went into i = 1 (s[1, 4] = s[4, 1] = 0; ties: row-major first)
  np.testing.assert_array_equal(masks["fc1"]["kernel"][0], [1, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(masks["fc1"]["bias"], [1, 1, 1, 1, 0, 1])
  np.testing.assert_array_equal(masks["fc2"]["kernel"][:, 0], [1, 1, 1, 1, 0, 1])
  np.testing.assert_allclose(new["fc2"]["kernel"][1], p["fc2"]["kernel"][1] + p["fc2"]["kernel"][4])
  assert not np.any(new["fc2"]["kernel"][4]) and not np.any(new["fc1"]["kernel"][:, 4])
  assert jnp.ndim(masks["fc3"]["kernel"]) == 0 and jnp.ndim(masks["fc2"]["bias"]) == 0


def test_merging_identical_conv_channels_read_through_a_flatten_is_exact():
  k = rand((3, 3, 2, 4), 4)
  k[..., 3] = k[..., 0]
  b = rand((4,), 5)
  b[3] = b[0]
  p = {"conv": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)},
       "fc": {"kernel": jnp.asarray(rand((4 * 4 * 4, 3), 6))}}

  def f(p, x):
    h = jax.lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.maximum(h + p["conv"]["bias"], 0)
    return h.reshape(len(x), -1) @ p["fc"]["kernel"]

  link = structured.ChannelLink("conv/kernel", "fc/kernel", ("conv/bias",))
  x = jnp.asarray(rand((2, 6, 6, 2), 7))
  new, masks = js.merge_and_scale(p, 0.25, link, output_layer=None)
  np.testing.assert_allclose(f(new, x), f(p, x), rtol=1e-5, atol=1e-5)
  rows = np.asarray(masks["fc"]["kernel"][:, 0])
  np.testing.assert_array_equal(rows, np.arange(64) % 4 != 3)   # channel r % 4 == 3 removed


def test_greedy_merging_matches_a_numpy_reference():
  p = mlp_params(seed=20)
  new, masks = js.merge_and_scale(p, 0.5, LINKS)        # fc1: 6 -> 3, fc2: 4 -> 2
  # Reference, written from the paper's sec. 3.3: fc1 first, then fc2 with fc1's merges.
  ref = {n: {k: np.array(v, np.float64) for k, v in d.items()} for n, d in p.items()}
  for prod, cons, remove in (("fc1", "fc2", 3), ("fc2", "fc3", 2)):
    w_in = np.concatenate([ref[prod]["kernel"].T, ref[prod]["bias"][:, None]], 1)
    a = ref[cons]["kernel"]
    alive = list(range(w_in.shape[0]))
    for _ in range(remove):
      best = None
      for i in alive:
        for j in alive:
          if i != j:
            s = np.mean(a[j] ** 2) * np.sum((w_in[i] - w_in[j]) ** 2)
            if best is None or s < best[0]:
              best = (s, i, j)
      _, i, j = best
      a[i] += a[j]
      a[j] = 0
      alive.remove(j)
    gone = [c for c in range(w_in.shape[0]) if c not in alive]
    ref[prod]["kernel"][:, gone] = 0
    ref[prod]["bias"][gone] = 0
    assert np.asarray(masks[prod]["kernel"]).any(0).tolist() == [c in alive for c in
                                                                 range(w_in.shape[0])]
  for n in ref:
    for k in ref[n]:
      np.testing.assert_allclose(new[n][k], ref[n][k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ activity


@pytest.fixture(scope="module")
def tiny_mlp():
  net = models.MLP((6, 4), num_classes=3)
  variables = {"params": mlp_params()}
  x = rand((64, 5), 30)
  return net, variables, x, js.activation_stats(net, variables, x, LINKS, batch_size=25)


def test_apoz_and_mean_activation_match_numpy(tiny_mlp):
  net, variables, x, stats = tiny_mlp
  p = jax.tree.map(np.asarray, variables["params"])
  h1 = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
  h2 = np.maximum(h1 @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
  for name, h in (("fc1/kernel", h1), ("fc2/kernel", h2)):
    assert stats[name].count == 64
    np.testing.assert_allclose(neurons.apoz(stats[name]), np.mean(h == 0, 0))
    np.testing.assert_allclose(js.apoz_scores(stats)[name], -np.mean(h == 0, 0))
    np.testing.assert_allclose(neurons.activation_magnitude_scores(stats)[name],
                               np.abs(h).mean(0), rtol=1e-5)
  # The same statistics from activations the user computed.
  own = neurons.stats_from_activations({"fc1/kernel": h1})["fc1/kernel"]
  np.testing.assert_allclose(own.outer, stats["fc1/kernel"].outer, rtol=1e-4, atol=1e-4)


def test_apoz_masks_remove_the_most_often_zero_neurons_and_propagate(tiny_mlp):
  _, variables, _, stats = tiny_mlp
  p = variables["params"]
  masks = js.neuron_masks(p, js.apoz_scores(stats), 0.5, LINKS)
  for prod, cons, c in (("fc1", "fc2", 6), ("fc2", "fc3", 4)):
    z = neurons.apoz(stats[f"{prod}/kernel"])
    kept = np.asarray(masks[prod]["kernel"]).any(0)
    assert kept.sum() == c // 2
    assert z[kept].max() <= z[~kept].min()
    np.testing.assert_array_equal(masks[prod]["bias"], kept)
    np.testing.assert_array_equal(np.asarray(masks[cons]["kernel"]).any(1), kept)
  assert np.asarray(masks["fc3"]["kernel"]).all(0).sum() == 0 or \
      np.asarray(masks["fc3"]["kernel"]).any(0).all()     # no output neuron removed
  assert jnp.ndim(masks["fc3"]["bias"]) == 0


def test_global_scope_and_exact_counts():
  p = mlp_params()
  scores = {"fc1/kernel": np.arange(6.0), "fc2/kernel": np.arange(4.0) + 2.5}
  masks = js.neuron_masks(p, scores, 0.5, LINKS, scope="global")     # keep 5 of 10
  # the 5 largest of {0, 1, 2, 3, 4, 5} and {2.5, 3.5, 4.5, 5.5}: 5.5, 5, 4.5, 4, 3.5
  np.testing.assert_array_equal(np.asarray(masks["fc1"]["kernel"]).any(0), [0, 0, 0, 0, 1, 1])
  np.testing.assert_array_equal(np.asarray(masks["fc2"]["kernel"]).any(0), [0, 1, 1, 1])
  local = js.neuron_masks(p, scores, 0.5, LINKS)
  np.testing.assert_array_equal(np.asarray(local["fc2"]["kernel"]).any(0), [0, 0, 1, 1])


# ------------------------------------------------------------------ correlation


def test_correlation_scores_match_a_numpy_greedy_reference():
  a = rand((200, 6), 40)
  a[:, 4] = 0.9 * a[:, 1] + 0.1 * a[:, 4]
  a[:, 5] = 2.0 * a[:, 0] + 1.0                            # |r| = 1 with neuron 0
  stats = neurons.stats_from_activations({"fc1/kernel": a})
  r = np.corrcoef(a.astype(np.float64), rowvar=False)
  np.testing.assert_allclose(neurons.activation_correlation(stats["fc1/kernel"]), r, atol=1e-5)
  alive, order = list(range(6)), []
  while len(alive) > 1:
    worst = [max(abs(r[j, k]) for k in alive if k != j) for j in alive]
    j = alive[int(np.argmax(worst))]
    order.append(j)
    alive.remove(j)
  scores = js.correlation_scores(stats)["fc1/kernel"]
  assert list(np.argsort(scores)[:5]) == order
  assert order[0] in (0, 5) and order[1] in (1, 4)
  masks = js.neuron_masks(mlp_params(), js.correlation_scores(stats), 2 / 6, LINKS)
  np.testing.assert_array_equal(np.asarray(masks["fc1"]["kernel"]).any(0),
                                [c not in order[:2] for c in range(6)])


def test_a_constant_neuron_is_removed_first():
  a = rand((50, 3), 41)
  a[:, 2] = 0.0                                            # dead ReLU
  stats = neurons.stats_from_activations({"l": a})
  r = neurons.activation_correlation(stats["l"])
  np.testing.assert_array_equal(r[2], [0, 0, 1])
  np.testing.assert_array_equal(js.correlation_scores(stats)["l"], [1, 2, 0])


# ------------------------------------------------------------------ output sensitivity


def test_sensitivity_scores_match_numpy():
  p = {"fc1": {"kernel": jnp.asarray(rand((5, 6), 50)), "bias": jnp.asarray(rand((6,), 51))},
       "fc2": {"kernel": jnp.asarray(rand((6, 3), 52)), "bias": jnp.asarray(rand((3,), 53))}}
  x = rand((32, 5), 54)

  def out(p, x):
    return jnp.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0) @ p["fc2"]["kernel"]

  link = structured.ChannelLink("fc1/kernel", "fc2/kernel", ("fc1/bias",))
  got = js.sensitivity_scores(p, out, x, link)["fc1/kernel"]
  w1, b1, w2 = (np.asarray(v, np.float64) for v in (p["fc1"]["kernel"], p["fc1"]["bias"],
                                                    p["fc2"]["kernel"]))
  on = (x @ w1 + b1 > 0).astype(np.float64)                      # (N, 6)
  # dy_k/dW1[i, j] = mean_n x_ni 1[z_nj > 0] W2[j, k]; S = sum_k |.| / 3 (eq. 2, alpha = 1/C)
  d = np.einsum("ni,nj,jk->ijk", x.astype(np.float64), on, w2) / len(x)
  want = (np.abs(d).sum(2) / 3).sum(0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  masks = js.neuron_masks(p, {"fc1/kernel": got}, 0.5, link)
  assert set(np.flatnonzero(np.asarray(masks["fc1"]["kernel"]).any(0))) == \
      set(np.argsort(want)[3:])


# ------------------------------------------------------------------ bad input


def test_bad_inputs_name_the_argument(tiny_mlp):
  net, variables, _, stats = tiny_mlp
  p = variables["params"]
  with pytest.raises(ValueError, match="sparsity must be in"):
    js.neuron_masks(p, js.apoz_scores(stats), 1.0, LINKS)
  with pytest.raises(ValueError, match="sparsity must be in"):
    js.merge_and_scale(p, -0.1, LINKS)
  with pytest.raises(ValueError, match="x: the calibration batch of shape \\(4, 7\\)"):
    js.activation_stats(net, variables, rand((4, 7), 0), LINKS)
  with pytest.raises(ValueError, match="scores: 'fc9/kernel' is not the producer"):
    js.neuron_masks(p, {"fc9/kernel": np.ones(6)}, 0.5, LINKS)
  with pytest.raises(ValueError, match=r"scores\['fc1/kernel'\] has shape \(4,\)"):
    js.neuron_masks(p, {"fc1/kernel": np.ones(4)}, 0.5, LINKS)
  with pytest.raises(ValueError, match="links: leaf 'fc7/kernel' is not in params"):
    js.merge_and_scale(p, 0.5, [structured.ChannelLink("fc7/kernel", "fc2/kernel")])
  with pytest.raises(ValueError, match="'fc3/kernel' is the output layer"):
    js.merge_and_scale(p, 0.5, [structured.ChannelLink("fc3/kernel", "fc2/kernel")])
  with pytest.raises(TypeError, match="links must be"):
    js.neuron_masks(p, js.apoz_scores(stats), 0.5, "fc1")
  with pytest.raises(ValueError, match="inputs: the calibration batch does not fit"):
    js.sensitivity_scores(p, forward, rand((4, 7), 0), LINKS)
  with pytest.raises(ValueError, match=r"activations\['fc1/kernel'\] must be"):
    neurons.stats_from_activations({"fc1/kernel": np.ones(3, np.float32)})
  with pytest.raises(ValueError, match="would remove every neuron of 'fc1/kernel'"):
    js.merge_and_scale(p, 0.95, LINKS)


def test_a_neuron_without_outgoing_weights_costs_nothing_to_merge():
  p = mlp_params()
  k2 = np.array(p["fc2"]["kernel"])
  k2[2] = 0.0                                              # fc1 neuron 2 feeds nothing
  p["fc2"] = {"kernel": jnp.asarray(k2), "bias": p["fc2"]["bias"]}
  x = jnp.asarray(rand((8, 5), 3))
  new, masks = js.merge_and_scale(p, 1 / 6, LINKS[:1])
  assert not np.asarray(masks["fc1"]["kernel"]).any(0)[2]
  np.testing.assert_allclose(forward(new, x), forward(p, x), rtol=1e-5, atol=1e-5)


def test_least_squares_compensation_is_exact_for_a_linearly_dependent_neuron():
  h = np.maximum(rand((100, 4), 60), 0)
  h[:, 3] = 2.0 * h[:, 0] - h[:, 1] + 0.5                 # in the span of neurons 0, 1 and 1
  p = {"p": {"kernel": jnp.asarray(rand((5, 4), 61))},
       "c": {"kernel": jnp.asarray(rand((4, 3), 62)), "bias": jnp.asarray(rand((3,), 63))}}
  link = structured.ChannelLink("p/kernel", "c/kernel")
  stats = neurons.stats_from_activations({"p/kernel": h})
  masks = js.neuron_masks(p, {"p/kernel": np.array([3.0, 2.0, 1.0, 0.0])}, 0.25, link,
                          output_layer=None)
  new = neurons.least_squares_compensation(p, masks, stats, link, ridge=0.0)
  z = h @ np.asarray(p["c"]["kernel"]) + np.asarray(p["c"]["bias"])
  z_new = h @ np.asarray(new["c"]["kernel"]) + np.asarray(new["c"]["bias"])
  assert not np.any(new["c"]["kernel"][3])
  np.testing.assert_allclose(z_new, z, rtol=1e-4, atol=1e-4)
  # Without the fit, dropping neuron 3 changes the output.
  assert np.abs(h[:, :3] @ np.asarray(p["c"]["kernel"])[:3] + np.asarray(p["c"]["bias"])
                - z).max() > 0.1
