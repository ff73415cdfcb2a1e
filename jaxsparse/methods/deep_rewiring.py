"""DeepR, deep rewiring (Bellec et al. 2018, ICLR, alg. 1).

Each connection ``k`` has a fixed random sign ``s_k`` and a parameter
``theta_k``; it is active iff ``theta_k > 0`` and then ``w_k = s_k * theta_k``.
Every step, for active ``k``:

    theta_k <- theta_k - eta * dE/dtheta_k - eta * alpha + sqrt(2 * eta * T) * nu_k

A connection whose ``theta`` crosses to ``<= 0`` goes dormant, and as many
dormant connections are reactivated uniformly at random, so each layer's
active count is constant.

In weight space (``w = s * theta``, ``dE/dtheta = s * dE/dw``) the step is plain
SGD on ``w`` with the L1 subgradient ``alpha * sign(w)`` and Gaussian noise of
standard deviation ``sqrt(2 * eta * T)``; the sign constraint is the only
DeepR-specific part. So DeepR is a chain a user writes from reusable pieces::

    inner = optax.chain(
        jaxsparse.regularizers.penalties.add_l1(alpha),           # the -eta * alpha term
        optax.sgd(eta),                                  # -eta * dE/dw
        jaxsparse.add_langevin_noise(temperature, eta),  # + sqrt(2 eta T) nu
    )
    tx = jaxsparse.deep_r(inner, sparsity=0.9)           # signs, dormancy, rewiring

(:func:`deep_r_optimizer` builds exactly this chain.) :func:`deep_r` looks at
the weights the inner step would produce, ``w + u``: an active weight with
``s * (w + u) <= 0`` goes dormant (exactly zero) instead, and as many dormant
connections (the just-dormant ones included, as in the official script) are
reactivated at random. Reactivated connections start at ``theta = 0`` (the
official script uses ``1e-12``, far below any step) with zeroed optimizer
state, and on their first step the L1 term is 0 there (``sign(0) = 0``).
Hence no weight ever has a sign that disagrees with its fixed sign.

Defaults of the official script: eta 0.5, batch 10, alpha 1e-5, noise
coefficient 1e-5 (``T = eta * coef^2 / 2``). The DSR paper's DeepR baseline:
eta 0.01, alpha 1e-5, ``T`` annealed 1e-5 -> 1e-8 -> 1e-12 -> 1e-15.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxsparse.core import registry, schedules, selection as topk, transform as core
from jaxsparse.regularizers import penalties
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.methods.static import random_masks


class LangevinNoiseState(NamedTuple):
  count: jax.Array
  key: jax.Array


def add_langevin_noise(temperature: schedules.ScalarOrSchedule,
                       learning_rate: schedules.ScalarOrSchedule, seed: int = 0
                       ) -> optax.GradientTransformation:
  """Adds ``sqrt(2 * eta_t * T_t) * nu``, ``nu ~ N(0, 1)``, to the updates.

  The Langevin term of DeepR (Bellec et al. 2018, eq. 2 / alg. 1). Place it
  after the optimizer whose learning rate is ``eta`` (it is added to the step,
  not to the gradient). ``temperature`` and ``learning_rate`` are floats or
  optax schedules of the step.
  """
  if not callable(temperature) and (not isinstance(temperature, (int, float)) or temperature < 0):
    raise ValueError(f"temperature must be >= 0 (or a schedule), got {temperature!r}")
  if not callable(learning_rate) and (not isinstance(learning_rate, (int, float))
                                      or learning_rate < 0):
    raise ValueError(f"learning_rate must be >= 0 (or a schedule), got {learning_rate!r}")
  t_at, lr_at = schedules.as_schedule(temperature), schedules.as_schedule(learning_rate)

  def init_fn(params):
    del params
    return LangevinNoiseState(jnp.zeros([], jnp.int32), jax.random.key(seed))

  def update_fn(updates, state, params=None):
    del params
    t = state.count
    scale = jnp.sqrt(2.0 * jnp.maximum(lr_at(t), 0.0) * jnp.maximum(t_at(t), 0.0))
    key = jax.random.fold_in(state.key, t)
    leaves, treedef = jax.tree.flatten(updates)
    noisy = [u + (scale * jax.random.normal(jax.random.fold_in(key, i), jnp.shape(u))).astype(u.dtype)
             for i, u in enumerate(leaves)]
    return jax.tree.unflatten(treedef, noisy), LangevinNoiseState(optax.safe_int32_increment(t),
                                                                  state.key)

  return optax.GradientTransformation(init_fn, update_fn)


def deep_r_optimizer(learning_rate: schedules.ScalarOrSchedule = 0.05, *, l1: float = 1e-5,
                     temperature: schedules.ScalarOrSchedule = 1e-12, seed: int = 0
                     ) -> optax.GradientTransformation:
  """DeepR's inner step: ``chain(add_l1(l1), sgd(eta), add_langevin_noise(T, eta))``."""
  if not callable(temperature) and (not isinstance(temperature, (int, float)) or temperature < 0):
    raise ValueError(f"temperature must be >= 0 (or a schedule), got {temperature!r}")
  return optax.chain(penalties.add_l1(l1), optax.sgd(learning_rate),
                     add_langevin_noise(temperature, learning_rate, seed))


def deep_r(inner: optax.GradientTransformation, sparsity: float, *,
           distribution: dist.Distribution = "uniform", filter: dist.LeafFilter | None = None,
           keep_dense: Sequence[str] = (), overrides: Mapping[str, float] | None = None,
           seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """DeepR's sign constraint and rewiring around ``inner`` (see the module docstring).

  The fixed signs are those of the initial weights (random at init; a zero
  initial weight draws a random sign); they live in the state's ``aux``.
  The rewiring runs at every step, inside the jitted step.
  """
  dist.check_sparsity(sparsity)

  def init_masks(params, key):
    counts = dist.kept_counts(params, sparsity, distribution=distribution, filter=filter,
                              keep_dense=keep_dense, overrides=overrides)
    masks = random_masks(params, counts, key)
    signs = []
    for i, (p, m) in enumerate(zip(jax.tree.leaves(params), jax.tree.leaves(masks))):
      if masks_lib.is_sparse(m):
        coin = jax.random.bernoulli(jax.random.fold_in(key, 10_000 + i), 0.5, jnp.shape(p))
        signs.append(jnp.where(p == 0, coin, p > 0))
    return masks, tuple(signs)

  def update_masks(x: core.MaskUpdateInputs) -> core.MaskUpdate:
    flat_m, treedef = jax.tree.flatten(x.masks)
    flat_p, flat_u = jax.tree.leaves(x.params), jax.tree.leaves(x.updates)
    new, survivors, j = list(flat_m), list(flat_m), 0
    for i, m in enumerate(flat_m):
      if not masks_lib.is_sparse(m):
        continue
      s = jnp.where(x.aux[j], 1.0, -1.0).astype(flat_p[i].dtype)
      theta = s * (flat_p[i] + flat_u[i])
      kept = m & (theta > 0)
      n_dead = jnp.sum(m, dtype=jnp.int32) - jnp.sum(kept, dtype=jnp.int32)
      woken = topk.random_k_mask(jax.random.fold_in(x.key, i), n_dead, ~kept)
      new[i], survivors[i] = kept | woken, kept
      j += 1
    return core.MaskUpdate(jax.tree.unflatten(treedef, new), jax.tree.unflatten(treedef, survivors),
                           x.aux)

  return core.sparse_transform(inner, init_masks=init_masks, update_masks=update_masks,
                               is_update_step=lambda step: jnp.bool_(True), seed=seed)


def _deep_r_around(inner: optax.GradientTransformation, sparsity: float, *,
                   learning_rate: schedules.ScalarOrSchedule = 0.01, l1: float = 1e-5,
                   temperature: schedules.ScalarOrSchedule = 1e-5,
                   distribution: dist.Distribution = "uniform",
                   filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                   overrides: Mapping[str, float] | None = None,
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """DeepR with any ``inner`` optimizer: ``inner`` chained with DeepR's L1 term and Langevin
  noise (``eta = learning_rate``, the inner optimizer's), then :func:`deep_r`."""
  chain = optax.chain(penalties.add_l1(l1), inner,
                      add_langevin_noise(temperature, learning_rate, seed))
  return deep_r(chain, sparsity, distribution=distribution, filter=filter, keep_dense=keep_dense,
                overrides=overrides, seed=seed)


def _defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  """``T`` annealed 1e-5 -> 1e-8 -> 1e-12 -> 1e-15 at 25, 50 and 75% of training."""
  del steps_per_epoch
  temperature = optax.piecewise_constant_schedule(
      1e-5, {int(total_steps * q): f for q, f in ((0.25, 1e-3), (0.5, 1e-4), (0.75, 1e-3))})
  return {"temperature": temperature, "seed": seed}


registry.register("deepr", _deep_r_around, _defaults)
