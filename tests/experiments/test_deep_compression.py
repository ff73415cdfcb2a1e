"""experiments.deep_compression --small: the pipeline runs and its table adds up."""
import json
import os

import pytest

from experiments import deep_compression as dc


def test_small_run_writes_the_paper_style_table(tmp_path):
  out = str(tmp_path / "dc")
  res = dc.main(["--model", "lenet300", "--small", "--out-dir", out])
  table = open(os.path.join(out, "table.md")).read()
  for head in ("Weights% (P)", "Weight bits (P+Q+H)", "Index bits (P+Q)",
               "Compress rate (P+Q+H)", "| Total |", "quantized (fine-tuned)", "40x"):
    assert head in table
  assert [r["layer"] for r in res["layers"]] == ["fc1", "fc2", "fc3"]
  kept = {r["layer"]: r["kept_pct"] for r in res["layers"]}
  # The paper's rates on the kernels (8%, 9%, 26%); the layer rows also hold the dense biases.
  assert 8.0 < kept["fc1"] < 8.3 and 9.0 < kept["fc2"] < 9.5 and 26.0 < kept["fc3"] < 27.0
  t = res["totals"]
  assert t["dense"] == 266_610 * 32
  assert t["ratio_huffman"] > t["ratio_pq"] > 20       # P+Q alone compresses >20x at 8% kept
  assert sum(r["pq_bytes"] for r in res["layers"]) * 8 == pytest.approx(t["pq"])
  assert all(r["weight_bits_pq"] == 5 and r["index_bits_pq"] == 5 for r in res["layers"])
  acc = res["accuracy"]
  assert acc["dense"] > 0.6 and acc["quantized"] > acc["pruned"] - 0.05
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["accuracy"] == acc
  with pytest.raises(FileExistsError, match="--out-dir"):
    dc.main(["--model", "lenet300", "--small", "--out-dir", out])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="--fc-bits must be >= 1, got 0"):
    dc.main(["--out-dir", "unused", "--fc-bits", "0"])
  with pytest.raises(ValueError, match="--sparsity must be in"):
    dc.main(["--out-dir", "unused", "--pruning", "global", "--sparsity", "1.5"])
