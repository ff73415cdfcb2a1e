"""experiments.distill and the runner's teacher: distillation into a sparse student."""
import csv
import os

import jax
import numpy as np
import pytest

from experiments import distill, training

TINY = dict(dataset="digits", model="mlp", model_kwargs={"features": [32]}, epochs=1,
            progress=False, log=None)


def test_alpha0_t1_teacher_trains_exactly_as_plain_cross_entropy_and_bad_values_fail_early():
  plain = training.train(method="set", sparsity=0.8, **TINY)
  teacher = lambda x: jax.numpy.zeros((x.shape[0], 10))  # noqa: E731 - any logits
  same = training.train(method="set", sparsity=0.8, teacher=teacher, distill_temperature=1.0,
                        distill_alpha=0.0, **TINY)
  assert same["config"]["distill_alpha"] == 0.0 and "distill_alpha" not in plain["config"]
  for a, b in zip(jax.tree.leaves(plain["state"].params), jax.tree.leaves(same["state"].params)):
    np.testing.assert_array_equal(a, b)
  # A soft term changes the training.
  soft = training.train(method="set", sparsity=0.8, teacher=teacher, distill_temperature=2.0,
                        distill_alpha=0.5, **TINY)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain["state"].params),
                                                       jax.tree.leaves(soft["state"].params)))
  started = []
  for kw, match in ((dict(distill_temperature=0.0), "temperature must be > 0"),
                    (dict(distill_alpha=1.5), r"alpha must be in \[0, 1\]")):
    with pytest.raises(ValueError, match=match):
      training.train(method="set", sparsity=0.8, teacher=teacher,
                     on_start=lambda: started.append(1), **kw, **TINY)
  assert not started


@pytest.mark.e2e
def test_small_run_writes_the_table_and_runs(tmp_path, capsys):
  out = str(tmp_path / "distill")
  rows = distill.main(["--out-dir", out, "--small", "--methods", "set"])
  assert [(r["role"], r["method"], r["distilled"]) for r in rows] == [
      ("teacher", "dense", False), ("student", "set", False), ("student", "set", True)]
  assert all(r["seed"] == 0 and r["model"] == "lenet300" for r in rows)
  assert rows[1]["sparsity"] == rows[2]["sparsity"] == 0.9
  with open(os.path.join(out, "runs.csv"), newline="") as f:
    assert len(list(csv.DictReader(f))) == 3
  table = open(os.path.join(out, "table.md")).read()
  gain = 100 * (rows[2]["test_accuracy"] - rows[1]["test_accuracy"])
  assert (f"| set | 0.9 | 1 | {100 * rows[1]['test_accuracy']:.2f} ± 0.00 | "
          f"{100 * rows[2]['test_accuracy']:.2f} ± 0.00 | {gain:+.2f} |") in table
  assert "Dense teacher lenet300 (1 epochs)" in table and "on digits" in table
  with pytest.raises(FileExistsError, match="--out-dir"):
    distill.main(["--out-dir", out, "--small", "--methods", "set"])
  with pytest.raises(ValueError, match="temperature must be > 0"):
    distill.main(["--out-dir", str(tmp_path / "other"), "--small", "--temperature", "0"])
  assert not os.path.exists(tmp_path / "other")
