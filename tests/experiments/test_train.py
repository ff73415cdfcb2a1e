"""End to end on real data (scikit-learn's digits): the README's main job."""
import json

import numpy as np
import pytest

from experiments import train as train_cli
from experiments import training


@pytest.mark.e2e
def test_set_lenet300_90_percent_sparse_reaches_90_percent_on_digits():
  # (timings belong to experiments/bench_*: no wall-clock limit in a unit test)
  result = training.train(dataset="digits", model="lenet300", method="set", sparsity=0.9,
                          epochs=30, batch_size=32, seed=0, progress=False, log=None)
  assert result["final_test_accuracy"] >= 0.90, result["history"][-1]
  assert result["final_sparsity"] == pytest.approx(0.9, abs=1e-4)
  params = result["state"].params
  sparse_kernels = [np.asarray(params[k]["kernel"]) for k in ("fc1", "fc2", "fc3")]
  nnz = sum(np.count_nonzero(w) for w in sparse_kernels)
  assert nnz <= round(0.1 * sum(w.size for w in sparse_kernels))


def test_cli_writes_results_json(tmp_path):
  out = tmp_path / "r.json"
  train_cli.main(["--method", "static", "--epochs", "2", "--sparsity", "0.5", "--out", str(out),
                  "--no-progress"])
  r = json.loads(out.read_text())
  assert r["config"]["method"] == "static" and r["config"]["sparsity"] == 0.5
  assert len(r["history"]) == 2 and 0.0 <= r["final_test_accuracy"] <= 1.0
  assert r["layers"]["fc1/bias"]["sparse"] is False and r["layers"]["fc1/kernel"]["sparse"]
  total_kept = sum(v["kept"] for v in r["layers"].values() if v["sparse"])
  total = sum(v["total"] for v in r["layers"].values() if v["sparse"])
  assert total_kept == round(0.5 * total)
  assert r["seconds_per_epoch"] > 0


@pytest.mark.e2e
@pytest.mark.parametrize("method", training.METHODS)
def test_every_method_trains_and_ends_at_its_sparsity(method):
  # The settings of notebooks/dynamic_sparse_training.ipynb: the notebook's kernel then reads
  # these compiled programs from the suite's compilation cache.
  result = training.train(dataset="digits", model="lenet300", method=method, sparsity=0.9,
                          epochs=6, batch_size=32, learning_rate=0.05, seed=0, progress=False,
                          log=None)
  expected = 0.0 if method == "dense" else 0.9
  assert result["final_sparsity"] == pytest.approx(expected, abs=1e-4)
  assert result["final_test_accuracy"] > 0.3  # well above chance (0.1)


def test_steps_per_call_runs_the_same_steps_as_the_scanned_epoch():
  """Chunks of 3 unrolled steps (the last one 2) vs one scan: same params and losses."""
  import jax
  import optax
  from experiments import data
  from jaxsparse.core import masks, transform as core
  from jaxsparse.nn import models
  from jaxsparse.methods import static

  ds = data.load_dataset("digits", seed=0)
  net = models.create_model("lenet300", ds.num_classes)
  params = models.init_params(net, ds.input_shape, 0)["params"]
  tx = static.static_sparse(optax.sgd(0.05, momentum=0.9), 0.9)
  state = training.TrainState(params, {}, tx.init(params))
  x, y = jax.device_put(ds.x_train[:500]), jax.device_put(ds.y_train[:500])
  runs = [training.make_train_epoch(net, tx, 100, return_losses=True, steps_per_call=k)(
      state, x, y, jax.random.key(3)) for k in (None, 3)]
  (scanned, _, scan_losses), (chunked, _, chunk_losses) = runs
  assert chunk_losses.shape == scan_losses.shape == (5,)
  np.testing.assert_allclose(chunk_losses, scan_losses, rtol=1e-4)
  assert masks.sparsity(chunked.params, core.get_masks(chunked.opt_state)) == pytest.approx(0.9, abs=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), scanned.params,
               chunked.params)
  with pytest.raises(ValueError, match="steps_per_call"):
    training.make_train_epoch(net, tx, 100, steps_per_call=0)


def test_iterate_epochs_folds_the_epoch_into_the_key_and_resumes_alike():
  """The experiments' one epoch loop: epoch e shuffles with fold_in(key, e), so starting at
  epoch 2 from epoch 2's state gives the uninterrupted run's epochs."""
  import jax

  def train_epoch(state, x, y, key):   # the "loss" is a function of the epoch's key
    losses = jax.random.uniform(key, (3,)) + state
    return state + 1, losses.mean(), losses

  key = jax.random.key(0)
  full = list(training.iterate_epochs(train_epoch, 0, None, None, key, stop=4))
  assert [e for e, *_ in full] == [0, 1, 2, 3] and [s for _, s, *_ in full] == [1, 2, 3, 4]
  assert all(isinstance(loss, float) and seconds >= 0 for _, _, loss, _, seconds in full)
  assert len({loss - s for _, s, loss, *_ in full}) == 4          # a new key every epoch
  resumed = list(training.iterate_epochs(train_epoch, full[1][1], None, None, key, stop=4,
                                         start=2))
  assert [r[:3] for r in resumed] == [f[:3] for f in full[2:]]


def test_bad_arguments():
  with pytest.raises(ValueError, match="method"):
    training.make_method("rigl2", None, 0.5, total_steps=10, steps_per_epoch=1)
  with pytest.raises(ValueError, match="optimizer"):
    training.make_optimizer("lbfgs2", 0.1)
  with pytest.raises(ValueError, match="epochs"):
    training.train(epochs=0, progress=False)


@pytest.mark.e2e
def test_dst_compare_writes_table_csv_plot_and_checks_the_ordering(tmp_path):
  from experiments import dst_compare
  out = tmp_path / "dst"
  runs = dst_compare.main(["--dataset", "digits", "--methods", "dense", "thin_dense", "set", "dsr",
                           "--sparsities", "0.9", "--seeds", "0", "--epochs", "1",
                           "--out-dir", str(out)])
  assert [r["method"] for r in runs] == ["dense", "thin_dense", "set", "dsr"]
  # equal parameter count: the thin network has about as many kernel weights as the sparse ones
  thin, sparse = runs[1]["kernel_params"], runs[2]["kernel_params"]
  assert abs(thin - sparse) / sparse < 0.02 and runs[3]["kernel_params"] == sparse
  table = (out / "table.md").read_text()
  assert "| dsr |" in table and "DSR >= SET:" in table and "DSR > thin dense:" in table
  assert len((out / "runs.csv").read_text().strip().splitlines()) == 5
  assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(FileExistsError, match="--out-dir"):
    dst_compare.main(["--dataset", "digits", "--methods", "dense", "--out-dir", str(out)])


def test_thin_dense_widths_match_the_sparse_parameter_count():
  from experiments import dst_compare
  for s in (0.9, 0.95, 0.98):
    widths = dst_compare.thin_widths(s)
    target = (1 - s) * dst_compare.kernel_count((300, 100))
    assert widths[0] == pytest.approx(3 * widths[1], abs=2)      # LeNet's 3 : 1 shape
    assert abs(dst_compare.kernel_count(widths) - target) / target < 0.04
