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
  for CUDA needs no GPU), against the dense step's;
* with ``--llvm-modules`` (CPU), how many LLVM modules XLA:CPU compiles for the step (one
  per kernel: a fusion, a scatter, an integer dot, ...) and their summed codegen time, read
  from XLA's own log in a child process per step. Most of a CPU compile is this codegen, at
  ~10-30 ms a module whatever its size, so the module count predicts compile time and,
  unlike seconds, does not change with the machine's load: a change meant to cut compile
  time can be checked by it in one run.

``--jaxpruner DIR`` adds the peer, jaxpruner's SET step (a source checkout, e.g.
google-research/jaxpruner at f133ee5, with ml-collections importable; updating every 100 steps,
uniform sparsity), measured the same way in the same process. jaxpruner's SET fails on trees
with unmasked leaves, so with it every step's model has no biases, and only the MLPs
(``lenet300``, ``mlp10m``) can be measured.

  python -m experiments.bench_compile [--models lenet300 resnet20 mlp10m] [--methods set rigl dsr]
      [--repeats 3] [--llvm-modules] [--jaxpruner DIR] [--out results/bench_compile.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import statistics
import subprocess
import sys
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
PEER = "jaxpruner_set"


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


def train_step(model_name: str, tx: optax.GradientTransformation, batch_size: int = 32, *,
               use_bias: bool = True, post=None):
  """``(step, args)``: the jitted-to-be train step of ``model_name`` with ``tx``; ``post(params,
  opt_state)`` runs after ``apply_updates`` (jaxpruner's ``post_gradient_update``)."""
  name, kwargs, input_shape = MODELS[model_name]
  net = models.create_model(name, 10, **kwargs, **({} if use_bias else {"use_bias": False}))
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
    p = optax.apply_updates(p, u)
    return (p if post is None else post(p, s)), stats, s

  return step, (params, stats, tx.init(params))


def step_of(model_name: str, method: str, jaxpruner_dir: str | None = None):
  """``(step, args)`` of ``method`` (``"dense"``, one of :data:`METHODS`, or :data:`PEER`
  from ``jaxpruner_dir``); with ``jaxpruner_dir``, every model is without biases."""
  if jaxpruner_dir is None:
    if method == PEER:
      raise ValueError(f"method {PEER!r} needs jaxpruner_dir")
    return train_step(model_name, make_method(method))
  if method != PEER:
    return train_step(model_name, make_method(method), use_bias=False)
  from experiments import bench_step   # (it imports this module)
  pruner = bench_step._jaxpruner_set(jaxpruner_dir, 0.9, 100)
  return train_step(model_name, pruner.wrap_optax(optax.sgd(0.01, momentum=0.9)),
                    use_bias=False, post=pruner.post_gradient_update)


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


def measure(model_name: str, methods: tuple[str, ...], repeats: int,
            jaxpruner_dir: str | None = None) -> dict:
  with no_persistent_cache():
    return _measure(model_name, methods, repeats, jaxpruner_dir)


def _measure(model_name: str, methods: tuple[str, ...], repeats: int,
             jaxpruner_dir: str | None = None) -> dict:
  names = ("dense",) + tuple(methods) + ((PEER,) if jaxpruner_dir else ())
  steps = {n: step_of(model_name, n, jaxpruner_dir) for n in names}
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
             device=jax.devices()[0].device_kind, repeats=repeats,
             use_bias=jaxpruner_dir is None, methods={})
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


_MODULE_LINE = re.compile(r"Compiled LLVM module: (\S+) time: ([\d.]+) (us|ms|s)\b")
_MARKER = "bench_compile: compiling now"


def _child_compile(model_name: str, method: str, jaxpruner_dir: str | None = None) -> None:
  """In a child process: build and lower the step, then print a marker and compile it."""
  step, args = step_of(model_name, method, jaxpruner_dir)
  with no_persistent_cache():
    lowered = jax.jit(step).trace(*args).lower()
    print(_MARKER, file=sys.stderr, flush=True)
    lowered.compile()


def llvm_modules(model_name: str, method: str, jaxpruner_dir: str | None = None) -> dict:
  """``{"modules": n, "codegen_s": t}``: the LLVM modules XLA:CPU compiles for the step of
  ``method`` on ``model_name``, counted from XLA's compiler log (``ir_compiler`` at
  verbosity 1) in a child process that compiles only that step (:func:`step_of`), from scratch.

  Raises:
    RuntimeError: when the child fails or its log holds no module line (another XLA version
      may log differently).
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="ir_compiler=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
                 [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  code = ("from experiments import bench_compile as b; "
          f"b._child_compile({model_name!r}, {method!r}, {jaxpruner_dir!r})")
  proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                        text=True)
  log = proc.stderr.split(_MARKER, 1)
  if proc.returncode or len(log) != 2:
    raise RuntimeError(f"compiling {model_name}/{method} in a child process failed "
                       f"(rc={proc.returncode}):\n{proc.stderr[-3000:]}")
  scale = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
  found = _MODULE_LINE.findall(log[1])
  if not found:
    raise RuntimeError("XLA's log held no 'Compiled LLVM module' line: this jaxlib's XLA:CPU "
                       "logs its modules differently; --llvm-modules cannot count them")
  return {"modules": len(found), "codegen_s": sum(float(t) * scale[u] for _, t, u in found)}


def markdown(rows: list[dict]) -> str:
  modules = all("modules" in m for r in rows for m in r["methods"].values())
  cells = []
  for r in rows:
    dense = r["methods"]["dense"]
    for n, m in r["methods"].items():
      cells.append([r["model"], n, f"{m['lower_s']:.2f}", f"{m['compile_s']:.2f}",
                    f"{m['compile_ratio']:.1f}x", f"{m['total_ratio']:.1f}x", f"{m['ops']:,}",
                    f"{m['cuda_ops']:,}"])
      if modules:
        cells[-1] += [f"{m['modules']:,}", f"{m['modules'] / dense['modules']:.1f}x",
                      f"{m['codegen_s']:.2f}"]
  head = ["model", "step", "trace+lower (s)", "compile (s)", "compile / dense",
          "(trace+lower+compile) / dense", "StableHLO ops (here)", "ops lowered for CUDA"]
  if modules:
    head += ["LLVM modules", "modules / dense", "LLVM codegen (s, summed)"]
  out = [common.markdown_table(head, cells)]
  r0 = rows[0]
  out.append(f"\n{r0['backend']} ({r0['device']}), jax {r0['jax_version']}, median of "
             f"{r0['repeats']} compiles from scratch per step, interleaved"
             + ("" if r0.get("use_bias", True) else ", models without biases (for jaxpruner)")
             + ("; LLVM modules from one more compile of each step in a child process "
                "(it inherits XLA_FLAGS)." if modules else "."))
  return "\n".join(out)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["lenet300", "resnet20"], choices=list(MODELS))
  p.add_argument("--methods", nargs="+", default=["static", "set", "rigl", "dsr"],
                 choices=list(METHODS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--llvm-modules", action="store_true",
                 help="also count the LLVM modules XLA:CPU compiles per step (CPU only)")
  p.add_argument("--jaxpruner", default=None, metavar="DIR",
                 help="a jaxpruner source checkout: add its SET step (every model then has no "
                      "biases; MLPs only)")
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  if args.repeats < 1:
    p.error(f"--repeats must be >= 1, got {args.repeats}")
  if args.jaxpruner:
    if "resnet20" in args.models:
      p.error("--jaxpruner: jaxpruner's SET fails on unmasked leaves (ResNet-20's BatchNorm); "
              "use --models lenet300 mlp10m")
    if not os.path.isfile(os.path.join(args.jaxpruner, "jaxpruner", "__init__.py")):
      p.error(f"--jaxpruner: no jaxpruner package in {args.jaxpruner!r} (pass a checkout of "
              "google-research/jaxpruner)")
  if args.llvm_modules and jax.default_backend() != "cpu":
    p.error(f"--llvm-modules counts XLA:CPU's modules; this backend is {jax.default_backend()}")
  rows = []
  for m in args.models:
    rows.append(measure(m, tuple(args.methods), args.repeats, args.jaxpruner))
    if args.llvm_modules:
      for name, row in rows[-1]["methods"].items():
        row.update(llvm_modules(m, name, args.jaxpruner))
    print(json.dumps(rows[-1]), flush=True)
  print(markdown(rows))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
