"""Block-structured dynamic sparse training: accuracy against block size (issue 6).

SET, RigL and DSR train at block granularity (``block_shape=(b, b)``), so the
mask they learn is made of whole ``b x b`` blocks: the structure the
block-sparse kernel (:mod:`jaxsparse.kernels`) accelerates. Block size 1 is
the unstructured method (the reference); a dense model is the baseline.

Setup: an MLP (``models.create_model("mlp", features=(512, 512))``) whose two
hidden kernels are sparse and blockable by 16, 32 and 64: fc1 ``832 x 512``
and fc2 ``512 x 512``. The output layer (``512 x 10``) stays dense: its 10
outputs cannot be tiled by 16-64 wide blocks. Fashion-MNIST's 28 x 28 = 784
pixels are flattened and **zero-padded in the data** to 832 = 13 * 64 features
(the next multiple of the least common multiple of the block sizes); the
padded inputs are 0 for every example, so they carry no information and
their fc1 rows only ever receive zero gradient. Same optimizer for every run:
SGD with momentum 0.9, cosine-decayed learning rate, batch 100, the same
epochs; the same initial layer densities for every sparse method
(``--distribution``, default ER, which for 2-D kernels is ERK).

Methods (all from the library, with the schedules of
:func:`experiments.training.make_method`):

* ``set``: b = 1 is ``js.sparse_evolutionary_training`` (SET's signed drop), b > 1 is
  ``js.methods.dst.block_set`` (drop ``floor(0.3 * nnz_blocks)`` blocks of smallest
  mean ``|w|``, regrow as many at random); both rewire once per epoch;
* ``rigl``: ``js.rigl(..., block_shape=(b, b))`` (blocks ranked by mean ``|w|``
  and mean ``|dense gradient|``), dT = min(100, steps / 20), T_end = 75%;
* ``dsr``: ``js.dsr(..., block_shape=(b, b))``; its target pruned count ``Np``
  counts blocks, so it is scaled to the same fraction of the kept units
  (``--dsr-np-fraction``, default 600 / 26620: the authors' Np for
  LeNet-300-100 at 90% sparsity) with a floor of 1;
* ``dense``: ``js.dense``, one model per seed (no block size).

At the end of every run each sparse mask is checked: constant on every
``b x b`` block (:func:`jaxsparse.kernels.is_block_structured`), with the
expected number of blocks (each leaf keeps ``round(kept_count / b^2)`` blocks
for SET and RigL; DSR moves blocks between the leaves but keeps their total),
and every masked weight exactly zero. A failed check raises.

  python -m experiments.block_sizes --epochs 8 --seeds 0,1,2 --sparsity 0.9 \\
      --block-sizes 1,16,32,64 --methods dense,set,rigl,dsr --out results/block_sizes

writes ``runs.csv`` (one row per run, rewritten after each run; ``--resume``
skips the runs it already holds), ``table.md`` (mean +- std over seeds) and
``accuracy_vs_block.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common, data, training
from jaxsparse.core import transform as core
from jaxsparse.methods import dst
from jaxsparse.nn import models
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.kernels import bsr

METHODS = ("dense", "set", "rigl", "dsr")
LABELS = {"dense": "dense", "set": "SET", "rigl": "RigL", "dsr": "DSR"}
DSR_NP_FRACTION = 600 / 26620   # the DSR authors' Np over LeNet-300-100's kept kernel weights at s = 0.9
OUTPUT_LAYER = "fc3"            # with two hidden layers; kept dense (10 outputs)
FIELDS = ("method", "block_size", "seed", "accuracy", "sparsity", "sparsity_all_params",
          "kept_blocks", "expected_blocks", "block_structured", "dsr_np", "epochs",
          "first_epoch_seconds", "seconds_per_epoch", "run_seconds")


def pad_features(ds: data.Dataset, multiple: int) -> data.Dataset:
  """``ds`` with every image flattened and zero-padded to a multiple of ``multiple`` features.

  The padded features are 0 for every example (train and test alike): they
  add no information, only rows of the first kernel that see a zero input.
  """
  n_in = int(math.prod(ds.input_shape))
  width = -(-n_in // multiple) * multiple

  def pad(x):
    x = x.reshape(len(x), n_in)
    return np.pad(x, ((0, 0), (0, width - n_in))) if width > n_in else x

  return dataclasses.replace(ds, x_train=pad(ds.x_train), x_test=pad(ds.x_test),
                             input_shape=(width,))


def expected_blocks(params, sparsity: float, block: int, distribution: str,
                    keep_dense: Sequence[str]) -> dict[str, int]:
  """Blocks each sparse leaf starts with: ``round(kept_count / b^2)`` clipped to [1, all]
  (``dst.dynamic_sparse``'s documented rule; b = 1 is the kept count)."""
  counts = dist.kept_counts(params, sparsity, distribution=distribution, keep_dense=keep_dense)
  shapes = dict(zip(masks_lib.leaf_names(params), (jnp.shape(p) for p in jax.tree.leaves(params))))
  out = {}
  for name, count in counts.items():
    r, c = shapes[name][0] // block, shapes[name][1] // block
    out[name] = min(r * c, max(1, round(count / (block * block)))) if count else 0
  return out


def block_counts(params, masks, block: int) -> dict[str, tuple[int, bool, bool]]:
  """Per sparse leaf: (kept blocks, mask constant on every block, masked weights all zero)."""
  out = {}
  for name, p, m in zip(masks_lib.leaf_names(params), jax.tree.leaves(params),
                        jax.tree.leaves(masks)):
    if not masks_lib.is_sparse(m):
      continue
    shape = (block, block)
    kept = int(jnp.sum(bsr.block_mask(m, m.shape, shape)))
    out[name] = (kept, bool(bsr.is_block_structured(m, shape)),
                 bool(jnp.all(jnp.where(m, True, p == 0))))
  return out


def check_masks(params, masks, block: int, expected: dict[str, int], per_leaf: bool,
                where: str) -> dict[str, int]:
  """Raises RuntimeError unless every sparse mask is block-structured with the expected
  block count (per leaf, or in total when ``per_leaf`` is False) and zero where masked."""
  counts = block_counts(params, masks, block)
  problems = []
  if set(counts) != set(expected):
    problems.append(f"sparse leaves {sorted(counts)} != expected {sorted(expected)}")
  for name, (kept, structured, zeros) in counts.items():
    if not structured:
      problems.append(f"{name}: mask is not constant on {block}x{block} blocks")
    if not zeros:
      problems.append(f"{name}: a masked weight is non-zero")
    if per_leaf and kept != expected.get(name):
      problems.append(f"{name}: {kept} blocks kept, expected {expected.get(name)}")
  total, want = sum(c[0] for c in counts.values()), sum(expected.values())
  if total != want:
    problems.append(f"{total} blocks kept in all, expected {want}")
  if problems:
    raise RuntimeError(f"block check failed {where} (block {block}): " + "; ".join(problems))
  return {name: c[0] for name, c in counts.items()}


def make_transform(method: str, block: int, inner, sparsity: float, *, total_steps: int,
                   steps_per_epoch: int, seed: int, distribution: str,
                   keep_dense: Sequence[str], dsr_np: int):
  """The library method at block size ``block`` (1 = unstructured), schedules as
  :func:`experiments.training.make_method`."""
  common = dict(distribution=distribution, keep_dense=tuple(keep_dense))
  blocks = {} if block == 1 else {"block_shape": (block, block)}
  if method == "set" and block > 1:
    return dst.block_set(inner, sparsity, update_period=steps_per_epoch,
                         update_start=steps_per_epoch, seed=seed, **blocks, **common)
  if method == "dsr":
    common["target_pruned"] = dsr_np
  kwargs = {} if method == "dense" else {**common, **(blocks if method != "set" else {})}
  return training.make_method(method, inner, sparsity, total_steps=total_steps,
                              steps_per_epoch=steps_per_epoch, seed=seed, **kwargs)


def run_one(ds: data.Dataset, method: str, block: int, seed: int, *, features: Sequence[int],
            sparsity: float, epochs: int, batch_size: int, lr: float, distribution: str,
            dsr_np_fraction: float, log: Callable[[str], None] | None = print) -> dict:
  """Trains one model; returns its row for ``runs.csv`` (raises if a block check fails)."""
  t_run = time.perf_counter()
  net = models.create_model("mlp", ds.num_classes, features=tuple(features))
  # jitted: one compilation, and the same values as the eager init
  params = jax.jit(lambda: models.init_params(net, ds.input_shape, seed))()["params"]
  keep_dense = (OUTPUT_LAYER,) if method != "dense" else ()
  steps_per_epoch = len(ds.x_train) // batch_size
  total_steps = steps_per_epoch * epochs
  inner = training.make_optimizer("sgd", training.make_learning_rate("cosine", lr, total_steps),
                                  momentum=0.9)
  expected, dsr_np = {}, ""
  if method != "dense":
    expected = expected_blocks(params, sparsity, block, distribution, keep_dense)
    if method == "dsr":
      dsr_np = max(1, round(dsr_np_fraction * sum(expected.values())))
  tx = make_transform(method, block, inner, sparsity, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, seed=seed, distribution=distribution,
                      keep_dense=keep_dense, dsr_np=dsr_np or 1)
  opt_state = jax.jit(tx.init)(params)   # one compilation instead of op-by-op dispatch
  params = masks_lib.apply_masks(params, core.get_masks(opt_state))
  if method != "dense":
    check_masks(params, core.get_masks(opt_state), block, expected, True, "at init")
  state = training.TrainState(params, {}, opt_state)
  train_epoch = training.make_train_epoch(net, tx, batch_size, return_losses=True)
  evaluate = training.make_evaluate(net)
  x_train, y_train = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
  times, acc = [], float("nan")
  for epoch, state, loss, _, seconds in training.iterate_epochs(
      train_epoch, state, x_train, y_train, jax.random.key(seed), stop=epochs):
    times.append(seconds)
    if not np.isfinite(loss):
      raise FloatingPointError(f"{method} block {block} seed {seed}: loss {loss} at epoch {epoch + 1}")
    acc = evaluate(state.params, state.batch_stats, ds.x_test, ds.y_test)
    if log is not None:
      log(f"  {method:5s} b={block:<3d} seed {seed} epoch {epoch + 1}/{epochs}: loss {loss:.4f} "
          f"test acc {acc:.4f} ({times[-1]:.1f}s)")
  masks = core.get_masks(state.opt_state)
  kept, structured = {}, ""
  if method != "dense":
    # SET and RigL keep each leaf's block count; DSR keeps only the total.
    kept = check_masks(state.params, masks, block, expected, method != "dsr", "at the end")
    structured = True
  return dict(
      method=method, block_size=block if method != "dense" else "", seed=seed, accuracy=acc,
      sparsity=masks_lib.sparsity(state.params, masks),
      sparsity_all_params=masks_lib.sparsity(state.params, masks, sparse_only=False),
      kept_blocks=json.dumps(kept), expected_blocks=json.dumps(expected),
      block_structured=structured, dsr_np=dsr_np, epochs=epochs,
      first_epoch_seconds=times[0],
      seconds_per_epoch=float(np.median(times[1:])) if len(times) > 1 else times[0],
      run_seconds=time.perf_counter() - t_run)


# ---------------------------------------------------------------------------- reporting

def _select(runs, method, block):
  return [r for r in runs if r["method"] == method
          and (method == "dense" or int(r["block_size"]) == block)]


def _mean_std(values):
  values = [float(v) for v in values]
  if not values:
    return None, None
  return common.mean_std(values)


def table(runs: list[dict], methods: Sequence[str], block_sizes: Sequence[int], header: str) -> str:
  sparse = [m for m in methods if m != "dense"]
  col = lambda b: "b = 1 (unstructured)" if b == 1 else f"b = {b}"
  rows = []
  if "dense" in methods:
    mean, std = _mean_std(r["accuracy"] for r in _select(runs, "dense", 0))
    if mean is not None:
      rows.append(["dense (no mask, all columns)",
                   *[f"{100 * mean:.2f} +- {100 * std:.2f}"] * len(block_sizes)])
  for m in sparse:
    cells = []
    for b in block_sizes:
      mean, std = _mean_std(r["accuracy"] for r in _select(runs, m, b))
      cells.append("" if mean is None else f"{100 * mean:.2f} +- {100 * std:.2f}")
    rows.append([LABELS[m], *cells])
  lines = [header, "", "Test accuracy % (mean +- std over seeds):", "",
           common.markdown_table(["method", *(col(b) for b in block_sizes)], rows)]
  lines += ["", "Per run group: actual sparsity of the sparse kernels (fc1, fc2), blocks kept "
            "(fc1 + fc2, seed of the first run), the block check over all seeds, seconds per "
            "epoch (median over runs, first epoch excluded):", ""]
  rows = []
  groups = [("dense", 0)] if "dense" in methods else []
  groups += [(m, b) for m in sparse for b in block_sizes]
  for m, b in groups:
    rs = _select(runs, m, b)
    if not rs:
      continue
    mean, std = _mean_std(r["accuracy"] for r in rs)
    sp_mean, _ = _mean_std(r["sparsity"] for r in rs)
    if m == "dense":
      blocks, check = "-", "-"
    else:
      kept = json.loads(rs[0]["kept_blocks"]) if isinstance(rs[0]["kept_blocks"], str) else rs[0]["kept_blocks"]
      blocks = " + ".join(str(v) for v in kept.values()) + f" = {sum(kept.values())}"
      ok = sum(str(r["block_structured"]) == "True" for r in rs)
      check = f"yes ({ok}/{len(rs)})" if ok == len(rs) else f"NO ({ok}/{len(rs)})"
    spe = statistics.median(float(r["seconds_per_epoch"]) for r in rs)
    rows.append([LABELS[m], "-" if m == "dense" else b, len(rs),
                 f"{100 * mean:.2f} +- {100 * std:.2f}", f"{float(sp_mean):.4f}", blocks, check,
                 f"{spe:.1f}"])
  lines.append(common.markdown_table(
      ["method", "block", "runs", "accuracy %", "sparsity", "blocks kept (fc1 + fc2)",
       "block-structured, right count", "s / epoch"], rows))
  return "\n".join(lines) + "\n"


def plot(runs: list[dict], methods: Sequence[str], block_sizes: Sequence[int], path: str,
         title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  xs = list(range(len(block_sizes)))
  if "dense" in methods:
    mean, std = _mean_std(r["accuracy"] for r in _select(runs, "dense", 0))
    if mean is not None:
      ax.axhline(100 * mean, color="k", ls="--", lw=1, label="dense")
      ax.axhspan(100 * (mean - std), 100 * (mean + std), color="k", alpha=0.08)
  for i, m in enumerate(m for m in methods if m != "dense"):
    px, ys, es = [], [], []
    for x, b in zip(xs, block_sizes):
      mean, std = _mean_std(r["accuracy"] for r in _select(runs, m, b))
      if mean is not None:
        px.append(x + (i - 1) * 0.06)   # small offsets so the error bars do not overlap
        ys.append(100 * mean)
        es.append(100 * std)
    if px:
      ax.errorbar(px, ys, yerr=es, marker="o", capsize=3, label=LABELS[m])
  ax.set_xticks(xs, [f"{b}x{b}" if b > 1 else "1 (unstructured)" for b in block_sizes])
  ax.set_xlabel("block size of the mask")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _done_key(r: dict) -> tuple:
  return (r["method"], str(r["block_size"]), int(r["seed"]))


def run_experiment(*, dataset: str = "fashion_mnist", out_dir: str = "results/block_sizes",
                   methods: Sequence[str] = METHODS, block_sizes: Sequence[int] = (1, 16, 32, 64),
                   seeds: Sequence[int] = (0, 1), epochs: int = 5, sparsity: float = 0.9,
                   features: Sequence[int] = (512, 512), lr: float = 0.05, batch_size: int = 100,
                   distribution: str = "er", dsr_np_fraction: float = DSR_NP_FRACTION,
                   data_dir: str | None = None, resume: bool = False,
                   log: Callable[[str], None] | None = print) -> list[dict]:
  """Runs every (seed, block size, method) and writes ``runs.csv``, ``table.md`` and
  ``accuracy_vs_block.png`` to ``out_dir``; returns the rows."""
  for m in methods:
    if m not in METHODS:
      raise ValueError(f"unknown method {m!r}; choose from {METHODS}")
  block_sizes = [int(b) for b in block_sizes]
  if not block_sizes or any(b < 1 for b in block_sizes):
    raise ValueError(f"block sizes must be positive, got {block_sizes}")
  multiple = math.lcm(*block_sizes)
  for w in features:
    if w % multiple:
      raise ValueError(f"hidden width {w} is not divisible by every block size {block_sizes}")
  csv_path = os.path.join(out_dir, "runs.csv")
  runs: list[dict] = []
  if os.path.exists(csv_path):
    if not resume:
      raise FileExistsError(f"{csv_path} exists; pass resume=True (--resume) to continue it or "
                            "choose another out_dir")
    with open(csv_path, newline="") as f:
      runs = list(csv.DictReader(f))
    other = {r["epochs"] for r in runs} - {str(epochs)}
    if other:
      raise ValueError(f"{csv_path} holds runs of {sorted(other)} epochs, not {epochs}")
  os.makedirs(out_dir, exist_ok=True)
  ds = pad_features(data.load_dataset(dataset, data_dir=data_dir), multiple)
  if log is not None:
    log(f"{dataset}: inputs padded to {ds.input_shape[0]} features; MLP {ds.input_shape[0]}-"
        f"{'-'.join(map(str, features))}-{ds.num_classes}, {len(ds.x_train)} train examples")
  # Seeds outermost, so that a run cut short holds whole tables for the first seeds.
  jobs = []
  for seed in seeds:
    if "dense" in methods:
      jobs.append(("dense", 0, seed))
    jobs += [(m, b, seed) for b in block_sizes for m in methods if m != "dense"]
  done = {_done_key(r) for r in runs}
  for i, (method, block, seed) in enumerate(jobs):
    if (method, "" if method == "dense" else str(block), seed) in done:
      continue
    row = run_one(ds, method, block, seed, features=features, sparsity=sparsity, epochs=epochs,
                  batch_size=batch_size, lr=lr, distribution=distribution,
                  dsr_np_fraction=dsr_np_fraction, log=log)
    runs.append(row)
    common.write_csv(csv_path, runs, FIELDS)
    if log is not None:
      log(f"[{i + 1}/{len(jobs)}] {method} b={block} seed {seed}: acc {row['accuracy']:.4f} "
          f"sparsity {row['sparsity']:.4f} blocks {row['kept_blocks']} "
          f"({row['run_seconds']:.0f}s)")
  header = (f"MLP {ds.input_shape[0]}-{'-'.join(map(str, features))}-{ds.num_classes} on "
            f"{dataset} (inputs zero-padded to {ds.input_shape[0]} features), fc1 and fc2 sparse "
            f"at {sparsity} ({distribution} initial densities), fc3 dense; {epochs} epochs, "
            f"batch {batch_size}, SGD momentum 0.9, lr {lr} cosine; seeds "
            f"{', '.join(map(str, seeds))}. Block SET = dst.block_set (b > 1) / js.sparse_evolutionary_training (b = 1); "
            f"RigL and DSR with block_shape=(b, b); DSR Np = {dsr_np_fraction:.4f} x kept "
            f"units (min 1).")
  md = table(runs, methods, block_sizes, header)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(md)
  plot(runs, methods, block_sizes, os.path.join(out_dir, "accuracy_vs_block.png"),
       f"{dataset}, MLP {'-'.join(map(str, features))}, s = {sparsity}, {epochs} epochs, "
       f"{len(seeds)} seed(s)")
  if log is not None:
    log(md)
    log(f"results written to {out_dir}/ (runs.csv, table.md, accuracy_vs_block.png)")
  return runs


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(",") if t.strip()]


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data.DATASETS))
  p.add_argument("--data-dir", default=None)
  p.add_argument("--methods", default=",".join(METHODS),
                 help=f"comma-separated, from {','.join(METHODS)}")
  p.add_argument("--block-sizes", default="1,16,32,64", help="comma-separated; 1 = unstructured")
  p.add_argument("--seeds", default="0,1", help="comma-separated")
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--features", default="512,512", help="hidden widths, comma-separated")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--distribution", default="er", choices=["uniform", "er", "erk"],
                 help="initial layer densities of every sparse method")
  p.add_argument("--dsr-np-fraction", type=float, default=DSR_NP_FRACTION,
                 help="DSR's Np as a fraction of the kept units (weights or blocks)")
  p.add_argument("--out", default="results/block_sizes")
  p.add_argument("--resume", action="store_true", help="skip the runs already in OUT/runs.csv")
  args = p.parse_args(argv)
  return run_experiment(dataset=args.dataset, out_dir=args.out,
                        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                        block_sizes=_ints(args.block_sizes), seeds=_ints(args.seeds),
                        epochs=args.epochs, sparsity=args.sparsity, features=_ints(args.features),
                        lr=args.lr, batch_size=args.batch_size, distribution=args.distribution,
                        dsr_np_fraction=args.dsr_np_fraction, data_dir=args.data_dir,
                        resume=args.resume)


if __name__ == "__main__":
  main(sys.argv[1:])
