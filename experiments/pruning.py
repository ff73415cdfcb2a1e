"""Pruning criteria compared at several sparsities: table.md, runs.csv and accuracy-vs-sparsity plot.

  python -m experiments.pruning --out-dir results/pruning \
      --dataset fashion_mnist --models lenet300 --sparsities 0.9 0.95 0.98 --seeds 0 1 --epochs 8

Methods (the papers are cited in :mod:`jaxsparse.pruning.criteria`):

* ``random``: random per-layer masks at init, trained (baseline).
* ``gradual``: Zhu & Gupta gradual magnitude pruning during the run.
* ``snip``, ``grasp``, ``synflow``: global masks at init (SNIP: one batch of
  ``--score-batch``; GraSP: ``--per-class`` examples of each class; SynFlow:
  100 data-free iterations), then static sparse training for ``--epochs``.
* ``magnitude``, ``obd``, ``obs``: one-shot, global, on the dense model trained
  for ``--epochs``, then ``--finetune-epochs`` of fine-tuning with the mask
  fixed (OBD: empirical-Fisher diagonal; OBS: block-diagonal damped empirical
  Fisher with the compensating update). ``oneshot_accuracy`` is before fine-tuning.
* ``lottery``: IMP, 20% per round (output layer 10%), rewinding to init,
  ``--lt-epochs`` per round; one IMP run per seed yields every sparsity.

The dense model's accuracy after ``--epochs`` is the reference row.

Runs of the same protocol made separately (other seeds, other models) are
combined with ``--merge``; every run directory holds its protocol in
``args.json``, and directories whose protocols differ are refused:

  python -m experiments.pruning --merge results/pruning results/pruning_lenet300_seed2 \
      --out-dir results/pruning_merged
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxsparse.pruning.lottery import lottery_ticket
from experiments import common, data, training
from jaxsparse.core import transform as core
from jaxsparse.pruning import criteria, magnitude, obs
from jaxsparse.nn import models
from jaxsparse.methods import static
from jaxsparse.core import masks as masks_lib

METHODS = ("random", "gradual", "magnitude", "snip", "grasp", "synflow", "obd", "obs", "lottery")
OUTPUT_LAYER = {"lenet300": "fc3", "lenet5": "fc2"}


class Runner:
  """Trains one model on one dataset with fixed or changing masks (dataset kept on device)."""

  def __init__(self, args, model_name: str, ds: data.Dataset):
    self.args = args
    self.name = model_name
    self.ds = ds
    self.net = models.create_model(model_name, ds.num_classes)
    self.x, self.y = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
    self.steps_per_epoch = len(ds.x_train) // args.batch_size
    self.evaluate = training.make_evaluate(self.net)

  def init(self, seed: int) -> Any:
    return models.init_params(self.net, self.ds.input_shape, seed)["params"]

  def apply(self, params, x):
    return self.net.apply({"params": params}, x)

  def loss(self, params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(self.apply(params, x), y).mean()

  def accuracy(self, params) -> float:
    return self.evaluate(params, {}, self.ds.x_test, self.ds.y_test)

  def fit(self, params, method_fn, epochs: int, lr: float, seed: int):
    """``method_fn(inner, total_steps)`` builds the jaxsparse transform; returns (params, masks)."""
    total = self.steps_per_epoch * epochs
    inner = training.make_optimizer("sgd", optax.cosine_decay_schedule(lr, total),
                                    momentum=self.args.momentum)
    tx = method_fn(inner, total)
    opt_state = tx.init(params)
    params = masks_lib.apply_masks(params, core.get_masks(opt_state))
    state = training.TrainState(params, {}, opt_state)
    epoch = training.make_train_epoch(self.net, tx, self.args.batch_size, return_losses=True,
                                      steps_per_call=self.args.steps_per_call)
    for _, state, *_ in training.iterate_epochs(epoch, state, self.x, self.y,
                                                jax.random.key(seed), stop=epochs):
      pass
    return state.params, core.get_masks(state.opt_state)

  def train_masked(self, params, masks, epochs, lr, seed):
    return self.fit(masks_lib.apply_masks(params, masks),
                    lambda inner, total: static.keep_masks(inner, masks), epochs, lr, seed)[0]

  def batch(self, n: int, seed: int):
    idx = np.random.default_rng(seed).choice(len(self.ds.x_train), n, replace=False)
    return jnp.asarray(self.ds.x_train[idx]), jnp.asarray(self.ds.y_train[idx])

  def per_class_batch(self, per_class: int, seed: int):
    r = np.random.default_rng(seed)
    idx = np.concatenate([r.choice(np.flatnonzero(self.ds.y_train == c), per_class, replace=False)
                          for c in range(self.ds.num_classes)])
    return jnp.asarray(self.ds.x_train[idx]), jnp.asarray(self.ds.y_train[idx])


# Criteria applied at initialisation, then the masked network trains from scratch:
# (runner, init params, sparsity, args, seed) -> masks.
AT_INIT = {
    "snip": lambda r, init, sp, a, seed: criteria.snip_masks(
        init, r.loss, r.batch(a.score_batch, seed), sp),
    "grasp": lambda r, init, sp, a, seed: criteria.grasp_masks(
        init, r.loss, r.per_class_batch(a.per_class, seed), sp),
    "synflow": lambda r, init, sp, a, seed: criteria.synflow_masks(
        init, r.apply, r.ds.input_shape, sp, iterations=a.synflow_iterations),
}


def _magnitude(r, dense, sp, a, seed):
  masks = magnitude.magnitude_masks(dense, sp, scope="global")
  return masks, masks_lib.apply_masks(dense, masks)


def _obd(r, dense, sp, a, seed):
  scores = criteria.obd_scores(dense, r.loss, r.batch(a.curvature_batch, seed))
  masks = criteria.score_masks(scores, sp, scope="global")
  return masks, masks_lib.apply_masks(dense, masks)


def _obs(r, dense, sp, a, seed):  # OBS also moves the kept weights (its compensating update)
  res = obs.obs_prune(dense, r.loss, r.batch(a.curvature_batch, seed), sp, damping=a.damping,
                      block_size=a.obs_block, scope="global")
  return res.masks, res.params


# One-shot criteria applied to the trained dense network, then fine-tuned:
# (runner, dense params, sparsity, args, seed) -> (masks, pruned params).
AFTER_TRAINING = {"magnitude": _magnitude, "obd": _obd, "obs": _obs}
# "random" and "gradual" prune during training (experiments.training.make_method); "lottery"
# is iterative magnitude pruning with rewinding (jaxsparse.pruning.lottery).


def run_model(args, runner: Runner, seed: int, bar) -> list[dict]:
  rows = []
  a = args
  row = lambda method, sp, acc, masks, params, t0, oneshot=float("nan"): rows.append(dict(
      model=runner.name, method=method, target_sparsity=sp, seed=seed, accuracy=acc,
      oneshot_accuracy=oneshot,
      sparsity=round(masks_lib.sparsity(params, masks), 5) if masks is not None else 0.0,
      seconds=round(time.perf_counter() - t0, 1)))

  init = runner.init(seed)
  t0 = time.perf_counter()
  dense_params, _ = runner.fit(init, lambda inner, total: static.dense(inner), a.epochs, a.lr, seed)
  row("dense", 0.0, runner.accuracy(dense_params), None, None, t0)
  bar.update(1)

  for sp in a.sparsities:
    for method in a.methods:
      if method == "lottery":
        continue
      t0 = time.perf_counter()
      bar.set_postfix_str(f"{runner.name} {method} {sp} seed {seed}")
      if method in ("random", "gradual"):
        def make(inner, total, method=method, sp=sp):
          return training.make_method(method, inner, sp, total_steps=total,
                                      steps_per_epoch=runner.steps_per_epoch, seed=seed)
        params, masks = runner.fit(init, make, a.epochs, a.lr, seed)
        row(method, sp, runner.accuracy(params), masks, params, t0)
      elif method in AT_INIT:
        masks = AT_INIT[method](runner, init, sp, a, seed)
        params = runner.train_masked(init, masks, a.epochs, a.lr, seed)
        row(method, sp, runner.accuracy(params), masks, params, t0)
      else:  # one-shot after dense training, then fine-tuning
        masks, pruned = AFTER_TRAINING[method](runner, dense_params, sp, a, seed)
        oneshot = runner.accuracy(pruned)
        params = runner.train_masked(pruned, masks, a.finetune_epochs, a.finetune_lr, seed)
        row(method, sp, runner.accuracy(params), masks, params, t0, oneshot)
      bar.update(1)

  if "lottery" in a.methods:
    bar.set_postfix_str(f"{runner.name} lottery seed {seed}")
    t0 = time.perf_counter()

    def train_fn(start, masks):
      params = runner.train_masked(start, masks, a.lt_epochs, a.lr, seed)
      return params, runner.accuracy(params)

    rounds = lottery_ticket(train_fn, init, targets=a.sparsities, rate=0.2,
                            output_layer=OUTPUT_LAYER[runner.name], rewind_params=init)
    for r in rounds:
      for sp in a.sparsities:
        if abs(r.sparsity - sp) < 5e-4:
          row("lottery", sp, r.result, r.masks, masks_lib.apply_masks(init, r.masks), t0)
    bar.update(1)
  return rows


def write_outputs(args, rows: list[dict]) -> str:
  out = args.out_dir
  common.write_csv(os.path.join(out, "runs.csv"), rows)

  def stat(vals):
    vals = [v for v in vals if v == v]
    return common.format_mean_std(vals) if vals else "-"

  lines = [f"# Pruning criteria on {args.dataset}", "",
           f"epochs {args.epochs}, fine-tune {args.finetune_epochs}, lottery {args.lt_epochs}/round, "
           f"batch {args.batch_size}, SGD momentum {args.momentum} lr {args.lr} (cosine), "
           f"seeds {sorted({r['seed'] for r in rows})}. Test accuracy %, mean ± std over seeds.", ""]
  done = [m for m in args.models if any(r["model"] == m for r in rows)]
  for model in done:
    mrows = [r for r in rows if r["model"] == model]
    dense = [r["accuracy"] for r in mrows if r["method"] == "dense"]
    header = ["method", *(f"{s:g}" for s in args.sparsities)]
    cells = lambda key, method: [method] + [
        stat([r[key] for r in mrows if r["method"] == method and r["target_sparsity"] == s])
        for s in args.sparsities]
    lines += [f"## {model} (dense: {stat(dense)})", "",
              common.markdown_table(header, [cells("accuracy", m) for m in args.methods]),
              "", "One-shot accuracy right after pruning the trained dense model (no fine-tuning):",
              "", common.markdown_table(header, [cells("oneshot_accuracy", m)
                                                 for m in ("magnitude", "obd", "obs")
                                                 if m in args.methods]), ""]
  table = "\n".join(lines)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(table + "\n")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(done), figsize=(6 * len(done), 4.5), squeeze=False)
  for ax, model in zip(axes[0], done):
    mrows = [r for r in rows if r["model"] == model]
    for method in args.methods:
      ys = [statistics.mean([r["accuracy"] for r in mrows if r["method"] == method
                             and r["target_sparsity"] == s] or [float("nan")])
            for s in args.sparsities]
      ax.plot(args.sparsities, [100 * v for v in ys], marker="o", label=method)
    dense = [r["accuracy"] for r in mrows if r["method"] == "dense"]
    ax.axhline(100 * statistics.mean(dense), color="k", ls="--", label="dense")
    ax.set(title=f"{model} on {args.dataset}", xlabel="sparsity", ylabel="test accuracy (%)")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy_vs_sparsity.png"), dpi=120)
  plt.close(fig)
  return table


# Flags that define what a row means; runs merged into one table must agree on them.
PROTOCOL = ("dataset", "epochs", "finetune_epochs", "lt_epochs", "batch_size", "lr", "finetune_lr",
            "momentum", "score_batch", "per_class", "synflow_iterations", "curvature_batch",
            "obs_block", "damping")
_CSV_TYPES = dict(target_sparsity=float, seed=int, accuracy=float, oneshot_accuracy=float,
                  sparsity=float, seconds=float)


def merge_runs(dirs: list[str]) -> tuple[dict, list[dict]]:
  """The protocol and the rows of several run directories (``args.json`` + ``runs.csv`` each).

  Raises:
    ValueError: when a directory lacks its files, when protocols differ (naming
      the flag), or when two directories hold the same (model, method,
      sparsity, seed) row.
  """
  protocol, rows, seen = None, [], {}
  for d in dirs:
    paths = [os.path.join(d, f) for f in ("args.json", "runs.csv")]
    for path in paths:
      if not os.path.exists(path):
        raise ValueError(f"--merge: {path} not found; every merged directory needs args.json and "
                         "runs.csv, as written by a pruning run")
    with open(paths[0]) as f:
      args = json.load(f)
    mine = {k: args.get(k) for k in PROTOCOL}
    if protocol is None:
      protocol, first = dict(args), d
    else:
      diff = [k for k in PROTOCOL if mine[k] != protocol.get(k)]
      if diff:
        raise ValueError(f"--merge: {d} and {first} differ in "
                         + ", ".join(f"{k} ({mine[k]} vs {protocol.get(k)})" for k in diff))
    with open(paths[1], newline="") as f:
      for r in csv.DictReader(f):
        r = {k: _CSV_TYPES.get(k, str)(v) for k, v in r.items()}
        key = (r["model"], r["method"], r["target_sparsity"], r["seed"])
        if key in seen:
          raise ValueError(f"--merge: {d} and {seen[key]} both hold model {key[0]} method {key[1]} "
                           f"sparsity {key[2]} seed {key[3]}")
        seen[key] = d
        rows.append(r)
    for k in ("models", "methods", "sparsities", "seeds"):
      protocol[k] = sorted(set(protocol[k]) | set(args[k]), key=(list(METHODS).index
                                                                 if k == "methods" else None))
  return protocol, rows


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out-dir", required=True)
  p.add_argument("--merge", nargs="+", metavar="DIR",
                 help="write the combined table, CSV and plot of these run directories to "
                      "--out-dir instead of running anything")
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data.DATASETS))
  p.add_argument("--models", nargs="+", default=["lenet300"], choices=sorted(OUTPUT_LAYER))
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--finetune-epochs", type=int, default=2)
  p.add_argument("--lt-epochs", type=int, default=2, help="epochs per lottery-ticket round")
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--finetune-lr", type=float, default=0.01)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--score-batch", type=int, default=100, help="SNIP batch (Lee et al.: 100)")
  p.add_argument("--per-class", type=int, default=10, help="GraSP examples per class")
  p.add_argument("--synflow-iterations", type=int, default=100)
  p.add_argument("--curvature-batch", type=int, default=256, help="examples for OBD/OBS Fisher")
  p.add_argument("--obs-block", type=int, default=64)
  p.add_argument("--damping", type=float, default=1e-4)
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="train in jitted calls of this many unrolled steps instead of one scan per "
                      "epoch (5x faster for LeNet-5 on CPU, see training.make_train_epoch)")
  return p


def main(argv=None) -> list[dict]:
  p = build_parser()
  args = p.parse_args(argv)
  try:
    common.check_out_dir(args.out_dir)
  except FileExistsError as e:
    raise SystemExit(str(e)) from None
  if args.merge:
    try:
      protocol, rows = merge_runs(args.merge)
    except ValueError as e:
      raise SystemExit(str(e)) from None
    merged = argparse.Namespace(**{**protocol, "out_dir": args.out_dir, "merge": args.merge})
    os.makedirs(args.out_dir, exist_ok=True)
    table = write_outputs(merged, rows)
    print(table)
    return rows
  for s in args.sparsities:
    if not 0 < s < 1:
      p.error(f"--sparsities must be in (0, 1), got {s}")
  if args.steps_per_call is not None and args.steps_per_call < 1:
    p.error(f"--steps-per-call must be >= 1, got {args.steps_per_call}")
  if min(args.epochs, args.finetune_epochs, args.lt_epochs) <= 0:
    p.error("--epochs, --finetune-epochs and --lt-epochs must be > 0")
  args.sparsities = sorted(args.sparsities)
  ds = data.load_dataset(args.dataset, seed=0)
  os.makedirs(args.out_dir, exist_ok=True)
  common.write_json(os.path.join(args.out_dir, "args.json"),
                    {k: v for k, v in vars(args).items() if k not in ("out_dir", "merge")})

  per_seed = 1 + len(args.sparsities) * len([m for m in args.methods if m != "lottery"]) + (
      "lottery" in args.methods)
  rows: list[dict] = []
  with tqdm(total=per_seed * len(args.seeds) * len(args.models), desc="runs", unit="run") as bar:
    for model in args.models:
      runner = Runner(args, model, ds)
      for seed in args.seeds:
        rows += run_model(args, runner, seed, bar)
        write_outputs(args, rows)  # partial results survive an interrupted run
  table = write_outputs(args, rows)
  print(table)
  return rows


if __name__ == "__main__":
  main()
