"""What the experiment scripts share: results folders, mean ± std, markdown tables, CSV and
JSON files, and timing.

Every script writes into a results folder that must not hold another run's results
(:func:`check_out_dir`, :func:`make_out_dir`), reports seeds as mean ± sample std
(:func:`mean_std`, :func:`format_mean_std`), renders markdown tables
(:func:`markdown_table`), writes ``runs.csv``-style files (:func:`write_csv`,
:func:`write_json`) and times jitted functions (:func:`median_seconds`).
"""

from __future__ import annotations

import csv
import json
import os
import random
import statistics
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

# ------------------------------------------------------------------ results folders


def check_out_dir(path: str, *, marker: str | None = None, flag: str = "--out-dir",
                  overwrite: bool | None = None) -> None:
  """Raises FileExistsError naming ``flag`` and ``path`` when ``path`` holds results.

  A folder holds results when it has the file ``marker`` or, without a ``marker``,
  when it is not empty. ``overwrite=True`` accepts such a folder; ``overwrite=False``
  refuses it and names ``--overwrite`` (for scripts that have the flag); ``None``, for
  scripts without it, refuses it.
  """
  if marker is not None:
    taken = os.path.exists(os.path.join(path, marker))
  else:
    taken = os.path.isdir(path) and bool(os.listdir(path)) or os.path.isfile(path)
  if taken and not overwrite:
    hint = "pass --overwrite or choose another" if overwrite is False else "choose another"
    raise FileExistsError(f"{flag} {path} already holds results; {hint} directory")


def make_out_dir(path: str, *, marker: str | None = None, flag: str = "--out-dir",
                 overwrite: bool | None = None) -> str:
  """:func:`check_out_dir`, then creates ``path`` (and its parents); returns ``path``."""
  check_out_dir(path, marker=marker, flag=flag, overwrite=overwrite)
  os.makedirs(path, exist_ok=True)
  return path


# ------------------------------------------------------------------------ statistics


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """``(mean, sample std)`` of ``values``: the std with ``ddof=1``, 0.0 for one value.

  Raises:
    ValueError: for no values.
  """
  vals = [float(v) for v in values]
  if not vals:
    raise ValueError("values: mean_std needs at least one value")
  return statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0


def format_mean_std(values: Iterable[float], *, scale: float = 100.0, sep: str = "±",
                    digits: int = 2) -> str:
  """``"<mean> <sep> <std>"`` of ``values`` times ``scale`` (100: fractions as %)."""
  mean, std = mean_std(values)
  return f"{scale * mean:.{digits}f} {sep} {scale * std:.{digits}f}"


# ---------------------------------------------------------------------------- tables

_ALIGN = {"l": "---", "r": "---:"}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]],
                   align: str | None = None) -> str:
  """A markdown table: ``| a | b |`` lines under a ``|---|---:|`` rule.

  ``align`` has one letter per column, ``l`` (left, the default) or ``r`` (right);
  cells are written with ``str``.

  Raises:
    ValueError: when ``align`` or a row does not have one entry per column.
  """
  align = "l" * len(header) if align is None else align
  if len(align) != len(header) or set(align) - set(_ALIGN):
    raise ValueError(f"align must be {len(header)} letters from 'l', 'r', got {align!r}")
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_ALIGN[a] for a in align) + "|"]
  for row in rows:
    row = list(row)
    if len(row) != len(header):
      raise ValueError(f"rows: {row} has {len(row)} cells, the header {len(header)}")
    lines.append("| " + " | ".join(str(c) for c in row) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ files


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              fields: Sequence[str] | None = None) -> None:
  """Writes ``rows`` to ``path`` with a header: ``fields``, default the first row's keys
  (``None`` values as empty cells)."""
  if fields is None:
    if not rows:
      raise ValueError("rows: write_csv needs fields or at least one row")
    fields = list(rows[0])
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fields))
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r[k] for k in fields} for r in rows)


def write_json(path: str, obj: Any, *, indent: int = 2) -> None:
  """Writes ``obj`` to ``path`` as indented JSON."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=indent)


def write_results(out_dir: str, result: Any, table: str, rows: Sequence[Mapping[str, Any]], *,
                  csv_name: str = "runs.csv") -> None:
  """An experiment's usual outputs in ``out_dir``: ``rows`` as ``csv_name``, ``result`` as
  ``results.json`` and the markdown ``table`` as ``table.md`` (also printed)."""
  write_csv(os.path.join(out_dir, csv_name), rows)
  write_json(os.path.join(out_dir, "results.json"), result)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(table)
  print(table)


# ----------------------------------------------------------------------------- timing


def median_seconds(fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 2,
                   shuffle: bool = False) -> dict[str, float]:
  """Median wall seconds of each ``fn()``, each call ended by ``jax.block_until_ready``.

  Every fn runs ``warmup`` times first (compilation). The fns then take turns within
  each of the ``repeats``, so that drift in a shared machine's load hits all alike;
  ``shuffle=True`` also shuffles their order at every repeat (fixed seed), so that no
  fn always runs right after the same one.
  """
  import jax  # the scripts that only write tables need no jax

  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  order, rng = list(fns), random.Random(0)
  for _ in range(repeats):
    if shuffle:
      rng.shuffle(order)
    for name in order:
      t0 = time.perf_counter()
      jax.block_until_ready(fns[name]())
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}
