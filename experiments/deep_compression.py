"""Deep Compression (Han, Mao & Dally 2016, ICLR) on Fashion-MNIST: prune, share weights,
Huffman code; the paper's compression table (its Tables 2 and 3) per layer and in total.

  python -m experiments.deep_compression --model lenet300 --out-dir results/dc_lenet300
  python -m experiments.deep_compression --model lenet5 --out-dir results/dc_lenet5

Pipeline (the paper's three stages, Fig. 1):

1. train the dense model for ``--epochs`` (SGD, momentum, cosine learning rate);
2. prune by magnitude to the paper's per-layer rates (``--pruning paper``, default; Tables
   2-3: LeNet-300-100 keeps 8% / 9% / 26% of fc1 / fc2 / fc3, LeNet-5 keeps 66% / 12% / 8% /
   19% of conv1 / conv2 / fc1 / fc2) or to one global ``--sparsity`` (``--pruning global``),
   then retrain with the mask fixed for ``--retrain-epochs``;
3. share weights by k-means (linear init; 8 bits conv, 5 bits fc;
   :func:`jaxsparse.weight_sharing`) and fine-tune the centroids for ``--share-epochs``
   (the centroid gradient is the sum over its cluster);
4. count storage (:mod:`jaxsparse.analysis.compression`): relative indices of 8 bits (conv)
   or 5 bits (fc) with fillers, b-bit cluster indices, a float32 codebook, then Huffman.

Writes ``table.md``, ``layers.csv`` and ``results.json`` into ``--out-dir``. ``--small``
runs a 1-2 minute version (5000 training and 1000 test images, one epoch per stage) for the
tests.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import numpy as np
import optax

import jaxsparse as js
from experiments import common, data, training
from jaxsparse.analysis import compression
from jaxsparse.core import masks as masks_lib
from jaxsparse.nn import models

MODELS = ("lenet300", "lenet5")
# Kept fractions per layer (Han et al. 2016, Table 2: LeNet-300-100, Table 3: LeNet-5).
PAPER_KEPT = {"lenet300": {"fc1": 0.08, "fc2": 0.09, "fc3": 0.26},
              "lenet5": {"conv1": 0.66, "conv2": 0.12, "fc1": 0.08, "fc2": 0.19}}
# The paper's results on MNIST (Table 1): compression ratio and top-1 error, dense -> compressed.
PAPER_RESULT = {"lenet300": "40x, top-1 error 1.64% -> 1.58%",
                "lenet5": "39x, top-1 error 0.80% -> 0.74%"}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out-dir", required=True)
  p.add_argument("--model", choices=MODELS, default="lenet300")
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--pruning", choices=("paper", "global"), default="paper",
                 help="the paper's per-layer kept rates, or one global magnitude --sparsity")
  p.add_argument("--sparsity", type=float, default=0.92, help="for --pruning global")
  p.add_argument("--epochs", type=int, default=10, help="dense training")
  p.add_argument("--retrain-epochs", type=int, default=10, help="after pruning, mask fixed")
  p.add_argument("--share-epochs", type=int, default=5, help="centroid fine-tuning")
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--retrain-lr", type=float, default=0.01)
  p.add_argument("--share-lr", type=float, default=1e-4,
                 help="SGD on the centroids, whose gradients are sums over clusters")
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--conv-bits", type=int, default=8)
  p.add_argument("--fc-bits", type=int, default=5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="training.make_train_epoch's; default 5 for lenet5 (CPU convs), else None")
  p.add_argument("--small", action="store_true",
                 help="5000 train / 1000 test images, one epoch per stage (a 1-2 minute check)")
  return p


def _check_args(a: argparse.Namespace) -> None:
  for name in ("epochs", "retrain_epochs", "share_epochs", "batch_size", "conv_bits", "fc_bits"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  if not 0.0 < a.sparsity < 1.0:
    raise ValueError(f"--sparsity must be in (0, 1), got {a.sparsity}")


def _fit(net, params, tx, x, y, epochs: int, a, seed: int):
  """Trains ``params`` with ``tx`` for ``epochs``; returns (params, opt_state)."""
  state = training.TrainState(params, {}, tx.init(params))
  epoch = training.make_train_epoch(net, tx, a.batch_size, return_losses=True,
                                    steps_per_call=a.steps_per_call)
  for _, state, loss, _, _ in training.iterate_epochs(epoch, state, x, y, jax.random.key(seed),
                                                      stop=epochs):
    if not np.isfinite(loss):
      raise FloatingPointError(f"loss is {loss}; try a smaller learning rate")
  return state.params, state.opt_state


def _sgd(lr: float, total: int, momentum: float) -> optax.GradientTransformation:
  return training.make_optimizer("sgd", optax.cosine_decay_schedule(lr, total), momentum=momentum)


def _layer_rows(sizes: list[compression.CompressionSizes]) -> list[dict[str, Any]]:
  """One row per layer (its kernel and bias together), as in the paper's tables."""
  layers: dict[str, list[compression.CompressionSizes]] = {}
  for s in sizes:
    layers.setdefault(s.name.rsplit("/", 1)[0], []).append(s)
  rows = []
  for layer, leaves in layers.items():
    kernels = [s for s in leaves if s.index_bits > 0]
    dense = sum(s.dense for s in leaves)
    pq, huff = sum(s.pq for s in leaves), sum(s.huffman for s in leaves)
    entries = sum(s.entries for s in kernels)
    rows.append(dict(
        layer=layer, weights=sum(s.total for s in leaves),
        kept_pct=100.0 * sum(s.kept for s in leaves) / sum(s.total for s in leaves),
        fillers=sum(s.fillers for s in kernels),
        weight_bits_pq=sum(s.weight_pq for s in kernels) / max(entries, 1),
        weight_bits_pqh=sum(s.weight_huffman for s in kernels) / max(entries, 1),
        index_bits_pq=sum(s.index_pq for s in kernels) / max(entries, 1),
        index_bits_pqh=sum(s.index_huffman for s in kernels) / max(entries, 1),
        dense_bytes=dense / 8, pq_bytes=pq / 8, huffman_bytes=huff / 8,
        ratio_pq=dense / pq, ratio_pqh=dense / huff))
  return rows


def run(a: argparse.Namespace) -> dict[str, Any]:
  if a.steps_per_call is None and a.model == "lenet5":
    a.steps_per_call = 5
  t0 = time.perf_counter()
  ds = data.load_dataset(a.dataset, seed=a.seed)
  x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  if a.small:
    a.epochs = a.retrain_epochs = a.share_epochs = 1
    x_tr, y_tr, x_te, y_te = x_tr[:5000], y_tr[:5000], x_te[:1000], y_te[:1000]
  net = models.create_model(a.model, ds.num_classes)
  evaluate = training.make_evaluate(net)
  acc = lambda p: evaluate(p, {}, x_te, y_te)
  x, y = jax.device_put(x_tr), jax.device_put(y_tr)
  steps = len(x_tr) // a.batch_size
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

  params = models.init_params(net, ds.input_shape, a.seed)["params"]
  dense, _ = _fit(net, params, js.dense(_sgd(a.lr, steps * a.epochs, a.momentum)), x, y,
                  a.epochs, a, a.seed)
  acc_dense = acc(dense)
  log(f"dense: {acc_dense:.4f}")

  if a.pruning == "paper":
    overrides = {k: 1.0 - v for k, v in PAPER_KEPT[a.model].items()}
    masks = js.magnitude_masks(dense, a.sparsity, overrides=overrides)
  else:
    masks = js.magnitude_masks(dense, a.sparsity, scope="global")
  pruned = masks_lib.apply_masks(dense, masks)
  acc_oneshot = acc(pruned)
  pruned, _ = _fit(net, pruned, js.keep_masks(_sgd(a.retrain_lr, steps * a.retrain_epochs,
                                                   a.momentum), masks),
                   x, y, a.retrain_epochs, a, a.seed + 1)
  acc_pruned = acc(pruned)
  log(f"pruned: one-shot {acc_oneshot:.4f}, retrained {acc_pruned:.4f}, "
      f"sparsity {masks_lib.sparsity(pruned, masks):.4f}")

  bits = lambda name, leaf: a.conv_bits if np.ndim(leaf) == 4 else a.fc_bits
  tx = js.weight_sharing(_sgd(a.share_lr, steps * a.share_epochs, a.momentum), masks, bits=bits)
  shared = js.share_weights(pruned, tx.init(pruned))
  acc_shared0 = acc(shared)
  shared, opt_state = _fit(net, shared, tx, x, y, a.share_epochs, a, a.seed + 2)
  acc_shared = acc(shared)
  log(f"quantized: before fine-tuning {acc_shared0:.4f}, fine-tuned {acc_shared:.4f}")

  sizes = js.compression_sizes(shared, opt_state)
  rows = _layer_rows(sizes)
  totals = compression.compression_totals(sizes)
  accuracy = dict(dense=acc_dense, pruned_oneshot=acc_oneshot, pruned=acc_pruned,
                  quantized_before_finetune=acc_shared0, quantized=acc_shared)
  result = dict(args=vars(a), accuracy=accuracy, layers=rows,
                totals={k: float(v) for k, v in totals.items()}, seconds=time.perf_counter() - t0,
                jax_version=jax.__version__, device=jax.devices()[0].platform)
  common.write_results(a.out_dir, result, table_markdown(a, result), result["layers"],
                       csv_name="layers.csv")
  return result


def table_markdown(a: argparse.Namespace, result: dict[str, Any]) -> str:
  rows, t, acc = result["layers"], result["totals"], result["accuracy"]
  header = ["Layer", "#Weights", "Weights% (P)", "Weight bits (P+Q)", "Weight bits (P+Q+H)",
            "Index bits (P+Q)", "Index bits (P+Q+H)", "Compress rate (P+Q)",
            "Compress rate (P+Q+H)"]
  body = [[r["layer"], f"{r['weights']:,}", f"{r['kept_pct']:.1f}%", f"{r['weight_bits_pq']:.0f}",
           f"{r['weight_bits_pqh']:.2f}", f"{r['index_bits_pq']:.0f}",
           f"{r['index_bits_pqh']:.2f}", f"{100 / r['ratio_pq']:.2f}%",
           f"{100 / r['ratio_pqh']:.2f}%"] for r in rows]
  body.append(["Total", f"{int(t['total']):,}", f"{100 * t['kept'] / t['total']:.1f}%", "", "",
               "", "", f"{100 / t['ratio_pq']:.2f}% ({t['ratio_pq']:.1f}x)",
               f"{100 / t['ratio_huffman']:.2f}% ({t['ratio_huffman']:.1f}x)"])
  pruning = ("the paper's per-layer kept rates " + ", ".join(
      f"{k} {100 * v:.0f}%" for k, v in PAPER_KEPT[a.model].items())
      if a.pruning == "paper" else f"global magnitude, sparsity {a.sparsity}")
  lines = [f"# Deep Compression, {a.model} on {a.dataset}{' (--small)' if a.small else ''}", "",
           f"Dense {a.epochs} epochs (SGD lr {a.lr}, momentum {a.momentum}, cosine), pruned by "
           f"{pruning}, retrained {a.retrain_epochs} epochs (lr {a.retrain_lr}), weight sharing "
           f"{a.conv_bits} bits conv / {a.fc_bits} bits fc, centroids fine-tuned "
           f"{a.share_epochs} epochs (lr {a.share_lr}); batch {a.batch_size}, seed {a.seed}; "
           f"{result['device']}, jax {result['jax_version']}, {result['seconds']:.0f} s.", "",
           "Compress rate = compressed / dense 32-bit size (kernel + bias; biases stay 32-bit "
           "dense); bits are per stored entry (kept weights + index fillers).", "",
           common.markdown_table(header, body, "lrrrrrrrr"), "",
           f"Size: {t['dense'] / 8 / 1024:,.1f} KB dense -> {t['pq'] / 8 / 1024:,.1f} KB (P+Q) "
           f"-> {t['huffman'] / 8 / 1024:,.1f} KB (P+Q+H); index fillers: {int(t['fillers'])}.", "",
           common.markdown_table(
               ["Top-1 accuracy", "dense", "pruned (one-shot)", "pruned (retrained)",
                "quantized (before fine-tuning)", "quantized (fine-tuned)"],
               [["%", *(f"{100 * acc[k]:.2f}" for k in ("dense", "pruned_oneshot", "pruned",
                                                         "quantized_before_finetune",
                                                         "quantized"))]], "lrrrrr"), "",
           f"Paper (MNIST, Table 1): {PAPER_RESULT[a.model]}.", ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  a = build_parser().parse_args(argv)
  _check_args(a)
  common.make_out_dir(a.out_dir)
  return run(a)


if __name__ == "__main__":
  main()
