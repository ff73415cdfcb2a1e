"""experiments.targeted_dropout --small: trains, prunes to 90% both ways, fine-tunes with the
mask kept, and writes its table."""
import json
import os

import pytest

from experiments import targeted_dropout as td

SMALL = ["--small", "--dataset", "digits", "--variants", "targeted"]


@pytest.mark.e2e
def test_small_run_prunes_to_the_sparsity_and_keeps_the_mask(tmp_path):
  out = str(tmp_path / "td")
  res = td.main(["--out-dir", out, *SMALL])
  assert [(r["variant"], r["seed"]) for r in res["runs"]] == [("targeted", 0)]
  for r in res["runs"]:
    # LeNet-300-100 on 8x8 digits: kernels 64x300, 300x100, 100x10 (biases stay dense).
    kernels = 64 * 300 + 300 * 100 + 100 * 10
    assert r["magnitude_sparsity"] == pytest.approx(round(0.9 * 64 * 300) / kernels
                                                    + round(0.9 * 300 * 100) / kernels
                                                    + round(0.9 * 100 * 10) / kernels, abs=1e-4)
    # Per column: floor(0.9 * fan_in) of each column: 57 of 64, 270 of 300, 90 of 100.
    assert r["per_column_sparsity"] == pytest.approx(
        (57 * 300 + 270 * 100 + 90 * 10) / kernels, abs=1e-4)
    assert r["magnitude_finetuned_sparsity"] == r["magnitude_sparsity"]
    assert r["per_column_finetuned_sparsity"] == r["per_column_sparsity"]
    assert 0.0 <= r["magnitude_pruned"] <= 1.0 and r["dense"] > 0.2   # chance: 0.1
  table = open(os.path.join(out, "table.md")).read()
  for text in ("targeted dropout (weight, gamma 0.9, alpha 0.5)", "90% magnitude, no fine-tune",
               "per column + 1 ep. fine-tune", "seeds 0"):
    assert text in table
  assert json.load(open(os.path.join(out, "results.json")))["runs"] == res["runs"]
  with pytest.raises(FileExistsError, match="--out-dir"):
    td.main(["--out-dir", out, *SMALL])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"--gamma must be in \[0, 1\], got 1.5"):
    td.main(["--out-dir", "unused", "--gamma", "1.5"])
  with pytest.raises(ValueError, match=r"--sparsity must be in \(0, 1\), got 1.0"):
    td.main(["--out-dir", "unused", "--sparsity", "1.0"])
