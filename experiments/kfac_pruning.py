"""Kronecker-factored structured pruning (Wang et al. 2019, EigenDamage) against filter L1, OBD
and OBS, on LeNet-5-Caffe and Fashion-MNIST at the same FLOPs reduction.

  python -m experiments.kfac_pruning --out-dir results/kfac_pruning

Pipeline, per seed:

1. train the dense LeNet-5-Caffe for ``--epochs`` (SGD, momentum, cosine learning rate);
2. on ``--calib`` training examples compute each criterion's per-filter importance of
   the prunable layers (conv1, conv2, fc1; fc2 produces the classes and is never pruned):
   * filter L1 (Li et al. 2017, :func:`jaxsparse.filter_l1_masks`), one fraction for every layer;
   * OBD: :func:`jaxsparse.obd_scores` (empirical Fisher diagonal) summed over each
     filter's weights and bias;
   * OBS: :func:`jaxsparse.obs_prune`'s element-wise saliencies (block-diagonal damped
     empirical Fisher on ``--obs-calib`` examples, ``--obs-block`` weights a block) summed
     over each filter; the chosen filters are then removed with OBS's own multi-weight
     compensating update (a second ``obs_prune`` call given the filter masks);
   * Kron-OBD and Kron-OBS (:mod:`jaxsparse.pruning.kfac`; Kron-OBS with its update);
   * EigenDamage (bottlenecks in the Kronecker-factored eigenbasis). ``--eigen-conv-factor``
     picks a conv's input factor: ``channel`` (default; the paper's conv bottleneck and the
     authors' ``use_patch=True`` default for EigenDamage: A over input channels, the layer
     becomes 1x1 -> kh x kw -> 1x1) or ``patch`` (KFC's factor over the unfolded patch: kh x kw
     -> 1x1 -> 1x1). Kron-OBD/OBS always use the patch factor.
3. prune to each ``--flops-reduction`` (dense FLOPs / pruned FLOPs, counted by
   :mod:`jaxsparse.analysis.flops`; a removed channel also removes its consumer's inputs).
   Hessian criteria (OBD, OBS, Kron-*) remove filters in increasing order of importance over
   all prunable layers (one global ranking, as the paper does) until the target is met;
   filter L1 removes the same fraction of every layer (its paper's local rule), the
   smallest fraction that meets it; EigenDamage's global fraction of eigen-directions is the
   smallest that meets it. No layer loses more than ``--max-layer-pruning`` of its filters
   (or eigen-directions);
4. evaluate right after pruning, fine-tune ``--finetune-epochs`` with the structure fixed
   (filter methods: gradients and weights masked, as :func:`jaxsparse.keep_masks` does;
   EigenDamage: the bottleneck's ``W'`` trained with ``Q_A``, ``Q_S`` fixed, as the
   paper's default) and evaluate again.

The factors and the OBD/OBS Fishers use the true labels (empirical Fisher). Writes
``table.md``, ``runs.csv`` and ``results.json`` into ``--out-dir``; ``--small`` is a short
check (500 training and 200 test images, one target), which the tests run with ``--model
lenet300`` (LeNet-300-100: fc1, fc2 prunable), whose Dense layers compile in seconds.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxsparse as js
from experiments import common, data, training
from jaxsparse.analysis import flops as flops_lib
from jaxsparse.core import masks as masks_lib
from jaxsparse.nn import models
from jaxsparse.pruning import kfac, structured

METHODS = ("filter_l1", "obd", "obs", "kron_obd", "kron_obs", "eigendamage")
LABELS = {"filter_l1": "filter L1 (Li et al. 2017)", "obd": "OBD, pooled per filter",
          "obs": "OBS, pooled per filter + OBS update", "kron_obd": "Kron-OBD",
          "kron_obs": "Kron-OBS + update", "eigendamage": "EigenDamage"}
# Per model: the chain of layers; all but the last (the classes) may lose filters, and each
# one's channels feed the next (LeNet-5: conv2's NHWC-flattened channels feed fc1).
CHAINS = {"lenet5": ("conv1", "conv2", "fc1", "fc2"), "lenet300": ("fc1", "fc2", "fc3")}


def chain_links(model: str) -> tuple[structured.ChannelLink, ...]:
  layers = CHAINS[model]
  return tuple(structured.ChannelLink(f"{p}/kernel", f"{c}/kernel", (f"{p}/bias",))
               for p, c in zip(layers, layers[1:]))


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out-dir", required=True)
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--model", choices=tuple(CHAINS), default="lenet5",
                 help="lenet5 (LeNet-5-Caffe); lenet300 makes a quick check (the tests)")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--flops-reduction", default="2,4", help="comma-separated targets, e.g. 2,4")
  p.add_argument("--seeds", default="0")
  p.add_argument("--epochs", type=int, default=3, help="dense training")
  p.add_argument("--finetune-epochs", type=int, default=1)
  p.add_argument("--lr", type=float, default=0.05)
  p.add_argument("--finetune-lr", type=float, default=0.01)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=100)
  p.add_argument("--calib", type=int, default=512, help="examples for K-FAC factors and OBD")
  p.add_argument("--obs-calib", type=int, default=128, help="examples for OBS's Fisher")
  p.add_argument("--obs-block", type=int, default=64, help="OBS block_size")
  p.add_argument("--damping", type=float, default=1e-3, help="Kron-OBS and OBS damping")
  p.add_argument("--max-layer-pruning", type=float, default=0.95)
  p.add_argument("--eigen-conv-factor", default="channel",
                 help="EigenDamage's conv input factor: channel (1x1 -> kh x kw -> 1x1, the "
                      "paper's) or patch (kh x kw -> 1x1 -> 1x1)")
  p.add_argument("--small", action="store_true",
                 help="500 train / 200 test images, one epoch, target 2x (a short check)")
  return p


def _check_args(a: argparse.Namespace) -> None:
  for name in ("epochs", "finetune_epochs", "batch_size", "calib", "obs_calib", "obs_block"):
    if getattr(a, name) < 1:
      raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
  a.method_list = [m.strip() for m in a.methods.split(",") if m.strip()]
  bad = [m for m in a.method_list if m not in METHODS]
  if bad or not a.method_list:
    raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
  a.targets = [float(t) for t in a.flops_reduction.split(",")]
  if any(not t > 1.0 for t in a.targets):
    raise ValueError(f"--flops-reduction targets must be > 1, got {a.flops_reduction}")
  a.seed_list = [int(s) for s in a.seeds.split(",")]
  kfac.check_damping(a.damping)
  if not 0.0 < a.max_layer_pruning < 1.0:
    raise ValueError(f"--max-layer-pruning must be in (0, 1), got {a.max_layer_pruning}")
  if a.eigen_conv_factor not in kfac.CONV_FACTORS:
    raise ValueError(f"--eigen-conv-factor must be one of {', '.join(kfac.CONV_FACTORS)}, got "
                     f"{a.eigen_conv_factor!r}")


# ------------------------------------------------------------------ FLOPs under filter removal


class FlopsModel:
  """Dense FLOPs per layer scaled by the kept fractions of its outputs and (through the
  links) of its inputs: the count :func:`jaxsparse.count_flops` gives for the propagated masks."""

  def __init__(self, layers: list[flops_lib.LayerFlops], links):
    self.layers = layers
    self.producer = {link.consumer: link.producer for link in links}

  def __call__(self, kept: dict[str, int], channels: dict[str, int]) -> float:
    total = 0.0
    for layer in self.layers:
      out = kept[layer.name] / channels[layer.name] if layer.name in channels else 1.0
      prod = self.producer.get(layer.name)
      inp = kept[prod] / channels[prod] if prod in channels else 1.0
      total += layer.dense * out * inp
    return total


def _greedy(scores: dict[str, np.ndarray], flops: FlopsModel, budget: float, cap: float
            ) -> dict[str, np.ndarray]:
  """Removes filters in increasing score over all layers until ``flops <= budget``."""
  channels = {n: s.size for n, s in scores.items()}
  kept = dict(channels)
  minimum = {n: max(1, math.ceil((1 - cap) * c)) for n, c in channels.items()}
  keep = {n: np.ones(c, bool) for n, c in channels.items()}
  order = sorted(((float(v), n, j) for n, s in scores.items() for j, v in enumerate(s)),
                 key=lambda t: t[0])
  for _, n, j in order:
    if flops(kept, channels) <= budget:
      break
    if kept[n] <= minimum[n]:
      continue
    keep[n][j] = False
    kept[n] -= 1
  return keep


def _uniform_fraction(channels: dict[str, int], flops: FlopsModel, budget: float, cap: float
                      ) -> float:
  """The smallest per-layer fraction (on a 1/1000 grid) whose FLOPs meet ``budget``."""
  for f in np.arange(0, cap + 1e-9, 1e-3):
    kept = {n: c - int(round(f * c)) for n, c in channels.items()}
    if flops(kept, channels) <= budget:
      return float(f)
  return float(cap)


def _masks_from_keep(params: Any, keep: dict[str, np.ndarray], links) -> Any:
  """Filter masks (kernels of ``keep``) propagated to biases and consumers."""
  leaves = dict(zip(masks_lib.leaf_names(params), jax.tree.leaves(params)))
  flat = [structured.filters().expand(jnp.asarray(keep[n]), jnp.shape(leaves[n])) if n in keep
          else True for n in masks_lib.leaf_names(params)]
  masks = jax.tree.unflatten(jax.tree.structure(params), flat)
  return structured.propagate_channels(params, masks, links)


def _pooled(scores: Any, names: tuple) -> dict[str, np.ndarray]:
  """Element scores summed over each filter's kernel weights and bias."""
  leaves = dict(zip(masks_lib.leaf_names(scores), jax.tree.leaves(scores)))
  out = {}
  for n in names:
    s = np.asarray(structured.filters().pool(jnp.asarray(leaves[n], jnp.float32)))
    bias = leaves.get(n.rsplit("/", 1)[0] + "/bias")
    out[n] = s + (np.asarray(bias, np.float32) if bias is not None else 0.0)
  return out


def _kept_params(params: Any, masks: Any) -> int:
  return sum(int(np.count_nonzero(np.broadcast_to(np.asarray(m, bool), np.shape(p))))
             for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))


# ------------------------------------------------------------------ fine-tuning


def _make_masked_step(net, tx):
  """One SGD step with the gradients and the weights masked (what js.keep_masks does); the
  masks are an argument, so every filter method shares one compiled step."""

  @jax.jit
  def step(params, opt_state, masks, x, y):
    def loss(p):
      logits = net.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = masks_lib.apply_masks(jax.grad(loss)(params), masks)
    updates, opt_state = tx.update(grads, opt_state, params)
    return masks_lib.apply_masks(optax.apply_updates(params, updates), masks), opt_state

  return step


def _make_bottleneck_step(net, tx, bottlenecks):
  """One SGD step on (params, W' of each bottleneck); Q_A and Q_S stay fixed."""

  def merged(train):
    params, ws = train
    return kfac.merge_bottlenecks(
        params, {n: b._replace(w=ws[n]) for n, b in bottlenecks.items() if b is not None})

  @jax.jit
  def step(train, opt_state, x, y):
    def loss(t):
      logits = net.apply({"params": merged(t)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(train), opt_state, train)
    return optax.apply_updates(train, updates), opt_state

  return step, merged


def _finetune(step, state, opt_state, x, y, a, seed, *extra):
  for epoch in range(a.finetune_epochs):
    rng = np.random.default_rng(seed * 1000 + epoch)
    for xb, yb in data.iterate_batches(x, y, a.batch_size, rng=rng):
      state, opt_state = step(state, opt_state, *extra, xb, yb)
  return state


# ------------------------------------------------------------------ one seed


def run_seed(a: argparse.Namespace, ds, seed: int, log) -> list[dict[str, Any]]:
  x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
  if a.small:
    x_tr, y_tr, x_te, y_te = x_tr[:500], y_tr[:500], x_te[:200], y_te[:200]
  net = models.create_model(a.model, ds.num_classes)
  links = chain_links(a.model)
  prunable = tuple(link.producer for link in links)
  evaluate = training.make_evaluate(net)
  acc = lambda p: evaluate(p, {}, x_te, y_te)
  steps = len(x_tr) // a.batch_size
  params = models.init_params(net, ds.input_shape, seed)["params"]
  tx = training.make_optimizer("sgd", optax.cosine_decay_schedule(a.lr, steps * a.epochs),
                               momentum=a.momentum)
  state = training.TrainState(params, {}, tx.init(params))
  # CPU convs run faster unrolled (training.make_train_epoch); a scan compiles faster (--small).
  epoch_fn = training.make_train_epoch(net, tx, a.batch_size, return_losses=True,
                                       steps_per_call=None if a.small else 5)
  for _, state, loss, _, _ in training.iterate_epochs(epoch_fn, state, jax.device_put(x_tr),
                                                      jax.device_put(y_tr), jax.random.key(seed),
                                                      stop=a.epochs):
    if not np.isfinite(loss):
      raise FloatingPointError(f"dense training: loss is {loss}; lower --lr")
  dense = state.params
  acc_dense = acc(dense)
  n_params = sum(int(np.size(l)) for l in jax.tree.leaves(dense))
  layers = js.count_flops(net, dense, ds.input_shape)
  dense_flops = js.total_flops(layers)[0]
  log(f"seed {seed}: dense {acc_dense:.4f}, {dense_flops:,} FLOPs, {n_params:,} params")

  def loss_fn(p, batch):
    logits = net.apply({"params": p}, batch[0])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

  order = np.random.default_rng(seed).permutation(len(x_tr))
  calib = order[:a.calib]
  chunks = [(x_tr[calib[i:i + 256]], y_tr[calib[i:i + 256]]) for i in range(0, len(calib), 256)]
  obs_batch = (x_tr[order[:a.obs_calib]], y_tr[order[:a.obs_calib]])
  shapes = dict(zip(masks_lib.leaf_names(dense), map(np.shape, jax.tree.leaves(dense))))
  channels = {n: int(shapes[n][-1]) for n in prunable}
  flops = FlopsModel(layers, links)

  t0 = time.perf_counter()
  # Kron-OBD/OBS take KFC's patch factors; EigenDamage those of --eigen-conv-factor (the same
  # when the model has no conv).
  has_conv = any(layer.kind == "Conv" for layer in layers)
  eig_kind = a.eigen_conv_factor if has_conv else "patch"
  kinds = {eig_kind} if "eigendamage" in a.method_list else set()
  if {"kron_obd", "kron_obs"} & set(a.method_list):
    kinds.add("patch")
  factors = {k: js.kron_factors(loss_fn, dense, chunks, conv_factor=k) for k in sorted(kinds)}
  sub = {n: factors["patch"][n] for n in prunable} if "patch" in factors else {}
  eig_sub = {n: factors[eig_kind][n] for n in prunable} if eig_kind in factors else {}
  scores: dict[str, dict[str, np.ndarray]] = {}
  if "obd" in a.method_list:   # the Fisher diagonal is a mean: average the chunks' scores
    parts = [_pooled(js.obd_scores(dense, loss_fn, c), prunable) for c in chunks]
    scores["obd"] = {n: sum(len(c[0]) * p[n] for c, p in zip(chunks, parts)) / len(calib)
                     for n in prunable}
  obs_leaves = set(prunable) | {n.rsplit("/", 1)[0] + "/bias" for n in prunable}
  obs_filter = lambda name, leaf: name in obs_leaves
  if "obs" in a.method_list:
    res = js.obs_prune(dense, loss_fn, obs_batch, 0.5, damping=a.damping, block_size=a.obs_block,
                       scope="local", filter=obs_filter)
    scores["obs"] = _pooled(res.scores, prunable)
  if "kron_obd" in a.method_list:
    scores["kron_obd"] = {n: np.asarray(v) for n, v in js.kron_obd_scores(dense, sub).items()}
  if "kron_obs" in a.method_list:
    scores["kron_obs"] = {n: np.asarray(v) for n, v in
                          js.kron_obs_scores(dense, sub, damping=a.damping).items()}
  log(f"seed {seed}: criteria computed in {time.perf_counter() - t0:.1f}s")

  ft_tx = lambda: training.make_optimizer(
      "sgd", optax.cosine_decay_schedule(a.finetune_lr, steps * a.finetune_epochs),
      momentum=a.momentum)
  masked_step = _make_masked_step(net, ft_tx())
  rows = [dict(seed=seed, method="dense", target=1.0, flops=dense_flops, params=n_params,
               acc_pruned=acc_dense, acc_finetuned=acc_dense)]
  for target in a.targets:
    budget = dense_flops / target
    for method in a.method_list:
      t0 = time.perf_counter()
      if method == "eigendamage":
        pruned, masks_or_b, fl, kept = _eigendamage_at(dense, eig_sub, layers, budget, a)
      else:
        if method == "filter_l1":
          f = _uniform_fraction(channels, flops, budget, a.max_layer_pruning)
          l1 = js.filter_l1_masks(dense, f)
          keep = {n: ~np.asarray(structured.removed_channels(
              dict(zip(masks_lib.leaf_names(l1), jax.tree.leaves(l1)))[n])) for n in prunable}
        else:
          keep = _greedy(scores[method], flops, budget, a.max_layer_pruning)
        masks = _masks_from_keep(dense, keep, links)
        if method == "kron_obs":
          pruned = kfac.kron_obs_update(dense, sub, masks, damping=a.damping)
        elif method == "obs":
          pruned = _obs_update(dense, loss_fn, obs_batch, keep, obs_filter, a)
        else:
          pruned = dense
        pruned = masks_lib.apply_masks(pruned, masks)
        masks_or_b = masks
        fl = js.total_flops(js.count_flops(net, dense, ds.input_shape, masks))[1]
        kept = _kept_params(dense, masks)
      acc_pruned = acc(pruned)
      if method == "eigendamage":
        step, merged = _make_bottleneck_step(net, ft_tx(), masks_or_b)
        ws = {n: jnp.asarray(b.w) for n, b in masks_or_b.items() if b is not None}
        train = (pruned, ws)
        tx_ = ft_tx()
        train = _finetune(step, train, tx_.init(train), x_tr, y_tr, a, seed)
        tuned = merged(train)
      else:
        tx_ = ft_tx()
        tuned = _finetune(masked_step, pruned, tx_.init(pruned), x_tr, y_tr, a, seed, masks_or_b)
      acc_tuned = acc(tuned)
      layer_info = _layer_info(method, masks_or_b, prunable)
      rows.append(dict(seed=seed, method=method, target=target, flops=fl, params=kept,
                       acc_pruned=acc_pruned, acc_finetuned=acc_tuned, layers=layer_info))
      log(f"seed {seed} {target:g}x {method}: {dense_flops / fl:.2f}x FLOPs, "
          f"{n_params / kept:.2f}x params, acc {acc_pruned:.4f} -> {acc_tuned:.4f} "
          f"({layer_info}; {time.perf_counter() - t0:.0f}s)")
  return rows


def _obs_update(dense, loss_fn, obs_batch, keep, obs_filter, a):
  """OBS's multi-weight update for exactly the filters removed (their kernel weights and
  bias): ``obs_prune`` with those masks and each leaf's exact kept count."""
  names = masks_lib.leaf_names(dense)
  leaves = dict(zip(names, jax.tree.leaves(dense)))
  own, overrides = [], {}
  for n in names:
    if obs_filter(n, leaves[n]):
      kernel = n if n in keep else n.rsplit("/", 1)[0] + "/kernel"
      # The producer's own filters only: a consumer's rows of removed inputs see zero input.
      m = structured.filters().expand(jnp.asarray(keep[kernel]), jnp.shape(leaves[n]))
      overrides[n] = 1.0 - float(np.count_nonzero(m)) / m.size
      own.append(m)
    else:
      own.append(True)
  own_masks = jax.tree.unflatten(jax.tree.structure(dense), own)
  res = js.obs_prune(dense, loss_fn, obs_batch, 0.0, damping=a.damping, block_size=a.obs_block,
                     scope="local", filter=obs_filter, overrides=overrides, masks=own_masks)
  return res.params


def _eigendamage_at(dense, sub, layers, budget, a):
  """The smallest global fraction of eigen-directions whose bottlenecks meet ``budget``."""
  total = sum(f.a.shape[0] + f.s.shape[0] for f in sub.values())
  basis = kfac.eigenbasis(dense, sub)

  def at(k):
    res = js.eigendamage(dense, sub, k / total, max_layer_pruning=a.max_layer_pruning,
                         output_layer=None, basis=basis)
    return res, js.total_flops(kfac.eigendamage_flops(layers, res.bottlenecks))[1]

  lo, hi = 0, total - 1
  best = at(hi)
  while lo < hi:   # FLOPs fall as more directions go
    mid = (lo + hi) // 2
    res, fl = at(mid)
    if fl <= budget:
      hi, best = mid, (res, fl)
    else:
      lo = mid + 1
  res, fl = best
  leaves = dict(zip(masks_lib.leaf_names(dense), jax.tree.leaves(dense)))
  params = sum(int(np.size(l)) for l in leaves.values())
  for n, b in res.bottlenecks.items():
    if b is not None:   # the layer's kernel and bias give way to its three maps
      params += kfac.bottleneck_size(b) - int(np.size(leaves[n])) - int(
          np.size(leaves[n.rsplit("/", 1)[0] + "/bias"]))
  return res.params, res.bottlenecks, fl, params


def _layer_info(method: str, masks_or_b: Any, prunable: tuple) -> str:
  if method == "eigendamage":
    return ", ".join(f"{n.split('/')[0]} " + (f"{b.w.shape[-2]}->{b.w.shape[-1]}" if b is not None
                                              else "whole") for n, b in masks_or_b.items())
  leaves = dict(zip(masks_lib.leaf_names(masks_or_b), jax.tree.leaves(masks_or_b)))
  return ", ".join(f"{n.split('/')[0]} {int((~structured.removed_channels(leaves[n])).sum())}"
                   for n in prunable)


# ------------------------------------------------------------------ report


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  keys = []
  for r in rows:
    if (r["method"], r["target"]) not in keys:
      keys.append((r["method"], r["target"]))
  for method, target in keys:
    rs = [r for r in rows if r["method"] == method and r["target"] == target]
    out.append(dict(method=method, target=target, seeds=len(rs),
                    flops=common.mean_std(r["flops"] for r in rs)[0],
                    params=common.mean_std(r["params"] for r in rs)[0],
                    acc_pruned=common.format_mean_std([r["acc_pruned"] for r in rs]),
                    acc_finetuned=common.format_mean_std([r["acc_finetuned"] for r in rs])))
  return out


def table_markdown(a: argparse.Namespace, summary: list[dict[str, Any]], seconds: float) -> str:
  dense = next(s for s in summary if s["method"] == "dense")
  header = ["method", "target", "FLOPs", "FLOPs reduction", "params", "params reduction",
            "acc. pruned (%)", "acc. fine-tuned (%)"]
  body = [[LABELS.get(s["method"], s["method"]), f"{s['target']:g}x", f"{s['flops'] / 1e6:.3f}M",
           f"{dense['flops'] / s['flops']:.2f}x", f"{s['params'] / 1e3:.1f}K",
           f"{dense['params'] / s['params']:.2f}x", s["acc_pruned"], s["acc_finetuned"]]
          for s in summary]
  seeds = ",".join(str(s) for s in a.seed_list)
  model = {"lenet5": "LeNet-5-Caffe", "lenet300": "LeNet-300-100"}[a.model]
  lines = [f"# Kronecker-factored structured pruning, {model} on {a.dataset}"
           f"{' (--small)' if a.small else ''}", "",
           f"Dense {a.epochs} epochs (SGD lr {a.lr}, momentum {a.momentum}, cosine, batch "
           f"{a.batch_size}); criteria on {a.calib} training examples (OBS: {a.obs_calib}, "
           f"blocks of {a.obs_block}); damping {a.damping}; at most {a.max_layer_pruning:g} of a "
           f"layer pruned; fine-tuned {a.finetune_epochs} epoch(s) (lr {a.finetune_lr}, cosine); "
           f"seeds {seeds} (mean ± std over seeds); {jax.devices()[0].platform}, jax "
           f"{jax.__version__}, {seconds:.0f} s.", "",
           "FLOPs: forward multiply-adds x 2 of the Dense/Conv kernels per example "
           "(jaxsparse.analysis.flops); a removed filter also removes its consumer's inputs. "
           "EigenDamage counts its three maps (bias rows not counted, as biases never are; "
           f"conv input factor: {a.eigen_conv_factor}"
           + (", so a conv becomes 1x1 Q_A at the input's resolution -> kh x kw W' -> 1x1 Q_S"
              if a.eigen_conv_factor == "channel" else
              ", so a conv becomes kh x kw Q_A -> 1x1 W' -> 1x1 Q_S")
           + "); params count kernels and biases (EigenDamage: Q_A with its bias row, W', Q_S).",
           "",
           common.markdown_table(header, body, "llrrrrrr"), ""]
  return "\n".join(lines)


def run(a: argparse.Namespace) -> dict[str, Any]:
  t0 = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)
  if a.small:
    a.epochs = a.finetune_epochs = 1
    a.targets = [2.0]
    a.calib, a.obs_calib, a.obs_block = min(a.calib, 128), min(a.obs_calib, 32), 32
  ds = data.load_dataset(a.dataset, seed=0)
  rows = []
  for seed in a.seed_list:
    rows += run_seed(a, ds, seed, log)
  summary = summarise(rows)
  seconds = time.perf_counter() - t0
  result = dict(args={k: v for k, v in vars(a).items()}, runs=rows, summary=summary,
                seconds=seconds, jax_version=jax.__version__,
                device=jax.devices()[0].platform)
  common.write_results(a.out_dir, result, table_markdown(a, summary, seconds), rows)
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  a = build_parser().parse_args(argv)
  _check_args(a)
  common.make_out_dir(a.out_dir)
  with warnings.catch_warnings():
    # Whole-filter masks leave biases with fewer kept entries than outputs by design.
    warnings.filterwarnings("ignore", message="sparsity: leaf .* keeps only")
    return run(a)


if __name__ == "__main__":
  main()
