"""Step-time and compile-time ratios of sparse jitted train steps to the plain dense optax step.

Same model, same batch, same inner optimizer (SGD, momentum 0.9), one process,
interleaved runs in a shuffled order, medians after warm-up, ``block_until_ready``.
For each method in ``--methods`` (``static``, ``set``, ``rigl``, ``dsr``) it times

* a non-update step (the masks are only applied);
* an update step (drop and regrow inside the same jitted step);

and, with ``--compile-times``, the trace+lower and compile seconds of each step
function next to the dense step's. ``--jaxpruner DIR`` adds jaxpruner's SET, on a
non-update step and on an update-every-step, in the same process (jaxpruner is not
on the package index: pass a source checkout, e.g. google-research/jaxpruner at
f133ee5, with ml-collections importable; it needs ``--no-bias``, which it implies).

Two ways of timing a step: ``--steps-per-call 1`` times one jitted call per
step from Python (host dispatch included); ``--steps-per-call N`` times a jitted
``lax.scan`` of N steps and divides by N (for update steps the scan uses
``update_period=1``, so every scanned step is an update step).

  python -m experiments.bench_step [--models lenet300 mlp10m] [--methods set rigl dsr static]
      [--repeats 20] [--steps-per-call 10] [--compile-times] [--jaxpruner DIR] [--out f.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import jaxsparse as js
from jaxsparse.nn import models

from experiments import bench_compile, common

MODELS = {
    "lenet300": dict(name="lenet300", kwargs={}, input_shape=(28, 28, 1)),
    "mlp10m": dict(name="mlp", kwargs={"features": (2048, 2048, 2048)}, input_shape=(28, 28, 1)),
    "mlp50m": dict(name="mlp", kwargs={"features": (4096, 4096, 4096)}, input_shape=(64, 64, 1)),
}
METHODS = ("static", "set", "rigl", "dsr")
_FAR = 10 ** 9   # an update_stop that is never reached


def make_method(name: str, sparsity: float, period: int) -> optax.GradientTransformation:
  """The method at uniform ``sparsity`` around SGD with momentum, updating every ``period`` steps."""
  inner = optax.sgd(0.01, momentum=0.9)
  kw = dict(distribution="uniform")
  if name == "static":
    return js.static_sparse(inner, sparsity, **kw)
  if name == "set":
    return js.sparse_evolutionary_training(inner, sparsity, update_period=period, update_start=period, **kw)
  if name == "rigl":
    return js.rigl(inner, sparsity, update_stop=_FAR, update_period=period, **kw)
  if name == "dsr":
    return js.dsr(inner, sparsity, update_period=period, **kw)
  raise ValueError(f"--methods: unknown method {name!r}; choose from {METHODS}")


def compiled(fn: Callable, *args: Any) -> tuple[Callable, float, float]:
  """``jax.jit(fn)`` compiled ahead of time for ``args``: (executable, trace+lower s, compile s)."""
  with bench_compile.no_persistent_cache():
    t0 = time.perf_counter()
    lowered = jax.jit(fn).trace(*args).lower()
    t1 = time.perf_counter()
    exe = lowered.compile()
    return exe, t1 - t0, time.perf_counter() - t1


def _jaxpruner_set(path: str, sparsity: float, freq: int):
  """jaxpruner's SET at uniform ``sparsity``, updating every ``freq`` steps (from a checkout)."""
  if path not in sys.path:
    sys.path.insert(0, path)
  if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map   # jaxpruner at f133ee5 still calls it; a shim for the peer only
  import jaxpruner
  return jaxpruner.SET(
      sparsity_distribution_fn=functools.partial(jaxpruner.sparsity_distributions.uniform,
                                                 sparsity=sparsity),
      scheduler=jaxpruner.sparsity_schedules.PeriodicSchedule(
          update_freq=freq, update_start_step=0, update_end_step=_FAR))


def bench(model_name: str, sparsity: float, batch_size: int, repeats: int,
          steps_per_call: int = 1, methods: tuple[str, ...] = ("set",), use_bias: bool = True,
          compile_times: bool = False, jaxpruner_dir: str | None = None) -> dict:
  spec = MODELS[model_name]
  net = models.create_model(spec["name"], 10, use_bias=use_bias, **spec["kwargs"])
  params = models.init_params(net, spec["input_shape"], 0)["params"]
  n_params = sum(p.size for p in jax.tree.leaves(params))
  key = jax.random.key(0)
  x = jax.random.uniform(key, (batch_size, *spec["input_shape"]))
  y = jax.random.randint(key, (batch_size,), 0, 10)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(net.apply({"params": p}, x), y).mean()

  def make_step(tx, post: Callable | None = None):
    def one(p, s):
      u, s = tx.update(jax.grad(loss_fn)(p), s, p)
      p = optax.apply_updates(p, u)
      return (p if post is None else post(p, s)), s

    if steps_per_call == 1:
      return one
    return lambda p, s: jax.lax.scan(lambda c, _: (one(*c), None), (p, s), None,
                                     length=steps_per_call)[0]

  fns, compile_rows, executables = {}, {}, {}

  def add(name, step, p, s, first_step=False):
    if id(step) not in executables:   # an update and a non-update step share one executable
      exe, t_lower, t_compile = compiled(step, p, s)
      executables[id(step)] = exe
      compile_rows[name] = dict(trace_lower_s=t_lower, compile_s=t_compile)
      print(f"  {model_name} {name}: trace+lower {t_lower:.2f} s, compile {t_compile:.2f} s",
            flush=True)
    exe = executables[id(step)]
    if first_step:   # time from the state after one step
      p, s = exe(p, s)
    fns[name] = lambda: exe(p, s)

  inner = optax.sgd(0.01, momentum=0.9)
  add("dense", make_step(inner), params, inner.init(params))
  period = 100 * steps_per_call
  for m in methods:
    tx = make_method(m, sparsity, period)
    state = tx.init(params)
    p = js.apply_masks(params, js.get_masks(state))
    step = make_step(tx)
    add(f"{m}_off", step, p, state._replace(count=jnp.int32(1)))
    if m == "static":
      continue
    if steps_per_call == 1:
      add(f"{m}_on", step, p, state._replace(count=jnp.int32(period)))
    else:   # every scanned step an update step
      tx_on = make_method(m, sparsity, 1)
      add(f"{m}_on", make_step(tx_on), p, tx_on.init(params)._replace(count=jnp.int32(1)))
  if jaxpruner_dir:
    for label, freq in (("jaxpruner_set_off", _FAR), ("jaxpruner_set_on", 1)):
      pruner = _jaxpruner_set(jaxpruner_dir, sparsity, freq)
      tx = pruner.wrap_optax(optax.sgd(0.01, momentum=0.9))
      # jaxpruner builds its mask at step 0
      add(label, make_step(tx, post=pruner.post_gradient_update), params, tx.init(params),
          first_step=True)

  t = common.median_seconds(fns, repeats=repeats, shuffle=True)
  per_step = {k: v / steps_per_call for k, v in t.items()}
  row = dict(model=model_name, params=int(n_params), sparsity=sparsity, batch_size=batch_size,
             use_bias=use_bias, steps_per_call=steps_per_call, dense_ms=per_step["dense"] * 1e3,
             ms={k: v * 1e3 for k, v in per_step.items()},
             ratio={k: v / per_step["dense"] for k, v in per_step.items() if k != "dense"},
             device=jax.devices()[0].device_kind, backend=jax.default_backend(),
             jax_version=jax.__version__)
  if compile_times:
    row["compile"] = compile_rows
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["lenet300", "mlp10m"], choices=list(MODELS))
  p.add_argument("--methods", nargs="+", default=["set"], choices=list(METHODS))
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--steps-per-call", type=int, default=1,
                  help="1: one jitted call per step; N > 1: a jitted lax.scan of N steps per call")
  p.add_argument("--no-bias", action="store_true", help="models without biases")
  p.add_argument("--compile-times", action="store_true",
                 help="also report trace+lower and compile seconds of every step")
  p.add_argument("--jaxpruner", default=None, metavar="DIR",
                 help="a jaxpruner source checkout: add its SET side by side (implies --no-bias)")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  if args.steps_per_call < 1:
    p.error(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
  use_bias = not (args.no_bias or args.jaxpruner)
  rows = []
  for m in args.models:
    rows.append(bench(m, args.sparsity, args.batch_size, args.repeats, args.steps_per_call,
                      tuple(args.methods), use_bias, args.compile_times, args.jaxpruner))
    print(json.dumps(rows[-1]), flush=True)
  print(markdown(rows))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


def markdown(rows: list[dict]) -> str:
  """The step-ratio table (and the compile-time table, when measured) of :func:`bench` rows."""
  cols = list(rows[0]["ratio"])
  out = [common.markdown_table(
      ["model", "params", "dense step (ms)", *cols],
      [[r["model"], f"{r['params']:,}", f"{r['dense_ms']:.3f}",
        *(f"{r['ratio'][c]:.2f}x" for c in cols)] for r in rows], align="lrr" + "r" * len(cols))]
  r0 = rows[0]
  out.append(f"\nratio = step time / dense step time; device {r0['device']} ({r0['backend']}), "
             f"jax {r0['jax_version']}, batch {r0['batch_size']}, sparsity {r0['sparsity']}, "
             f"biases {r0['use_bias']}, {r0['steps_per_call']} step(s) per call")
  if "compile" in r0:   # one executable serves a method's update and non-update steps
    names = list(r0["compile"])
    out += ["", common.markdown_table(
        ["model", *(f"{n} lower / compile (s)" for n in names)],
        [[r["model"], *(f"{r['compile'][n]['trace_lower_s']:.2f} / "
                        f"{r['compile'][n]['compile_s']:.2f}" for n in names)] for r in rows],
        align="l" + "r" * len(names))]
  return "\n".join(out)


if __name__ == "__main__":
  main()
