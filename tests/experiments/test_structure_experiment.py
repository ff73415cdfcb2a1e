"""experiments.structure: the library's recorder on a real SET/static run, the plots, the CLI
(the recorder by hand: tests/analysis/test_structure.py)."""
import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

import jaxsparse as js
from experiments import structure
from experiments import training

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def runs():
  """Two epochs of SET (an update every 5 of the 44 steps) and static on the digits, with
  the recorder as training.train's hook. A one-layer model (64 -> 10) keeps the SET
  compile short."""
  out = {}
  for method, kw in (("set", dict(update_period=5, update_start=5)), ("static", {})):
    rec = js.StructureRecorder()
    result = training.train(dataset="digits", model="mlp", model_kwargs=dict(features=()),
                            method=method, sparsity=0.8, epochs=2, batch_size=32,
                            method_kwargs=kw, progress=False, log=None, on_epoch_end=rec)
    out[method] = rec, result
  return out


def test_set_changes_its_mask_and_static_does_not(runs):
  for method, (rec, result) in runs.items():
    assert [r["epoch"] for r in rec.history] == [1, 2]
    assert "test_accuracy" in rec.history[0]
    assert rec.history[0]["changed"] == {}
    for r in rec.history:                          # both keep the layer's density
      assert r["kept"]["fc1/kernel"] == round(0.2 * 64 * 10)
    final = np.asarray(js.get_masks(result["state"].opt_state)["fc1"]["kernel"])
    np.testing.assert_array_equal(rec.in_degree, final.sum(axis=1))
  set_changed = runs["set"][0].history[1]["changed"]
  assert 0 < set_changed["fc1/kernel"] <= 2.0 and set_changed["all"] == set_changed["fc1/kernel"]
  assert runs["static"][0].history[1]["changed"] == {"fc1/kernel": 0.0, "all": 0.0}
  assert not np.array_equal(runs["set"][0].in_degrees[0], runs["set"][0].in_degrees[1])


def test_plots_write_png_files(runs, tmp_path):
  rec, _ = runs["set"]
  paths = structure.write_plots(rec, (8, 8, 1), str(tmp_path), name="set")
  assert len(structure.write_plots(rec, None, str(tmp_path))) == 2   # no image: no heatmap
  assert [p.rsplit("/", 1)[1] for p in paths] == ["layer_density.png", "mask_change.png",
                                                   "input_connectivity.png"]
  for p in paths:
    with open(p, "rb") as f:
      head = f.read()
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 5000, p
  fig = Figure()
  ax = fig.add_subplot()
  im = structure.plot_input_connectivity(rec.in_degree, (8, 8), ax, colorbar=False)
  np.testing.assert_array_equal(im.get_array(), rec.in_degree.reshape(8, 8))
  assert [line.get_label() for line in structure.plot_mask_change(
      rec.history, fig.add_subplot()).get_lines()] == ["fc1", "all"]
  with pytest.raises(ValueError, match="image_shape"):
    structure.plot_input_connectivity(rec.in_degree, (28, 28), ax)


def test_command_line_refuses_to_overwrite_results(tmp_path):
  (tmp_path / "history.csv").write_text("epoch\n1\n")
  with pytest.raises(FileExistsError, match="--overwrite"):
    structure.main(["--method", "static", "--epochs", "1", "--out-dir", str(tmp_path)])
