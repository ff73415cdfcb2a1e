"""Structure over training: what a sparse method does to its masks, layer by layer.

Three views of a run (one way to get them, used by the notebook
``notebooks/dynamic_sparse_training.ipynb`` and by this module's command line):

* the density of every sparse layer over training (DSR and the other methods that
  reallocate move parameters between layers; SET, RigL and static keep each layer's
  density fixed);
* the fraction of each layer's mask (and of all of them) that changed since the
  previous record;
* the first layer's connectivity per input feature: how many kept connections leave
  each input pixel, drawn as an image (the SET paper's picture of connections
  concentrating on the informative pixels).

A :class:`jaxsparse.analysis.structure.StructureRecorder` (``js.StructureRecorder``)
collects them. It is a ``training.train`` hook (``on_epoch_end=recorder``: one record per
epoch), or call ``recorder.record(masks, params, step=step)`` from your own loop, e.g. after
every mask update. :func:`plot_layer_density`, :func:`plot_mask_change` and
:func:`plot_input_connectivity` draw onto a matplotlib ``Axes`` you pass (no pyplot
state; they work under the Agg backend).

  python -m experiments.structure --dataset fashion_mnist --method set --epochs 20

trains with ``experiments.training.train``, records once per epoch and writes
``history.csv`` (one row per epoch), ``in_degree.csv`` (the first layer's per-input
kept connections after every epoch), ``layer_density.png``, ``mask_change.png`` and
``input_connectivity.png`` to ``results/structure/<method>/``.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsparse.analysis.structure import ALL, StructureRecorder


# ------------------------------------------------------------------------ plots


def _x_axis(history: Sequence[Mapping[str, Any]], x: str | None) -> tuple[list, str]:
  """The x values of the rows: field ``x``, else ``epoch`` or ``step`` if every row has
  it, else the record number."""
  if x is None:
    x = next((k for k in ("epoch", "step") if history and all(k in r for r in history)), None)
  if x is None:
    return list(range(1, len(history) + 1)), "record"
  return [r[x] for r in history], x


def _integer_ticks(ax: Any, xlabel: str) -> None:
  if xlabel in ("epoch", "step", "record"):
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _label(layer: str) -> str:
  return layer[:-len("/kernel")] if layer.endswith("/kernel") else layer


def _layers(history: Sequence[Mapping[str, Any]]) -> list[str]:
  return [k for k in history[0]["density"] if k != ALL] if history else []


def plot_layer_density(history: Sequence[Mapping[str, Any]], ax: Any, *, x: str | None = None,
                       log: bool = True, title: str | None = None) -> Any:
  """Density (kept / size) of every recorded layer over the records, and of all of them
  (dashed). ``history`` is :attr:`StructureRecorder.history`; returns ``ax``."""
  xs, xlabel = _x_axis(history, x)
  for layer in _layers(history):
    ax.plot(xs, [r["density"][layer] for r in history], marker=".", label=_label(layer))
  if history:
    ax.plot(xs, [r["density"][ALL] for r in history], "k--", label=ALL)
  ax.set(xlabel=xlabel, ylabel="fraction of weights kept", title=title or "layer density")
  _integer_ticks(ax, xlabel)
  if log:
    ax.set_yscale("log")
  ax.legend(fontsize="small")
  return ax


def plot_mask_change(history: Sequence[Mapping[str, Any]], ax: Any, *, x: str | None = None,
                     title: str | None = None) -> Any:
  """:func:`mask_change` of every layer since the previous record, and of all layers
  together (dashed); the first record has no previous one and is not drawn."""
  xs, xlabel = _x_axis(history, x)
  pts = [(xv, r) for xv, r in zip(xs, history) if r["changed"]]
  for layer in _layers(history):
    ax.plot([p[0] for p in pts], [p[1]["changed"][layer] for p in pts], marker=".",
            label=_label(layer))
  if pts:
    ax.plot([p[0] for p in pts], [p[1]["changed"][ALL] for p in pts], "k--", label=ALL)
  ax.set(xlabel=xlabel, ylabel="|new XOR old| / previously kept",
         title=title or "mask change since the previous record")
  _integer_ticks(ax, xlabel)
  ax.legend(fontsize="small")
  return ax


def plot_input_connectivity(in_degree: Any, image_shape: Sequence[int], ax: Any, *,
                            title: str | None = None, colorbar: bool = True) -> Any:
  """Heatmap of the first layer's kept connections per input pixel.

  ``in_degree`` (see :func:`in_degree`) is reshaped to ``image_shape`` in row-major
  order, the order in which the models flatten their ``(H, W, C)`` input; with
  channels, a pixel's count is summed over them. E.g. ``(28, 28)`` or ``(28, 28, 1)``
  for Fashion-MNIST, ``(8, 8)`` for the digits. Returns the ``AxesImage``.

  Raises:
    ValueError: when the number of inputs is not the image's.
  """
  d = np.asarray(in_degree)
  shape = tuple(int(s) for s in image_shape)
  if d.size != math.prod(shape) or len(shape) not in (2, 3):
    raise ValueError(f"in_degree has {d.size} entries; image_shape {shape} must be (H, W) or "
                     f"(H, W, C) with H * W * C = {d.size}.")
  img = d.reshape(shape)
  if img.ndim == 3:
    img = img.sum(axis=-1)
  im = ax.imshow(img, cmap="viridis", interpolation="nearest")
  ax.set(xticks=[], yticks=[], title=title or "kept connections per input pixel")
  if colorbar:
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  return im


# ------------------------------------------------------------------- command line

DEFAULTS = {"digits": dict(batch_size=32, lr=0.05), "fashion_mnist": dict(batch_size=100, lr=0.01)}


def write_plots(recorder: StructureRecorder, image_shape: Sequence[int] | None, out_dir: str,
                name: str = "") -> list[str]:
  """The PNGs of a recorder into ``out_dir`` (``layer_density.png``, ``mask_change.png``
  and, unless ``image_shape`` is None, ``input_connectivity.png``); returns their paths."""
  from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

  prefix = f"{name}\n" if name else ""
  plots = [
      ("layer_density.png", lambda ax: plot_layer_density(
          recorder.history, ax, title=f"{prefix}layer density"), (6, 4)),
      ("mask_change.png", lambda ax: plot_mask_change(
          recorder.history, ax, title=f"{prefix}mask change since the previous record"), (6, 4))]
  if image_shape is not None:
    plots.append(("input_connectivity.png", lambda ax: plot_input_connectivity(
        recorder.in_degree, image_shape, ax,
        title=f"{prefix}first layer: kept connections per input pixel"), (5, 4.8)))
  paths = []
  for fname, draw, size in plots:
    fig = Figure(figsize=size)
    draw(fig.add_subplot())
    fig.tight_layout()
    path = os.path.join(out_dir, fname)
    fig.savefig(path, dpi=120)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> StructureRecorder:
  from experiments import common, data, training
  from jaxsparse.nn import models

  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="digits", choices=sorted(data.DATASETS))
  p.add_argument("--model", default="lenet300", choices=sorted(models.MODELS),
                 help="a model with a Dense first layer (the connectivity plot needs one)")
  p.add_argument("--method", default="set", choices=training.METHODS)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=None,
                 help="default: 32 on digits, 100 on fashion_mnist")
  p.add_argument("--lr", type=float, default=None,
                 help="default: 0.05 on digits, 0.01 on fashion_mnist")
  p.add_argument("--update-period", type=int, default=None,
                 help="steps between mask updates, for methods that take update_period "
                 "(default: the method's, see training.make_method)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out-dir", default=None, help="default: results/structure/<method>")
  p.add_argument("--overwrite", action="store_true", help="replace results already in --out-dir")
  args = p.parse_args(argv)

  out_dir = args.out_dir or os.path.join("results", "structure", args.method)
  common.check_out_dir(out_dir, marker="history.csv", overwrite=args.overwrite)
  defaults = DEFAULTS.get(args.dataset, DEFAULTS["digits"])
  method_kwargs = {} if args.update_period is None else {"update_period": args.update_period}
  recorder = StructureRecorder()
  result = training.train(dataset=args.dataset, model=args.model, method=args.method,
                          sparsity=args.sparsity, epochs=args.epochs,
                          batch_size=args.batch_size or defaults["batch_size"],
                          learning_rate=args.lr or defaults["lr"], seed=args.seed,
                          data_dir=args.data_dir, method_kwargs=method_kwargs, progress=False,
                          on_epoch_end=recorder)
  image_shape = data.load_dataset(args.dataset, data_dir=args.data_dir,
                                  seed=args.seed).input_shape
  os.makedirs(out_dir, exist_ok=True)
  recorder.write_csv(os.path.join(out_dir, "history.csv"))
  recorder.write_in_degree_csv(os.path.join(out_dir, "in_degree.csv"))
  if recorder.in_degree.size != math.prod(image_shape):
    print(f"input_connectivity.png skipped: the first recorded layer has "
          f"{recorder.in_degree.size} inputs, the images {math.prod(image_shape)} pixels "
          "(a model whose first layer is not Dense?)")
    image_shape = None
  paths = write_plots(recorder, image_shape, out_dir,
                      name=f"{args.method}, {args.model}, {args.dataset}")
  last = recorder.history[-1]
  print(f"final test accuracy {result['final_test_accuracy']:.4f}, sparsity "
        f"{result['final_sparsity']:.4f}; final density per layer: "
        + ", ".join(f"{_label(k)} {v:.4f}" for k, v in last["density"].items()))
  print("wrote", ", ".join([os.path.join(out_dir, "history.csv"),
                            os.path.join(out_dir, "in_degree.csv"), *paths]))
  return recorder


if __name__ == "__main__":
  main()
