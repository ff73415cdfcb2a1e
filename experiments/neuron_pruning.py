"""Neuron pruning criteria (:mod:`jaxsparse.pruning.neurons`) on Fashion-MNIST: accuracy after
removing half or three quarters of the hidden neurons, before and after a short fine-tune.

  python -m experiments.neuron_pruning --out-dir results/neuron_pruning

For each seed: train the dense model (LeNet-300-100 by default; ``--model lenet5`` prunes
LeNet-5-Caffe's conv channels and fc1's neurons) for ``--epochs``; then, for every criterion
and every ``--sparsities`` entry, remove that fraction of the neurons of every hidden layer
(each layer on its own; the output layer is never pruned), measure the test accuracy, and
fine-tune with the mask fixed (``jaxsparse.keep_masks``) for ``--finetune-epochs``.

Criteria: ``merge`` (merge-and-scale, Srinivas & Babu 2015; data-free, changes the next
layer's weights), ``apoz`` (Hu et al. 2016), ``mean_abs`` (mean |activation|),
``sensitivity`` (Tartaglione et al. 2018's output sensitivity, pooled per neuron),
``correlation`` (greedy Pearson correlation), ``correlation_ls`` (the same mask, then the
removed neurons folded into the kept ones by least squares over the calibration data), and
the baselines ``filter_l1`` (Li et al.
2017) and ``random``. The data-driven criteria use ``--calibration`` training images.

Writes ``table.md``, ``results.csv`` (one row per seed, criterion and sparsity) and
``results.json`` into ``--out-dir``. ``--small`` is a quick version for the tests (2000
training / 500 test images, one epoch each, 200 calibration images).
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
from jaxsparse.core import masks as masks_lib
from jaxsparse.nn import models
from jaxsparse.pruning import neurons, structured

CRITERIA = ("merge", "apoz", "mean_abs", "sensitivity", "correlation", "correlation_ls",
            "filter_l1", "random")
MODELS = ("lenet300", "lenet5")
# Producer -> consumer of every hidden layer (the output layer has no consumer).
LINKS = {
    "lenet300": structured.mlp_links(3),
    "lenet5": [structured.ChannelLink("conv1/kernel", "conv2/kernel", ("conv1/bias",)),
               structured.ChannelLink("conv2/kernel", "fc1/kernel", ("conv2/bias",)),
               structured.ChannelLink("fc1/kernel", "fc2/kernel", ("fc1/bias",))],
}


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out-dir", required=True)
  p.add_argument("--model", choices=MODELS, default="lenet300")
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--criteria", default=",".join(CRITERIA),
                 help=f"comma-separated, from {', '.join(CRITERIA)}")
  p.add_argument("--sparsities", default="0.5,0.75", help="fractions of hidden neurons removed")
  p.add_argument("--seeds", default="0", help="comma-separated")
  p.add_argument("--epochs", type=int, default=5, help="dense training")
  p.add_argument("--finetune-epochs", type=int, default=1)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--finetune-lr", type=float, default=0.01)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--calibration", type=int, default=2000,
                 help="training images for the data-driven criteria")
  p.add_argument("--steps-per-call", type=int, default=None,
                 help="training.make_train_epoch's; default 5 for lenet5 (CPU convs), else None")
  p.add_argument("--small", action="store_true",
                 help="2000 train / 500 test images, one epoch each, 200 calibration images")
  return p


def _parse(a: argparse.Namespace) -> tuple[list[str], list[float], list[int]]:
  criteria = [c.strip() for c in a.criteria.split(",") if c.strip()]
  bad = [c for c in criteria if c not in CRITERIA]
  if bad or not criteria:
    raise ValueError(f"--criteria: unknown {bad or criteria!r}; choose from {', '.join(CRITERIA)}")
  try:
    sparsities = [float(s) for s in a.sparsities.split(",")]
    seeds = [int(s) for s in a.seeds.split(",")]
  except ValueError as e:
    raise ValueError(f"--sparsities and --seeds must be comma-separated numbers: {e}") from e
  for s in sparsities:
    if not 0.0 < s < 1.0:
      raise ValueError(f"--sparsities must be in (0, 1), got {s}")
  for name in ("epochs", "finetune_epochs", "batch_size", "calibration"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  return criteria, sparsities, seeds


def _fit(net, params, tx, x, y, epochs: int, a, seed: int, *, epoch=None, opt_state=None):
  """Trains for ``epochs``; ``epoch`` (a ``make_train_epoch`` function) and ``opt_state`` may be
  given to reuse one compiled epoch across masks."""
  state = training.TrainState(params, {}, tx.init(params) if opt_state is None else opt_state)
  epoch = epoch or training.make_train_epoch(net, tx, a.batch_size, return_losses=True,
                                             steps_per_call=a.steps_per_call)
  for _, state, loss, _, _ in training.iterate_epochs(epoch, state, x, y, jax.random.key(seed),
                                                      stop=epochs):
    if not np.isfinite(loss):
      raise FloatingPointError(f"loss is {loss}; try a smaller learning rate")
  return state.params


def _sgd(lr: float, total: int, momentum: float) -> optax.GradientTransformation:
  return training.make_optimizer("sgd", optax.cosine_decay_schedule(lr, total), momentum=momentum)


def prune(criterion: str, dense: Any, sparsity: float, links, *, stats, sens, seed: int
          ) -> tuple[Any, Any]:
  """``(params, masks)`` after removing ``sparsity`` of every linked layer's neurons."""
  if criterion == "merge":
    return js.merge_and_scale(dense, sparsity, links)
  if criterion == "filter_l1":
    masks = js.filter_l1_masks(dense, sparsity)
    return dense, structured.propagate_channels(dense, masks, links)
  if criterion == "random":
    rng = np.random.default_rng(seed)
    shapes = dict(zip(masks_lib.leaf_names(dense), (np.shape(l) for l in jax.tree.leaves(dense))))
    scores = {l.producer: rng.random(shapes[l.producer][-1]) for l in links}
  else:
    scores = {"apoz": lambda: js.apoz_scores(stats),
              "mean_abs": lambda: neurons.activation_magnitude_scores(stats),
              "correlation": lambda: js.correlation_scores(stats),
              "correlation_ls": lambda: js.correlation_scores(stats),
              "sensitivity": lambda: sens}[criterion]()
  masks = js.neuron_masks(dense, scores, sparsity, links)
  if criterion == "correlation_ls":
    return neurons.least_squares_compensation(dense, masks, stats, links), masks
  return dense, masks


def _kept_params(params: Any, masks: Any) -> int:
  return sum(c.kept for c in masks_lib.count_leaves(params, masks))


def run(a: argparse.Namespace) -> dict[str, Any]:
  criteria, sparsities, seeds = _parse(a)
  if a.steps_per_call is None and a.model == "lenet5":
    a.steps_per_call = 5
  if a.small:
    a.epochs = a.finetune_epochs = 1
    a.calibration = min(a.calibration, 200)
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  links = LINKS[a.model]
  rows = []
  for seed in seeds:
    ds = data.load_dataset(a.dataset, seed=seed)
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    if a.small:
      x_tr, y_tr, x_te, y_te = x_tr[:2000], y_tr[:2000], x_te[:500], y_te[:500]
    net = models.create_model(a.model, ds.num_classes)
    evaluate = training.make_evaluate(net)
    acc = lambda p: float(evaluate(p, {}, x_te, y_te))
    x, y = jax.device_put(x_tr), jax.device_put(y_tr)
    steps = len(x_tr) // a.batch_size
    params = models.init_params(net, ds.input_shape, seed)["params"]
    dense = _fit(net, params, js.dense(_sgd(a.lr, steps * a.epochs, a.momentum)), x, y,
                 a.epochs, a, seed)
    dense_flops = js.total_flops(js.count_flops(net, dense, ds.input_shape))[0]
    dense_params = sum(int(np.size(l)) for l in jax.tree.leaves(dense))
    acc_dense = acc(dense)
    log(f"seed {seed}: dense {acc_dense:.4f}")
    calib = x_tr[:a.calibration]
    stats = js.activation_stats(net, {"params": dense}, calib, links)
    output_fn = lambda p, xb: jax.nn.softmax(net.apply({"params": p}, xb))
    sens = js.sensitivity_scores(dense, output_fn, calib[:min(len(calib), 1000)], links)
    rows.append(dict(seed=seed, criterion="dense", sparsity=0.0, acc_oneshot=acc_dense,
                     acc_finetuned=acc_dense, params=dense_params, flops=dense_flops,
                     seconds=0.0))
    inner, finetune = _sgd(a.finetune_lr, steps * a.finetune_epochs, a.momentum), None
    for criterion in criteria:
      for s in sparsities:
        t1 = time.perf_counter()
        pruned, masks = prune(criterion, dense, s, links, stats=stats, sens=sens, seed=seed)
        pruned = masks_lib.apply_masks(pruned, masks)
        acc_oneshot = acc(pruned)
        tx = js.keep_masks(inner, masks)
        if finetune is None:
          finetune = training.make_train_epoch(net, tx, a.batch_size, return_losses=True,
                                               steps_per_call=a.steps_per_call)
        # keep_masks's update reads the masks from its state, so one compiled epoch serves
        # every mask of this structure (given through tx.init).
        tuned = _fit(net, pruned, tx, x, y, a.finetune_epochs, a, seed + 1, epoch=finetune,
                     opt_state=tx.init(pruned))
        flops = js.total_flops(js.count_flops(net, tuned, ds.input_shape, masks))[1]
        rows.append(dict(seed=seed, criterion=criterion, sparsity=s, acc_oneshot=acc_oneshot,
                         acc_finetuned=acc(tuned), params=_kept_params(tuned, masks),
                         flops=flops, seconds=time.perf_counter() - t1))
        log(f"{criterion} s={s}: one-shot {acc_oneshot:.4f}, fine-tuned "
            f"{rows[-1]['acc_finetuned']:.4f}, params {rows[-1]['params']:,}")
  result = dict(args=vars(a), rows=rows, seconds=time.perf_counter() - t0,
                jax_version=jax.__version__, device=jax.devices()[0].platform)
  common.write_results(a.out_dir, result, table_markdown(a, result), result["rows"],
                       csv_name="results.csv")
  return result


def table_markdown(a: argparse.Namespace, result: dict[str, Any]) -> str:
  rows = result["rows"]
  dense_p, dense_f = rows[0]["params"], rows[0]["flops"]
  groups: dict[tuple, list] = {}
  for r in rows:
    groups.setdefault((r["criterion"], r["sparsity"]), []).append(r)
  body = []
  for (criterion, s), rs in groups.items():
    body.append([criterion, f"{s:.2f}", common.format_mean_std(r["acc_oneshot"] for r in rs),
                 common.format_mean_std(r["acc_finetuned"] for r in rs),
                 f"{rs[0]['params']:,} ({100 * rs[0]['params'] / dense_p:.1f}%)",
                 f"{rs[0]['flops']:,} ({100 * rs[0]['flops'] / dense_f:.1f}%)"])
  seeds = sorted({r["seed"] for r in rows})
  lines = [f"# Neuron pruning, {a.model} on {a.dataset}{' (--small)' if a.small else ''}", "",
           f"Dense {a.epochs} epochs (SGD lr {a.lr}, momentum {a.momentum}, cosine, batch "
           f"{a.batch_size}); each hidden layer loses the given fraction of its neurons "
           f"(output layer kept); fine-tune {a.finetune_epochs} epoch(s) at lr {a.finetune_lr} "
           f"with the mask fixed; data-driven criteria on {a.calibration} training images; "
           f"seeds {seeds} (mean ± std over seeds, in %); {result['device']}, jax "
           f"{result['jax_version']}, {result['seconds']:.0f} s.", "",
           "Params and FLOPs (per example, Dense/Conv multiply-adds x 2) are what the masks "
           "keep, with the neurons' biases and the next layer's rows removed.", "",
           common.markdown_table(["criterion", "sparsity", "one-shot acc", "fine-tuned acc",
                                  "params kept", "FLOPs kept"], body, "lrrrrr"), ""]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  a = build_parser().parse_args(argv)
  _parse(a)
  common.make_out_dir(a.out_dir)
  return run(a)


if __name__ == "__main__":
  main()
