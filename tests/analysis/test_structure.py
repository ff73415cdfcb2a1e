"""jaxsparse.analysis.structure: mask change, in-degree and the recorder's rows, by hand."""
import csv

import numpy as np
import pytest

from jaxsparse.analysis import structure

# Two hand-made layers. fc1 (4 inputs x 3 outputs) keeps 5; fc2 (3 x 2) keeps 3.
OLD = {"fc1": {"kernel": np.array([[1, 1, 0],
                                   [0, 0, 0],
                                   [1, 0, 1],
                                   [0, 1, 0]], bool), "bias": True},
       "fc2": {"kernel": np.array([[1, 0],
                                   [0, 1],
                                   [1, 0]], bool), "bias": True}}
# fc1: (0,1) dropped, (1,2) grown, (3,1) dropped, (3,0) grown: 4 changed, still 5 kept.
# fc2: (2,0) dropped: 1 changed, 2 kept.
NEW = {"fc1": {"kernel": np.array([[1, 0, 0],
                                   [0, 0, 1],
                                   [1, 0, 1],
                                   [1, 0, 0]], bool), "bias": True},
       "fc2": {"kernel": np.array([[1, 0],
                                   [0, 1],
                                   [0, 0]], bool), "bias": True}}
PARAMS = {"fc1": {"kernel": np.zeros((4, 3)), "bias": np.zeros(3)},
          "fc2": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}


def test_mask_change_and_in_degree_by_hand():
  assert structure.mask_change(OLD["fc1"]["kernel"], NEW["fc1"]["kernel"]) == 4 / 5
  assert structure.mask_change(OLD["fc2"]["kernel"], NEW["fc2"]["kernel"]) == 1 / 3
  assert structure.mask_change(OLD["fc2"]["kernel"], OLD["fc2"]["kernel"]) == 0.0
  np.testing.assert_array_equal(structure.in_degree(OLD["fc1"]["kernel"]), [2, 0, 2, 1])
  np.testing.assert_array_equal(structure.in_degree(NEW["fc1"]["kernel"]), [1, 1, 2, 1])
  # numpy reference on random masks: XOR over the previous kept count, row sums
  rng = np.random.default_rng(0)
  a, b = rng.random((2, 20, 7)) < 0.3
  assert structure.mask_change(a, b) == np.logical_xor(a, b).sum() / a.sum()
  np.testing.assert_array_equal(structure.in_degree(b), b.astype(int).sum(axis=1))
  with pytest.raises(ValueError, match="shapes"):
    structure.mask_change(a, b[:, :3])
  with pytest.raises(ValueError, match="rank"):
    structure.in_degree(a[0])


def test_recorder_rows_by_hand(tmp_path):
  rec = structure.StructureRecorder()
  first = rec.record(OLD, PARAMS, step=10)
  assert list(first["density"]) == ["fc1/kernel", "fc2/kernel", "all"]  # biases are not layers
  assert first["density"] == {"fc1/kernel": 5 / 12, "fc2/kernel": 3 / 6, "all": 8 / 18}
  assert first["kept"] == {"fc1/kernel": 5, "fc2/kernel": 3, "all": 8}
  assert first["changed"] == {}                      # nothing to compare with yet
  second = rec.record(NEW, PARAMS, step=20)
  assert second["changed"] == {"fc1/kernel": 4 / 5, "fc2/kernel": 1 / 3, "all": (4 + 1) / (5 + 3)}
  assert second["density"]["fc2/kernel"] == 2 / 6 and second["kept"]["all"] == 7
  np.testing.assert_array_equal(rec.in_degree, [1, 1, 2, 1])   # fc1, the first kernel
  np.testing.assert_array_equal(rec.in_degrees[0], [2, 0, 2, 1])

  # a dense layer (scalar mask) is recorded at density 1 when params give its shape
  dense = {"fc1": {"kernel": True, "bias": True}, "fc2": OLD["fc2"]}
  row = structure.StructureRecorder().record(dense, PARAMS)
  assert row["density"]["fc1/kernel"] == 1.0 and row["kept"]["fc1/kernel"] == 12
  # chosen layers and input layer; errors name the problem
  rec2 = structure.StructureRecorder(layers=["fc2/kernel"], input_layer="fc2/kernel")
  rec2.record(OLD)
  assert list(rec2.history[0]["density"]) == ["fc2/kernel", "all"]
  np.testing.assert_array_equal(rec2.in_degree, [1, 1, 1])
  with pytest.raises(ValueError, match="no mask leaf named 'fc9/kernel'"):
    structure.StructureRecorder(layers=["fc9/kernel"]).record(OLD)
  with pytest.raises(ValueError, match="scalar"):
    structure.StructureRecorder(layers=["fc1/kernel"]).record(dense)

  path = tmp_path / "h.csv"
  rec.write_csv(str(path))
  rows = list(csv.DictReader(path.open()))
  assert [r["step"] for r in rows] == ["10", "20"]
  assert rows[0]["changed/all"] == "" and float(rows[1]["changed/all"]) == 5 / 8
  assert float(rows[1]["density/fc1/kernel"]) == 5 / 12
  rec.write_in_degree_csv(str(tmp_path / "d.csv"), key="step")
  d = list(csv.reader((tmp_path / "d.csv").open()))
  assert d == [["step", "input_0", "input_1", "input_2", "input_3"], ["10", "2", "0", "2", "1"],
               ["20", "1", "1", "2", "1"]]
