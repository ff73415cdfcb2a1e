"""experiments.bench_compile: compile seconds and program sizes against the dense step."""
import json

from experiments import bench_compile


def test_reports_compile_times_and_op_counts_against_dense(tmp_path):
  out = tmp_path / "c.json"
  rows = bench_compile.main(["--models", "lenet300", "--methods", "static",
                             "--repeats", "1", "--out", str(out)])
  (row,) = rows
  assert row["model"] == "lenet300" and list(row["methods"]) == ["dense", "static"]
  dense, static = row["methods"]["dense"], row["methods"]["static"]
  assert dense["compile_ratio"] == 1.0
  for m in row["methods"].values():
    assert m["compile_s"] > 0 and m["lower_s"] > 0 and m["ops"] > 0 and m["cuda_ops"] > 0
  # the masking adds ops to the dense step, on both lowerings
  assert static["ops"] > dense["ops"] and static["cuda_ops"] > dense["cuda_ops"]
  assert json.loads(out.read_text())[0]["methods"]["static"]["ops"] == static["ops"]
  assert "| lenet300 | static |" in bench_compile.markdown(rows)
