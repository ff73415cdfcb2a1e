"""The main job: train one model with one sparsity method and write a JSON results file.

  python -m experiments.train --dataset fashion_mnist --model lenet300 --method set \
      --sparsity 0.9 --epochs 20

The flags build an :class:`experiments.configs.Config` (checked as a named config's
are) that :func:`experiments.run.run_to_json` trains; ``python -m experiments.run
<config>`` runs a named config into a results folder instead.
"""

from __future__ import annotations

import argparse
import sys

from experiments import configs, data, run, training
from jaxsparse.nn import models


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS))
  p.add_argument("--data-dir", default=None, help="directory holding the IDX files")
  p.add_argument("--model", default="lenet300", choices=sorted(models.MODELS))
  p.add_argument("--method", default="set", choices=training.METHODS)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--epochs", type=int, default=30)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--optimizer", default="sgd", choices=training.OPTIMIZERS)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="results JSON path (default results/<run>.json)")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
  return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> configs.Config:
  """The :class:`~experiments.configs.Config` of the flags."""
  return configs.Config(dataset=args.dataset, model=args.model, method=args.method,
                        sparsity=args.sparsity, epochs=args.epochs, batch_size=args.batch_size,
                        optimizer=args.optimizer, learning_rate=args.lr, momentum=args.momentum,
                        weight_decay=args.weight_decay, seed=args.seed, data_dir=args.data_dir)


def main(argv=None) -> dict:
  args = parse_args(argv)
  return run.run_to_json(config_from_args(args), args.out, progress=not args.no_progress)


if __name__ == "__main__":
  main(sys.argv[1:])
