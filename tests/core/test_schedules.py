"""Schedules against their papers' formulas."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxsparse.core import schedules


def test_polynomial_sparsity_is_zhu_gupta():
  s_i, s_f, t0, n, dt = 0.05, 0.9, 100, 10, 50
  sched = schedules.polynomial_sparsity(s_f, initial_sparsity=s_i, begin_step=t0, num_updates=n,
                                        update_period=dt)
  for t in [0, 99, 100, 150, 300, 599, 600, 1000]:
    frac = min(max((t - t0) / (n * dt), 0.0), 1.0)
    assert float(sched(t)) == pytest.approx(s_f + (s_i - s_f) * (1 - frac) ** 3, abs=1e-6)


def test_cosine_drop_fraction_is_rigl():
  f = schedules.cosine_drop_fraction(0.3, 1000)
  for t in [0, 250, 500, 999, 1000, 2000]:
    expected = 0.3 / 2 * (1 + math.cos(math.pi * min(t, 1000) / 1000))
    assert float(f(t)) == pytest.approx(expected, abs=1e-6)


def test_periodic_start_stop():
  on = schedules.periodic(10, 5, 40)
  steps = np.array([int(s) for s in range(60) if bool(on(jnp.int32(s)))])
  np.testing.assert_array_equal(steps, [5, 15, 25, 35])
  assert [s for s in range(12) if bool(schedules.at_steps(3, 7)(jnp.int32(s)))] == [3, 7]


@pytest.mark.parametrize("kwargs,name", [
    (dict(update_period=0), "update_period"), (dict(update_period=2.5), "update_period"),
    (dict(update_period=1, update_start=-1), "update_start"),
    (dict(update_period=1, update_start=5, update_stop=5), "update_stop"),
])
def test_period_errors_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    schedules.periodic(**kwargs)


def test_fraction_errors():
  with pytest.raises(ValueError, match="alpha"):
    schedules.cosine_drop_fraction(1.5, 10)
  with pytest.raises(ValueError, match="end_step"):
    schedules.cosine_drop_fraction(0.3, 0)
