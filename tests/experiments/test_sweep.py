"""Sweeps (baselines, skip on re-run, table and plots) and the runner's TensorBoard logging."""

import csv
import json
import os
import struct
import sys

import numpy as np
import pytest

from experiments import run, sweep

# Small and quick: one epoch of a 64-32-10 MLP on the bundled digits.
TINY = ["epochs=1", "model=mlp", 'model_kwargs={"features": [32]}']


def read_events(logdir):
  """``{tag: [(step, value), ...]}`` and the purge steps of every event file in ``logdir``.

  A minimal reader of TFRecord-framed ``Event`` protos (tensorboardX writes
  them; it has no reader and tensorboard is not a dependency): uint64 length,
  masked CRC32C of the length, the payload, masked CRC32C of the payload.
  """
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  scalars, purges = {}, []
  files = sorted(n for n in os.listdir(logdir) if n.startswith("events.out.tfevents."))
  for name in files:
    with open(os.path.join(logdir, name), "rb") as f:
      buf = f.read()
    pos = 0
    while pos < len(buf):
      header = buf[pos:pos + 8]
      (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", buf[pos + 8:pos + 12])
      payload = buf[pos + 12:pos + 12 + length]
      (payload_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
      assert header_crc == masked_crc32c(header) and payload_crc == masked_crc32c(payload), name
      pos += 16 + length
      event = event_pb2.Event.FromString(payload)
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        purges.append(event.step)
      for v in event.summary.value:
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return files, scalars, purges


def _report(method, sparsity, seed, acc, flops, speedup, nbytes, secs):
  return dict(config=dict(method=method, sparsity=sparsity, seed=seed, dataset="digits",
                          model="lenet300"),
              test_accuracy=acc, sparsity_sparse_layers=sparsity + 0.001 * seed, dense_flops=1000,
              sparse_flops=flops, flops_speedup=speedup, best_bytes=nbytes,
              seconds_per_epoch=secs)


def test_plan_always_adds_the_baselines_and_rejects_overrides_it_sets():
  assert sweep.plan(["set", "dense", "set"], [0.8, 0.9], [0, 1]) == [
      ("dense", 0.0, 0), ("set", 0.8, 0), ("set", 0.9, 0), ("random", 0.8, 0),
      ("random", 0.9, 0), ("magnitude", 0.8, 0), ("magnitude", 0.9, 0),
      ("dense", 0.0, 1), ("set", 0.8, 1), ("set", 0.9, 1), ("random", 0.8, 1),
      ("random", 0.9, 1), ("magnitude", 0.8, 1), ("magnitude", 0.9, 1)]
  assert sweep.plan(["magnitude"], [0.5], [3]) == [("dense", 0.0, 3), ("random", 0.5, 3),
                                                   ("magnitude", 0.5, 3)]
  with pytest.raises(ValueError, match="the sweep sets sparsity; use --sparsities"):
    sweep.sweep("digits_set", ["set"], [0.9], [0], ["sparsity=0.5"], out="/nonexistent")
  # method_kwargs go to every method: a kwarg only SET takes is refused before anything trains.
  with pytest.raises(TypeError, match="'random' does not take method_kwargs"):
    sweep.sweep("digits_set", ["set"], [0.9], [0], ["method_kwargs.drop_fraction=0.5"],
                out="/nonexistent")
  assert not os.path.exists("/nonexistent")


def test_aggregation_gives_mean_and_std_over_seeds_and_keeps_the_baselines(tmp_path):
  rng = np.random.default_rng(0)
  acc = {key: rng.uniform(0.5, 1.0, 3) for key in
         [("dense", 0.0), ("rigl", 0.8), ("rigl", 0.9), ("random", 0.8), ("random", 0.9),
          ("magnitude", 0.8), ("magnitude", 0.9)]}
  reports = []
  for seed in (2, 0, 1):  # out of order on purpose
    for (method, s), a in acc.items():
      flops = 1000 * (1 - s) + seed  # varies per seed: the means are checked
      reports.append(_report(method, s, seed, float(a[seed]), flops, 1000 / flops,
                             5000 * (1 - s) + 10 * seed, 0.1 + 0.01 * seed))
  rows = sweep.aggregate(reports)
  assert [(r["method"], r["sparsity"]) for r in rows] == [
      ("dense", 0.0), ("rigl", 0.8), ("rigl", 0.9), ("random", 0.8), ("random", 0.9),
      ("magnitude", 0.8), ("magnitude", 0.9)]
  for r in rows:
    a = acc[(r["method"], r["sparsity"])]
    assert r["test_accuracy_mean"] == pytest.approx(np.mean(a), rel=1e-12)
    assert r["test_accuracy_std"] == pytest.approx(np.std(a, ddof=1), rel=1e-12)
    assert r["seeds"] == [0, 1, 2] and r["n_seeds"] == 3
    assert r["baseline"] == (r["method"] != "rigl")
    s = r["sparsity"]
    assert r["sparse_flops"] == pytest.approx(1000 * (1 - s) + 1)
    assert r["flops_speedup"] == pytest.approx(np.mean([1000 / (1000 * (1 - s) + k) for k in range(3)]))
    assert r["best_bytes"] == pytest.approx(5000 * (1 - s) + 10)
    assert r["seconds_per_epoch"] == pytest.approx(0.11)
    assert r["measured_sparsity"] == pytest.approx(s + 0.001)
  one = sweep.aggregate(reports[:1])
  assert one[0]["n_seeds"] == 1 and one[0]["test_accuracy_std"] == 0.0

  md = sweep.write_table(reports, str(tmp_path), title="hand-made")
  rigl = rows[1]
  assert (f"| rigl | 0.8 | 3 | {100 * rigl['test_accuracy_mean']:.2f} ± "
          f"{100 * rigl['test_accuracy_std']:.2f} |") in md
  assert "| *dense* | 0 | 3 |" in md and "| *random* | 0.9 |" in md and "| *magnitude* | 0.8 |" in md
  assert (tmp_path / "table.md").read_text() == md + "\n"
  with open(tmp_path / "table.csv", newline="") as f:
    back = list(csv.DictReader(f))
  assert [(b["method"], float(b["sparsity"])) for b in back] == [(r["method"], r["sparsity"]) for r in rows]
  for b, r in zip(back, rows):
    assert float(b["test_accuracy_std"]) == pytest.approx(r["test_accuracy_std"], rel=1e-12)
    assert b["seeds"] == "0 1 2"

  figs = sweep.plot(reports, str(tmp_path))
  for name in ("accuracy_vs_sparsity", "accuracy_vs_flops"):
    assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figs[name].axes[0]
    handles = dict(zip(*reversed(ax.get_legend_handles_labels())))
    assert set(handles) == {"dense", "rigl", "random (baseline)", "magnitude (baseline)"}
    for label, style in (("rigl", "-"), ("random (baseline)", "--"), ("magnitude (baseline)", "--")):
      line = handles[label].lines[0]
      assert line.get_linestyle() == style, label
      method = label.split()[0]
      np.testing.assert_allclose(line.get_ydata(), [100 * r["test_accuracy_mean"] for r in rows
                                                    if r["method"] == method])
  dense = rows[0]
  hline = [l for l in figs["accuracy_vs_sparsity"].axes[0].get_lines() if l.get_label() == "dense"]
  np.testing.assert_allclose(hline[0].get_ydata(), 100 * dense["test_accuracy_mean"])
  point = handles["dense"].lines[0]  # accuracy_vs_flops: dense is a point at its FLOPs
  np.testing.assert_allclose(np.asarray(point.get_xdata(), float), [dense["sparse_flops"]])



def test_pruned_parameter_efficiency_column_against_a_hand_computation(tmp_path):
  reports = [_report(m, s, seed, acc, 100, 1.0, 100, 0.1) for m, s, seed, acc in [
      ("dense", 0.0, 0, 0.90), ("dense", 0.0, 1, 0.92), ("rigl", 0.5, 0, 0.86),
      ("rigl", 0.5, 1, 0.88), ("random", 0.8, 0, 0.70), ("random", 0.8, 1, 0.74)]]
  rows = {(r["method"], r["sparsity"]): r for r in sweep.aggregate(reports)}
  assert rows[("dense", 0.0)]["pruned_parameter_efficiency"] is None
  assert rows[("rigl", 0.5)]["pruned_parameter_efficiency"] == pytest.approx((0.87 - 0.91) / 0.5)
  assert rows[("random", 0.8)]["pruned_parameter_efficiency"] == pytest.approx((0.72 - 0.91) / 0.8)
  md = sweep.write_table(reports, str(tmp_path))
  assert md.splitlines()[2].endswith("| s/epoch | PPE |")
  assert "| -8.00 |" in md and "| -23.75 |" in md and md.splitlines()[4].endswith("| – |")
  with open(tmp_path / "table.csv", newline="") as f:
    back = {(b["method"], float(b["sparsity"])): b for b in csv.DictReader(f)}
  assert back[("dense", 0.0)]["pruned_parameter_efficiency"] == ""
  assert float(back[("rigl", 0.5)]["pruned_parameter_efficiency"]) == pytest.approx(-0.08)
  # Without a dense run there is no baseline: no efficiency.
  assert all(r["pruned_parameter_efficiency"] is None for r in sweep.aggregate(reports[2:]))


@pytest.mark.e2e
def test_tiny_sweep_writes_table_plots_and_tensorboard_and_skips_finished_runs(tmp_path, monkeypatch,
                                                                               capsys):
  out = str(tmp_path / "sweep")
  args = ["digits_set", "--methods", "static", "--sparsities", "0.9", "--seeds", "0,1", *TINY,
          "--out", out, "--no-progress"]
  assert sweep.main(args) == 0, capsys.readouterr().err[-3000:]
  capsys.readouterr()

  names = [sweep.run_name(m, s, seed) for seed in (0, 1)
           for m, s in (("dense", 0.0), ("static", 0.9), ("random", 0.9), ("magnitude", 0.9))]
  assert sorted(n for n in os.listdir(out) if "__" in n) == sorted(names)
  for f in ("table.md", "table.csv", "accuracy_vs_sparsity.png", "accuracy_vs_flops.png"):
    assert os.path.getsize(os.path.join(out, f)) > 0, f
  with open(os.path.join(out, "table.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [(r["method"], r["sparsity"], r["seeds"]) for r in rows] == [
      ("dense", "0.0", "0 1"), ("static", "0.9", "0 1"), ("random", "0.9", "0 1"),
      ("magnitude", "0.9", "0 1")]
  reports = {n: json.load(open(os.path.join(out, n, "report.json"))) for n in names}
  for r in rows:
    accs = [reports[sweep.run_name(r["method"], float(r["sparsity"]), s)]["test_accuracy"]
            for s in (0, 1)]
    assert float(r["test_accuracy_mean"]) == pytest.approx(np.mean(accs))
    assert float(r["test_accuracy_std"]) == pytest.approx(np.std(accs, ddof=1))

  # TensorBoard: the metrics.csv row of every run, as scalars at step = epoch.
  for n in names:
    files, scalars, purges = read_events(os.path.join(out, n, "tensorboard"))
    assert len(files) == 1 and purges == []
    with open(os.path.join(out, n, "metrics.csv"), newline="") as f:
      (row,) = list(csv.DictReader(f))
    expected = {k for k in row if k != "epoch"}
    assert {"loss", "test_accuracy", "sparsity", "seconds"} <= expected
    assert n.startswith("dense") or {"density/fc1/kernel", "density/fc2/kernel"} <= expected
    assert set(scalars) == expected
    for tag in expected:
      ((step, value),) = scalars[tag]
      assert step == 1 and value == pytest.approx(float(row[tag]), rel=1e-6), (n, tag)

  # Run again: every run is finished, nothing trains, the outputs are written again.
  mtimes = {n: os.stat(os.path.join(out, n, "report.json")).st_mtime_ns for n in names}
  os.remove(os.path.join(out, "table.md"))

  def no_training(*a, **k):
    raise AssertionError("a finished run was trained again")

  monkeypatch.setattr(run, "run", no_training)
  assert sweep.main(args) == 0
  assert capsys.readouterr().out.count("finished, skipped") == len(names)
  assert {n: os.stat(os.path.join(out, n, "report.json")).st_mtime_ns for n in names} == mtimes
  assert os.path.exists(os.path.join(out, "table.md"))
  # Another config into the same folder is refused; so is an unfinished run without --resume.
  assert sweep.main([*args, "learning_rate=0.1"]) == 2
  assert "holds a finished run of another config (learning_rate: 0.05 -> 0.1)" in capsys.readouterr().err
  monkeypatch.undo()
  os.remove(os.path.join(out, names[-1], "report.json"))
  assert sweep.main(args) == 2
  assert "already exists; pass --resume" in capsys.readouterr().err
  assert {n: os.stat(os.path.join(out, n, "report.json")).st_mtime_ns for n in names[:-1]} == {
      n: mtimes[n] for n in names[:-1]}


@pytest.mark.e2e
def test_sweep_compares_methods_over_seeds_and_refuses_unfinished_results(tmp_path, capsys):
  """What experiments.compare did (removed: the sweep covers it): methods x seeds at one
  sparsity, one table row per method, and results already in the folder are refused."""
  out = tmp_path / "cmp"
  args = ["digits_dense", "--methods", "dense,static", "--seeds", "0,1", "--sparsities", "0.5",
          "epochs=2", "--out", str(out), "--no-progress"]
  reports = sweep.sweep("digits_dense", ["dense", "static"], [0.5], [0, 1], ["epochs=2"],
                        out=str(out))
  runs = [(r["config"]["method"], r["config"]["seed"]) for r in reports]
  assert [r for r in runs if r[0] in ("dense", "static")] == [("dense", 0), ("static", 0),
                                                               ("dense", 1), ("static", 1)]
  table = (out / "table.md").read_text()
  assert "| *dense* | 0 | 2 |" in table and "| static | 0.5 | 2 |" in table
  assert len((out / "table.csv").read_text().strip().splitlines()) == 5
  os.remove(out / sweep.run_name("static", 0.5, 1) / "report.json")
  capsys.readouterr()
  assert sweep.main(args) == 2
  assert "already exists; pass --resume" in capsys.readouterr().err


def test_resumed_run_continues_the_tensorboard_curves(tmp_path):
  out = str(tmp_path / "run")
  run.run("digits_dense", TINY, out=out)
  run.run("digits_dense", [*TINY, "epochs=2"], out=out, resume=True)  # one more epoch
  files, scalars, purges = read_events(os.path.join(out, "tensorboard"))
  assert len(files) == 2 and purges == [2]  # anything after the checkpoint would be hidden
  assert set(scalars) == {"loss", "test_accuracy", "sparsity", "seconds"}
  with open(os.path.join(out, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["epoch"]) for r in rows] == [1, 2]
  for tag, points in scalars.items():
    assert [s for s, _ in points] == [1, 2]
    np.testing.assert_allclose([v for _, v in points], [float(r[tag]) for r in rows], rtol=1e-6)


def test_without_tensorboardx_a_run_says_so_and_writes_the_csv(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import tensorboardX -> ImportError
  out = tmp_path / "run"
  report = run.run("digits_static", TINY, out=str(out))
  err = capsys.readouterr().err
  assert run.TENSORBOARD_OFF in err and "pip install tensorboardX" in err
  assert err.count("TensorBoard logging is off") == 1
  assert not (out / "tensorboard").exists()
  with open(out / "metrics.csv", newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert float(row["test_accuracy"]) == report["test_accuracy"]
  assert float(row["density/fc1/kernel"]) == pytest.approx(1 - report["layers"]["fc1/kernel"]["sparsity"])
  assert (out / "report.json").exists()
