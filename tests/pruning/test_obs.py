"""OBS: the selected weight and the compensating update against a direct inverse of the small Hessian."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxsparse.pruning import criteria, obs
from jaxsparse.core import masks as masks_lib


def tiny():
  r = np.random.default_rng(0)
  params = {"fc1": {"kernel": jnp.asarray(r.normal(size=(3, 2)), jnp.float32),
                    "bias": jnp.zeros(2)},
            "fc2": {"kernel": jnp.asarray(r.normal(size=(2, 2)), jnp.float32),
                    "bias": jnp.zeros(2)}}
  batch = (jnp.asarray(r.normal(size=(4, 3)), jnp.float32), jnp.asarray([0, 1, 1, 0], jnp.int32))
  return params, batch


def loss(params, batch):
  x, y = batch
  h = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
  logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def direct_fisher(params, batch, leaf, damping):
  g = criteria.per_example_grads(params, loss, batch)[leaf]["kernel"]
  g = np.asarray(g, np.float64).reshape(g.shape[0], -1)
  return g.T @ g / g.shape[0] + damping * np.eye(g.shape[1])


def test_woodbury_inverse_equals_direct_inverse():
  g = np.random.default_rng(1).normal(size=(3, 7))
  f = g.T @ g / 3 + 0.1 * np.eye(7)
  np.testing.assert_allclose(obs.damped_fisher_inverse(jnp.asarray(g, jnp.float32), 0.1),
                             np.linalg.inv(f), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damping", [1e-2, 1.0])
def test_one_weight_obs_matches_hassibi_with_a_direct_inverse(damping):
  """Pruning one of fc1's 6 weights: argmin w_q^2 / [H^-1]_qq and delta = -w_q/[H^-1]_qq H^-1 e_q."""
  params, batch = tiny()
  hinv = np.linalg.inv(direct_fisher(params, batch, "fc1", damping))
  w = np.asarray(params["fc1"]["kernel"], np.float64).ravel()
  sal = 0.5 * w ** 2 / np.diag(hinv)
  q = int(np.argmin(sal))
  delta = -w[q] / hinv[q, q] * hinv[:, q]
  out = obs.obs_prune(params, loss, batch, 1 / 6, damping=damping, scope="local",
                      filter=lambda n, l: n == "fc1/kernel")
  mask = np.asarray(out.masks["fc1"]["kernel"]).ravel()
  assert np.flatnonzero(~mask).tolist() == [q]
  np.testing.assert_allclose(np.asarray(out.scores["fc1"]["kernel"]).ravel(), sal, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(out.params["fc1"]["kernel"]).ravel(), w + delta,
                             rtol=1e-3, atol=1e-5)
  assert out.params["fc1"]["kernel"].ravel()[q] == 0.0
  # Untouched leaves stay exactly as they were.
  np.testing.assert_array_equal(out.params["fc2"]["kernel"], params["fc2"]["kernel"])


def test_multi_weight_update_solves_the_constrained_quadratic():
  """Removing Q at once: min 1/2 d^T H d s.t. d_Q = -w_Q, solved directly on H (not H^-1)."""
  params, batch = tiny()
  h = direct_fisher(params, batch, "fc1", 0.1)
  out = obs.obs_prune(params, loss, batch, 0.5, damping=0.1, scope="local",
                      filter=lambda n, l: n == "fc1/kernel")
  w = np.asarray(params["fc1"]["kernel"], np.float64).ravel()
  keep = np.asarray(out.masks["fc1"]["kernel"]).ravel()
  d = np.zeros(6)
  d[~keep] = -w[~keep]
  d[keep] = np.linalg.solve(h[np.ix_(keep, keep)], -h[np.ix_(keep, ~keep)] @ d[~keep])
  np.testing.assert_allclose(np.asarray(out.params["fc1"]["kernel"]).ravel(), w + d,
                             rtol=1e-3, atol=1e-5)
  assert masks_lib.sparsity(out.params, out.masks) == 0.5


def test_block_diagonal_obs_equals_obs_on_each_block_of_the_direct_hessian():
  """block_size=3 on fc1's 6 weights: the Hessian is block-diagonal (two 3x3 blocks of F)."""
  params, batch = tiny()
  f = direct_fisher(params, batch, "fc1", 0.1)
  h = np.zeros_like(f)
  for blk in (slice(0, 3), slice(3, 6)):
    h[blk, blk] = f[blk, blk]
  hinv = np.linalg.inv(h)
  w = np.asarray(params["fc1"]["kernel"], np.float64).ravel()
  out = obs.obs_prune(params, loss, batch, 0.5, damping=0.1, block_size=3, scope="local",
                      filter=lambda n, l: n == "fc1/kernel")
  sal = 0.5 * w ** 2 / np.diag(hinv)
  np.testing.assert_allclose(np.asarray(out.scores["fc1"]["kernel"]).ravel(), sal, rtol=1e-3)
  keep = np.asarray(out.masks["fc1"]["kernel"]).ravel()
  assert sorted(np.flatnonzero(~keep)) == sorted(np.argsort(sal)[:3])
  d = np.zeros(6)
  d[~keep] = -w[~keep]
  d[keep] = np.linalg.solve(h[np.ix_(keep, keep)], -h[np.ix_(keep, ~keep)] @ d[~keep])
  np.testing.assert_allclose(np.asarray(out.params["fc1"]["kernel"]).ravel(), w + d,
                             rtol=1e-3, atol=1e-5)


def test_size_guard_refuses_a_large_layer_and_says_what_to_use():
  params, batch = tiny()
  with pytest.raises(ValueError, match=r"fc1/kernel.*max_size=4.*block_size.*obd_scores"):
    obs.obs_prune(params, loss, batch, 0.5, max_size=4)
  with pytest.raises(ValueError, match="block_size=8"):
    obs.obs_prune(params, loss, batch, 0.5, block_size=8, max_size=4)
  with pytest.raises(ValueError, match="damping"):
    obs.obs_prune(params, loss, batch, 0.5, damping=0.0)
  with pytest.raises(ValueError, match="batch"):
    obs.obs_prune(params, loss, None, 0.5)
