"""DropConnect and targeted dropout (Gomez et al. 2019): exact candidate counts, the drop rate
within binomial error over many draws in one jitted call, only candidates dropped, identities
and errors."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.regularizers import dropout

DRAWS = 400


def _params():
  rng = np.random.default_rng(0)  # distinct magnitudes: no ties
  n = lambda *s: rng.standard_normal(s).astype(np.float32)
  return {"fc": {"kernel": n(10, 6), "bias": n(6)}, "conv": {"kernel": n(3, 3, 4, 5)},
          "out": {"kernel": n(6, 2)}}


def _within_binomial(drops, trials, p):
  # 5 standard deviations of a Binomial(trials, p) count: fails by chance with prob < 1e-6.
  assert abs(drops - trials * p) <= 5 * math.sqrt(trials * p * (1 - p)), (drops, trials, p)


def test_targeting_masks_pick_exactly_the_gamma_fraction_of_smallest():
  params = _params()
  weight, unit, kept = jax.jit(lambda p: (
      dropout.targeting_masks(p, 0.3), dropout.targeting_masks(p, 0.5, granularity="unit"),
      dropout.targeting_masks(p, 0.3, keep_dense=["conv"], filter=lambda n, leaf: True)))(params)
  assert weight["fc"]["bias"].ndim == 0 and not weight["fc"]["bias"]
  for name, fan_in in (("fc", 10), ("conv", 36), ("out", 6)):
    w = params[name]["kernel"].reshape(fan_in, -1)
    m = np.asarray(weight[name]["kernel"]).reshape(fan_in, -1)
    k = math.floor(0.3 * fan_in)                        # per column: 3, 10, 1
    np.testing.assert_array_equal(m.sum(0), k)
    want = np.zeros_like(m)
    np.put_along_axis(want, np.argsort(np.abs(w), axis=0)[:k], True, axis=0)
    np.testing.assert_array_equal(m, want)
    mu = np.asarray(unit[name]["kernel"]).reshape(fan_in, -1)
    cols = np.argsort(np.linalg.norm(w, axis=0))[:math.floor(0.5 * w.shape[1])]  # 3, 2, 1
    np.testing.assert_array_equal(mu, np.broadcast_to(np.isin(np.arange(w.shape[1]), cols),
                                                      mu.shape))
  assert kept["conv"]["kernel"].ndim == 0 and kept["fc"]["bias"].sum() == 1   # floor(0.3 * 6)


def test_targeted_dropout_drops_only_candidates_at_rate_alpha():
  params, alpha = _params(), 0.3
  keys = jax.random.split(jax.random.key(0), DRAWS)
  draw = jax.jit(lambda keys: (
      jax.vmap(lambda k: dropout.targeted_dropout(params, k, 0.5, alpha))(keys),
      jax.vmap(lambda k: dropout.targeted_dropout(params, k, 0.5, alpha,
                                                  granularity="unit"))(keys),
      dropout.targeting_masks(params, 0.5), dropout.targeting_masks(params, 0.5,
                                                                    granularity="unit")))
  weight, unit, cand_w, cand_u = draw(keys)
  for out, cand, granularity in ((weight, cand_w, "weight"), (unit, cand_u, "unit")):
    np.testing.assert_array_equal(out["fc"]["bias"], np.broadcast_to(params["fc"]["bias"],
                                                                     (DRAWS, 6)))
    drops = trials = 0
    for name in ("fc", "conv", "out"):
      w, c = params[name]["kernel"], np.asarray(cand[name]["kernel"])
      dropped = np.asarray(out[name]["kernel"]) == 0
      assert not (dropped & ~c).any()                    # never a non-candidate
      np.testing.assert_array_equal(np.asarray(out[name]["kernel"])[~dropped],
                                    np.broadcast_to(w, dropped.shape)[~dropped])
      if granularity == "unit":                          # a unit goes as a whole column
        cols = dropped.reshape(DRAWS, -1, w.shape[-1])
        assert (cols.all(1) | ~cols.any(1)).all()
        dropped, c = cols[:, 0], c.reshape(-1, w.shape[-1])[0]
      drops += dropped.sum()
      trials += DRAWS * c.sum()
    _within_binomial(drops, trials, alpha)


def test_identities_and_gradients():
  params = _params()
  key = jax.random.key(1)
  assert dropout.targeted_dropout(params, key, 0.9, 0.0) is params
  assert dropout.drop_connect(params, key, 0.0) is params
  # A dropped weight gets no gradient at that step; the others get theirs.
  x = np.ones((1, 10), np.float32)

  def loss(kernel):
    p = dropout.targeted_dropout({"k": kernel}, key, 0.5, 1.0)
    return jnp.sum(x @ p["k"])

  same, g, cand = jax.jit(lambda p: (
      dropout.targeted_dropout(p, key, 0.0, 0.5), jax.grad(loss)(p["fc"]["kernel"]),
      dropout.targeting_masks({"k": p["fc"]["kernel"]}, 0.5)["k"]))(params)
  jax.tree.map(np.testing.assert_array_equal, same, params)        # gamma = 0: no candidate
  np.testing.assert_array_equal(g, np.where(cand, 0.0, 1.0))  # alpha = 1: all candidates go


def test_drop_connect_rate_and_rescaling():
  params, rate = _params(), 0.25
  keys = jax.random.split(jax.random.key(2), DRAWS)
  draw = jax.jit(jax.vmap(lambda k: (dropout.drop_connect(params, k, rate),
                                     dropout.drop_connect(params, k, rate, rescale=False))))
  inverted, plain = draw(keys)
  np.testing.assert_array_equal(inverted["fc"]["bias"][0], params["fc"]["bias"])
  drops = trials = 0
  for name in ("fc", "conv", "out"):
    w = np.broadcast_to(params[name]["kernel"], (DRAWS,) + params[name]["kernel"].shape)
    inv, pl = np.asarray(inverted[name]["kernel"]), np.asarray(plain[name]["kernel"])
    kept = pl != 0
    np.testing.assert_array_equal(inv != 0, kept)        # the same mask for the same key
    np.testing.assert_array_equal(pl[kept], w[kept])
    np.testing.assert_allclose(inv[kept], w[kept] / (1 - rate), rtol=1e-6)
    drops += (~kept).sum()
    trials += kept.size
  _within_binomial(drops, trials, rate)


def test_bad_arguments_are_named():
  params, key = _params(), jax.random.key(0)
  with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\], got 1.5"):
    dropout.targeted_dropout(params, key, 1.5, 0.5)
  with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\], got -0.1"):
    dropout.targeted_dropout(params, key, 0.5, -0.1)
  with pytest.raises(TypeError, match="alpha must be a number"):
    dropout.targeted_dropout(params, key, 0.5, "0.5")
  with pytest.raises(ValueError, match=r"rate must be in \[0, 1\), got 1.0"):
    dropout.drop_connect(params, key, 1.0)
  with pytest.raises(ValueError, match="granularity must be one of"):
    dropout.targeted_dropout(params, key, 0.5, 0.0, granularity="row")
  with pytest.raises(TypeError, match="key must be a jax.random key"):
    dropout.drop_connect(params, 0, 0.5)
  with pytest.raises(ValueError, match="keep_dense: 'fc9' matches no leaf"):
    dropout.targeted_dropout(params, key, 0.5, 0.5, keep_dense=["fc9"])
