"""experiments.kfac_pruning --small: the pipeline runs, meets the FLOPs target, writes its table."""
import json
import os

import pytest

from experiments import kfac_pruning as kp


@pytest.mark.e2e
def test_small_run_meets_the_flops_target_and_writes_the_table(tmp_path):
  out = str(tmp_path / "kfac")
  # LeNet-300-100 and three of the six methods keep the check short (LeNet-5's convs compile
  # for minutes on a loaded CPU; tests/pruning/test_kfac.py checks the conv factors): masks with
  # propagation (filter L1), the Kron-OBS update, EigenDamage's bottlenecks and fine-tuning.
  res = kp.main(["--small", "--model", "lenet300", "--methods", "filter_l1,kron_obs,eigendamage",
                 "--out-dir", out])
  table = open(os.path.join(out, "table.md")).read()
  for head in ("LeNet-300-100 on fashion_mnist (--small)", "FLOPs reduction",
               "acc. fine-tuned (%)", "| Kron-OBS + update | 2x |",
               "| EigenDamage | 2x |", "seeds 0"):
    assert head in table
  runs = {r["method"]: r for r in res["runs"]}
  assert set(runs) == {"dense", "filter_l1", "kron_obs", "eigendamage"}
  dense = runs["dense"]
  assert dense["flops"] == 532_400 and dense["params"] == 266_610   # LeNet-300-100
  for m in ("filter_l1", "kron_obs", "eigendamage"):
    assert dense["flops"] / runs[m]["flops"] >= 2.0              # the target is met ...
    assert dense["flops"] / runs[m]["flops"] < 2.3               # ... and not overshot much
    assert runs[m]["params"] < dense["params"]
    assert 0.0 <= runs[m]["acc_finetuned"] <= 1.0
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["runs"][0]["acc_pruned"] == dense["acc_pruned"]
  with pytest.raises(FileExistsError, match="--out-dir"):
    kp.main(["--small", "--out-dir", out])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="--methods: unknown \\['obq'\\]"):
    kp.main(["--out-dir", "unused", "--methods", "obd,obq"])
  with pytest.raises(ValueError, match="--flops-reduction targets must be > 1"):
    kp.main(["--out-dir", "unused", "--flops-reduction", "0.5"])
  with pytest.raises(ValueError, match="damping must be a finite number > 0"):
    kp.main(["--out-dir", "unused", "--damping", "0"])
  with pytest.raises(ValueError, match="--eigen-conv-factor must be one of patch, channel"):
    kp.main(["--out-dir", "unused", "--eigen-conv-factor", "patches"])
