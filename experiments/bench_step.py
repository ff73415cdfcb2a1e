"""Step-time ratio of a sparse (SET) jitted train step to the plain dense optax step.

Same model, same batch, same inner optimizer, one process. Reports the median
of several timed runs (after warm-up, with block_until_ready) for

* the dense step: ``optax.sgd(momentum=0.9)`` alone;
* a SET non-update step (the mask is only applied);
* a SET update step (prune and regrow inside the same jitted step).

Two ways of timing a step: ``--steps-per-call 1`` times one jitted call per
step from Python (so host dispatch, which grows with the number of state
leaves, is included); ``--steps-per-call N`` times a jitted ``lax.scan`` of N
steps on the same batch and divides by N, which is how
:mod:`jaxsparse.training` runs an epoch (for update steps the scan uses
``update_period=1``, so every scanned step is an update step).

  python -m experiments.bench_step [--models lenet300 mlp10m] [--repeats 20] [--steps-per-call 10]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import jaxsparse as js
from jaxsparse import models

MODELS = {
    "lenet300": dict(name="lenet300", kwargs={}, input_shape=(28, 28, 1)),
    "mlp10m": dict(name="mlp", kwargs={"features": (2048, 2048, 2048)}, input_shape=(28, 28, 1)),
}


def interleaved_medians(fns: dict, repeats: int) -> dict:
  """Median seconds of each fn; the fns are timed in turn within each repeat, so
  that drift in a shared machine's load hits all of them alike, in an order shuffled
  (fixed seed) at every repeat, so that no fn always runs right after the same one (on
  CPU a step timed right after an update step, which frees much memory, ran ~5-10%
  slower)."""
  for fn in fns.values():  # warm-up (and compilation)
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  order, rng = list(fns), random.Random(0)
  for _ in range(repeats):
    rng.shuffle(order)
    for name in order:
      fn = fns[name]
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def bench(model_name: str, sparsity: float, batch_size: int, repeats: int,
          steps_per_call: int = 1) -> dict:
  spec = MODELS[model_name]
  net = models.create_model(spec["name"], 10, **spec["kwargs"])
  params = models.init_params(net, spec["input_shape"], 0)["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  key = jax.random.key(0)
  x = jax.random.uniform(key, (batch_size, *spec["input_shape"]))
  y = jax.random.randint(key, (batch_size,), 0, 10)

  def make_step(tx):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": p}, x), y).mean()

    def one(p, s):
      g = jax.grad(loss_fn)(p)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    if steps_per_call == 1:
      return jax.jit(one)

    @jax.jit
    def steps(p, s):
      return jax.lax.scan(lambda c, _: (one(*c), None), (p, s), None, length=steps_per_call)[0]
    return steps

  inner = optax.sgd(0.01, momentum=0.9)
  dense_step = make_step(inner)
  dense_state = inner.init(params)

  period = 100 * steps_per_call
  tx = js.set(optax.sgd(0.01, momentum=0.9), sparsity, update_period=period)
  sparse_step = make_step(tx)
  state = tx.init(params)
  sparse_params = js.apply_masks(params, state.masks)
  off = state._replace(count=jnp.int32(1))       # not an update step (nor the next N - 1)
  if steps_per_call == 1:
    update_step, on = sparse_step, state._replace(count=jnp.int32(period))   # an update step
  else:   # every scanned step an update step
    tx_on = js.set(optax.sgd(0.01, momentum=0.9), sparsity, update_period=1)
    update_step, on = make_step(tx_on), tx_on.init(params)
  t = interleaved_medians({"dense": lambda: dense_step(params, dense_state),
                           "off": lambda: sparse_step(sparse_params, off),
                           "on": lambda: update_step(sparse_params, on)}, repeats)
  t_dense, t_off, t_on = (t[k] / steps_per_call for k in ("dense", "off", "on"))
  return dict(model=model_name, params=int(n_params), sparsity=sparsity, batch_size=batch_size,
              dense_ms=t_dense * 1e3, set_non_update_ms=t_off * 1e3, set_update_ms=t_on * 1e3,
              ratio_non_update=t_off / t_dense, ratio_update=t_on / t_dense,
              steps_per_call=steps_per_call, device=jax.devices()[0].device_kind, backend=jax.default_backend(),
              jax_version=jax.__version__)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--steps-per-call", type=int, default=1,
                  help="1: one jitted call per step; N > 1: a jitted lax.scan of N steps per call")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  if args.steps_per_call < 1:
    raise ValueError(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
  rows = [bench(m, args.sparsity, args.batch_size, args.repeats, args.steps_per_call)
          for m in args.models]
  print("| model | params | dense step (ms) | SET non-update (ms) | SET update (ms) | "
        "ratio non-update | ratio update |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['model']} | {r['params']:,} | {r['dense_ms']:.2f} | {r['set_non_update_ms']:.2f} | "
          f"{r['set_update_ms']:.2f} | {r['ratio_non_update']:.2f}x | {r['ratio_update']:.2f}x |")
  print(f"device: {rows[0]['device']} ({rows[0]['backend']}), jax {rows[0]['jax_version']}, "
        f"batch {args.batch_size}, sparsity {args.sparsity}, {args.steps_per_call} step(s) per call")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
