"""Small real-data fixtures shared by the tests: an MLP on scikit-learn's digits."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits


@functools.lru_cache(maxsize=None)
def digits():
  d = load_digits()
  return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)


def mlp_params(key, sizes=(64, 64, 32, 10)):
  ps = {}
  for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
    k = jax.random.fold_in(key, i)
    ps[f"fc{i + 1}"] = {"kernel": jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a),
                        "bias": jnp.zeros(b)}
  return ps


def mlp_apply(params, x):
  n = len(params)
  for i in range(n):
    p = params[f"fc{i + 1}"]
    x = x @ p["kernel"] + p["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def loss_fn(params, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(params, x), y).mean()


def make_step(tx, trace_counter=None):
  @jax.jit
  def step(params, opt_state, x, y):
    if trace_counter is not None:
      trace_counter.append(1)
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def batches(n_steps, batch=64, seed=0):
  x, y = digits()
  rng = np.random.default_rng(seed)
  for _ in range(n_steps):
    idx = rng.integers(0, len(x), batch)
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


def eight_cpu_devices_env(**extra: str) -> dict:
  """The environment of a subprocess with 8 CPU devices, keeping the suite's XLA_FLAGS."""
  flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
