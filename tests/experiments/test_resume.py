"""Checkpoint/resume: a killed run resumes bit-identically; shape changes and NaN losses stop cleanly."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import run
from experiments import checkpoint, training

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# DSR: masks, counter, PRNG key and the adaptive threshold all live in the state.
CONFIG, OVERRIDES = "digits_dsr", ["epochs=6"]


def _finished_checkpoints(directory):
  return [n for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(directory) else []


def _runner(out, *flags, cache):
  """The runner in a subprocess; a shared persistent compilation cache saves recompiling."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return subprocess.Popen([sys.executable, "-m", "experiments.run", CONFIG, *OVERRIDES,
                           "--out", out, "--no-progress", *flags], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(proc):
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.e2e
def test_killed_run_resumes_bit_identically_and_refuses_shape_changes(tmp_path):
  killed, full, cache = (str(tmp_path / n) for n in ("killed", "full", "cache"))
  proc = _runner(killed, cache=cache)
  try:
    deadline = time.monotonic() + 120
    while not _finished_checkpoints(os.path.join(killed, "checkpoints")):
      assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
      assert time.monotonic() < deadline, "no checkpoint after 120 s"
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL  # really interrupted, not finished
  stopped_at = checkpoint.latest_epoch(os.path.join(killed, "checkpoints"))
  assert 1 <= stopped_at < 6

  copy = str(tmp_path / "copy")
  shutil.copytree(killed, copy)
  resumed, reference = _runner(killed, "--resume", cache=cache), _runner(full, cache=cache)
  # While those run: an existing folder needs --resume, and a resume that changes shapes is refused.
  with pytest.raises(FileExistsError):
    run.run(CONFIG, OVERRIDES, out=copy)
  with pytest.raises(ValueError, match=r"cannot resume .*params/fc1/kernel: checkpoint \(64, 300\)"
                                       r".*model: 'lenet300' -> 'mlp'"):
    run.run(CONFIG, [*OVERRIDES, "model=mlp", 'model_kwargs={"features": [32]}'], out=copy,
            resume=True)

  _wait(resumed)
  _wait(reference)
  a, meta_a = checkpoint.read(os.path.join(killed, "checkpoints"))
  b, meta_b = checkpoint.read(os.path.join(full, "checkpoints"))
  assert meta_a["epoch"] == meta_b["epoch"] == 6
  assert list(a) == list(b)
  assert "opt_state/aux/drop/threshold" in a and "opt_state/key (prng key data)" in a
  for name in a:  # params, masks, counters, PRNG key, DSR threshold, momentum: all bit-identical
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert [h["loss"] for h in meta_a["history"]] == [h["loss"] for h in meta_b["history"]]
  reports = [json.load(open(os.path.join(d, "report.json"))) for d in (killed, full)]
  assert reports[0]["test_accuracy"] == reports[1]["test_accuracy"]
  assert reports[0]["layers"] == reports[1]["layers"]
  with open(os.path.join(killed, "metrics.csv")) as f:
    epochs = [int(line.split(",")[0]) for line in f.readlines()[1:]]
  assert epochs == list(range(1, 7))  # one row per epoch, none lost or repeated



def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys):
  real = training.make_train_epoch

  def poisoned(*args, **kwargs):
    epoch_fn = real(*args, **kwargs)
    calls = []

    def train_epoch(state, x, y, key):
      state, loss, losses = epoch_fn(state, x, y, key)
      calls.append(1)
      if len(calls) == 2:  # the second epoch's third step diverges
        losses = losses.at[2:].set(np.nan)
        loss = losses.mean()
      return state, loss, losses

    return train_epoch

  monkeypatch.setattr(training, "make_train_epoch", poisoned)
  out = str(tmp_path / "nan")
  assert run.main(["digits_dense", "epochs=4", "--out", out, "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert "loss is nan at epoch 2, step 3 of 14 (global step 17)" in err
  assert "last good checkpoint (after epoch 1) is kept" in err
  assert checkpoint.latest_epoch(os.path.join(out, "checkpoints")) == 1
