"""experiments.common: results folders, mean ± std, markdown tables, CSV/JSON files, timing."""
import csv
import json

import jax.numpy as jnp
import pytest

from experiments import common


def test_out_dir_guard_refuses_results_and_names_the_flag(tmp_path):
  out = tmp_path / "a" / "b"
  assert common.make_out_dir(str(out)) == str(out) and out.is_dir()
  common.make_out_dir(str(out))                     # empty: accepted again
  (out / "runs.csv").write_text("x\n")
  with pytest.raises(FileExistsError, match=r"--out-dir .*b already holds results; choose"):
    common.check_out_dir(str(out))
  with pytest.raises(FileExistsError, match="--out .*pass --overwrite"):
    common.make_out_dir(str(out), flag="--out", overwrite=False)
  common.check_out_dir(str(out), overwrite=True)
  common.check_out_dir(str(out), marker="history.csv")   # only the marker counts
  (out / "history.csv").write_text("x\n")
  with pytest.raises(FileExistsError):
    common.check_out_dir(str(out), marker="history.csv")


def test_mean_std_is_the_sample_std_and_zero_for_one_value():
  assert common.mean_std([0.5]) == (0.5, 0.0)
  mean, std = common.mean_std([1.0, 2.0, 3.0, 4.0])
  assert mean == 2.5 and std == pytest.approx(1.2909944487358056)
  assert common.format_mean_std([0.9, 0.92]) == "91.00 ± 1.41"
  assert common.format_mean_std([91.0, 92.0], scale=1, sep="+-", digits=1) == "91.5 +- 0.7"
  with pytest.raises(ValueError, match="values"):
    common.mean_std([])


def test_markdown_table_rows_rule_and_alignment():
  md = common.markdown_table(["method", "acc"], [["set", "90.1"], ["rigl", 91]], align="lr")
  assert md == "| method | acc |\n|---|---:|\n| set | 90.1 |\n| rigl | 91 |"
  assert common.markdown_table(["a"], []) == "| a |\n|---|"
  with pytest.raises(ValueError, match="align"):
    common.markdown_table(["a", "b"], [], align="l")
  with pytest.raises(ValueError, match="rows"):
    common.markdown_table(["a", "b"], [[1]])


def test_write_csv_and_json(tmp_path):
  path = tmp_path / "runs.csv"
  common.write_csv(str(path), [dict(method="set", acc=0.9, np=None), dict(method="rigl", acc=0.8)])
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert rows == [dict(method="set", acc="0.9", np=""), dict(method="rigl", acc="0.8", np="")]
  common.write_csv(str(path), [], fields=("a", "b"))
  assert path.read_text().strip() == "a,b"
  with pytest.raises(ValueError, match="rows"):
    common.write_csv(str(path), [])
  common.write_json(str(tmp_path / "r.json"), dict(a=[1, 2]))
  assert json.loads((tmp_path / "r.json").read_text()) == dict(a=[1, 2])


def test_write_results_writes_csv_json_and_the_printed_table(tmp_path, capsys):
  rows = [{"method": "set", "acc": 0.9}, {"method": "rigl", "acc": 0.91}]
  common.write_results(str(tmp_path), {"rows": rows, "seconds": 1.5}, "| a |\n", rows,
                       csv_name="layers.csv")
  assert list(csv.DictReader(open(tmp_path / "layers.csv"))) == [
      {"method": "set", "acc": "0.9"}, {"method": "rigl", "acc": "0.91"}]
  assert json.load(open(tmp_path / "results.json")) == {"rows": rows, "seconds": 1.5}
  assert (tmp_path / "table.md").read_text() == "| a |\n"
  assert "| a |" in capsys.readouterr().out


def test_median_seconds_times_every_fn_after_warmup():
  calls = {"a": 0, "b": 0}

  def fn(name):
    calls[name] += 1
    return jnp.ones(3)

  for shuffle in (False, True):
    calls.update(a=0, b=0)
    t = common.median_seconds({"a": lambda: fn("a"), "b": lambda: fn("b")}, repeats=3,
                              warmup=1, shuffle=shuffle)
    assert set(t) == {"a", "b"} and all(v > 0 for v in t.values())
    assert calls == {"a": 4, "b": 4}
  with pytest.raises(ValueError, match="repeats"):
    common.median_seconds({"a": lambda: fn("a")}, repeats=0)
