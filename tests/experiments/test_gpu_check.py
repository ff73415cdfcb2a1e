"""The GPU command's orchestration on the CPU: limits, partial results, the report."""
import json
import os

from experiments import gpu_check


def test_a_part_past_its_limit_is_reported_and_the_next_still_runs(tmp_path):
  out = str(tmp_path / "gc")
  report = gpu_check.run_parts(["exactness", "torch_bsr"], {"exactness": 0.5, "torch_bsr": 120},
                               small=True, jaxpruner=None, out_dir=out)
  assert report["exactness"]["ok"] is False
  assert report["exactness"]["error"] == "timed out after 0 s"
  assert report["torch_bsr"]["ok"] is True          # ran after the timeout, in its own process
  assert report["torch_bsr"]["jax"]                 # every part is labelled with its JAX version
  md = open(os.path.join(out, "report.md")).read()
  assert "## exactness: FAILED" in md and "TIMED OUT" in md and "## torch_bsr: ok" in md
  assert set(json.load(open(os.path.join(out, "report.json")))) == {"exactness", "torch_bsr"}


def test_bad_arguments_name_the_flag(capsys):
  import pytest
  with pytest.raises(SystemExit):
    gpu_check.main(["--limits", "steps=soon"])
  assert "--limits" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    gpu_check.main(["--jaxpruner", "/nonexistent/jaxpruner"])
  assert "--jaxpruner" in capsys.readouterr().err


def test_lm_forward_small_runs_the_pruned_mlp_on_the_block_sparse_kernel():
  """``--small --parts lm_forward``'s work, in this process (interpret mode on the CPU)."""
  out = gpu_check.part_lm_forward(small=True)
  assert out["ok"] is True and len(out["rows"]) == 1, out["rows"]
  row = out["rows"][0]
  assert (row["nnz_blocks"], row["of_blocks"]) == (8, 16)   # 50% of fc1's 2 x 8 blocks of 16x16
  assert row["pallas_calls"] == 2                             # fc1 and fc2 of the one block
  assert row["err_sparse"] < 1e-5                             # float32: the same logits as dense
  # FLOPs: the MLP is 2/3 of the block's Dense FLOPs; half of it goes.
  assert 1.2 < row["ideal"] < 1.5
  assert "| 50% | 16 | 8 of 16 |" in out["markdown"]


def test_mask_update_part_small_times_the_exact_global_selection():
  """``--small --parts mask_update`` in this process: bench_mask_update's rows (its ``bench``
  asserts that global magnitude keeps exactly the planned count) and the part's table."""
  out = gpu_check.part_mask_update(small=True)
  (row,) = out["rows"]
  assert out["ok"] and 90_000 <= row["params"] <= 110_000
  assert row["dense_step_ms"] > 0 and row["global_magnitude_ms"] > 0
  assert out["markdown"].splitlines()[0].startswith("| params | dense step ms |")
