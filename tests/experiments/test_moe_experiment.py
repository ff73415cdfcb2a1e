"""experiments.moe --small: three models train, and the table's matching holds (params of the
same-params dense MLP, FLOPs of the same-FLOPs one; loads and drops add up)."""
import json
import os

import pytest

from experiments import moe as moe_exp

TINY = ["--small", "--dataset", "digits", "--experts", "4", "--k", "2", "--expert-hidden", "8",
        "--width", "16", "--batch-size", "50"]


@pytest.mark.e2e
def test_small_run_matches_params_and_flops(tmp_path):
  out = str(tmp_path / "moe")
  res = moe_exp.main(["--out-dir", out, *TINY])
  rows = {r["model"]: r for r in res["runs"]}
  assert set(rows) == set(moe_exp.MODELS)
  moe, same_p, same_f = rows["moe"], rows["dense_same_params"], rows["dense_same_flops"]
  # The hidden width is solved to the nearest unit: one unit is 64 + 1 + 16 params.
  assert abs(same_p["params"] - moe["params"]) <= (64 + 1 + 16) / 2
  # H is solved from the matmuls' FLOPs; biases, relus and the argmax add a few percent.
  assert same_f["flops_per_token"] == pytest.approx(moe["flops_per_token"], rel=0.1)
  assert same_p["flops_per_token"] > 1.3 * moe["flops_per_token"]  # E / (k * capacity) = 1.6
  test_pairs = sum(int(c) for c in moe["expert_counts"].split()) + round(
      moe["test_dropped_fraction"] * 700)                         # 350 test images, k = 2
  assert test_pairs == 700
  assert 0 <= moe["train_dropped_fraction"] < 1 and moe["load_cv"] >= 0
  assert all(0.1 < r["test_accuracy"] <= 1 for r in res["runs"])
  table = open(os.path.join(out, "table.md")).read()
  for text in ("MoE (E=4, k=2", "dense, same params", "dense, same FLOPs/token", "seeds 0"):
    assert text in table
  assert json.load(open(os.path.join(out, "results.json")))["runs"] == res["runs"]
  with pytest.raises(FileExistsError, match="--out-dir"):
    moe_exp.main(["--out-dir", out, *TINY])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match=r"k must be <= num_experts \(4\), got 5"):
    moe_exp.main(["--out-dir", "unused", "--experts", "4", "--k", "5"])
  with pytest.raises(ValueError, match="capacity_factor must be > 0"):
    moe_exp.main(["--out-dir", "unused", "--capacity-factor", "0"])
