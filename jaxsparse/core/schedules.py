"""Schedules: target sparsity over time, when masks update, and drop fractions.

All are plain functions of the (traced) optimizer step, built on optax
schedules where one fits, so they run inside the jitted step.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from jaxsparse.core.distributions import INJECT_HINT, check_sparsity

Schedule = Callable[[jax.Array], jax.Array]
ScalarOrSchedule = Union[float, Schedule]


def as_schedule(value: ScalarOrSchedule) -> Schedule:
  """A float becomes ``optax.constant_schedule``; a callable is returned as is."""
  return value if callable(value) else optax.constant_schedule(value)


def polynomial_sparsity(final_sparsity: float, *, initial_sparsity: float = 0.0,
                        begin_step: int = 0, num_updates: int = 10, update_period: int = 100,
                        power: float = 3.0) -> Schedule:
  """Zhu & Gupta (2017), eq. 1: gradual sparsity.

  ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3`` for
  ``t0 <= t <= t0 + n * dt``; ``s_i`` before ``t0`` and ``s_f`` after.
  """
  s_f = check_sparsity(final_sparsity, "final_sparsity")
  s_i = check_sparsity(initial_sparsity, "initial_sparsity")
  if num_updates <= 0:
    raise ValueError(f"num_updates must be > 0, got {num_updates}")
  if update_period <= 0:
    raise ValueError(f"update_period must be > 0, got {update_period}")
  if begin_step < 0:
    raise ValueError(f"begin_step must be >= 0, got {begin_step}")
  return optax.polynomial_schedule(init_value=s_i, end_value=s_f, power=power,
                                   transition_steps=num_updates * update_period,
                                   transition_begin=begin_step)


def cosine_drop_fraction(alpha: float = 0.3, end_step: int = 1) -> Schedule:
  """RigL (Evci et al. 2020, eq. 1): ``f(t) = alpha / 2 * (1 + cos(pi * t / T_end))``."""
  check_fraction(alpha, "alpha")
  if end_step <= 0:
    raise ValueError(f"end_step must be > 0, got {end_step}")
  return optax.cosine_decay_schedule(init_value=alpha, decay_steps=end_step)


def check_fraction(value: float, argname: str) -> None:
  """Raises ValueError unless ``value`` is a float in [0, 1] (or a schedule); TypeError for a
  jax array, which comes from wrapping a method in ``optax.inject_hyperparams``."""
  if callable(value):
    return
  if isinstance(value, jax.Array):
    raise TypeError(f"{argname}: got a jax array ({value!r}); {INJECT_HINT}")
  if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
    raise ValueError(f"{argname} must be in [0, 1], got {value!r}")


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_period(update_period: int, update_start: int | None = 0, update_stop: int | None = None
                 ) -> int:
  """Raises ValueError naming the bad argument of a mask-update period; returns the first
  update step (``update_start``, or ``update_period`` when ``update_start`` is None)."""
  for name, v in (("update_period", update_period), ("update_start", update_start),
                  ("update_stop", update_stop)):
    if isinstance(v, jax.Array):
      raise TypeError(f"{name}: got a jax array ({v!r}); {INJECT_HINT}")
  if not _is_int(update_period) or update_period <= 0:
    raise ValueError(f"update_period must be an int > 0, got {update_period!r}")
  if update_start is None:
    start, first = update_period, f"the first update step, update_period={update_period} (update_start defaults to update_period)"
  else:
    if not _is_int(update_start) or update_start < 0:
      raise ValueError(f"update_start must be an int >= 0, got {update_start!r}")
    start, first = update_start, f"update_start={update_start}"
  if update_stop is not None and (not _is_int(update_stop) or update_stop <= start):
    raise ValueError(f"update_stop must be None or an int > {first}, got {update_stop!r}: "
                     "no mask update would run")
  return int(start)


def periodic(update_period: int, update_start: int | None = 0, update_stop: int | None = None
             ) -> Callable[[jax.Array], jax.Array]:
  """``step -> bool``: True at ``start, start + period, ...`` while ``step < stop``
  (``update_start=None``: the first update is one period in)."""
  update_start = check_period(update_period, update_start, update_stop)

  def is_update_step(step: jax.Array) -> jax.Array:
    since = jnp.asarray(step) - update_start
    # lax.rem, not %: equal where it counts (since >= 0), without jnp's sign fix-ups (~17 ops
    # in a GPU program, at every step)
    on = (since >= 0) & (lax.rem(since, jnp.asarray(update_period, since.dtype)) == 0)
    if update_stop is not None:
      on &= step < update_stop
    return on

  return is_update_step


def at_steps(*steps: int) -> Callable[[jax.Array], jax.Array]:
  """``step -> bool``: True exactly at the given steps (one-shot pruning)."""
  for s in steps:
    if not isinstance(s, int) or s < 0:
      raise ValueError(f"prune step must be an int >= 0, got {s!r}")
  arr = tuple(steps)
  return lambda step: jnp.any(jnp.asarray(arr) == step)


def doubling_periodic(update_period: int, doubling_steps: tuple[int, ...] = (),
                      update_start: int | None = 0, update_stop: int | None = None
                      ) -> Callable[[jax.Array], jax.Array]:
  """``step -> bool``: every ``update_period`` steps from ``update_start``, the period
  doubling at each of ``doubling_steps``, while ``step < update_stop``.

  DSR (Mostafa & Wang 2019): period 100 iterations, doubled at epochs 25, 50
  and 75 of 100, stopping at epoch 90. After the ``i``-th doubling step ``b_i``
  the updates fall on ``b_i, b_i + 2^i * period, ...``.
  """
  update_start = check_period(update_period, update_start, update_stop)
  steps = tuple(doubling_steps)
  if any(not isinstance(b, int) or b <= update_start for b in steps) or list(steps) != sorted(set(steps)):
    raise ValueError(f"doubling_steps must be increasing ints > update_start={update_start}, "
                     f"got {doubling_steps!r}")
  bounds = jnp.asarray((update_start, *steps), jnp.int32)

  def is_update_step(step: jax.Array) -> jax.Array:
    i = jnp.searchsorted(bounds, step, side="right") - 1  # last boundary <= step
    i = jnp.clip(i, 0, len(steps))
    period = update_period * (2 ** i)
    on = (step >= update_start) & ((step - bounds[i]) % period == 0)
    if update_stop is not None:
      on &= step < update_stop
    return on

  return is_update_step
