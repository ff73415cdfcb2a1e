"""Kron-OBD, Kron-OBS and EigenDamage (Wang et al. 2019) against numpy references from the
paper's equations, on tiny layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse.pruning import criteria, kfac, structured


class ConvNet(nn.Module):
  """conv (no nonlinearity) -> flatten -> dense: its output gradients are linear in closed form."""
  padding: str = "VALID"
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (2, 2), strides=self.strides, padding=self.padding, name="conv")(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(4, name="fc")(x)


def _sq_loss(net):
  def loss_fn(params, batch):
    x, t = batch
    return 0.5 * jnp.mean(jnp.sum(jnp.square(net.apply({"params": params}, x) - t), -1))
  return loss_fn


@pytest.fixture(scope="module")
def tiny():
  """ConvNet (VALID, stride 1), 8 calibration examples and their K-FAC factors, built once."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5, 5, 2)).astype(np.float32)
  t = rng.normal(size=(8, 4)).astype(np.float32)
  net = ConvNet()
  params = net.init(jax.random.key(0), x)["params"]
  return net, params, (x, t), kfac.kron_factors(_sq_loss(net), params, (x, t))


def _np_patches(x, k, stride, padding):
  """(N, positions, k*k*C) patches in flax kernel order (di, dj, c), from the definition."""
  n, h, w, c = x.shape
  if padding == "SAME":
    pads = []
    for size in (h, w):
      out = -(-size // stride)
      total = max((out - 1) * stride + k - size, 0)
      pads.append((total // 2, total - total // 2))
    x = np.pad(x, [(0, 0), pads[0], pads[1], (0, 0)])
    h, w = x.shape[1:3]
  rows = []
  for i in range(0, h - k + 1, stride):
    for j in range(0, w - k + 1, stride):
      rows.append(x[:, i:i + k, j:j + k, :].reshape(n, -1))
  return np.stack(rows, 1)


@pytest.mark.parametrize("padding,strides", [("VALID", 1), ("SAME", 2)])
def test_factors_match_numpy_patches_and_closed_form_gradients(tiny, padding, strides):
  net, params, (x, t), f = tiny
  if (padding, strides) != ("VALID", 1):
    net = ConvNet(padding, strides)
    params = net.init(jax.random.key(0), x)["params"]
    f = kfac.kron_factors(_sq_loss(net), params, (x, t))
  assert set(f) == {"conv/kernel", "fc/kernel"}
  p = jax.tree.map(np.asarray, params)
  n = len(x)
  patches = _np_patches(x, 2, strides, padding)                         # (N, T, 8)
  conv_out = patches @ p["conv"]["kernel"].reshape(8, 8) + p["conv"]["bias"]   # (N, T, 8)
  z = conv_out.reshape(n, -1) @ p["fc"]["kernel"] + p["fc"]["bias"]
  np.testing.assert_allclose(z, net.apply({"params": params}, x), rtol=1e-4, atol=1e-5)
  g_fc = z - t                                          # one example's d loss / d z
  g_conv = (g_fc @ p["fc"]["kernel"].T).reshape(conv_out.shape)
  a = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], -1)
  T = a.shape[1]
  a_ref = np.einsum("ntd,nte->de", a, a) / (n * T)      # mean over examples and positions
  s_ref = np.einsum("ntd,nte->de", g_conv, g_conv) / n  # mean over examples of the sum over t
  np.testing.assert_allclose(f["conv/kernel"].a, a_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(f["conv/kernel"].s, s_ref, rtol=1e-4, atol=1e-5)
  a_fc = np.concatenate([conv_out.reshape(n, -1), np.ones((n, 1))], -1)
  np.testing.assert_allclose(f["fc/kernel"].a, a_fc.T @ a_fc / n, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(f["fc/kernel"].s, g_fc.T @ g_fc / n, rtol=1e-4, atol=1e-5)
  assert f["conv/kernel"].has_bias
  if padding == "VALID":  # two calibration batches average to the factors of their union
    f2 = kfac.kron_factors(_sq_loss(net), params, [(x[:4], t[:4]), (x[4:], t[4:])])
    np.testing.assert_allclose(f2["conv/kernel"].s, s_ref, rtol=1e-4, atol=1e-5)


def test_one_example_fisher_is_exactly_a_kron_s():
  rng = np.random.default_rng(1)
  net = nn.Dense(3)
  x, y = rng.normal(size=(1, 4)).astype(np.float32), np.array([2])
  params = net.init(jax.random.key(1), x)["params"]

  def loss_fn(p, batch):
    import optax
    logits = net.apply({"params": p}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  f = kfac.kron_factors(loss_fn, params, (x, y))["kernel"]
  g = criteria.per_example_grads(params, loss_fn, (x, y))
  vec = np.concatenate([np.asarray(g["kernel"][0]), np.asarray(g["bias"][0])[None]]).reshape(-1)
  np.testing.assert_allclose(np.kron(f.a, f.s), np.outer(vec, vec), rtol=1e-5, atol=1e-7)


def test_kron_obd_equals_pooled_obd_when_factors_are_diagonal():
  # One-hot inputs make A diagonal; a loss linear in the output gives every example the same
  # output gradient v, so E[a_i^2 g_j^2] = A_ii S_jj: OBD's Fisher diagonal is S (x) A's.
  rng = np.random.default_rng(2)
  net = nn.Dense(3, use_bias=False)
  x = np.zeros((5, 4), np.float32)
  x[np.arange(5), [0, 1, 2, 3, 1]] = rng.normal(size=5)
  v = jnp.array([0.5, -1.0, 2.0])
  params = net.init(jax.random.key(2), x)["params"]
  loss_fn = lambda p, b: jnp.mean(net.apply({"params": p}, b[0]) @ v)
  f = kfac.kron_factors(loss_fn, params, (x, np.zeros(5)))
  a = np.asarray(f["kernel"].a)
  assert np.count_nonzero(a - np.diag(np.diag(a))) == 0
  kron = js.kron_obd_scores(params, f)["kernel"]
  pooled = structured.filters().pool(js.obd_scores(params, loss_fn, (x, np.zeros(5)))["kernel"])
  np.testing.assert_allclose(kron, pooled, rtol=1e-5)
  w = np.asarray(params["kernel"])
  diag = 0.5 * np.asarray(v) ** 2 * (np.diag(a)[:, None] * w ** 2).sum(0)  # the diagonal formula
  np.testing.assert_allclose(kron, diag, rtol=1e-5)


def _random_layer(seed=3, d_in=4, d_out=5):
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(d_in + 1, 3 * (d_in + 1)))
  n = rng.normal(size=(d_out, 3 * d_out))
  a, s = (m @ m.T / m.shape[1]).astype(np.float32), (n @ n.T / n.shape[1]).astype(np.float32)
  w = rng.normal(size=(d_in + 1, d_out)).astype(np.float32)
  params = {"fc": {"kernel": jnp.asarray(w[:-1]), "bias": jnp.asarray(w[-1])}}
  return params, {"fc/kernel": kfac.KronFactors(jnp.asarray(a), jnp.asarray(s), True)}, w


def test_kron_obd_and_obs_scores_match_the_full_kronecker_fisher():
  params, f, w = _random_layer()
  d_in, d_out = w.shape
  theta = w.reshape(-1)                       # row-major: index i * d_out + j
  fac = f["fc/kernel"]
  F = np.kron(np.asarray(fac.a, np.float64), np.asarray(fac.s, np.float64))
  d = kfac.damped_factors(fac, 1e-2)
  Fd = np.kron(np.asarray(d.a, np.float64), np.asarray(d.s, np.float64))
  Fd_inv = np.linalg.inv(Fd)
  obd, obs_ = [], []
  for j in range(d_out):
    q = np.arange(d_in) * d_out + j           # filter j's weights
    obd.append(0.5 * theta[q] @ F[np.ix_(q, q)] @ theta[q])                          # eq. 9
    obs_.append(0.5 * theta[q] @ np.linalg.solve(Fd_inv[np.ix_(q, q)], theta[q]))     # eq. 10
  np.testing.assert_allclose(js.kron_obd_scores(params, f)["fc/kernel"], obd, rtol=1e-4)
  np.testing.assert_allclose(js.kron_obs_scores(params, f, damping=1e-2)["fc/kernel"], obs_,
                             rtol=1e-3)
  # K-FAC's pi-damping (Martens & Grosse 2015, sec. 6.3).
  a, s = np.asarray(fac.a), np.asarray(fac.s)
  pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(s) / len(s)))
  np.testing.assert_allclose(d.a, a + pi * 0.1 * np.eye(len(a)), rtol=1e-5)
  np.testing.assert_allclose(d.s, s + 0.1 / pi * np.eye(len(s)), rtol=1e-5)


def test_kron_obs_update_is_the_constrained_minimiser_of_the_kronecker_quadratic():
  params, f, w = _random_layer(seed=4)
  d_in, d_out = w.shape
  masks = {"fc": {"kernel": jnp.ones((d_in - 1, d_out), bool).at[:, jnp.array([1, 3])].set(False),
                  "bias": jnp.ones((d_out,), bool).at[jnp.array([1, 3])].set(False)}}
  new = kfac.kron_obs_update(params, f, masks, damping=1e-2)
  w_new = np.concatenate([np.asarray(new["fc"]["kernel"]), np.asarray(new["fc"]["bias"])[None]])
  assert np.all(w_new[:, [1, 3]] == 0.0)
  # Brute force: minimise 1/2 d^T F d over all weights with the removed filters' d_Q = -theta_Q.
  d = kfac.damped_factors(f["fc/kernel"], 1e-2)
  F = np.kron(np.asarray(d.a, np.float64), np.asarray(d.s, np.float64))
  theta = w.reshape(-1).astype(np.float64)
  q = np.zeros(theta.size, bool)
  q[np.arange(d_in)[:, None] * d_out + np.array([1, 3])] = True
  delta = np.zeros_like(theta)
  delta[q] = -theta[q]
  delta[~q] = -np.linalg.solve(F[np.ix_(~q, ~q)], F[np.ix_(~q, q)] @ delta[q])
  np.testing.assert_allclose(w_new.reshape(-1), theta + delta, rtol=1e-3, atol=1e-4)
  # The cost of the set is 1/2 theta_Q^T ([F^-1]_QQ)^-1 theta_Q; one filter: its Kron-OBS score.
  cost = 0.5 * delta @ F @ delta
  fi = np.linalg.inv(F)
  np.testing.assert_allclose(cost, 0.5 * theta[q] @ np.linalg.solve(fi[np.ix_(q, q)], theta[q]),
                             rtol=1e-3)


def _eigen_reference(a, s, w):
  la, qa = np.linalg.eigh(np.asarray(a, np.float64))
  ls, qs = np.linalg.eigh(np.asarray(s, np.float64))
  wp = qa.T @ w @ qs
  # In the eigenbasis the Kronecker Fisher is diagonal, L_A (x) L_S.
  rot = np.kron(qa, qs)
  F_kfe = rot.T @ np.kron(np.asarray(a, np.float64), np.asarray(s, np.float64)) @ rot
  np.testing.assert_allclose(F_kfe, np.diag(np.kron(la, ls)), atol=1e-4)
  imp = 0.5 * wp ** 2 * np.diag(F_kfe).reshape(wp.shape)
  return imp.sum(1), imp.sum(0)


def test_eigendamage_importances_bottleneck_and_exact_reconstruction(tiny):
  net, params, (x, t), f = tiny
  eig = kfac.eigenbasis(params, f)
  for name in f:
    ref_in, ref_out = _eigen_reference(f[name].a, f[name].s,
                                       np.asarray(kfac.layer_matrix(params, name, f[name])))
    np.testing.assert_allclose(eig[name][1], ref_in, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(eig[name][2], ref_out, rtol=1e-3, atol=1e-6)
  # No pruning: the three maps reproduce the layer's output.
  full = kfac.merge_bottlenecks(params, {n: e[0] for n, e in eig.items()})
  apply = jax.jit(net.apply)
  np.testing.assert_allclose(apply({"params": full}, x), apply({"params": params}, x),
                             rtol=1e-5, atol=1e-5)
  assert js.eigendamage(params, f, 0.0).bottlenecks == {"conv/kernel": None}   # fc is the output
  # Prune: one global threshold over conv's 9 input and 8 output directions.
  res = js.eigendamage(params, f, 0.75, max_layer_pruning=0.9)
  b = res.bottlenecks["conv/kernel"]
  imp = np.concatenate([np.asarray(eig["conv/kernel"][1]), np.asarray(eig["conv/kernel"][2])])
  keep = imp > np.sort(imp)[12]                        # 13 of the 17 removed
  assert b.w.shape == (keep[:9].sum(), keep[9:].sum())
  assert b.q_a.shape == (9, keep[:9].sum()) and b.q_s.shape == (8, keep[9:].sum())
  assert kfac.bottleneck_size(b) == b.q_a.size + b.w.size + b.q_s.size < 8 * 8 + 8
  full_w = np.abs(eig["conv/kernel"][0].w)
  np.testing.assert_array_equal(np.abs(b.w), full_w[np.ix_(keep[:9], keep[9:])])
  k = np.asarray(res.params["conv"]["kernel"]).reshape(8, 8)
  kb = np.concatenate([k, np.asarray(res.params["conv"]["bias"])[None]])
  np.testing.assert_allclose(kb, b.q_a @ b.w @ b.q_s.T, rtol=1e-5, atol=1e-6)
  assert np.linalg.matrix_rank(kb, tol=1e-5) <= min(b.w.shape)
  np.testing.assert_array_equal(res.params["fc"]["kernel"], params["fc"]["kernel"])
  layers = kfac.eigendamage_flops(js.count_flops(net, params, (5, 5, 2)), res.bottlenecks)
  k_in, k_out = b.w.shape
  assert layers[0].sparse == 2 * 16 * (8 * k_in + k_in * k_out + k_out * 8)
  assert layers[1].sparse == layers[1].dense


def test_kron_prune_masks_filters_propagates_and_keeps_the_output_layer(tiny):
  net, params, (x, t), f = tiny
  link = structured.ChannelLink("conv/kernel", "fc/kernel", ("conv/bias",))
  res = js.kron_prune(params, f, 3 / 8, criterion="obs", damping=1e-3, links=[link])
  gone = np.asarray(structured.removed_channels(res.masks["conv"]["kernel"]))
  assert gone.sum() == 3 and set(res.scores) == {"conv/kernel"}
  np.testing.assert_array_equal(np.flatnonzero(gone),
                                np.sort(np.argsort(np.asarray(res.scores["conv/kernel"]))[:3]))
  assert np.all(np.asarray(res.params["conv"]["kernel"])[..., gone] == 0)
  assert np.all(np.asarray(res.params["conv"]["bias"])[gone] == 0)
  rows = np.tile(gone, 16)                                 # NHWC flatten: row r is channel r % 8
  assert not np.asarray(res.masks["fc"]["kernel"])[rows].any()
  assert np.asarray(res.masks["fc"]["kernel"])[~rows].all()
  obd = js.kron_prune(params, f, 3 / 8, criterion="obd", links=[link])
  kept = ~np.asarray(structured.removed_channels(obd.masks["conv"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(obd.params["conv"]["kernel"])[..., kept],
                                np.asarray(params["conv"]["kernel"])[..., kept])   # OBD: no update


def test_bad_inputs_name_the_argument(tiny):
  net, params, (x, t), f = tiny
  loss_fn = _sq_loss(net)
  with pytest.raises(ValueError, match="batch: loss_fn.*calibration batch of shapes"):
    kfac.kron_factors(loss_fn, params, (x[:, :4, :4], t))      # 4x4 images: fc's input differs
  with pytest.raises(ValueError, match="batch: every leaf needs the same"):
    kfac.kron_factors(loss_fn, params, (x, t[:3]))
  with pytest.raises(ValueError, match=r"batches\[1\]: example shapes"):
    kfac.kron_factors(loss_fn, params, [(x, t), (x[:, :4], t)])
  with pytest.raises(ValueError, match="layers: \\['nope/kernel'\\]"):
    kfac.kron_factors(loss_fn, params, (x, t), layers=["nope/kernel"])
  for bad in (0.0, -1e-3, float("nan")):
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
      js.kron_obs_scores(params, f, damping=bad)
  with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\), got 1.5"):
    js.kron_prune(params, f, 1.5)
  with pytest.raises(ValueError, match="sparsity must be in \\[0, 1\\), got -0.1"):
    js.eigendamage(params, f, -0.1)
  with pytest.raises(ValueError, match="criterion must be one of"):
    js.kron_prune(params, f, 0.3, criterion="obq")
  with pytest.raises(ValueError, match="max_layer_pruning must be in"):
    js.eigendamage(params, f, 0.3, max_layer_pruning=1.0)


# ------------------------------------------------------------------ EigenDamage, channel factors


@pytest.fixture(scope="module")
def tiny_channel(tiny):
  """The tiny ConvNet's factors with the conv's input factor over channels (the paper's)."""
  net, params, batch, _ = tiny
  return kfac.kron_factors(_sq_loss(net), params, batch, conv_factor="channel")


def _np_conv(x, w):
  """VALID, stride 1 conv of NHWC ``x`` with an HWIO ``w``, from the definition."""
  k = w.shape[0]
  return _np_patches(x, k, 1, "VALID") @ w.reshape(-1, w.shape[-1])   # (N, positions, O)


def test_channel_factors_match_numpy_pooled_over_positions_and_offsets(tiny, tiny_channel):
  net, params, (x, t), f = tiny
  fc = tiny_channel
  c = fc["conv/kernel"]
  assert c.window == (2, 2) and c.in_positions == 25 and c.has_bias and c.a.shape == (3, 3)
  rows = _np_patches(x, 2, 1, "VALID").reshape(-1, 2)           # one row per (n, t, offset)
  rows = np.concatenate([rows, np.full((len(rows), 1), 1 / 4)], -1)   # bias input 1/(kh kw)
  np.testing.assert_allclose(c.a, rows.T @ rows / len(rows), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(c.s, f["conv/kernel"].s, rtol=1e-5, atol=1e-6)   # S unchanged
  np.testing.assert_allclose(fc["fc/kernel"].a, f["fc/kernel"].a, rtol=1e-5, atol=1e-6)
  assert fc["fc/kernel"].window == () and fc["fc/kernel"].in_positions == 0
  # Importances: OBD in the KFE of I (x) A (x) S, summed over the kernel offsets.
  w = np.asarray(kfac.layer_matrix(params, "conv/kernel", c), np.float64)   # (4, 3, 8)
  np.testing.assert_array_equal(w[:, 2], np.broadcast_to(params["conv"]["bias"], (4, 8)))
  la, qa = np.linalg.eigh(np.asarray(c.a, np.float64))
  ls, qs = np.linalg.eigh(np.asarray(c.s, np.float64))
  imp = (0.5 * (qa.T @ w @ qs) ** 2 * np.outer(la, ls)).sum(0)
  full, imp_in, imp_out = kfac.eigenbasis(params, {"conv/kernel": c})["conv/kernel"]
  assert full.w.shape == (2, 2, 3, 8) and full.in_positions == 25
  np.testing.assert_allclose(imp_in, imp.sum(1), rtol=1e-3, atol=1e-7)
  np.testing.assert_allclose(imp_out, imp.sum(0), rtol=1e-3, atol=1e-7)
  with pytest.raises(ValueError, match="factors\\['conv/kernel'\\] are channel factors"):
    js.kron_obd_scores(params, {"conv/kernel": c})


def test_channel_bottleneck_is_one_conv_exact_unpruned(tiny, tiny_channel):
  net, params, (x, t), _ = tiny
  fc = tiny_channel
  full = kfac.eigenbasis(params, fc)["conv/kernel"][0]
  conv = nn.Conv(8, (2, 2), padding="VALID")
  run = lambda p: np.asarray(conv.apply({"params": p["conv"]}, x)).reshape(len(x), -1, 8)
  merged = kfac.merge_bottlenecks(params, {"conv/kernel": full})
  np.testing.assert_allclose(run(merged), run(params), rtol=1e-4, atol=1e-5)   # Q_A W' Q_S^T = W
  # Keep some directions: 1x1 q_a (with the constant 1/4 channel) -> 2x2 conv w -> 1x1 q_s^T.
  b = kfac.Bottleneck(full.q_a[:, [0, 2]], full.w[:, :, [0, 2]][..., [1, 4, 6]],
                      full.q_s[:, [1, 4, 6]], 25)
  h = np.concatenate([x, np.full(x.shape[:3] + (1,), 1 / 4)], -1) @ b.q_a
  three_maps = _np_conv(h, b.w) @ b.q_s.T
  np.testing.assert_allclose(run(kfac.merge_bottlenecks(params, {"conv/kernel": b})), three_maps,
                             rtol=1e-4, atol=1e-5)
  res = js.eigendamage(params, fc, 0.75, max_layer_pruning=0.9)   # 8 of 11 directions go
  rb = res.bottlenecks["conv/kernel"]
  k_in, k_out = rb.w.shape[2:]
  assert rb.w.shape[:2] == (2, 2) and k_in + k_out == 3
  assert kfac.bottleneck_size(rb) == 3 * k_in + 4 * k_in * k_out + 8 * k_out < 2 * 2 * 2 * 8 + 8
  h = np.concatenate([x, np.full(x.shape[:3] + (1,), 1 / 4)], -1) @ rb.q_a
  np.testing.assert_allclose(run(res.params), _np_conv(h, rb.w) @ rb.q_s.T, rtol=1e-4, atol=1e-5)
  layers = kfac.eigendamage_flops(js.count_flops(net, params, (5, 5, 2)), res.bottlenecks)
  assert layers[0].sparse == 2 * (25 * 2 * k_in + 16 * (4 * k_in * k_out + k_out * 8))


def test_channel_bottleneck_flops_by_hand_and_bad_options():
  # LeNet-5-Caffe's conv2 (5x5, 20 -> 50, 12x12 -> 8x8) as 1x1 20->4, 5x5 4->6, 1x1 6->50.
  conv2 = js.analysis.flops.LayerFlops("conv2/kernel", "Conv", (5, 5, 20, 50), 64, 25_000,
                                       3_200_000, 3_200_000)
  b = kfac.Bottleneck(np.zeros((21, 4)), np.zeros((5, 5, 4, 6)), np.zeros((50, 6)), 144)
  (got,) = kfac.eigendamage_flops([conv2], {"conv2/kernel": b})
  assert got.sparse == 2 * (144 * 20 * 4 + 64 * (25 * 4 * 6 + 6 * 50)) == 138_240
  assert got.kept == 20 * 4 + 25 * 4 * 6 + 6 * 50
  with pytest.raises(ValueError, match="bottlenecks\\['conv2/kernel'\\].*in_positions"):
    kfac.eigendamage_flops([conv2], {"conv2/kernel": b._replace(in_positions=0)})
  with pytest.raises(ValueError, match="conv_factor must be one of \\('patch', 'channel'\\)"):
    kfac.kron_factors(lambda p, b: 0.0, {}, (np.zeros((2, 1)),), conv_factor="patches")
