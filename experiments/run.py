"""Run a named experiment config: ``python -m experiments.run <config> [key=value ...]``.

  python -m experiments.run digits_rigl                       # results/runs/digits_rigl/
  python -m experiments.run digits_set epochs=5 sparsity=0.95 method_kwargs.drop_fraction=0.5
  python -m experiments.run digits_dsr --out /tmp/dsr --resume # continue a killed run
  python -m experiments.run --list                             # the known configs

The results folder (``--out``, default ``results/runs/<config>[__<overrides>]``)
gets ``config.json``, ``metrics.csv`` (one row per epoch: loss, test accuracy,
sparsity, seconds, density of every sparse layer), ``tensorboard/`` (the same
scalars as TensorBoard event files, step = epoch, written with tensorboardX when
it is installed: ``pip install tensorboardX`` or the ``[experiments]`` extra;
without it the run says so in one line and writes the CSV only; view with
``tensorboard --logdir <out>``), ``checkpoints/`` (orbax,
after every epoch), and at the end ``report.json`` and ``report.md``: test
accuracy, parameters and sparsity per layer and overall, dense and sparse
forward FLOPs (theoretical speedup), storage bytes in the best format per
layer, and seconds per epoch. An existing folder is never overwritten silently:
pass ``--resume`` to continue the run in it (from its last checkpoint) or
``--overwrite`` to delete it first. A resumed run keeps the CSV rows and
continues the TensorBoard curves from its checkpoint (a new event file whose
purge step hides anything logged after that checkpoint). A NaN loss stops the
run with an error naming the epoch and step and keeps the last good checkpoint.

Nothing is written before the config, the overrides (``method_kwargs`` included: an
unknown argument is named with the closest valid one), the dataset, the model and the
method have been built and checked, so a bad command leaves no folder behind.

Run it from the repository root: ``experiments`` is a folder of the repository, not an
installed package (from elsewhere, ``PYTHONPATH=/path/to/repo python -m experiments.run``);
results folders are relative to the current directory.

For several methods, sparsities and seeds with baselines, a table and plots,
see :mod:`experiments.sweep`; for one run from command-line flags into one JSON file (the
README's main job), :mod:`experiments.train` (:func:`run_to_json`).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import shutil
import sys
from typing import Any

from experiments import configs
from experiments import checkpoint, common, data, training
from jaxsparse.core import masks as masks_lib, transform as core
from jaxsparse.analysis import flops, formats
from jaxsparse.nn import models

METRICS = ("epoch", "loss", "test_accuracy", "sparsity", "seconds")


def default_out(name: str, overrides: list[str]) -> str:
  """``results/runs/<name>`` plus a sanitized suffix of the overrides, if any."""
  suffix = "__" + re.sub(r"[^A-Za-z0-9_.=,-]+", "-", ",".join(overrides)) if overrides else ""
  return os.path.join("results", "runs", name + suffix)


def check_out(out: str, *, resume: bool, overwrite: bool) -> None:
  """Checks, without touching the disk, that :func:`prepare_out` would accept ``out``.

  Raises:
    FileExistsError: naming ``out`` when it exists and neither flag is set.
    FileNotFoundError: for ``resume`` without a run in ``out``.
  """
  if resume and overwrite:
    raise ValueError("pass at most one of --resume and --overwrite")
  if os.path.isdir(out) and os.listdir(out):
    if not (overwrite or resume):
      raise FileExistsError(f"results folder {out!r} already exists; pass --resume to continue "
                            "the run in it, --overwrite to replace it, or --out for another folder")
  elif resume:
    raise FileNotFoundError(f"--resume: results folder {out!r} does not exist or is empty")


def prepare_out(out: str, *, resume: bool, overwrite: bool) -> None:
  """Creates ``out``; an existing non-empty folder needs ``resume`` or ``overwrite``
  (``overwrite`` deletes it first). Raises as :func:`check_out`."""
  check_out(out, resume=resume, overwrite=overwrite)
  if overwrite and os.path.isdir(out):
    shutil.rmtree(out)
  os.makedirs(out, exist_ok=True)


def epoch_row(metrics: dict[str, Any], state: training.TrainState) -> dict[str, Any]:
  """One epoch's log row: :data:`METRICS` plus ``density/<layer>`` (kept / total) per sparse layer."""
  row = {k: metrics[k] for k in METRICS}
  for c in masks_lib.count_leaves(state.params, core.get_masks(state.opt_state)):
    if c.sparse:
      row[f"density/{c.name}"] = c.kept / c.total
  return row


class CSVLogger:
  """Appends one row per epoch to ``path``: :data:`METRICS` plus ``density/<layer>`` columns."""

  def __init__(self, path: str, keep_epochs: int = 0):
    self.path = path
    rows = []
    if keep_epochs and os.path.exists(path):  # resume: keep the rows of the checkpointed epochs
      with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= keep_epochs]
    self.fields: list[str] | None = list(rows[0]) if rows else None
    with open(path, "w", newline="") as f:
      if rows:
        writer = csv.DictWriter(f, self.fields)
        writer.writeheader()
        writer.writerows(rows)

  def __call__(self, metrics: dict[str, Any], state: training.TrainState) -> None:
    self.write(epoch_row(metrics, state))

  def write(self, row: dict[str, Any]) -> None:
    new = self.fields is None
    self.fields = self.fields or list(row)
    with open(self.path, "a", newline="") as f:
      writer = csv.DictWriter(f, self.fields)
      if new:
        writer.writeheader()
      writer.writerow(row)

  def close(self) -> None:
    pass


TENSORBOARD_OFF = ("TensorBoard logging is off: tensorboardX is not installed (pip install "
                   "tensorboardX, or install jaxsparse with the [experiments] or [test] extra); "
                   "writing metrics.csv only")


class TensorBoardLogger:
  """Writes every entry of an epoch row but ``epoch`` as a scalar at step ``epoch`` (tensorboardX).

  Each logger starts a new event file in ``logdir``. ``resume_after=k`` (the
  last checkpointed epoch of a resumed run) sets the writer's purge step to
  ``k + 1``: TensorBoard then drops whatever the interrupted run logged after
  epoch ``k`` and the curves continue from the checkpoint. The writer is
  flushed after every epoch, so a killed run loses no finished epoch.

  Raises:
    ImportError: when tensorboardX is not installed (see :func:`open_tensorboard`).
  """

  def __init__(self, logdir: str, *, resume_after: int | None = None):
    from tensorboardX import SummaryWriter  # optional dependency
    os.makedirs(logdir, exist_ok=True)
    # tensorboardX names files by the second and host: a suffix keeps a quick resume from
    # truncating the previous file.
    part = sum(n.startswith("events.out.tfevents.") for n in os.listdir(logdir))
    self.logdir = logdir
    self.writer = SummaryWriter(logdir, filename_suffix=f".{part}",
                                purge_step=None if resume_after is None else resume_after + 1)

  def __call__(self, metrics: dict[str, Any], state: training.TrainState) -> None:
    self.write(epoch_row(metrics, state))

  def write(self, row: dict[str, Any]) -> None:
    step = int(row["epoch"])
    for tag, value in row.items():
      if tag != "epoch":
        self.writer.add_scalar(tag, float(value), step)
    self.writer.flush()

  def close(self) -> None:
    self.writer.close()


def open_tensorboard(logdir: str, *, resume_after: int | None = None
                     ) -> TensorBoardLogger | None:
  """A :class:`TensorBoardLogger`, or None (after printing :data:`TENSORBOARD_OFF`) without tensorboardX."""
  try:
    return TensorBoardLogger(logdir, resume_after=resume_after)
  except ImportError:
    print(TENSORBOARD_OFF, file=sys.stderr)
    return None


def make_report(config: configs.Config, result: dict[str, Any]) -> dict[str, Any]:
  """Accuracy, per-layer params / sparsity / FLOPs / best storage, totals and timing of one run."""
  state = result["state"]
  ds = data.load_dataset(config.dataset, data_dir=config.data_dir, seed=config.seed)
  net = models.create_model(config.model, ds.num_classes, **config.model_kwargs)
  masks = core.get_masks(state.opt_state)
  layer_flops = {f.name: f for f in flops.count_flops(net, state.params, ds.input_shape, masks,
                                                        batch_stats=state.batch_stats)}
  sizes = {s.name: s for s in formats.storage_sizes(state.params, masks)}
  layers = {}
  for c in masks_lib.count_leaves(state.params, masks):
    s, f = sizes[c.name], layer_flops.get(c.name)
    layers[c.name] = dict(shape=list(c.shape), params=c.total, kept=c.kept, sparsity=c.sparsity,
                          sparse=c.sparse, best_format=s.best, best_bytes=s.sizes()[s.best] / 8,
                          dense_bytes=s.dense / 8, dense_flops=f.dense if f else 0,
                          sparse_flops=f.sparse if f else 0)
  dense_flops, sparse_flops = flops.total_flops(list(layer_flops.values()))
  total = sum(v["params"] for v in layers.values())
  kept = sum(v["kept"] for v in layers.values())
  return dict(
      config=config.to_dict(), test_accuracy=result["final_test_accuracy"],
      params=total, kept_params=kept, sparsity_all=1 - kept / total,
      sparsity_sparse_layers=result["final_sparsity"],
      dense_flops=dense_flops, sparse_flops=sparse_flops,
      flops_speedup=dense_flops / sparse_flops if sparse_flops else math.inf,
      dense_bytes=sum(v["dense_bytes"] for v in layers.values()),
      best_bytes=sum(v["best_bytes"] for v in layers.values()),
      seconds_per_epoch=result["seconds_per_epoch"],
      first_epoch_seconds=result["first_epoch_seconds"],
      epoch_seconds=[h["seconds"] for h in result["history"]],
      device=result["device"], jax_version=result["jax_version"], layers=layers)


def report_markdown(report: dict[str, Any]) -> str:
  """The report as a markdown table per layer plus a totals line."""
  rows = [[name, tuple(v["shape"]), f"{v['params']:,}", f"{v['kept']:,}", f"{v['sparsity']:.2%}",
           f"{v['dense_flops']:,}", f"{v['sparse_flops']:,}", v["best_format"],
           f"{v['best_bytes']:,.0f}"] for name, v in report["layers"].items()]
  lines = [common.markdown_table(["layer", "shape", "params", "kept", "sparsity", "dense FLOPs",
                                  "sparse FLOPs", "best format", "bytes"], rows,
                                 align="llrrrrrlr"),
           f"| **total** | | {report['params']:,} | {report['kept_params']:,} | "
           f"{report['sparsity_all']:.2%} | {report['dense_flops']:,} | "
           f"{report['sparse_flops']:,} | | {report['best_bytes']:,.0f} |", ""]
  lines.append(f"test accuracy {report['test_accuracy']:.4f}; sparsity of the sparse layers "
               f"{report['sparsity_sparse_layers']:.2%}; theoretical speedup "
               f"{report['flops_speedup']:.2f}x; storage {report['best_bytes']:,.0f} bytes "
               f"(dense {report['dense_bytes']:,.0f}); {report['seconds_per_epoch']:.3f} s/epoch "
               f"(first epoch, with compilation, {report['first_epoch_seconds']:.2f} s)")
  return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", nargs="?", help="a name from experiments.configs.CONFIGS")
  p.add_argument("overrides", nargs="*", help="key=value overrides of config fields")
  p.add_argument("--out", default=None, help="results folder (default results/runs/<config>...)")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--overwrite", action="store_true", help="delete --out first")
  p.add_argument("--list", action="store_true", help="list the configs and exit")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
  return p.parse_intermixed_args(argv)  # config, overrides and flags in any order


def run(name: str, overrides: list[str] = (), *, out: str | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
  """Runs config ``name`` with ``overrides`` into ``out``; returns the report (see module doc).

  Everything is checked before anything is written: the config and overrides,
  the results folder (read-only), then the dataset, model, method arguments
  and optimizer state (:func:`experiments.training.train` builds them and calls
  back to create the folder only when the run can start). A bad argument thus
  leaves no folder behind, and running the same command again gives the same
  error.
  """
  overrides = list(overrides)
  config = configs.apply_overrides(configs.get_config(name), overrides)
  out = out or default_out(name, overrides)
  check_out(out, resume=resume, overwrite=overwrite)
  ckpt_dir = os.path.join(out, "checkpoints")
  loggers: list[Any] = []

  def on_start() -> None:
    prepare_out(out, resume=resume, overwrite=overwrite)
    done = checkpoint.latest_epoch(ckpt_dir) or 0
    with open(os.path.join(out, "config.json"), "w") as f:
      f.write(config.to_json())
    loggers.append(CSVLogger(os.path.join(out, "metrics.csv"), keep_epochs=done))
    tensorboard = open_tensorboard(os.path.join(out, "tensorboard"),
                                   resume_after=done if resume else None)
    if tensorboard is not None:
      loggers.append(tensorboard)

  def on_epoch_end(metrics: dict[str, Any], state: training.TrainState) -> None:
    row = epoch_row(metrics, state)
    for logger in loggers:
      logger.write(row)

  try:
    result = training.train(**config.train_kwargs(), progress=progress,
                            checkpoint_dir=ckpt_dir, resume=resume, stop_on_nan=True,
                            on_epoch_end=on_epoch_end, on_start=on_start)
  finally:
    for logger in loggers:
      logger.close()
  report = make_report(config, result)
  common.write_json(os.path.join(out, "report.json"), report)
  md = report_markdown(report)
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(f"# {name} {' '.join(overrides)}\n\n{md}\n")
  print(md)
  print(f"results in {out}")
  return report


def default_json(config: configs.Config) -> str:
  """``results/<dataset>_<model>_<method>_s<sparsity>_seed<seed>.json``: the main job's file."""
  return os.path.join("results", f"{config.dataset}_{config.model}_{config.method}_"
                                 f"s{config.sparsity}_seed{config.seed}.json")


def run_to_json(config: configs.Config, out: str | None = None, *, progress: bool = False
                ) -> dict[str, Any]:
  """Trains ``config`` and writes :func:`experiments.training.train`'s results (config,
  history, per-layer counts, timing; not the state) to the JSON file ``out`` (default
  :func:`default_json`): ``python -m experiments.train``. Returns the results."""
  result = training.train(**config.train_kwargs(), progress=progress)
  result.pop("state")
  print(result["summary"])
  print(f"final test accuracy {result['final_test_accuracy']:.4f}  sparsity "
        f"{result['final_sparsity']:.4f}  {result['seconds_per_epoch']:.2f} s/epoch "
        f"(first epoch {result['first_epoch_seconds']:.2f} s, with compilation)")
  out = out or default_json(config)
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  common.write_json(out, result)
  print(f"results written to {out}")
  return result


USER_ERRORS = (KeyError, TypeError, ValueError, FileExistsError, FileNotFoundError,
               FloatingPointError)
"""Errors of a bad config, override or results folder: printed as one line, exit status 2."""


def print_error(err: BaseException) -> int:
  """Prints ``err`` as ``error: ...`` to stderr; returns the exit status 2."""
  msg = err.args[0] if isinstance(err, KeyError) and err.args else err
  print(f"error: {msg}", file=sys.stderr)
  return 2


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.list or not args.config:
    for n, c in sorted(configs.CONFIGS.items()):
      print(f"{n:28s} {c.dataset} {c.model} {c.method} sparsity={c.sparsity} epochs={c.epochs}")
    return 0
  try:
    run(args.config, args.overrides, out=args.out, resume=args.resume, overwrite=args.overwrite,
        progress=not args.no_progress)
  except USER_ERRORS as err:
    return print_error(err)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
