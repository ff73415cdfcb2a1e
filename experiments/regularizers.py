"""Regularizers and Bayesian sparsity on LeNet-300-100, each next to magnitude pruning at equal
sparsity.

  python -m experiments.regularizers --dataset fashion_mnist --epochs 10 --seeds 0 \
      --out-dir results/regularizers

(``python -m experiments.regularisers``, the British spelling, still works and warns.)

Methods (all from scratch, ``--epochs`` epochs, batch ``--batch-size``):

* ``l1_prox``: SGD + proximal L1 (``l1_proximal``), exact zeros, threshold 0;
* ``group_lasso_prox``: SGD + proximal group lasso on neurons (``groups="input"``:
  rows of every kernel, i.e. input pixels / hidden neurons), threshold 0;
* ``l0_weight`` / ``l0_neuron``: Adam on L0 hard-concrete layers, loss CE + lam * expected L0 / N
  (log alpha with its own Adam learning rate ``--gate-lr``);
* ``sparse_vd``: Adam on sparse VD layers, loss CE + beta_t * KL / N (beta warmed up linearly
  over the first half), pruned at log alpha > 3;
* ``sensitivity``: SGD + ``sensitivity_decay`` on the softmax outputs, then |w| <= T removed.

Each sparse model is converted to an ordinary masked LeNet-300-100 (``threshold_and_freeze``,
``l0_to_masked``, ``sparse_vd_to_masked``), optionally fine-tuned with ``keep_masks``
(``--finetune-epochs``), and evaluated. Its baseline is one-shot global magnitude pruning
(``magnitude_pruning``, prune at half-way) of the plain model to the same kernel sparsity, trained
for the same total number of epochs with SGD. Writes runs.csv, table.md and accuracy_vs_sparsity.png.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from experiments import common, data, training
from jaxsparse.regularizers import bayesian, penalties
from jaxsparse.core import masks as masks_lib, transform as core
from jaxsparse.pruning import magnitude
from jaxsparse.nn import models
from jaxsparse.methods import static

METHODS = ("l1_prox", "group_lasso_prox", "l0_weight", "l0_neuron", "sparse_vd", "sensitivity")


class GatedLeNet300100(nn.Module):
  """LeNet-300-100 with L0 or sparse-VD layers named fc1..fc3 (so conversions fit LeNet300100)."""

  kind: str  # "l0_weight" | "l0_neuron" | "vd"
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, deterministic: bool = False):
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate((300, 100, self.num_classes), start=1):
      if self.kind == "vd":
        layer = bayesian.SparseVDDense(width, name=f"fc{i}")
      else:
        layer = bayesian.L0Dense(width, gates=self.kind.split("_")[1], name=f"fc{i}")
      x = layer(x, deterministic)
      if i < 3:
        x = nn.relu(x)
    return x


def ce(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def fit(loss_fn: Callable, tx: optax.GradientTransformation, params: Any, ds, epochs: int,
        batch_size: int, seed: int, pass_inputs: bool = False) -> Any:
  """Trains ``params`` with a jitted scanned epoch; ``loss_fn(params, x, y, key, step)``.

  The epochs run in :func:`experiments.training.iterate_epochs`, the loop of every
  experiment; the step is this module's own, as the gated models' losses take a key
  (gate / weight noise) and the step (the KL warm-up), and sensitivity decay the inputs.
  """

  def step(carry, batch):
    params, opt_state, key, t = carry
    x, y = batch
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, jax.random.fold_in(key, t), t)
    extra = {"inputs": x} if pass_inputs else {}
    updates, opt_state = tx.update(grads, opt_state, params, **extra)
    return (optax.apply_updates(params, updates), opt_state, key, t + 1), loss

  @jax.jit
  def epoch(state, x, y, key):
    params, opt_state, t = state
    xs, ys = data.epoch_batches(x, y, batch_size, key)
    (params, opt_state, _, t), losses = jax.lax.scan(step, (params, opt_state, key, t), (xs, ys))
    return (params, opt_state, t), losses.mean(), losses

  state = (params, tx.init(params), jnp.int32(0))
  for _, state, *_ in training.iterate_epochs(epoch, state, jax.device_put(ds.x_train),
                                              jax.device_put(ds.y_train), jax.random.key(seed),
                                              stop=epochs):
    pass
  params, opt_state, _ = state
  return params, opt_state


def accuracy(params, ds) -> float:
  net = models.LeNet300100(ds.num_classes)
  f = jax.jit(lambda p, x: jnp.argmax(net.apply({"params": p}, x), -1))
  correct = sum(int(jnp.sum(f(params, ds.x_test[i:i + 2000]) == ds.y_test[i:i + 2000]))
                for i in range(0, len(ds.x_test), 2000))
  return correct / len(ds.x_test)


def kernel_sparsity(params, masks) -> float:
  return masks_lib.sparsity(params, masks)


def sgd(lr: float, steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  sched = optax.cosine_decay_schedule(lr, steps)
  return optax.sgd(sched, momentum=0.9), sched


# Regularizers of the plain LeNet-300-100, optax transforms chained after SGD:
# (args, learning-rate schedule, model) -> transform. The others are gated layers (L0, VD).
PLAIN = {
    "l1_prox": lambda a, sched, net: penalties.l1_proximal(a.l1, sched),
    "group_lasso_prox": lambda a, sched, net: penalties.group_lasso_proximal(
        a.group_lasso, sched, groups="input"),
    "sensitivity": lambda a, sched, net: penalties.sensitivity_decay(
        a.sensitivity, lambda p, x: jax.nn.softmax(net.apply({"params": p}, x))),
}


def train_method(method: str, ds, args, seed: int) -> tuple[Any, Any]:
  """Trains ``method`` and returns plain LeNet-300-100 ``(params, masks)``."""
  n = len(ds.x_train)
  steps = (n // args.batch_size) * args.epochs
  plain = models.LeNet300100(ds.num_classes)
  if method in PLAIN:
    params = models.init_params(plain, ds.input_shape, seed)["params"]
    opt, sched = sgd(args.lr, steps)
    tx = optax.chain(opt, PLAIN[method](args, sched, plain))
    loss = lambda p, x, y, key, t: ce(plain.apply({"params": p}, x), y)
    params, _ = fit(loss, tx, params, ds, args.epochs, args.batch_size, seed,
                    pass_inputs=method == "sensitivity")
    threshold = args.sensitivity_threshold if method == "sensitivity" else 0.0
    return penalties.threshold_and_freeze(params, threshold)

  kind = "vd" if method == "sparse_vd" else method
  net = GatedLeNet300100(kind, ds.num_classes)
  x0 = jnp.zeros((1, *ds.input_shape))
  params = net.init({"params": jax.random.key(seed), "gates": jax.random.key(seed + 1),
                     "noise": jax.random.key(seed + 2)}, x0)["params"]
  tx = optax.adam(optax.cosine_decay_schedule(args.adam_lr, steps))
  if kind != "vd":  # the gates' log alpha gets its own (larger) Adam step: see --gate-lr
    gate_tx = optax.adam(optax.cosine_decay_schedule(args.gate_lr, steps))
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "gate" if "log_alpha" in jax.tree_util.keystr(path) else "weight", params)
    tx = optax.multi_transform({"gate": gate_tx, "weight": tx}, labels)
  if kind == "vd":
    warm = max(1, steps // 2)

    def loss(p, x, y, key, t):
      logits = net.apply({"params": p}, x, rngs={"noise": key})
      beta = jnp.minimum(1.0, t / warm)
      return ce(logits, y) + beta * bayesian.sparse_vd_kl(p) / n
  else:
    lam = args.l0 if kind == "l0_weight" else args.l0_neuron

    def loss(p, x, y, key, t):
      logits = net.apply({"params": p}, x, rngs={"gates": key})
      return ce(logits, y) + lam * bayesian.l0_penalty(p) / n
  params, _ = fit(loss, tx, params, ds, args.epochs, args.batch_size, seed)
  if kind == "vd":
    return bayesian.sparse_vd_to_masked(params)
  return bayesian.l0_to_masked(params)


def finetune(params, masks, ds, args, seed):
  if args.finetune_epochs <= 0:
    return params
  steps = (len(ds.x_train) // args.batch_size) * args.finetune_epochs
  tx = static.keep_masks(optax.sgd(optax.cosine_decay_schedule(args.lr * 0.1, steps),
                                   momentum=0.9), masks)
  plain = models.LeNet300100(ds.num_classes)
  loss = lambda p, x, y, key, t: ce(plain.apply({"params": p}, x), y)
  params, _ = fit(loss, tx, params, ds, args.finetune_epochs, args.batch_size, seed + 100)
  return params


def magnitude_baseline(sparsity: float, ds, args, seed: int) -> tuple[float, float]:
  """One-shot global magnitude pruning at half-way to ``sparsity``, same total epochs."""
  epochs = args.epochs + args.finetune_epochs
  steps = (len(ds.x_train) // args.batch_size) * epochs
  plain = models.LeNet300100(ds.num_classes)
  params = models.init_params(plain, ds.input_shape, seed)["params"]
  opt, _ = sgd(args.lr, steps)
  s = float(min(max(sparsity, 0.0), 0.999))
  tx = magnitude.magnitude_pruning(opt, s, prune_step=steps // 2, scope="global")
  loss = lambda p, x, y, key, t: ce(plain.apply({"params": p}, x), y)
  params, opt_state = fit(loss, tx, params, ds, epochs, args.batch_size, seed)
  masks = core.get_masks(opt_state)
  return accuracy(params, ds), kernel_sparsity(params, masks)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist", choices=sorted(data.DATASETS))
  p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--finetune-epochs", type=int, default=1)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--lr", type=float, default=0.05, help="SGD (momentum 0.9) learning rate")
  p.add_argument("--adam-lr", type=float, default=1e-3, help="Adam learning rate (L0, sparse VD)")
  p.add_argument("--gate-lr", type=float, default=1e-2,
                 help="Adam learning rate of the L0 gates' log alpha (Adam moves a parameter by at "
                 "most ~lr per step, and log alpha must travel from 0 to below -2.4 for a gate to "
                 "be exactly 0 at test time; 1e-3 needs far more than 10 epochs)")
  p.add_argument("--l1", type=float, default=2e-3, help="L1 strength")
  p.add_argument("--group-lasso", type=float, default=3e-2, help="group lasso strength")
  p.add_argument("--l0", type=float, default=1.0,
                 help="L0 strength for weight gates (loss CE + l0 * expected L0 / N)")
  p.add_argument("--l0-neuron", type=float, default=0.1,
                 help="L0 strength for neuron gates (a gate's expected L0 counts its whole row)")
  p.add_argument("--sensitivity", type=float, default=5e-4, help="sensitivity-driven lambda")
  p.add_argument("--sensitivity-threshold", type=float, default=1e-2,
                 help="|w| at or below which sensitivity-regularized weights are removed")
  p.add_argument("--no-magnitude", action="store_true",
                 help="skip the magnitude-pruning baselines (for quick tuning runs)")
  p.add_argument("--out-dir", required=True)
  args = p.parse_args(argv)
  common.check_out_dir(args.out_dir)
  if args.epochs <= 0 or args.finetune_epochs < 0:
    raise ValueError("--epochs must be > 0 and --finetune-epochs >= 0")
  ds = data.load_dataset(args.dataset)
  os.makedirs(args.out_dir, exist_ok=True)

  runs = []
  jobs = [(m, s) for m in args.methods for s in args.seeds]
  bar = tqdm(jobs, desc="runs", unit="run")
  for method, seed in bar:
    bar.set_postfix(method=method, seed=seed)
    t0 = time.perf_counter()
    params, masks = train_method(method, ds, args, seed)
    acc_before = accuracy(params, ds)
    params = finetune(params, masks, ds, args, seed)
    sp = kernel_sparsity(params, masks)
    acc = accuracy(params, ds)
    t1 = time.perf_counter()
    mag_acc, mag_sp = ((float("nan"), float("nan")) if args.no_magnitude
                       else magnitude_baseline(sp, ds, args, seed))
    runs.append(dict(method=method, seed=seed, sparsity=sp, accuracy_before_finetune=acc_before,
                     accuracy=acc, magnitude_sparsity=mag_sp, magnitude_accuracy=mag_acc,
                     seconds=t1 - t0, magnitude_seconds=time.perf_counter() - t1))
    tqdm.write(f"{method} seed {seed}: sparsity {sp:.4f} acc {acc:.4f} (before fine-tune "
               f"{acc_before:.4f}); magnitude at {mag_sp:.4f}: {mag_acc:.4f}")

  common.write_csv(os.path.join(args.out_dir, "runs.csv"), runs)
  rows = []
  for method in args.methods:
    rs = [r for r in runs if r["method"] == method]
    rows.append([method] + [common.format_mean_std([r[k] for r in rs], sep="+-") for k in (
        "sparsity", "accuracy_before_finetune", "accuracy", "magnitude_accuracy")])
  table = "\n".join([
      f"LeNet-300-100 on {args.dataset}: {args.epochs} epochs + {args.finetune_epochs} "
      f"fine-tune epoch(s) with the mask, batch {args.batch_size}, seeds {args.seeds}", "",
      common.markdown_table(["method", "kernel sparsity %", "test acc % (before fine-tune)",
                             "test acc %", "magnitude pruning at same sparsity: acc %"], rows)])
  with open(os.path.join(args.out_dir, "table.md"), "w") as f:
    f.write(table + "\n")
  print(table)

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, method in enumerate(args.methods):
    rs = [r for r in runs if r["method"] == method]
    c = f"C{i}"
    ax.scatter([100 * r["sparsity"] for r in rs], [100 * r["accuracy"] for r in rs], color=c,
               marker="o", label=method)
    ax.scatter([100 * r["magnitude_sparsity"] for r in rs],
               [100 * r["magnitude_accuracy"] for r in rs], color=c, marker="x")
  ax.set_xlabel("kernel sparsity (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"LeNet-300-100 on {args.dataset} (o: method, x: magnitude pruning)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out_dir, "accuracy_vs_sparsity.png"), dpi=120)
  return runs


if __name__ == "__main__":
  main()
