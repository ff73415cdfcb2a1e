"""Pruning criteria: each score against a hand-computed numpy reference on a tiny MLP."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments import data
from jaxsparse.pruning import criteria
from jaxsparse.core import masks as masks_lib
from jaxsparse.methods import static
from jaxsparse.core import distributions as dist


# ------------------------------------------------------------------ a tiny two-layer MLP


def tiny_params(seed=0):
  r = np.random.default_rng(seed)
  return {"fc1": {"kernel": jnp.asarray(r.normal(size=(3, 4)), jnp.float32),
                  "bias": jnp.asarray(r.normal(size=4) * 0.1, jnp.float32)},
          "fc2": {"kernel": jnp.asarray(r.normal(size=(4, 2)), jnp.float32),
                  "bias": jnp.asarray(r.normal(size=2) * 0.1, jnp.float32)}}


def tiny_batch(n=5, seed=1):
  r = np.random.default_rng(seed)
  return jnp.asarray(r.normal(size=(n, 3)), jnp.float32), jnp.asarray(r.integers(0, 2, n), jnp.int32)


def apply(params, x):
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]


def loss(params, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


def np_grad(p, x, y):
  """Hand-written backprop of the mean softmax cross-entropy (float64)."""
  w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in
                    (p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"]))
  x = np.asarray(x, np.float64)
  pre = x @ w1 + b1
  h = np.maximum(pre, 0)
  out = h @ w2 + b2
  e = np.exp(out - out.max(1, keepdims=True))
  prob = e / e.sum(1, keepdims=True)
  d_out = (prob - np.eye(2)[np.asarray(y)]) / len(x)
  d_pre = (d_out @ w2.T) * (pre > 0)
  return {"fc1": {"kernel": x.T @ d_pre, "bias": d_pre.sum(0)},
          "fc2": {"kernel": h.T @ d_out, "bias": d_out.sum(0)}}


def tmap(f, *trees):
  return jax.tree.map(f, *trees)


def assert_tree_close(a, b, rtol=1e-4, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol,
                               atol=atol)


# ------------------------------------------------------------------ scores vs references


def test_snip_equals_hand_computed():
  p, (x, y) = tiny_params(), tiny_batch()
  ref = tmap(lambda w, g: np.abs(np.asarray(w, np.float64) * g), p, np_grad(p, x, y))
  assert_tree_close(criteria.snip_scores(p, loss, (x, y)), ref)


def test_grasp_equals_hand_computed_hessian_gradient_product():
  """S = -theta * Hg with Hg from central differences of the hand-written gradient."""
  p, (x, y) = tiny_params(), tiny_batch()
  g = np_grad(p, x, y)
  eps = 1e-5
  plus = np_grad(tmap(lambda w, d: np.asarray(w, np.float64) + eps * d, p, g), x, y)
  minus = np_grad(tmap(lambda w, d: np.asarray(w, np.float64) - eps * d, p, g), x, y)
  hg = tmap(lambda a, b: (a - b) / (2 * eps), plus, minus)
  ref = tmap(lambda w, h: -np.asarray(w, np.float64) * h, p, hg)
  s = criteria.grasp_scores(p, loss, (x, y))
  assert_tree_close(s, ref, rtol=1e-3, atol=1e-6)
  # The paper removes the highest S: a mask at sparsity s drops exactly the top-S weights.
  m = criteria.grasp_masks(p, loss, (x, y), 0.5, scope="global")
  kernels = np.concatenate([np.asarray(s["fc1"]["kernel"]).ravel(), np.asarray(s["fc2"]["kernel"]).ravel()])
  kept = np.concatenate([np.asarray(m["fc1"]["kernel"]).ravel(), np.asarray(m["fc2"]["kernel"]).ravel()])
  assert kept.sum() == 10
  assert kernels[kept].max() < kernels[~kept].min()


def test_empirical_fisher_and_obd_equal_hand_computed():
  p, (x, y) = tiny_params(), tiny_batch()
  per = [np_grad(p, x[i:i + 1], y[i:i + 1]) for i in range(len(x))]
  fisher = tmap(lambda *gs: np.mean(np.square(np.stack(gs)), 0), *per)
  assert_tree_close(criteria.empirical_fisher_diag(p, loss, (x, y)), fisher)
  obd = tmap(lambda w, f: 0.5 * np.asarray(w, np.float64) ** 2 * f, p, fisher)
  assert_tree_close(criteria.obd_scores(p, loss, (x, y)), obd)


def test_hutchinson_is_exact_on_a_diagonal_hessian_and_unbiased_otherwise():
  a = jnp.asarray([1.0, 2.0, 3.0, 4.0])
  params = {"w": jnp.ones(4)}
  batch = jnp.zeros((2, 1))
  diag_loss = lambda p, b: 0.5 * jnp.sum(a * p["w"] ** 2) + 0 * jnp.sum(b)
  h = criteria.hutchinson_diag_hessian(params, diag_loss, batch, jax.random.key(0), num_samples=3)
  np.testing.assert_allclose(h["w"], a, rtol=1e-6)
  mat = jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)), jnp.float32)
  mat = mat @ mat.T
  full_loss = lambda p, b: 0.5 * p["w"] @ mat @ p["w"] + 0 * jnp.sum(b)
  h = criteria.hutchinson_diag_hessian(params, full_loss, batch, jax.random.key(1), num_samples=4000)
  off = np.abs(np.asarray(mat)).sum(1) - np.abs(np.diag(mat))
  assert np.all(np.abs(np.asarray(h["w"]) - np.diag(mat)) < 0.1 * off + 1e-3)
  obd = criteria.obd_scores(params, diag_loss, batch, curvature="hutchinson", key=jax.random.key(2),
                            num_samples=2)
  np.testing.assert_allclose(obd["w"], 0.5 * a, rtol=1e-6)


def test_synflow_scores_equal_hand_computed():
  p = tiny_params()
  w1, b1, w2, b2 = (np.abs(np.asarray(v, np.float64)) for v in
                    (p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"]))
  h = np.ones(3) @ w1 + b1                     # the all-ones input through |W1|, |b1|
  back = w2.sum(1)                             # dR/dh
  ref = {"fc1": {"kernel": w1 * np.outer(np.ones(3), back), "bias": b1 * back},
         "fc2": {"kernel": w2 * np.outer(h, np.ones(2)), "bias": b2}}
  assert_tree_close(criteria.synflow_scores(p, apply, (3,)), ref, rtol=1e-5)


def test_synflow_masks_reach_exact_sparsity_and_one_iteration_is_one_shot():
  p = tiny_params()
  one = criteria.synflow_masks(p, apply, (3,), 0.5, iterations=1)
  direct = criteria.score_masks(criteria.synflow_scores(p, apply, (3,)), 0.5)
  assert_tree_close(one, direct)
  many = criteria.synflow_masks(p, apply, (3,), 0.75, iterations=10)
  pruned = masks_lib.apply_masks(p, many)
  assert masks_lib.sparsity(pruned, many) == pytest.approx(0.75, abs=1 / 20)
  assert masks_lib.sparsity(pruned, many) == 1 - 5 / 20


def test_score_pruning_transform_matches_the_pure_masks():
  p, batch = tiny_params(), tiny_batch()
  tx = criteria.score_pruning(optax.sgd(0.0), 0.5, criteria.batch_score_fn("snip", loss, batch),
                              prune_steps=(0,), scope="global")
  state = tx.init(p)
  _, state = jax.jit(tx.update)(jax.grad(loss)(p, batch), state, p)
  expected = criteria.snip_masks(p, loss, batch, 0.5, scope="global")
  got = state.masks
  assert_tree_close(got, expected)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_magnitude_is_one_criterion_of_the_one_engine(scope):
  # magnitude_masks is score_masks of magnitude_scores; magnitude_pruning and
  # score_pruning(batch_score_fn("magnitude")) build the same masks at the same step.
  from jaxsparse.pruning import magnitude
  assert criteria.score_masks is magnitude.score_masks
  p = tiny_params(3)
  p["fc1"]["kernel"] = p["fc1"]["kernel"].at[0, :2].set(0.5).at[1, :2].set(-0.5)  # ties
  expected = criteria.score_masks(criteria.magnitude_scores(p), 0.6, scope=scope)
  assert_tree_close(magnitude.magnitude_masks(p, 0.6, scope=scope), expected)
  g = jax.tree.map(jnp.ones_like, p)
  for tx in (magnitude.magnitude_pruning(optax.sgd(0.0), 0.6, prune_step=1, scope=scope),
             criteria.score_pruning(optax.sgd(0.0), 0.6, criteria.batch_score_fn("magnitude"),
                                    prune_steps=(1,), scope=scope)):
    state = tx.init(p)
    for _ in range(2):
      _, state = jax.jit(tx.update)(g, state, p)
    assert_tree_close(state.masks, expected)


# ------------------------------------------------------------------ global vs local vs numpy


TREES = [[(4, 6), (8, 3), (2, 3, 4)], [(5, 5)]]


@settings(max_examples=8, deadline=None)
@given(st.sampled_from(TREES), st.sampled_from([0.3, 0.9]), st.integers(0, 2**31 - 1),
       st.sampled_from(["local", "global"]))
def test_global_and_local_selection_agree_with_numpy(shapes, sparsity, seed, scope):
  r = np.random.default_rng(seed)
  scores = {f"l{i}": {"kernel": jnp.asarray(r.normal(size=s), jnp.float32),
                      "bias": jnp.asarray(r.normal(size=s[-1]), jnp.float32)}
            for i, s in enumerate(shapes)}
  got = criteria.score_masks(scores, sparsity, scope=scope)
  names = [f"l{i}" for i in range(len(shapes))]
  flat = [np.asarray(scores[n]["kernel"]).ravel() for n in names]
  if scope == "global":
    allv = np.concatenate(flat)
    k = int(round((1 - sparsity) * allv.size))
    keep = np.zeros(allv.size, bool)
    keep[np.argsort(-allv, kind="stable")[:k]] = True
    ref = np.split(keep, np.cumsum([f.size for f in flat])[:-1])
  else:
    counts = dist.kept_counts(scores, sparsity)
    ref = []
    for n, f in zip(names, flat):
      keep = np.zeros(f.size, bool)
      keep[np.argsort(-f, kind="stable")[:counts[f"{n}/kernel"]]] = True
      ref.append(keep)
  for n, keep in zip(names, ref):
    np.testing.assert_array_equal(np.asarray(got[n]["kernel"]).ravel(), keep)
    assert jnp.ndim(got[n]["bias"]) == 0  # biases stay dense


# ------------------------------------------------------------------ prune at init, then train


def test_snip_at_90_percent_on_digits_trains_to_90_percent():
  ds = data.load_dataset("digits", seed=0)
  xtr, ytr = ds.x_train.reshape(len(ds.x_train), -1), ds.y_train
  xte, yte = ds.x_test.reshape(len(ds.x_test), -1), ds.y_test
  key = jax.random.key(0)
  sizes = (64, 300, 100, 10)
  params = {f"fc{i + 1}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (a, b))
                           * np.sqrt(2.0 / a), "bias": jnp.zeros(b)}
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}

  def mlp(p, x):
    for i in range(1, 4):
      x = x @ p[f"fc{i}"]["kernel"] + p[f"fc{i}"]["bias"]
      x = jax.nn.relu(x) if i < 3 else x
    return x

  def mlp_loss(p, batch):
    return optax.softmax_cross_entropy_with_integer_labels(mlp(p, batch[0]), batch[1]).mean()

  masks = criteria.snip_masks(params, mlp_loss, (xtr[:100], ytr[:100]), 0.9)
  assert masks_lib.sparsity(masks_lib.apply_masks(params, masks), masks) == pytest.approx(0.9, abs=1e-4)
  tx = static.keep_masks(optax.adam(3e-3), masks)
  params = masks_lib.apply_masks(params, masks)
  state = tx.init(params)

  @jax.jit
  def epoch(params, state, key):
    xs, ys = data.epoch_batches(xtr, ytr, 64, key)

    def step(carry, b):
      p, s = carry
      u, s = tx.update(jax.grad(mlp_loss)(p, b), s, p)
      return (optax.apply_updates(p, u), s), None

    return jax.lax.scan(step, (params, state), (xs, ys))[0]

  for e in range(12):
    params, state = epoch(params, state, jax.random.fold_in(key, e))
  acc = float(jnp.mean(jnp.argmax(mlp(params, xte), -1) == yte))
  assert masks_lib.sparsity(params, masks) == pytest.approx(0.9, abs=1e-4)
  assert all(bool(jnp.all(jnp.where(m, True, w == 0))) for w, m in
             zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
  assert acc >= 0.90, acc


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("fn", [criteria.snip_scores, criteria.grasp_scores,
                                criteria.empirical_fisher_diag, criteria.obd_scores])
def test_data_scores_refuse_a_missing_batch(fn):
  with pytest.raises(ValueError, match="batch"):
    fn(tiny_params(), loss, None)


def test_batch_score_fn_refuses_a_missing_batch_and_unknown_criteria():
  with pytest.raises(ValueError, match="batch"):
    criteria.batch_score_fn("grasp", loss, None)
  with pytest.raises(ValueError, match="criterion"):
    criteria.batch_score_fn("nope", loss, tiny_batch())


def test_non_scalar_loss_is_refused():
  per_example = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(apply(p, b[0]), b[1])
  for fn in (criteria.snip_scores, criteria.grasp_scores, criteria.empirical_fisher_diag):
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
      fn(tiny_params(), per_example, tiny_batch())


def test_other_bad_arguments_are_named():
  p, b = tiny_params(), tiny_batch()
  with pytest.raises(ValueError, match="scope"):
    criteria.score_masks(p, 0.5, scope="layer")
  with pytest.raises(ValueError, match="sparsity"):
    criteria.snip_masks(p, loss, b, 1.0)
  with pytest.raises(ValueError, match="curvature"):
    criteria.obd_scores(p, loss, b, curvature="kfac")
  with pytest.raises(ValueError, match="key"):
    criteria.obd_scores(p, loss, b, curvature="hutchinson")
  with pytest.raises(ValueError, match="iterations"):
    criteria.synflow_masks(p, apply, (3,), 0.5, iterations=0)


def test_data_criteria_compile_once_per_loss_and_shapes():
  """A second call with the same loss_fn and shapes reuses the compiled criterion (each call
  used to jit a fresh closure and compile again); new values give new scores."""
  p, b = tiny_params(), tiny_batch()
  fns = ((criteria.snip_scores, criteria._snip), (criteria.grasp_scores, criteria._grasp),
         (criteria.per_example_grads, criteria._per_example_grads))
  for public, jitted in fns:
    first = public(p, loss, b)
    size = jitted._cache_size()
    again = public(tiny_params(seed=3), loss, b)
    assert jitted._cache_size() == size, public.__name__
    assert not all(bool(jnp.array_equal(x, y)) for x, y in
                   zip(jax.tree.leaves(first), jax.tree.leaves(again))), public.__name__
