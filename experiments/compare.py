"""Compare sparsity methods on one model and dataset over seeds; write a markdown + CSV table.

  python -m experiments.compare --dataset fashion_mnist --methods dense static set \
      --sparsity 0.9 --epochs 20 --batch-size 100 --lr 0.01 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics

from tqdm.auto import tqdm

from experiments import data, training
from jaxsparse.nn import models


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS))
  p.add_argument("--model", default="lenet300", choices=sorted(models.MODELS))
  p.add_argument("--methods", nargs="+", default=["dense", "static", "set"], choices=training.METHODS)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--optimizer", default="sgd", choices=training.OPTIMIZERS)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--out-dir", default="results/compare")
  args = p.parse_args(argv)
  if os.path.exists(os.path.join(args.out_dir, "runs.json")):
    raise FileExistsError(f"--out-dir {args.out_dir} already holds results; choose another directory")
  os.makedirs(args.out_dir, exist_ok=True)

  runs = []
  jobs = [(m, s) for m in args.methods for s in args.seeds]
  for method, seed in tqdm(jobs, desc="runs", unit="run"):
    r = training.train(dataset=args.dataset, model=args.model, method=method,
                       sparsity=args.sparsity, epochs=args.epochs, batch_size=args.batch_size,
                       optimizer=args.optimizer, learning_rate=args.lr, seed=seed,
                       progress=False, log=None)
    r.pop("state")
    runs.append(dict(method=method, seed=seed, accuracy=r["final_test_accuracy"],
                     sparsity=r["final_sparsity"], seconds_per_epoch=r["seconds_per_epoch"]))
  with open(os.path.join(args.out_dir, "runs.json"), "w") as f:
    json.dump(dict(config=vars(args), runs=runs), f, indent=2)
  with open(os.path.join(args.out_dir, "runs.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(runs[0]))
    w.writeheader()
    w.writerows(runs)
  lines = [f"{args.model} on {args.dataset}, {args.epochs} epochs, seeds {args.seeds}", "",
           "| method | sparsity | test accuracy (mean +- std) | s/epoch |", "|---|---|---|---|"]
  for method in args.methods:
    rs = [r for r in runs if r["method"] == method]
    accs = [r["accuracy"] for r in rs]
    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    lines.append(f"| {method} | {rs[0]['sparsity']:.3f} | {100 * statistics.mean(accs):.2f} +- "
                 f"{100 * std:.2f} | {statistics.median(r['seconds_per_epoch'] for r in rs):.2f} |")
  table = "\n".join(lines)
  with open(os.path.join(args.out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  return runs


if __name__ == "__main__":
  main()
