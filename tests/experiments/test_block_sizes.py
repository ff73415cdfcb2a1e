"""experiments/block_sizes.py on digits: block RigL keeps block-structured masks; the table is written."""
import csv
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import block_sizes
from experiments import data


@pytest.mark.e2e
def test_block_rigl_on_digits_keeps_blocks_and_writes_table(tmp_path):
  # digits: 8x8 = 64 features (no padding needed for blocks of 16), hidden 64; one epoch is
  # 14 steps, and RigL's period max(1, 14 // 20) = 1 step makes 9 block mask updates.
  runs = block_sizes.run_experiment(dataset="digits", out_dir=str(tmp_path), methods=["rigl"],
                                    block_sizes=[16], seeds=[0], epochs=1, features=(64, 64),
                                    log=None)
  assert len(runs) == 1
  with open(tmp_path / "runs.csv", newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert row["method"] == "rigl" and row["block_size"] == "16"
  assert row["block_structured"] == "True"
  kept = json.loads(row["kept_blocks"])
  assert kept == json.loads(row["expected_blocks"]) and set(kept) == {"fc1/kernel", "fc2/kernel"}
  # 90% of 2 x 4096 weights kept in 256-weight blocks: 410 / 256 -> 2 blocks per leaf
  assert kept == {"fc1/kernel": 2, "fc2/kernel": 2}
  assert float(row["sparsity"]) == pytest.approx(1 - 4 * 256 / 8192)
  table = (tmp_path / "table.md").read_text()
  assert "| RigL |" in table and "b = 16" in table and "yes (1/1)" in table
  assert (tmp_path / "accuracy_vs_block.png").stat().st_size > 0


def test_block_check_rejects_a_mask_that_is_not_block_constant():
  blocky = jnp.zeros((32, 32), bool).at[:16, 16:].set(True)
  params = {"fc1": {"kernel": jnp.where(blocky, 1.0, 0.0)}}
  assert block_sizes.check_masks(params, {"fc1": {"kernel": blocky}}, 16,
                                 {"fc1/kernel": 1}, True, "test") == {"fc1/kernel": 1}
  with pytest.raises(RuntimeError, match="not constant on 16x16 blocks"):
    block_sizes.check_masks(params, {"fc1": {"kernel": blocky.at[0, 0].set(True)}}, 16,
                            {"fc1/kernel": 2}, True, "test")
  with pytest.raises(RuntimeError, match="expected 2"):
    block_sizes.check_masks(params, {"fc1": {"kernel": blocky}}, 16, {"fc1/kernel": 2}, True,
                            "test")


def test_pad_features_appends_constant_zero_inputs():
  ds = data.load_dataset("digits")
  padded = block_sizes.pad_features(ds, 48)
  assert padded.input_shape == (96,) and padded.x_train.shape == (len(ds.x_train), 96)
  np.testing.assert_array_equal(padded.x_train[:, :64], ds.x_train.reshape(-1, 64))
  assert not padded.x_train[:, 64:].any() and not padded.x_test[:, 64:].any()
