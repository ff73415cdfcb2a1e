"""A sparsely-gated mixture of experts (Shazeer et al. 2017) as the hidden layer of an MLP on
Fashion-MNIST, against dense MLPs of the same parameter count and of the same FLOPs per token.

  python -m experiments.moe --out-dir results/moe --seeds 0 1 2
  python -m experiments.moe --out-dir /tmp/moe --small      # 5000 / 1000 images, 1 epoch

Models (one image is one token):

* ``moe``: flatten -> :class:`jaxsparse.MoE` (784 -> ``--width``, ``--experts`` one-hidden-layer
  ReLU experts of ``--expert-hidden`` units, top-``--k`` noisy gating, ``--capacity-factor``)
  -> relu -> Dense(10); loss = cross-entropy + the layer's load-balancing loss (sowed).
* ``dense_same_params``: flatten -> Dense(H) -> relu -> Dense(width) -> relu -> Dense(10), H
  chosen so that the parameter count matches the MoE model's.
* ``dense_same_flops``: the same with H chosen so that the compiled FLOPs per token match the
  MoE model's (gate, expert buffers at capacity and routing included).

FLOPs per token are XLA's count of the compiled evaluation forward on a batch of
``--batch-size`` (the MoE's capacity depends on the batch), divided by the batch. Adam,
``--epochs`` epochs, batch ``--batch-size``; the table reports test accuracy (mean ± std over
``--seeds``), parameters, FLOPs per token, the fraction of (token, choice) pairs dropped over
capacity (training: the last epoch; test: evaluation batches of the training size) and the load
balance on the test set (CV of the pairs each expert computed, and max / mean). Writes
``table.md``, ``runs.csv`` and ``results.json`` into ``--out-dir``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from experiments import common, data

MODELS = ("moe", "dense_same_params", "dense_same_flops")


class MoEMLP(nn.Module):
  """flatten -> MoE(width) -> relu -> Dense(num_classes)."""

  width: int
  num_experts: int
  k: int
  expert_hidden: int
  capacity_factor: float
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    x = js.MoE(features=self.width, num_experts=self.num_experts, k=self.k,
               hidden_features=self.expert_hidden, capacity_factor=self.capacity_factor,
               name="moe")(x, deterministic=not train)
    return nn.Dense(self.num_classes, name="out")(nn.relu(x))


class DenseMLP(nn.Module):
  """flatten -> Dense(hidden) -> relu -> Dense(width) -> relu -> Dense(num_classes): one
  expert of ``hidden`` units, ungated."""

  width: int
  hidden: int
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train
    x = nn.relu(nn.Dense(self.hidden, name="hidden")(x.reshape(x.shape[0], -1)))
    x = nn.relu(nn.Dense(self.width, name="width")(x))
    return nn.Dense(self.num_classes, name="out")(x)


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.moe", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out-dir", required=True)
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--experts", type=int, default=8)
  p.add_argument("--k", type=int, default=2)
  p.add_argument("--expert-hidden", type=int, default=64)
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--capacity-factor", type=float, default=1.25)
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--small", action="store_true",
                 help="5000 train / 1000 test images, 1 epoch, the first seed")
  return p


def _check_args(a: argparse.Namespace) -> None:
  for name in ("experts", "k", "expert_hidden", "width", "epochs", "batch_size"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  js.nn.moe.check_moe_args(a.experts, a.k, a.capacity_factor)


def _param_count(params: Any) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def compile_forward(net: nn.Module, params: Any, batch: int, shape: tuple):
  """The evaluation forward ``(params, x, y) -> (correct, expert_counts, dropped)``, compiled
  for one batch; its ``cost_analysis()`` gives the FLOPs (the model's, plus an argmax)."""

  def fwd(params, x, y):
    logits, cols = net.apply({"params": params}, x, train=False,
                             mutable=["intermediates", "losses"])
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    if "moe" in cols.get("intermediates", {}):
      stats = _moe_stats(cols)
      return correct, stats.expert_counts, stats.dropped
    return correct, jnp.zeros([0], jnp.int32), jnp.zeros([], jnp.int32)

  return jax.jit(fwd).lower(params, jnp.zeros((batch, *shape)),
                            jnp.zeros((batch,), jnp.int32)).compile()


def flops_per_token(compiled, batch: int) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"]) / batch


def _moe_stats(cols: dict) -> js.nn.moe.MoEStats:
  return cols["intermediates"]["moe"]["moe_stats"][0]


def make_train_epoch(net: nn.Module, tx: optax.GradientTransformation, batch_size: int,
                     is_moe: bool):
  """``(params, opt_state, x, y, key) -> (params, opt_state, ce, aux, dropped)``: one
  shuffled epoch as one jitted scan; the MoE adds its sowed load-balancing loss."""

  def loss_fn(params, x, y, key):
    if is_moe:
      logits, cols = net.apply({"params": params}, x, train=True, rngs={"gating": key},
                               mutable=["losses", "intermediates"])
      aux, dropped = js.total_aux_loss(cols["losses"]), _moe_stats(cols).dropped
    else:
      logits, aux, dropped = net.apply({"params": params}, x, train=True), 0.0, 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return ce + aux, (ce, aux, dropped)

  def step(carry, batch):
    params, opt_state = carry
    x, y, key = batch
    grads, aux = jax.grad(loss_fn, has_aux=True)(params, x, y, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), aux

  @jax.jit
  def epoch(params, opt_state, x, y, key):
    shuffle, gate = jax.random.split(key)
    xs, ys = data.epoch_batches(x, y, batch_size, shuffle)
    keys = jax.random.split(gate, xs.shape[0])
    (params, opt_state), (ce, aux, dropped) = jax.lax.scan(step, (params, opt_state),
                                                           (xs, ys, keys))
    return params, opt_state, ce.mean(), jnp.mean(aux), jnp.sum(dropped)

  return epoch


def evaluate(compiled, params: Any, x: np.ndarray, y: np.ndarray, batch_size: int):
  """``(accuracy, expert_counts, dropped)`` over the full batches of ``(x, y)``, with the MoE's
  capacity of a training batch."""
  correct, counts, dropped = 0, 0, 0
  for i in range(0, len(x) - batch_size + 1, batch_size):
    n, c, d = compiled(params, jnp.asarray(x[i:i + batch_size]),
                       jnp.asarray(y[i:i + batch_size], jnp.int32))
    correct += int(n)
    counts, dropped = counts + np.asarray(c), dropped + int(d)
  return correct / (len(x) // batch_size * batch_size), counts, dropped


def build_models(a: argparse.Namespace, input_shape: tuple, num_classes: int
                 ) -> tuple[dict[str, nn.Module], Any]:
  """The three models and the MoE's compiled forward; the dense widths are solved from the
  MoE's parameter count and measured FLOPs per token."""
  moe = MoEMLP(a.width, a.experts, a.k, a.expert_hidden, a.capacity_factor, num_classes)
  params = _init(moe, 0, a.batch_size, input_shape)
  n_in = int(np.prod(input_shape))
  # Dense(H) + Dense(width) + out: H * (n_in + 1 + width) + width + out params.
  fixed = a.width + (a.width + 1) * num_classes
  h_params = round((_param_count(params) - fixed) / (n_in + 1 + a.width))
  compiled = compile_forward(moe, params, a.batch_size, input_shape)
  moe_flops = flops_per_token(compiled, a.batch_size)
  # 2 * (n_in * H + H * width + width * classes) FLOPs of matmuls; the table reports the
  # measured ratio (biases, relus and the argmax add a little).
  h_flops = max(1, round((moe_flops - 2 * a.width * num_classes) / (2 * (n_in + a.width))))
  return {"moe": moe, "dense_same_params": DenseMLP(a.width, h_params, num_classes),
          "dense_same_flops": DenseMLP(a.width, h_flops, num_classes)}, compiled


@functools.cache
def _jit_init(net: nn.Module, batch: int, shape: tuple):
  return jax.jit(lambda key: net.init({"params": key}, jnp.zeros((batch, *shape)))["params"])


def _init(net: nn.Module, seed: int, batch: int, shape: tuple) -> Any:
  return _jit_init(net, batch, shape)(jax.random.key(seed))


def run(a: argparse.Namespace) -> dict[str, Any]:
  t0 = time.perf_counter()
  ds = data.load_dataset(a.dataset)
  x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  if a.small:
    a.epochs, a.seeds = 1, a.seeds[:1]
    x_tr, y_tr, x_te, y_te = x_tr[:5000], y_tr[:5000], x_te[:1000], y_te[:1000]
  x, y = jax.device_put(x_tr), jax.device_put(y_tr)
  shape = tuple(ds.input_shape)
  a.n_in = int(np.prod(shape))
  nets, moe_compiled = build_models(a, shape, ds.num_classes)
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  runs = []
  for name, net in nets.items():
    is_moe = name == "moe"
    tx = optax.adam(a.lr)
    epoch = make_train_epoch(net, tx, a.batch_size, is_moe)
    compiled = moe_compiled if is_moe else None
    flops = flops_per_token(moe_compiled, a.batch_size) if is_moe else None
    for seed in a.seeds:
      params = _init(net, seed, a.batch_size, shape)
      if compiled is None:
        compiled = compile_forward(net, params, a.batch_size, shape)
        flops = flops_per_token(compiled, a.batch_size)
      opt_state = tx.init(params)
      key = jax.random.key(1000 + seed)
      ts = time.perf_counter()
      for e in range(a.epochs):
        params, opt_state, ce, aux, dropped = epoch(params, opt_state, x, y,
                                                    jax.random.fold_in(key, e))
        if not np.isfinite(float(ce)):
          raise FloatingPointError(f"{name} seed {seed}: loss is {float(ce)}")
      seconds = (time.perf_counter() - ts) / a.epochs
      acc, counts, test_dropped = evaluate(compiled, params, x_te, y_te, a.batch_size)
      pairs = (len(y_tr) // a.batch_size) * a.batch_size * a.k
      test_pairs = (len(y_te) // a.batch_size) * a.batch_size * a.k
      row = dict(model=name, seed=seed, test_accuracy=acc, params=_param_count(params),
                 flops_per_token=flops, hidden=getattr(net, "hidden", None),
                 train_ce_last_epoch=float(ce), aux_loss_last_epoch=float(aux),
                 train_dropped_fraction=float(dropped) / pairs if is_moe else None,
                 test_dropped_fraction=test_dropped / test_pairs if is_moe else None,
                 load_cv=float(np.std(counts) / np.mean(counts)) if is_moe else None,
                 load_max_over_mean=float(np.max(counts) / np.mean(counts)) if is_moe else None,
                 expert_counts=" ".join(str(int(c)) for c in counts) if is_moe else None,
                 seconds_per_epoch=seconds)
      runs.append(row)
      log(f"{name} seed {seed}: acc {acc:.4f}, ce {float(ce):.4f}, aux {float(aux):.4f}, "
          f"{seconds:.1f} s/epoch" + (f", test dropped {row['test_dropped_fraction']:.4f}, "
                                      f"load {row['expert_counts']}" if is_moe else ""))
  result = dict(args=vars(a), runs=runs, seconds=time.perf_counter() - t0,
                jax_version=jax.__version__, device=jax.devices()[0].platform)
  common.write_results(a.out_dir, result, table_markdown(a, result), result["runs"])
  return result


def _fmt(rows: list[dict], key: str, fmt: str = "{:.4f}") -> str:
  vals = [r[key] for r in rows if r[key] is not None]
  if not vals:
    return "-"
  if len(vals) == 1:
    return fmt.format(vals[0])
  m, s = common.mean_std(vals)
  return f"{fmt.format(m)} ± {fmt.format(s)}"


def table_markdown(a: argparse.Namespace, result: dict[str, Any]) -> str:
  runs = result["runs"]
  moe_flops = next(r["flops_per_token"] for r in runs if r["model"] == "moe")
  body = []
  for name in MODELS:
    rows = [r for r in runs if r["model"] == name]
    r0 = rows[0]
    label = {"moe": f"MoE (E={a.experts}, k={a.k}, experts {a.n_in}-{a.expert_hidden}-{a.width})",
             "dense_same_params": f"dense, same params (hidden {r0['hidden']})",
             "dense_same_flops": f"dense, same FLOPs/token (hidden {r0['hidden']})"}[name]
    body.append([label, common.format_mean_std([r["test_accuracy"] for r in rows]),
                 f"{r0['params']:,}", f"{r0['flops_per_token'] / 1e3:,.1f}k",
                 f"{r0['flops_per_token'] / moe_flops:.2f}",
                 _fmt(rows, "train_dropped_fraction"), _fmt(rows, "test_dropped_fraction"),
                 _fmt(rows, "load_cv", "{:.3f}"), _fmt(rows, "load_max_over_mean", "{:.2f}"),
                 f"{np.mean([r['seconds_per_epoch'] for r in rows]):.1f}"])
  header = ["model", "test acc. % (mean ± std)", "params", "FLOPs/token", "FLOPs / MoE's",
            "dropped (train, last epoch)", "dropped (test)", "load CV (test)",
            "load max/mean (test)", "s/epoch"]
  seeds = " ".join(str(s) for s in a.seeds)
  lines = [f"# Mixture of experts on {a.dataset}{' (--small)' if a.small else ''}", "",
           f"Command: `{a.command}`; {a.epochs} epochs, Adam lr {a.lr}, batch "
           f"{a.batch_size}, capacity factor {a.capacity_factor}, seeds {seeds}; "
           f"{result['device']}, jax {result['jax_version']}, {result['seconds']:.0f} s.", "",
           "FLOPs/token: XLA's cost analysis of the compiled evaluation forward on one batch, "
           "divided by the batch (MoE: gate, expert buffers at capacity, routing). Dropped: "
           "the fraction of (token, choice) pairs over their expert's capacity. Load: pairs "
           "computed per expert over the test set.", "",
           common.markdown_table(header, body, "lrrrrrrrrr"), ""]
  moe_rows = [r for r in runs if r["model"] == "moe"]
  lines += ["Expert loads on the test set (pairs per expert), per seed: " + "; ".join(
      f"seed {r['seed']}: {r['expert_counts']}" for r in moe_rows) + ".", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  argv = sys.argv[1:] if argv is None else list(argv)
  a = build_parser().parse_args(argv)
  _check_args(a)
  a.command = " ".join(["python -m experiments.moe", *argv])
  common.make_out_dir(a.out_dir)
  return run(a)


if __name__ == "__main__":
  main()
