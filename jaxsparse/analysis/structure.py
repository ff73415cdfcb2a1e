"""What a sparse method does to its masks over training, layer by layer: density, mask
change and first-layer in-degree.

A :class:`StructureRecorder` records per-layer density (DSR and the other methods that
reallocate move parameters between layers; SET, RigL and static keep each layer's density
fixed), the fraction of each layer's mask that changed since the previous record
(:func:`mask_change`), and the first layer's kept connections per input feature
(:func:`in_degree`: the SET paper's picture of connections concentrating on the informative
pixels; Mocanu et al. 2018). Call ``recorder.record(masks, params, step=step)`` from any
loop, or pass the recorder as an ``on_epoch_end(metrics, state)`` hook (a ``state`` with
``params`` and ``opt_state``). The plots and the command line are in the repository's
``experiments/structure.py``.
"""

from __future__ import annotations

import csv
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jaxsparse.core import masks as masks_lib, transform as core

ALL = "all"
"""The key of the whole-network entries (all recorded layers together)."""


def mask_change(old: Any, new: Any) -> float:
  """``|new XOR old| / |old|``: entries that changed, over the entries ``old`` kept.

  Both a dropped and a grown connection count, so a method that rewires a fraction
  ``f`` of a layer's connections at fixed density gives ``2 f``. SET with ``drop_fraction =
  0.3`` gives about 0.6 per update, more where active weights are exactly zero (SET
  drops those too: e.g. connections from an always-blank input pixel, which get no
  gradient). The denominator is the previous mask's kept count (at least 1, so an
  empty previous mask gives the number of grown entries).

  Raises:
    ValueError: when the two masks have different shapes.
  """
  old, new = np.asarray(old, bool), np.asarray(new, bool)
  if old.shape != new.shape:
    raise ValueError(f"masks have different shapes: old {old.shape}, new {new.shape}.")
  return float(np.count_nonzero(old ^ new)) / max(int(np.count_nonzero(old)), 1)


def in_degree(mask: Any) -> np.ndarray:
  """Kept connections per input feature of a kernel mask: its sum over the last
  (output) axis. A Dense kernel ``(in, out)`` gives ``(in,)``: how many hidden units
  each input pixel still reaches. A higher-rank kernel is viewed as the matrix
  ``(prod(shape[:-1]), shape[-1])``, as :mod:`jaxsparse.analysis.formats` does.

  Raises:
    ValueError: for a mask of rank < 2.
  """
  m = np.asarray(mask, bool)
  if m.ndim < 2:
    raise ValueError(f"in_degree needs a kernel mask of rank >= 2, got shape {m.shape}.")
  return m.reshape(-1, m.shape[-1]).sum(axis=-1)


def layer_masks(masks: Any, params: Any = None,
                layers: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Leaf name -> boolean numpy mask of the layers to record.

  ``layers=None`` takes every kernel: the leaves whose param (or, without
  ``params``, whose mask) has rank >= 2, the library's default sparse leaves. A dense
  leaf's scalar mask is broadcast to its param's shape, so a dense layer has density 1
  (without ``params`` such a leaf is skipped, its shape being unknown).

  Raises:
    ValueError: naming a requested layer that is missing or whose shape is unknown.
  """
  names = masks_lib.leaf_names(masks)
  mask_leaves = jax.tree.leaves(masks)
  if params is not None:
    masks_lib.check_masks(params, masks)
    shapes = [tuple(np.shape(p)) for p in jax.tree.leaves(params)]
  else:
    shapes = [tuple(np.shape(m)) if np.ndim(m) else None for m in mask_leaves]
  found = dict(zip(names, zip(mask_leaves, shapes)))
  if layers is None:
    layers = [n for n, (_, s) in found.items() if s is not None and len(s) >= 2]
  out = {}
  for name in layers:
    if name not in found:
      raise ValueError(f"layers: no mask leaf named {name!r}; leaves: {names}")
    m, shape = found[name]
    if shape is None:
      raise ValueError(f"layers: {name!r} has a scalar (dense) mask; pass params to record it.")
    out[name] = np.array(np.broadcast_to(np.asarray(m, bool), shape))
  return out


class StructureRecorder:
  """Records per-layer density, mask change and first-layer in-degree, one row per call.

  ``experiments.training.train(..., on_epoch_end=recorder)`` records after every epoch (the
  row also holds that epoch's metrics: ``epoch``, ``loss``, ``test_accuracy``, ...). In your
  own loop call ``recorder.record(masks, params, step=step)`` whenever you want a row,
  e.g. right after each mask update.

  Every row of :attr:`history` is a dict of the given fields plus

  * ``density``: layer -> kept / size, and ``"all"`` (kept / size over all recorded
    layers);
  * ``kept``: layer -> kept count, and ``"all"``;
  * ``changed``: layer -> :func:`mask_change` against the previous row's mask
    (``|new XOR old| / kept in the previous mask``), and ``"all"`` (summed XOR over
    summed previous kept counts). Empty in the first row.

  :attr:`in_degrees` holds the input layer's :func:`in_degree` of every row
  (:attr:`in_degree` the latest). The input layer is ``input_layer``, or the first
  recorded layer in leaf order (``fc1/kernel`` for LeNet-300-100).

  Args:
    layers: leaf names to record (default: every kernel, see :func:`layer_masks`).
    input_layer: the leaf whose in-degree is recorded.
  """

  def __init__(self, layers: Sequence[str] | None = None, input_layer: str | None = None):
    self.layers = None if layers is None else list(layers)
    self.input_layer = input_layer
    self.history: list[dict[str, Any]] = []
    self.in_degrees: list[np.ndarray] = []
    self._previous: dict[str, np.ndarray] | None = None

  def __call__(self, metrics: Mapping[str, Any], state: Any) -> None:
    """An ``on_epoch_end(metrics, state)`` hook: one row from ``state.opt_state``'s masks."""
    self.record(core.get_masks(state.opt_state), state.params, **metrics)

  def record(self, masks: Any, params: Any = None, **fields: Any) -> dict[str, Any]:
    """Appends (and returns) one row for ``masks`` (a mask tree, e.g.
    ``js.get_masks(opt_state)``); ``fields`` (``step=...``, metrics) are stored in it."""
    current = layer_masks(masks, params, self.layers)
    if not current:
      raise ValueError("no layer to record: the mask tree has no kernel leaf (pass params "
                       "for dense masks, or name the leaves in layers=).")
    if self._previous is not None and set(self._previous) != set(current):
      raise ValueError(f"the recorded layers changed: {sorted(self._previous)} before, "
                       f"{sorted(current)} now.")
    input_layer = self.input_layer or next(iter(current))
    if input_layer not in current:
      raise ValueError(f"input_layer {input_layer!r} is not a recorded layer: {list(current)}")

    kept = {n: int(np.count_nonzero(m)) for n, m in current.items()}
    size = {n: m.size for n, m in current.items()}
    row = dict(fields)
    row["density"] = {n: kept[n] / size[n] for n in current}
    row["density"][ALL] = sum(kept.values()) / sum(size.values())
    row["kept"] = dict(kept, **{ALL: sum(kept.values())})
    row["changed"] = {}
    if self._previous is not None:
      xor, before = 0, 0
      for n, m in current.items():
        row["changed"][n] = mask_change(self._previous[n], m)
        xor += int(np.count_nonzero(self._previous[n] ^ m))
        before += int(np.count_nonzero(self._previous[n]))
      row["changed"][ALL] = xor / max(before, 1)
    self._previous = current
    self.history.append(row)
    self.in_degrees.append(in_degree(current[input_layer]))
    return row

  @property
  def in_degree(self) -> np.ndarray:
    """The input layer's in-degree at the latest record."""
    if not self.in_degrees:
      raise ValueError("nothing recorded yet")
    return self.in_degrees[-1]

  def rows(self) -> list[dict[str, Any]]:
    """The history as flat rows: the fields, then ``density/<layer>``, ``kept/<layer>``,
    ``changed/<layer>`` (``None`` in the first row) for every layer and ``"all"``."""
    return [flat_row(r) for r in self.history]

  def write_csv(self, path: str) -> None:
    """:meth:`rows` as CSV (an empty cell where there is no value)."""
    write_rows_csv(self.rows(), path)

  def write_in_degree_csv(self, path: str, key: str = "epoch") -> None:
    """One row per record: ``key`` (the record's field, or its index) and the input
    layer's kept connections for every input feature."""
    with open(path, "w", newline="") as f:
      w = csv.writer(f)
      n = len(self.in_degrees[0]) if self.in_degrees else 0
      w.writerow([key] + [f"input_{i}" for i in range(n)])
      for i, (r, d) in enumerate(zip(self.history, self.in_degrees)):
        w.writerow([r.get(key, i + 1)] + [int(v) for v in d])


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
  """One history row as a flat dict (see :meth:`StructureRecorder.rows`)."""
  out = {k: v for k, v in row.items() if k not in ("density", "kept", "changed")}
  for group in ("density", "kept", "changed"):
    for layer in row["density"]:
      out[f"{group}/{layer}"] = row[group].get(layer)
  return out


def write_rows_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
  fields = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    for r in rows:
      w.writerow({k: "" if r.get(k) is None else r[k] for k in fields})
