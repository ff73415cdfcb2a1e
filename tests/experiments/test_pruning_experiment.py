"""experiments.pruning --merge: runs of one protocol made separately combine into one table."""
import csv
import json
import os

import pytest

from experiments import pruning

FIELDS = ("model", "method", "target_sparsity", "seed", "accuracy", "oneshot_accuracy", "sparsity",
          "seconds")


def _run_dir(path, seeds, accuracies, **flags):
  """A run directory as a pruning run writes it: args.json and runs.csv (dense + magnitude 0.9)."""
  os.makedirs(path)
  argv = ["--out-dir", "x", "--models", "lenet300", "--methods", "magnitude", "--sparsities", "0.9",
          "--seeds", *map(str, seeds)] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
  args = {k: v for k, v in vars(pruning.build_parser().parse_args(argv)).items()
          if k not in ("out_dir", "merge")}
  with open(os.path.join(path, "args.json"), "w") as f:
    json.dump(args, f)
  with open(os.path.join(path, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(FIELDS)
    for seed, (dense, pruned) in zip(seeds, accuracies):
      w.writerow(["lenet300", "dense", 0.0, seed, dense, "nan", 0.0, 1.0])
      w.writerow(["lenet300", "magnitude", 0.9, seed, pruned, 0.5, 0.9, 1.0])


def test_merge_combines_seeds_and_refuses_mixed_protocols_and_duplicates(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  _run_dir(a, [0, 1], [(0.88, 0.86), (0.89, 0.87)])
  _run_dir(b, [2], [(0.90, 0.88)])
  out = str(tmp_path / "merged")
  rows = pruning.main(["--merge", a, b, "--out-dir", out])
  assert sorted({r["seed"] for r in rows}) == [0, 1, 2] and len(rows) == 6
  table = open(os.path.join(out, "table.md")).read()
  assert "seeds [0, 1, 2]" in table
  assert "## lenet300 (dense: 89.00 ± 1.00)" in table  # mean and sample std of 88, 89, 90
  assert "| magnitude | 87.00 ± 1.00 |" in table
  assert os.path.exists(os.path.join(out, "accuracy_vs_sparsity.png"))
  with open(os.path.join(out, "runs.csv")) as f:
    assert len(f.readlines()) == 7

  with pytest.raises(SystemExit, match="both hold model lenet300 method dense sparsity 0.0 seed 2"):
    pruning.main(["--merge", a, b, b, "--out-dir", str(tmp_path / "dup")])
  other = str(tmp_path / "other")
  _run_dir(other, [3], [(0.9, 0.9)], epochs=4)
  with pytest.raises(SystemExit, match=r"differ in epochs \(4 vs 8\)"):
    pruning.main(["--merge", a, other, "--out-dir", str(tmp_path / "mixed")])
  os.remove(os.path.join(other, "args.json"))
  with pytest.raises(SystemExit, match="args.json not found"):
    pruning.main(["--merge", a, other, "--out-dir", str(tmp_path / "missing")])
  assert not any(os.path.exists(tmp_path / d) for d in ("dup", "mixed", "missing"))


@pytest.mark.e2e
def test_every_criterion_runs_on_digits_and_reaches_its_sparsity(tmp_path):
  """Each criterion family of the CLI (during training, at init, after training) on real data:
  one row per method at the target sparsity, fine-tuned above chance."""
  methods = ["random", "magnitude", "snip", "synflow", "obd", "obs"]
  rows = pruning.main(["--out-dir", str(tmp_path / "p"), "--dataset", "digits", "--models",
                       "lenet300", "--methods", *methods, "--sparsities", "0.9", "--epochs", "2",
                       "--finetune-epochs", "1", "--batch-size", "32", "--curvature-batch", "32",
                       "--obs-block", "16", "--synflow-iterations", "5", "--score-batch", "32"])
  got = {r["method"]: r for r in rows}
  assert set(got) == {"dense", *methods}
  for m in methods:
    assert abs(got[m]["sparsity"] - 0.9) < 0.01, got[m]
    # chance is 0.1; a random 90% mask from step 0 learns the slowest in 2 epochs
    assert got[m]["accuracy"] > (0.2 if m == "random" else 0.5), got[m]
  for m in ("magnitude", "obd", "obs"):                  # one-shot after training, then tuned
    assert got[m]["oneshot_accuracy"] == got[m]["oneshot_accuracy"]  # not NaN
