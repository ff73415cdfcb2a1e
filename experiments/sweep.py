"""Sweep a config over methods, sparsities and seeds, with baselines, a table and plots.

  python -m experiments.sweep digits_set --methods set,rigl --sparsities 0.8,0.9,0.95 --seeds 0,1,2
  python -m experiments.sweep digits_set --methods set epochs=5 --out /tmp/sweep  # key=value overrides

Every combination is one :func:`experiments.run.run` (``key=value`` overrides
as there) into ``<out>/<method>__sparsity=<s>__seed=<seed>/``; ``--out``
defaults to ``results/sweeps/<config>[__<overrides>]``. The baselines are always
added: ``dense`` once per seed (at sparsity 0), and at every sparsity
``random`` (a random mask drawn at step 0: random pruning, the baseline for any
criterion) and ``magnitude`` (one-shot global magnitude pruning halfway through
training, then fine-tuning). Overrides apply to every run, baselines included
(so ``method_kwargs`` must suit every method; this is checked before anything
trains); ``method``, ``sparsity`` and ``seed`` are set by the sweep.

A run whose folder holds a ``report.json`` is finished and is skipped (its
config must match, else the sweep stops), so an interrupted sweep continues
where it stopped when started again. A run folder without a report (a run that
was killed) is never overwritten silently: pass ``--resume`` to continue such
runs from their last checkpoint or ``--overwrite`` to start them again.

At the end ``<out>`` gets ``table.md`` and ``table.csv`` (one row per method
and sparsity: test accuracy mean +- std over seeds, the sample std with
``ddof=1``, 0 for one seed; and the means of the measured sparsity, sparse
forward FLOPs, theoretical speedup, best-format storage bytes and seconds per
epoch; and, where the sweep has a dense run, the pruned-parameter efficiency
``(mean accuracy - mean dense accuracy) / sparsity``: see
:func:`jaxsparse.analysis.efficiency.pruned_parameter_efficiency`) and
``accuracy_vs_sparsity.png`` and ``accuracy_vs_flops.png`` (error
bars: std; dense as a line with a +-std band, resp. a point; baselines dashed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import optax

from experiments import configs, run
from experiments import checkpoint, common, training
from jaxsparse.analysis import efficiency

BASELINES = ("random", "magnitude")
"""Pruning baselines run at every sparsity of a sweep (``dense`` runs once per seed)."""

CSV_FIELDS = ("method", "baseline", "sparsity", "n_seeds", "seeds", "test_accuracy_mean",
              "test_accuracy_std", "measured_sparsity", "dense_flops", "sparse_flops",
              "flops_speedup", "best_bytes", "seconds_per_epoch", "pruned_parameter_efficiency")
_MEANS = {"measured_sparsity": "sparsity_sparse_layers", "dense_flops": "dense_flops",
          "sparse_flops": "sparse_flops", "flops_speedup": "flops_speedup",
          "best_bytes": "best_bytes", "seconds_per_epoch": "seconds_per_epoch"}
_SET_BY_SWEEP = {"method": "--methods", "sparsity": "--sparsities", "seed": "--seeds"}


def plan(methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int]
         ) -> list[tuple[str, float, int]]:
  """The ``(method, sparsity, seed)`` runs of a sweep, baselines included, seed by seed.

  ``dense`` runs once per seed at sparsity 0; every other method (``methods``
  then :data:`BASELINES`, each once) at every sparsity.
  """
  if not sparsities or not seeds:
    raise ValueError("a sweep needs at least one sparsity and one seed")
  sparse = [m for m in _method_order([*methods, *BASELINES]) if m != "dense"]
  runs = []
  for seed in dict.fromkeys(seeds):
    runs.append(("dense", 0.0, seed))
    runs += [(m, float(s), seed) for m in sparse for s in dict.fromkeys(sparsities)]
  return runs


def run_name(method: str, sparsity: float, seed: int) -> str:
  return f"{method}__sparsity={sparsity:g}__seed={seed}"


def default_out(name: str, overrides: Sequence[str]) -> str:
  """``results/sweeps/<name>`` plus the sanitized overrides, as :func:`experiments.run.default_out`."""
  return os.path.join("results", "sweeps", os.path.basename(run.default_out(name, list(overrides))))


def _check_method(config: configs.Config) -> None:
  """Builds the method's transformation (cheap, no training) to catch bad ``method_kwargs`` early."""
  try:
    training.make_method(config.method, optax.identity(), config.sparsity, total_steps=100,
                         steps_per_epoch=10, seed=config.seed, **config.method_kwargs)
  except TypeError as err:
    raise TypeError(f"method {config.method!r} does not take method_kwargs "
                    f"{dict(config.method_kwargs)} ({err}); in a sweep the overrides apply to "
                    "every method, baselines included") from err
  except Exception:  # noqa: BLE001 - checks of step counts need the real ones: left to the run
    pass


def sweep(name: str, methods: Sequence[str], sparsities: Sequence[float], seeds: Sequence[int],
          overrides: Sequence[str] = (), *, out: str | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = False) -> list[dict[str, Any]]:
  """Runs (or skips, when finished) every run of :func:`plan`, writes the table and plots.

  Returns the reports of all runs. See the module doc for the folders, the
  skipping and ``resume``/``overwrite`` (which apply to unfinished runs only).

  Raises:
    ValueError: for an override of ``method``/``sparsity``/``seed``, or a
      finished run in ``out`` whose config differs from the one asked for.
    FileExistsError: for an unfinished run folder without ``resume``/``overwrite``.
  """
  overrides = list(overrides)
  for item in overrides:
    key = item.partition("=")[0].strip()
    if key in _SET_BY_SWEEP:
      raise ValueError(f"override {item!r}: the sweep sets {key}; use {_SET_BY_SWEEP[key]}")
  if resume and overwrite:
    raise ValueError("pass at most one of --resume and --overwrite")
  out = out or default_out(name, overrides)
  runs = plan(methods, sparsities, seeds)
  todo = []
  for method, sparsity, seed in runs:  # every config checked before anything trains
    run_overrides = [*overrides, f"method={method}", f"sparsity={sparsity}", f"seed={seed}"]
    config = configs.apply_overrides(configs.get_config(name), run_overrides)
    _check_method(config)
    todo.append((run_name(method, sparsity, seed), run_overrides, config))
  os.makedirs(out, exist_ok=True)

  reports = []
  for i, (rname, run_overrides, config) in enumerate(todo, 1):
    folder = os.path.join(out, rname)
    report_path = os.path.join(folder, "report.json")
    if os.path.exists(report_path):
      with open(report_path) as f:
        report = json.load(f)
      changed = checkpoint.config_changes(report["config"], config.to_dict())
      if changed:
        raise ValueError(f"{folder} holds a finished run of another config ({changed}); use "
                         "another --out or delete that folder")
      print(f"[{i}/{len(todo)}] {rname}: finished, skipped")
      reports.append(report)
      continue
    started = os.path.isdir(folder) and bool(os.listdir(folder))
    print(f"[{i}/{len(todo)}] {rname}" + (" (unfinished: resuming)" if started and resume else ""))
    reports.append(run.run(name, run_overrides, out=folder, resume=resume and started,
                           overwrite=overwrite and started, progress=progress))
  title = f"{name} {' '.join(overrides)}".strip()
  table = write_outputs(reports, out, title=title)
  print(table)
  print(f"sweep results in {out}")
  return reports


def _group(reports: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for r in reports:
    c = r["config"]
    groups.setdefault((c["method"], float(c["sparsity"])), []).append(r)
  return groups


def _method_order(methods: Sequence[str]) -> list[str]:
  """dense, then the methods in order of appearance, then the baselines."""
  seen = list(dict.fromkeys(methods))
  return ([m for m in seen if m == "dense"] + [m for m in seen if m != "dense" and m not in BASELINES]
          + [m for m in BASELINES if m in seen])


def aggregate(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (method, sparsity) of ``reports`` (the dicts of ``report.json``).

  Each row has :data:`CSV_FIELDS`: ``seeds`` (sorted list), ``n_seeds``,
  ``test_accuracy_mean`` and ``test_accuracy_std`` (sample std, ``ddof=1``;
  0.0 for a single seed) and the means over seeds of the measured sparsity of
  the sparse layers, dense and sparse FLOPs, theoretical speedup, best-format
  storage bytes and seconds per epoch. ``baseline`` is true for ``dense`` and
  :data:`BASELINES`. Rows: ``dense`` first, then the methods in order of first
  appearance, then the baselines; by sparsity within a method.

  ``pruned_parameter_efficiency`` is
  :func:`~jaxsparse.analysis.efficiency.pruned_parameter_efficiency` of the row's mean
  accuracy, the ``dense`` row's mean accuracy and the row's (target) sparsity; ``None``
  for the dense row itself, at sparsity 0, and without a dense run.
  """
  groups = _group(reports)
  rows = []
  for method in _method_order([m for m, _ in groups]):
    for sparsity in sorted(s for m, s in groups if m == method):
      rs = groups[(method, sparsity)]
      mean, std = common.mean_std(r["test_accuracy"] for r in rs)
      row = dict(method=method, baseline=method == "dense" or method in BASELINES,
                 sparsity=sparsity, n_seeds=len(rs),
                 seeds=sorted(r["config"]["seed"] for r in rs),
                 test_accuracy_mean=mean, test_accuracy_std=std)
      for field, key in _MEANS.items():
        row[field] = float(np.mean([float(r[key]) for r in rs]))
      rows.append(row)
  dense = next((r for r in rows if r["method"] == "dense"), None)
  for row in rows:
    row["pruned_parameter_efficiency"] = (
        efficiency.pruned_parameter_efficiency(row["test_accuracy_mean"],
                                               dense["test_accuracy_mean"], row["sparsity"])
        if dense is not None and row["sparsity"] > 0 else None)
  return [{k: row[k] for k in CSV_FIELDS} for row in rows]


def table_markdown(rows: Sequence[dict[str, Any]], title: str = "") -> str:
  """The rows of :func:`aggregate` as a markdown table (accuracy in %)."""
  lines = [f"# Sweep: {title}", ""] if title else []
  lines += ["Test accuracy: mean ± std (ddof=1) over seeds; the other columns: means over seeds. "
            "Baselines in italics. PPE, pruned-parameter efficiency: (accuracy - dense "
            "accuracy) / sparsity, in points (jaxsparse's definition, after Hoefler et al. "
            "2021).", ""]
  cells = [[f"*{r['method']}*" if r["baseline"] else r["method"], f"{r['sparsity']:g}",
            r["n_seeds"],
            f"{100 * r['test_accuracy_mean']:.2f} ± {100 * r['test_accuracy_std']:.2f}",
            f"{r['measured_sparsity']:.2%}", f"{r['sparse_flops']:,.0f}",
            f"{r['flops_speedup']:.2f}x", f"{r['best_bytes']:,.0f}",
            f"{r['seconds_per_epoch']:.3f}", _format_ppe(r["pruned_parameter_efficiency"])]
           for r in rows]
  lines.append(common.markdown_table(
      ["method", "sparsity", "seeds", "test accuracy (%)", "measured sparsity", "sparse FLOPs",
       "speedup", "storage (bytes)", "s/epoch", "PPE"], cells, align="lrrrrrrrrr"))
  return "\n".join(lines)


def _format_ppe(value: float | None) -> str:
  return "–" if value is None else f"{100 * value:+.2f}"


def write_table(reports: Sequence[dict[str, Any]], out: str, title: str = "") -> str:
  """Writes ``<out>/table.md`` and ``<out>/table.csv`` from ``reports``; returns the markdown."""
  rows = aggregate(reports)
  md = table_markdown(rows, title)
  with open(os.path.join(out, "table.md"), "w") as f:
    f.write(md + "\n")
  common.write_csv(os.path.join(out, "table.csv"),
                   [{**r, "seeds": " ".join(map(str, r["seeds"]))} for r in rows], CSV_FIELDS)
  return md


def plot(reports: Sequence[dict[str, Any]], out: str | None = None, title: str = ""
         ) -> dict[str, Any]:
  """Accuracy against sparsity and against sparse FLOPs, as matplotlib figures.

  Returns ``{"accuracy_vs_sparsity": fig, "accuracy_vs_flops": fig}``, each also
  saved as ``<out>/<name>.png`` when ``out`` is given. Error bars are the std
  over seeds; ``dense`` is a horizontal line with a +-std band (sparsity plot)
  and a point with an error bar (FLOPs plot); :data:`BASELINES` are dashed.
  """
  from matplotlib.figure import Figure  # no pyplot: no global state, renders with Agg

  rows = aggregate(reports)
  if not title and reports:
    c = reports[0]["config"]
    title = f"{c['model']} on {c['dataset']}"
  methods = _method_order([r["method"] for r in rows])
  figs = {}
  for name, x_field, xlabel in (("accuracy_vs_sparsity", "sparsity", "sparsity"),
                                ("accuracy_vs_flops", "sparse_flops",
                                 "forward FLOPs per example (sparse)")):
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for method in methods:
      mrows = [r for r in rows if r["method"] == method]
      y = np.array([100 * r["test_accuracy_mean"] for r in mrows])
      err = np.array([100 * r["test_accuracy_std"] for r in mrows])
      if method == "dense" and x_field == "sparsity":
        for r, yi, ei in zip(mrows, y, err):
          ax.axhline(yi, color="black", lw=1.2, label="dense")
          ax.axhspan(yi - ei, yi + ei, color="black", alpha=0.12, lw=0)
        continue
      x = [r[x_field] for r in mrows]
      if method == "dense":
        ax.errorbar(x, y, yerr=err, color="black", marker="*", ms=12, ls="none", capsize=3,
                    label="dense")
        continue
      ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=3,
                  ls="--" if method in BASELINES else "-",
                  label=f"{method} (baseline)" if method in BASELINES else method)
    if x_field == "sparse_flops":
      ax.set_xscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    if out is not None:
      fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
    figs[name] = fig
  return figs


def write_outputs(reports: Sequence[dict[str, Any]], out: str, title: str = "") -> str:
  """:func:`write_table` and :func:`plot` into ``out`` (plots skipped, with a note, without matplotlib)."""
  md = write_table(reports, out, title)
  if importlib.util.find_spec("matplotlib") is None:
    print("plots skipped: matplotlib is not installed (pip install matplotlib, or the "
          "[experiments] extra)", file=sys.stderr)
  else:
    plot(reports, out)
  return md


def _parse_list(text: str, kind: type, flag: str) -> list:
  try:
    return [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ValueError(f"{flag} takes a comma-separated list of {kind.__name__}s, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("config", help="a name from experiments.configs.CONFIGS")
  p.add_argument("overrides", nargs="*", help="key=value overrides for every run")
  p.add_argument("--methods", default=None,
                 help="comma-separated methods (default: the config's); baselines are added")
  p.add_argument("--sparsities", default=None, help="comma-separated (default: the config's)")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
  p.add_argument("--out", default=None, help="sweep folder (default results/sweeps/<config>...)")
  p.add_argument("--resume", action="store_true", help="continue unfinished runs")
  p.add_argument("--overwrite", action="store_true", help="restart unfinished runs")
  p.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
  return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    base = configs.get_config(args.config)
    methods = args.methods.split(",") if args.methods else [base.method]
    sparsities = (_parse_list(args.sparsities, float, "--sparsities") if args.sparsities
                  else [base.sparsity])
    seeds = _parse_list(args.seeds, int, "--seeds")
    sweep(args.config, [m.strip() for m in methods if m.strip()], sparsities, seeds,
          args.overrides, out=args.out, resume=args.resume, overwrite=args.overwrite,
          progress=not args.no_progress)
  except run.USER_ERRORS as err:
    return run.print_error(err)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
