"""Compile time and program size of sparse train steps against the dense optax step.

For each model in ``--models`` (``lenet300``, ``resnet20``, ``mlp10m``: the 10M-parameter
MLP 784-2048-2048-2048-10) and each method in
``--methods`` (``static``, ``set``, ``rigl``, ``dsr``) it builds the jitted train step
(forward, backward, the method's ``update``, ``apply_updates``; BatchNorm statistics
for ResNet-20) and measures, in one process:

* trace + lower seconds and compile seconds on this machine's backend (median of
  ``--repeats`` runs, the methods interleaved in a shuffled order at every repeat,
  ``jax.clear_caches()`` before each so that every run compiles from scratch);
* the StableHLO op count of the step lowered for this backend and for CUDA (lowering
  for CUDA needs no GPU), against the dense step's.

  python -m experiments.bench_compile [--models lenet300 resnet20 mlp10m] [--methods set rigl dsr]
      [--repeats 3] [--out results/bench_compile.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from jax.experimental.compilation_cache import compilation_cache

import jaxsparse as js
from jaxsparse.analysis import lowering
from jaxsparse.nn import models

from experiments import common

# name: (registry name, constructor kwargs, input shape)
MODELS = {"lenet300": ("lenet300", {}, (28, 28, 1)),
          "resnet20": ("resnet20", {}, (32, 32, 3)),
          "mlp10m": ("mlp", {"features": (2048, 2048, 2048)}, (28, 28, 1))}
METHODS = ("static", "set", "rigl", "dsr")


def make_method(name: str, sparsity: float = 0.9) -> optax.GradientTransformation:
  """The method around SGD with momentum at its README defaults, updating every 100 steps."""
  inner = optax.sgd(0.01, momentum=0.9)
  if name == "dense":
    return inner
  if name == "static":
    return js.static_sparse(inner, sparsity)
  if name == "set":
    return js.sparse_evolutionary_training(inner, sparsity, update_period=100)
  if name == "rigl":
    return js.rigl(inner, sparsity, update_stop=10_000, update_period=100)
  if name == "dsr":
    return js.dsr(inner, sparsity, update_period=100)
  raise ValueError(f"--methods: unknown method {name!r}; choose from {METHODS}")


def train_step(model_name: str, tx: optax.GradientTransformation, batch_size: int = 32):
  """``(step, args)``: the jitted-to-be train step of ``model_name`` with ``tx``."""
  name, kwargs, input_shape = MODELS[model_name]
  net = models.create_model(name, 10, **kwargs)
  variables = models.init_params(net, input_shape, 0)
  params, stats = variables["params"], variables.get("batch_stats", {})
  x = jnp.zeros((batch_size, *input_shape), jnp.float32)
  y = jnp.zeros((batch_size,), jnp.int32)

  def loss_fn(p, stats):
    if stats:
      logits, upd = net.apply({"params": p, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"])
      stats = upd["batch_stats"]
    else:
      logits = net.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), stats

  def step(p, stats, s):
    (_, stats), g = jax.value_and_grad(loss_fn, has_aux=True)(p, stats)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), stats, s

  return step, (params, stats, tx.init(params))


@contextlib.contextmanager
def no_persistent_cache():
  """Compiles from scratch inside: a persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``,
  as the test suite sets) would turn a timed compile into a cache read."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # JAX decides whether to use the cache once, at first use
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    compilation_cache.reset_cache()


def measure(model_name: str, methods: tuple[str, ...], repeats: int) -> dict:
  with no_persistent_cache():
    return _measure(model_name, methods, repeats)


def _measure(model_name: str, methods: tuple[str, ...], repeats: int) -> dict:
  names = ("dense",) + tuple(methods)
  steps = {n: train_step(model_name, make_method(n)) for n in names}
  times = {n: {"lower": [], "compile": []} for n in names}
  order, rng = list(names), random.Random(0)
  for _ in range(repeats):
    rng.shuffle(order)
    for n in order:
      step, args = steps[n]
      jax.clear_caches()
      t0 = time.perf_counter()
      lowered = jax.jit(step).trace(*args).lower()
      t1 = time.perf_counter()
      lowered.compile()
      times[n]["lower"].append(t1 - t0)
      times[n]["compile"].append(time.perf_counter() - t1)
  row = dict(model=model_name, backend=jax.default_backend(), jax_version=jax.__version__,
             device=jax.devices()[0].device_kind, repeats=repeats, methods={})
  for n in names:
    step, args = steps[n]
    here = jax.jit(step).trace(*args).lower().compiler_ir()
    cuda = lowering.lower(step, *args, platform="cuda")
    row["methods"][n] = dict(
        lower_s=statistics.median(times[n]["lower"]),
        compile_s=statistics.median(times[n]["compile"]),
        ops=sum(lowering.op_counts(here).values()),
        cuda_ops=sum(lowering.op_counts(cuda).values()))
  dense = row["methods"]["dense"]
  for n in names:
    m = row["methods"][n]
    m["compile_ratio"] = m["compile_s"] / dense["compile_s"]
    m["total_ratio"] = (m["lower_s"] + m["compile_s"]) / (dense["lower_s"] + dense["compile_s"])
  return row


def markdown(rows: list[dict]) -> str:
  cells = [[r["model"], n, f"{m['lower_s']:.2f}", f"{m['compile_s']:.2f}",
            f"{m['compile_ratio']:.1f}x", f"{m['total_ratio']:.1f}x", f"{m['ops']:,}",
            f"{m['cuda_ops']:,}"] for r in rows for n, m in r["methods"].items()]
  out = [common.markdown_table(
      ["model", "step", "trace+lower (s)", "compile (s)", "compile / dense",
       "(trace+lower+compile) / dense", "StableHLO ops (here)", "ops lowered for CUDA"], cells)]
  r0 = rows[0]
  out.append(f"\n{r0['backend']} ({r0['device']}), jax {r0['jax_version']}, median of "
             f"{r0['repeats']} compiles from scratch per step, interleaved.")
  return "\n".join(out)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["lenet300", "resnet20"], choices=list(MODELS))
  p.add_argument("--methods", nargs="+", default=["static", "set", "rigl", "dsr"],
                 choices=list(METHODS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  rows = []
  for m in args.models:
    rows.append(measure(m, tuple(args.methods), args.repeats))
    print(json.dumps(rows[-1]), flush=True)
  print(markdown(rows))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
