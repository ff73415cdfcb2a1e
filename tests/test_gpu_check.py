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
