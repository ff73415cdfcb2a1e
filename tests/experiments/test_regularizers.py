"""experiments.regularizers on digits (through training.iterate_epochs), and its British alias."""
import csv

import pytest

from experiments import regularisers, regularizers


def test_l1_prox_trains_writes_table_and_csv_and_refuses_existing_results(tmp_path):
  out = tmp_path / "reg"
  args = ["--dataset", "digits", "--methods", "l1_prox", "--epochs", "2", "--finetune-epochs", "0",
          "--batch-size", "16", "--no-magnitude", "--out-dir", str(out)]
  (run,) = regularizers.main(args)
  assert run["method"] == "l1_prox" and run["accuracy"] > 0.5, run
  assert 0.0 < run["sparsity"] < 1.0                      # proximal L1 makes exact zeros
  with open(out / "runs.csv", newline="") as f:
    assert [r["method"] for r in csv.DictReader(f)] == ["l1_prox"]
  table = (out / "table.md").read_text()
  assert "| method | kernel sparsity % |" in table and "| l1_prox | " in table
  with pytest.raises(FileExistsError, match="--out-dir"):
    regularizers.main(args)


def test_british_alias_warns_and_runs_the_new_module(tmp_path):
  with pytest.warns(DeprecationWarning, match="experiments.regularizers"):
    with pytest.raises(ValueError, match="--epochs must be > 0"):
      regularisers.main(["--epochs", "0", "--out-dir", str(tmp_path / "x")])
