"""What DSR's result depends on: Np, the reallocation period and the initial layer densities.

Runs DSR variants (and static / SET with the same initial densities) in the setup of
:mod:`experiments.dst_compare` at one sparsity, so that a failed ordering can be traced to a
hyperparameter rather than assumed to be the method's.

  python -m experiments.dsr_checks --sparsity 0.98 --seeds 0 1 --epochs 5 --out-dir results/dsr_checks
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm.auto import tqdm

from experiments import common, data, training

# name -> (method, method_kwargs)
VARIANTS = {
    "dsr (Np 600, uniform init, period 100)": ("dsr", {}),
    "dsr Np 150": ("dsr", {"target_pruned": 150}),
    "dsr Np 2400": ("dsr", {"target_pruned": 2400}),
    "dsr period 400": ("dsr", {"update_period": 400, "doubling_steps": ()}),
    "dsr ER init": ("dsr", {"distribution": "er"}),
    "static uniform": ("static", {"distribution": "uniform"}),
    "static ER": ("static", {}),
    "set uniform": ("set", {"distribution": "uniform"}),
    "set ER": ("set", {}),
}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data.DATASETS))
  p.add_argument("--sparsity", type=float, default=0.98)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument("--out-dir", default="results/dsr_checks")
  args = p.parse_args(argv)
  common.make_out_dir(args.out_dir)
  runs = []
  for seed in tqdm(args.seeds, desc="seeds"):
    for name in tqdm(args.variants, desc="variants", leave=False):
      method, kwargs = VARIANTS[name]
      r = training.train(dataset=args.dataset, model="lenet300", method=method,
                         sparsity=args.sparsity, epochs=args.epochs, batch_size=100,
                         optimizer="nesterov", learning_rate=0.1, lr_schedule="step", l1=1e-4,
                         seed=seed, model_kwargs=dict(use_bias=False, batch_norm=True),
                         method_kwargs=kwargs, progress=False, log=None)
      layers = {k: v["kept"] for k, v in r["layers"].items() if v["sparse"]}
      runs.append(dict(variant=name, seed=seed, accuracy=r["final_test_accuracy"],
                       layer_kept=json.dumps(layers)))
  common.write_csv(os.path.join(args.out_dir, "runs.csv"), runs)
  rows = []
  for name in args.variants:
    rs = [r for r in runs if r["variant"] == name]
    acc = common.format_mean_std([100 * r["accuracy"] for r in rs], scale=1, sep="+-")
    rows.append([name, acc, rs[0]["layer_kept"]])
  lines = [f"LeNet-300-100 on {args.dataset}, sparsity {args.sparsity}, {args.epochs} epochs, "
           f"seeds {args.seeds} (setup of experiments.dst_compare)", "",
           common.markdown_table(["variant", "test accuracy %", "final kept per layer (seed 0)"],
                                 rows)]
  md = "\n".join(lines) + "\n"
  with open(os.path.join(args.out_dir, "table.md"), "w") as f:
    f.write(md)
  print(md)
  return runs


if __name__ == "__main__":
  main(sys.argv[1:])
