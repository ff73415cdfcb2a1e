"""Knowledge distillation into a sparse student (Hinton et al. 2015) with SET and RigL.

  python -m experiments.distill --out-dir results/distill   # 3 seeds, 5 student epochs
  python -m experiments.distill --out-dir /tmp/distill --small   # digits, 1 epoch, 1 seed

For every seed: a dense teacher (``--teacher-model``, LeNet-300-100 by default) is
trained with plain cross-entropy, then for every method (``--methods``, SET and RigL)
and sparsity (``--sparsities``) the student (``--model``) is trained twice from the same
initialisation and mask seed: with cross-entropy only, and with
:func:`jaxsparse.regularizers.distillation.distillation_loss` against the frozen
teacher's logits (``--temperature``, ``--alpha``). ``--out-dir`` gets ``runs.csv``
(one row per training), ``table.csv`` and ``table.md`` (test accuracy mean ± sample std
over seeds, and the mean gain of distillation in points) and ``args.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import jax

from experiments import common, data, training
from jaxsparse.nn import models

RUN_FIELDS = ("role", "model", "method", "sparsity", "distilled", "seed", "test_accuracy",
              "final_sparsity", "seconds_per_epoch")
TABLE_FIELDS = ("method", "sparsity", "n_seeds", "plain_mean", "plain_std", "distilled_mean",
                "distilled_std", "gain_mean")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m experiments.distill", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out-dir", required=True)
  p.add_argument("--overwrite", action="store_true", help="reuse an --out-dir holding results")
  p.add_argument("--small", action="store_true",
                 help="a quick check: digits, 1 epoch, 1 seed, sparsity 0.9")
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data.DATASETS))
  p.add_argument("--teacher-model", default="lenet300")
  p.add_argument("--model", default="lenet300", help="the sparse student")
  p.add_argument("--methods", nargs="+", default=["set", "rigl"], choices=training.METHODS)
  p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  # The README table's budget: the default command reproduces it.
  p.add_argument("--epochs", type=int, default=5, help="student epochs")
  p.add_argument("--teacher-epochs", type=int, default=10)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--temperature", type=float, default=4.0, help="T (Hinton et al. use 1-20)")
  p.add_argument("--alpha", type=float, default=0.9, help="weight of the soft-target term")
  return p


def _small(args: argparse.Namespace) -> argparse.Namespace:
  return argparse.Namespace(**{**vars(args), "dataset": "digits", "epochs": 1,
                               "teacher_epochs": 1, "seeds": args.seeds[:1],
                               "sparsities": args.sparsities[:1]})


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Trains the teachers and students of ``args``; returns the rows of ``runs.csv``."""
  # The loss's own checks, before a teacher trains for nothing.
  training.check_distillation(args.temperature, args.alpha)
  num_classes = data.load_dataset(args.dataset, seed=0).num_classes
  common_kw = dict(dataset=args.dataset, batch_size=args.batch_size, learning_rate=args.lr,
                   progress=False, log=None)
  rows = []
  for seed in args.seeds:
    res = training.train(model=args.teacher_model, method="dense", sparsity=0.0,
                         epochs=args.teacher_epochs, seed=seed, **common_kw)
    print(f"seed {seed}: dense teacher {args.teacher_model}: {res['final_test_accuracy']:.4f}",
          flush=True)
    rows.append(dict(role="teacher", model=args.teacher_model, method="dense", sparsity=0.0,
                     distilled=False, seed=seed, test_accuracy=res["final_test_accuracy"],
                     final_sparsity=res["final_sparsity"],
                     seconds_per_epoch=res["seconds_per_epoch"]))
    state = res["state"]
    variables = {"params": state.params}
    if jax.tree.leaves(state.batch_stats):  # batch norm's running statistics
      variables["batch_stats"] = state.batch_stats
    teacher = training.make_teacher(models.create_model(args.teacher_model, num_classes),
                                    variables)
    for method in args.methods:
      for sparsity in args.sparsities:
        for distilled in (False, True):
          kw = dict(teacher=teacher, distill_temperature=args.temperature,
                    distill_alpha=args.alpha) if distilled else {}
          res = training.train(model=args.model, method=method, sparsity=sparsity,
                               epochs=args.epochs, seed=seed, **common_kw, **kw)
          print(f"seed {seed}: {method} s={sparsity:g} "
                f"{'distilled' if distilled else 'plain CE'}: {res['final_test_accuracy']:.4f}",
                flush=True)
          rows.append(dict(role="student", model=args.model, method=method, sparsity=sparsity,
                           distilled=distilled, seed=seed,
                           test_accuracy=res["final_test_accuracy"],
                           final_sparsity=res["final_sparsity"],
                           seconds_per_epoch=res["seconds_per_epoch"]))
  return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, sparsity): accuracy mean and sample std over seeds without and
  with distillation, and the mean over seeds of the per-seed gain."""
  out = []
  students = [r for r in rows if r["role"] == "student"]
  for key in dict.fromkeys((r["method"], r["sparsity"]) for r in students):
    acc = {d: {r["seed"]: r["test_accuracy"] for r in students
               if (r["method"], r["sparsity"]) == key and r["distilled"] == d}
           for d in (False, True)}
    (pm, ps), (dm, ds) = common.mean_std(acc[False].values()), common.mean_std(acc[True].values())
    gain, _ = common.mean_std(acc[True][s] - acc[False][s] for s in acc[False])
    out.append(dict(method=key[0], sparsity=key[1], n_seeds=len(acc[False]), plain_mean=pm,
                    plain_std=ps, distilled_mean=dm, distilled_std=ds, gain_mean=gain))
  return out


def table_markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
  teacher = [r["test_accuracy"] for r in rows if r["role"] == "teacher"]
  lines = [f"# Distillation into a sparse student: {args.model} on {args.dataset}", "",
           f"Dense teacher {args.teacher_model} ({args.teacher_epochs} epochs): "
           f"{common.format_mean_std(teacher)} % over seeds {sorted(set(args.seeds))}. "
           f"Students: {args.epochs} epochs, T = {args.temperature:g}, alpha = {args.alpha:g}. "
           "Test accuracy (%), mean ± std (ddof=1) over seeds; gain: mean of the per-seed "
           "differences, in points.", ""]
  cells = [[r["method"], f"{r['sparsity']:g}", r["n_seeds"],
            f"{100 * r['plain_mean']:.2f} ± {100 * r['plain_std']:.2f}",
            f"{100 * r['distilled_mean']:.2f} ± {100 * r['distilled_std']:.2f}",
            f"{100 * r['gain_mean']:+.2f}"] for r in aggregate(rows)]
  lines.append(common.markdown_table(
      ["method", "sparsity", "seeds", "cross-entropy only", "distilled", "gain"], cells,
      align="lrrrrr"))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
  args = build_parser().parse_args(argv)
  if args.small:
    args = _small(args)
  common.check_out_dir(args.out_dir, overwrite=args.overwrite)
  rows = run(args)
  common.make_out_dir(args.out_dir, overwrite=True)
  common.write_csv(os.path.join(args.out_dir, "runs.csv"), rows, RUN_FIELDS)
  common.write_csv(os.path.join(args.out_dir, "table.csv"), aggregate(rows), TABLE_FIELDS)
  common.write_json(os.path.join(args.out_dir, "args.json"), vars(args))
  md = table_markdown(rows, args)
  with open(os.path.join(args.out_dir, "table.md"), "w") as f:
    f.write(md + "\n")
  print(md)
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
