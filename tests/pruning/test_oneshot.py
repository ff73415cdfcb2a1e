"""One-shot pruning: Wanda and SparseGPT against numpy references written from the papers'
equations, N:M counts, sequential calibration, OWL's exact layer sparsities, errors, sharding."""

import json
import subprocess
import sys
import textwrap

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from tests.helpers import eight_cpu_devices_env
from jaxsparse.pruning import oneshot
from jaxsparse.core import selection as topk
from jaxsparse.nn import transformer as tr

# ------------------------------------------------------------------ numpy references


def wanda_reference(kernel, x, sparsity=None, nm=None):
  """Sun et al. 2023, eq. 1: S_ij = |W_ij| ||X_j||_2; per output, remove the lowest
  round(s d_in) (unstructured) or the M - N lowest of every M inputs."""
  w = np.asarray(kernel, np.float64)              # (d_in, d_out)
  xf = np.asarray(x, np.float64).reshape(-1, w.shape[0])
  s = np.abs(w) * np.sqrt((xf ** 2).sum(0))[:, None]
  keep = np.ones(w.shape, bool)
  for o in range(w.shape[1]):
    if nm is None:
      keep[np.argsort(s[:, o], kind="stable")[:int(round(sparsity * w.shape[0]))], o] = False
    else:
      n, m = nm
      for g in range(0, w.shape[0], m):
        keep[g + np.argsort(-s[g:g + m, o], kind="stable")[n:], o] = False
  return keep


def sparsegpt_reference(kernel, x, sparsity=None, nm=None, blocksize=128, percdamp=0.01):
  """Frantar & Alistarh 2023 from the equations, without the Cholesky or lazy-batch tricks.

  H = 2 X^T X / n + lambda I. Inputs j = 0, 1, ... are processed in order; F = {j, ...} are
  those not yet processed. Pruning w = W[r, j] moves the row's remaining weights by the OBS
  update delta_F = -w / [H_F^-1]_jj [H_F^-1]_{j, F} (Hassibi & Stork eq. 4 with H_F = H[F, F]).
  Masks: at the start of each block of inputs, the round(s * rows * end) - (pruned so far)
  smallest w^2 / [H_F^-1]_jj of the block; N:M: at every M-th input, per row, the M - N
  smallest of the next M.
  """
  w = np.asarray(kernel, np.float64).T.copy()     # (rows = outputs, cols = inputs)
  r, c = w.shape
  xf = np.asarray(x, np.float64).reshape(-1, c)
  h = 2 * xf.T @ xf / xf.shape[0]
  h += percdamp * np.mean(np.diag(h)) * np.eye(c)
  hinv_jj = lambda j: np.linalg.inv(h[j:, j:])[0, 0]
  pruned = np.zeros((r, c), bool)
  b = min(blocksize, c)
  done = 0
  for j in range(c):
    if nm is None and j % b == 0:
      cols = list(range(j, min(j + b, c)))
      scores = np.stack([w[:, i] ** 2 / hinv_jj(i) for i in cols], 1)
      k = int(round(sparsity * r * (j + len(cols)))) - done
      done += k
      flat = np.zeros(scores.size, bool)
      flat[np.argsort(scores.reshape(-1), kind="stable")[:k]] = True
      pruned[:, cols] = flat.reshape(scores.shape)
    if nm is not None and j % nm[1] == 0:
      n, m = nm
      scores = np.stack([w[:, i] ** 2 / hinv_jj(i) for i in range(j, j + m)], 1)
      for row in range(r):
        pruned[row, j + np.argsort(-scores[row], kind="stable")[n:]] = True
    hinv_f = np.linalg.inv(h[j:, j:])
    for row in np.flatnonzero(pruned[:, j]):
      w[row, j:] -= w[row, j] / hinv_f[0, 0] * hinv_f[0]
    w[pruned[:, j], j] = 0.0
  return w.T, ~pruned.T


def _layer(seed=0, d_in=24, d_out=10, tokens=160):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(tokens, d_in)) * rng.uniform(0.2, 3.0, size=d_in)  # uneven feature norms
  x[:, :4] += 0.8 * x[:, 4:8]                                             # correlated inputs
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32)
  return kernel, x.astype(np.float32)


@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(sparsity=0.3), dict(nm=(2, 4))])
def test_wanda_matches_reference(target):
  kernel, x = _layer()
  keep = oneshot.wanda_mask(kernel, x.reshape(8, 20, -1), **target)  # any leading shape
  np.testing.assert_array_equal(np.asarray(keep), wanda_reference(kernel, x, **target))
  if "sparsity" in target:  # exactly round(s d_in) removed per output
    removed = (~np.asarray(keep)).sum(0)
    assert (removed == round(target["sparsity"] * 24)).all()


@pytest.mark.parametrize("target,blocksize", [
    (dict(sparsity=0.5), 10),   # three blocks, the last padded: lazy updates across blocks
    (dict(nm=(2, 4)), 8),
])
def test_sparsegpt_matches_reference(target, blocksize):
  kernel, x = _layer(1)
  new, keep = oneshot.sparsegpt(kernel, x, blocksize=blocksize, **target)
  ref_w, ref_keep = sparsegpt_reference(kernel, x, blocksize=blocksize, **target)
  np.testing.assert_array_equal(np.asarray(keep), ref_keep)
  np.testing.assert_allclose(np.asarray(new), ref_w, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(new)[~ref_keep] == 0)
  assert not np.allclose(np.asarray(new)[ref_keep], kernel[ref_keep])  # the OBS update moved them
  if "sparsity" in target:
    assert (~np.asarray(keep)).sum() == round(0.5 * kernel.size)


def test_sparsegpt_with_identity_gram_is_magnitude_pruning():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(64, 24)))  # X^T X = I
  kernel = rng.normal(size=(24, 10)).astype(np.float32)
  # One block of all inputs (blocksize >= d_in): the selection is over the whole layer.
  for target in (dict(sparsity=0.5), dict(sparsity=0.75), dict(nm=(2, 4))):
    new, keep = oneshot.sparsegpt(kernel, q.astype(np.float32), **target,
                                  blocksize=8 if "nm" in target else 128)
    np.testing.assert_array_equal(np.asarray(keep),
                                  np.asarray(oneshot.magnitude_mask(kernel, **target)))
    np.testing.assert_allclose(np.asarray(new), np.where(keep, kernel, 0), atol=1e-5)


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_hold_n_of_every_m(nm):
  kernel, x = _layer(3)
  n, m = nm
  keeps = [oneshot.magnitude_mask(kernel, nm=nm), oneshot.wanda_mask(kernel, x, nm=nm),
           oneshot.sparsegpt(kernel, x, nm=nm, blocksize=8)[1]]
  for keep in keeps:
    groups = np.asarray(keep).reshape(24 // m, m, -1)  # groups of M consecutive inputs
    assert (groups.sum(1) == n).all()


def test_smallest_k_agrees_with_topk_on_ties():
  rng = np.random.default_rng(4)
  f, g = jax.jit(oneshot._smallest_k), jax.jit(topk.smallest_k_mask)
  for _ in range(20):
    scores = jnp.asarray(rng.integers(-3, 3, size=(7, 9)).astype(np.float32))
    valid = jnp.asarray(rng.random((7, 9)) < 0.8)
    k = jnp.int32(rng.integers(0, 66))
    np.testing.assert_array_equal(f(scores, k, valid), g(scores, k, valid))


# ------------------------------------------------------------------ whole model


@pytest.fixture(scope="module")
def lm():
  model = tr.GPT(context=16, width=32, depth=2, num_heads=4, mlp_ratio=1)  # one kernel shape
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
  # Spread the weights so that pruning block 0 visibly changes block 1's inputs.
  params = jax.jit(lambda t: jax.tree.map(lambda p: p * 8 if p.ndim == 2 else p, t))(params)
  tokens = np.random.default_rng(0).integers(0, 256, size=(8, 16)).astype(np.int32)
  return model, params, tokens


def test_sequential_calibration_uses_pruned_activations(lm):
  model, params, tokens = lm
  stages = tr.stages(model)
  res = oneshot.prune(stages, params, tokens, "wanda", sparsity=0.5)
  name = "blocks_1/attn/query/kernel"

  @jax.jit
  def query_input(p):
    """What blocks_1's query layer sees: ln1 of block 0's output under params ``p``."""
    h = stages[1].apply(p["blocks_0"], stages[0].apply(p, tokens))
    return nn.LayerNorm().apply({"params": params["blocks_1"]["ln1"]}, h)

  x_pruned, x_dense = query_input(res.params), query_input(params)
  np.testing.assert_allclose(res.norms[name], oneshot.input_stats(x_pruned).norms, rtol=1e-5)
  assert not np.allclose(res.norms[name], oneshot.input_stats(x_dense).norms, rtol=1e-2)
  kernel = params["blocks_1"]["attn"]["query"]["kernel"]
  mask_pruned = oneshot.wanda_mask(kernel, x_pruned, sparsity=0.5)
  mask_dense = oneshot.wanda_mask(kernel, x_dense, sparsity=0.5)
  np.testing.assert_array_equal(_leaf(res.masks, name), mask_pruned)
  assert not np.array_equal(mask_pruned, mask_dense)   # calibrating on dense activations differs
  # The result feeds keep_masks; the head stays dense; the pruned weights are zero.
  js.keep_masks(optax.sgd(0.1), res.masks).init(res.params)
  assert res.targets[name] == 0.5 and "head/kernel" not in res.targets
  assert res.masks["head"]["kernel"].ndim == 0
  assert np.all(_leaf(res.params, name)[~mask_pruned] == 0)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_owl_exact_layer_sparsities(lm, method):
  model, params, tokens = lm
  owl = oneshot.OWL(m=3.0, lam=0.1)
  res = oneshot.prune(tr.stages(model), params, tokens, method, sparsity=0.6, owl=owl)
  ratios = [res.outlier_ratios[f"blocks_{i}"] for i in range(2)]
  assert ratios[0] != ratios[1]
  s0, s1 = res.targets["blocks_0/attn/query/kernel"], res.targets["blocks_1/attn/query/kernel"]
  assert abs((s0 + s1) / 2 - 0.6) < 1e-12 and abs(abs(s0 - s1) - 0.2) < 1e-12
  assert (s0 < s1) == (ratios[0] > ratios[1])    # more outliers, less sparsity
  for name, s in res.targets.items():
    keep = _leaf(res.masks, name)
    d_in = keep.shape[0]
    if method == "wanda":   # exactly round(s d_in) per output
      assert ((~keep).sum(0) == round(s * d_in)).all(), name
    else:                   # exactly round(s size) per layer
      assert (~keep).sum() == round(s * keep.size), name
    assert np.all(_leaf(res.params, name)[~keep] == 0)


def _leaf(tree, name):
  for k in name.split("/"):
    tree = tree[k]
  return np.asarray(tree)


def test_owl_sparsities_mapping():
  s = oneshot.owl_sparsities([0.01, 0.03, 0.02, 0.05], 0.5, lam=0.08)
  np.testing.assert_allclose(s.mean(), 0.5)
  np.testing.assert_allclose(s.max() - s.min(), 0.16)
  assert np.argmin(s) == 3 and np.argmax(s) == 0
  np.testing.assert_array_equal(oneshot.owl_sparsities([0.2, 0.2], 0.5), [0.5, 0.5])
  assert oneshot.owl_nm(s, (4, 8)) and sum(oneshot.owl_nm(s, (4, 8))) == 16


def test_bad_input_errors_name_the_argument(lm):
  kernel, x = _layer()
  with pytest.raises(ValueError, match=r"nm=\(5, 4\): N must"):
    oneshot.wanda_mask(kernel, x, nm=(5, 4))
  with pytest.raises(ValueError, match=r"nm=\(5, 4\): N must"):
    oneshot.sparsegpt(kernel, x, nm=(5, 4))
  with pytest.raises(ValueError, match=r"^x: calibration activations of shape \(160, 23\)"):
    oneshot.wanda_mask(kernel, x[:, :23], sparsity=0.5)
  with pytest.raises(ValueError, match=r"^x: calibration activations"):
    oneshot.sparsegpt(kernel, x[:, :23], sparsity=0.5)
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
      oneshot.sparsegpt(kernel, x, sparsity=bad)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
      oneshot.magnitude_mask(kernel, sparsity=bad)
  with pytest.raises(ValueError, match=r"^kernel: expected a Dense kernel"):
    oneshot.wanda_mask(kernel[None], x, sparsity=0.5)
  model, params, tokens = lm
  for leaf in ("embed/embedding", "blocks_0/ln1/scale", "no/such/kernel"):
    with pytest.raises(ValueError, match=f"^layers: '{leaf}' is not"):
      oneshot.prune(tr.stages(model), params, tokens, "wanda", sparsity=0.5, layers=[leaf])
  with pytest.raises(ValueError, match=r"^inputs: sequences of 17 tokens"):
    oneshot.prune(tr.stages(model), params, np.zeros((2, 17), np.int32), "wanda", sparsity=0.5)
  with pytest.raises(ValueError, match="exactly one of sparsity"):
    oneshot.prune(tr.stages(model), params, tokens, "wanda")
  with pytest.raises(ValueError, match="^method must be one of"):
    oneshot.prune(tr.stages(model), params, tokens, "obs", sparsity=0.5)


# ------------------------------------------------------------------ sharded path

_SHARDED = textwrap.dedent("""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from jaxsparse.pruning import oneshot
    from jaxsparse.core import sharding
    from jaxsparse.nn import transformer as tr
    assert len(jax.devices()) == 8, jax.devices()
    model = tr.GPT(context=16, width=32, depth=2, num_heads=4, mlp_ratio=1)
    ref = np.load(sys.argv[1])   # the one-device run: masks, params, tokens
    names = [n for n in ref.files if n != "tokens"]
    params = {}
    for n in names:
      if n.startswith("params/"):
        node = params
        *path, leaf = n.split("/")[1:]
        for key in path:
          node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(ref["init/" + n[len("params/"):]])
    mesh = sharding.make_mesh((2, 4), ("data", "model"))
    # Kernels split over their outputs ("model"), calibration sequences over "data".
    sp = sharding.shard(params, sharding.param_shardings(params, mesh, "tensor_parallel"))
    st = jax.device_put(jnp.asarray(ref["tokens"]), sharding.batch_sharding(mesh, "data"))
    many = oneshot.prune(tr.stages(model), sp, st, "sparsegpt", sparsity=0.5)
    flat = lambda tree, pre: {pre + "/".join(str(k.key) for k in p): v
                              for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    masks, pruned = flat(many.masks, "masks/"), flat(many.params, "params/")
    k = many.params["blocks_1"]["mlp"]["fc1"]["kernel"]
    # The per-layer SparseGPT program on a row-split kernel: which collectives it runs.
    w = jax.device_put(jnp.ones((32, 32)), NamedSharding(mesh, P("model", None)))
    hlo = oneshot._sparsegpt_rows.lower(w, jnp.eye(32), jnp.zeros(1, jnp.int32),
                                        jnp.float32(0.01), blocksize=32, nm=None).compile()
    print(json.dumps(dict(
        same_masks=sum(np.array_equal(ref[n], masks[n]) for n in names if n in masks),
        close_params=sum(np.allclose(ref[n], pruned[n], rtol=1e-4, atol=1e-6)
                         for n in names if n in pruned),
        devices=len(k.sharding.device_set), kept_spec=k.sharding.spec == P(None, "model"),
        all_gathers=len(re.findall(r"all-gather\\(", hlo.as_text())),
        out_spec=hlo.output_shardings[0].spec == P("model", None))))
""")


def test_sharded_prune_matches_one_device(lm, tmp_path):
  """SparseGPT on 8 fake CPU devices (2 data x 4 model) gives the one-device masks, keeps
  every kernel split over its outputs, and its per-layer program gathers nothing."""
  model, params, tokens = lm
  one = oneshot.prune(tr.stages(model), params, tokens, "sparsegpt", sparsity=0.5)
  flat = lambda tree, pre: {pre + n: np.asarray(v) for n, v in
                            zip(js.core.masks.leaf_names(tree), jax.tree.leaves(tree))}
  np.savez(tmp_path / "ref.npz", tokens=tokens, **flat(one.masks, "masks/"),
           **flat(one.params, "params/"), **flat(params, "init/"))
  env = eight_cpu_devices_env()
  proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path / "ref.npz")], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  leaves = len(jax.tree.leaves(params))   # every leaf compared, masks and params
  assert out == dict(same_masks=leaves, close_params=leaves, devices=8, kept_spec=True,
                     all_gathers=0, out_spec=True), out
