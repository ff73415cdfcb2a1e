"""experiments.neuron_pruning --small: every criterion runs, counts add up, bad flags are named."""
import json
import os

import pytest

from experiments import neuron_pruning as npr


def test_small_run_writes_the_table(tmp_path):
  # scikit-learn's digits (8x8 inputs) keeps the run short; the full run uses Fashion-MNIST.
  out = str(tmp_path / "np")
  res = npr.main(["--small", "--dataset", "digits", "--sparsities", "0.5", "--out-dir", out])
  rows = res["rows"]
  assert [r["criterion"] for r in rows] == ["dense", *npr.CRITERIA]
  dense = rows[0]
  assert dense["params"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
  assert dense["flops"] == 2 * (64 * 300 + 300 * 100 + 100 * 10)
  for r in rows[1:]:
    # Half of fc1 (150) and of fc2 (50) neurons with their biases and the next layer's rows:
    # fc1 64*150 + 150, fc2 150*50 + 50, fc3 50*10 + 10.
    assert r["params"] == 64 * 150 + 150 + 150 * 50 + 50 + 50 * 10 + 10
    assert r["flops"] == 2 * (64 * 150 + 150 * 50 + 50 * 10)
    assert 0.0 <= r["acc_oneshot"] <= 1.0 and 0.0 <= r["acc_finetuned"] <= 1.0
  table = open(os.path.join(out, "table.md")).read()
  for c in npr.CRITERIA:
    assert f"| {c} | 0.50 |" in table
  assert json.load(open(os.path.join(out, "results.json")))["rows"] == rows
  with pytest.raises(FileExistsError, match="--out-dir"):
    npr.main(["--small", "--dataset", "digits", "--out-dir", out])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="--criteria: unknown"):
    npr.main(["--out-dir", "unused", "--criteria", "apoz,magic"])
  with pytest.raises(ValueError, match="--sparsities must be in"):
    npr.main(["--out-dir", "unused", "--sparsities", "0.5,1.0"])
