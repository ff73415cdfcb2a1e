"""Knowledge distillation (Hinton et al. 2015): against a numpy reference from the paper."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.regularizers import distillation


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference(s, t, y, temperature, alpha):
  """Sec. 2 written out in float64: T^2 * sum_i q_i log(q_i / p_i) with q, p the teacher's
  and student's softmax at T, plus the hard-label cross-entropy -log softmax(s)_y."""
  q, p = _softmax(t / temperature), _softmax(s / temperature)
  soft = temperature ** 2 * np.sum(q * (np.log(q) - np.log(p)), -1)
  hard = -np.log(_softmax(s)[np.arange(len(y)), y])
  return alpha * soft + (1 - alpha) * hard


def _case(seed=0, n=6, k=5):
  rng = np.random.default_rng(seed)
  return (rng.normal(0, 2, (n, k)), rng.normal(0, 2, (n, k)), rng.integers(0, k, n))


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.0), (1.0, 1.0), (2.0, 0.5), (4.0, 0.9),
                                               (20.0, 0.3)])
def test_matches_the_numpy_reference(temperature, alpha):
  s, t, y = _case()
  got = js.distillation_loss(jnp.float32(s), jnp.float32(t), jnp.asarray(y),
                             temperature=temperature, alpha=alpha)
  assert got.shape == (6,)
  np.testing.assert_allclose(got, reference(s, t, y, temperature, alpha), rtol=2e-5, atol=2e-5)


def test_t1_alpha0_is_plain_cross_entropy_and_agreeing_teacher_adds_nothing():
  s, t, y = _case(1)
  s32 = jnp.float32(s)
  ce = optax.softmax_cross_entropy_with_integer_labels(s32, jnp.asarray(y))
  got = distillation.distillation_loss(s32, jnp.float32(t), jnp.asarray(y), temperature=1.0,
                                       alpha=0.0)
  np.testing.assert_array_equal(got, ce)
  # The KL form: a teacher with the student's logits leaves only (1 - alpha) * CE.
  got = js.distillation_loss(s32, s32, jnp.asarray(y), temperature=3.0, alpha=0.25)
  np.testing.assert_allclose(got, 0.75 * ce, rtol=1e-6, atol=1e-6)


def test_soft_gradient_is_p_minus_q_over_t_times_t_squared():
  """Eq. 2: d/ds of KL(q || p) is (p - q) / T, p = softmax(s/T), q = softmax(t/T); the T^2
  factor makes it T * (p - q), and at high T, for zero-mean logits, (s - t) / N (Eq. 4)."""
  s = np.array([[1.0, 2.0, 3.0]])
  t = np.array([[3.0, 1.0, 0.0]])
  y = np.array([0])
  for temperature in (1.0, 2.0, 5.0):
    grad = jax.grad(lambda z: js.distillation_loss(
        z, jnp.asarray(t), jnp.asarray(y), temperature=temperature, alpha=1.0).sum())(
            jnp.asarray(s))
    p, q = _softmax(s / temperature), _softmax(t / temperature)
    np.testing.assert_allclose(grad / temperature ** 2, (p - q) / temperature, rtol=1e-5,
                               atol=1e-7)
  # Eq. 4 limit: zero-mean logits, T large: T^2 * (p - q) / T -> (s - t) / N.
  sc, tc = s - s.mean(), t - t.mean()
  grad = jax.grad(lambda z: js.distillation_loss(
      z, jnp.asarray(tc), jnp.asarray(y), temperature=1000.0, alpha=1.0).sum())(jnp.asarray(sc))
  np.testing.assert_allclose(grad, (sc - tc) / 3, rtol=1e-2)
  # No gradient reaches the teacher.
  g_t = jax.grad(lambda z: js.distillation_loss(
      jnp.asarray(s), z, jnp.asarray(y), temperature=2.0, alpha=1.0).sum())(jnp.asarray(t))
  np.testing.assert_array_equal(g_t, 0.0)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temperature=0.0, alpha=0.5), ValueError, "temperature must be > 0"),
    (dict(temperature=-1.0, alpha=0.5), ValueError, "temperature must be > 0"),
    (dict(temperature=float("nan"), alpha=0.5), ValueError, "temperature must be > 0"),
    (dict(temperature="4", alpha=0.5), TypeError, "temperature must be a real number"),
    (dict(temperature=2.0, alpha=-0.1), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(temperature=2.0, alpha=1.5), ValueError, r"alpha must be in \[0, 1\]"),
    (dict(temperature=2.0, alpha=True), TypeError, "alpha must be a real number"),
])
def test_bad_temperature_or_alpha_is_an_error_naming_it(kwargs, error, match):
  s, t, y = _case()
  with pytest.raises(error, match=match):
    js.distillation_loss(s, t, y, **kwargs)
  with pytest.raises(error, match=match):   # the same checks alone, before any training
    distillation.check_hyperparameters(**kwargs)


def test_bad_shapes_are_errors_naming_the_argument():
  s, t, y = _case()
  with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
    js.distillation_loss(s, t[:, :3], y, temperature=2.0, alpha=0.5)
  with pytest.raises(ValueError, match="labels must have shape"):
    js.distillation_loss(s, t, y[:3], temperature=2.0, alpha=0.5)
