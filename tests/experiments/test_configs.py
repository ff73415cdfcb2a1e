"""Named configs: round trip, overrides with type checks, bad names and keys, results folders."""

import dataclasses
import json

import pytest

from experiments import configs, run
from experiments import data, training
from jaxsparse.nn import models


@pytest.mark.parametrize("name", sorted(configs.CONFIGS))
def test_every_config_round_trips_through_dict_and_json(name):
  config = configs.get_config(name)
  assert configs.Config.from_dict(config.to_dict()) == config
  assert configs.Config.from_json(config.to_json()) == config
  assert json.loads(config.to_json())["method"] == config.method
  assert set(config.train_kwargs()) <= set(training.train.__kwdefaults__)


def test_overrides_are_parsed_and_type_checked():
  base = configs.get_config("digits_set")
  c = configs.apply_overrides(base, ["epochs=5", "learning_rate=1", "method=rigl",
                                     "data_dir=null", 'model_kwargs={"features": [32, 16]}',
                                     "method_kwargs.update_period=7", "model=mlp"])
  assert (c.epochs, c.learning_rate, c.method, c.data_dir, c.model) == (5, 1.0, "rigl", None, "mlp")
  assert isinstance(c.learning_rate, float)
  assert c.model_kwargs == {"features": [32, 16]} and c.method_kwargs == {"update_period": 7}
  assert base.epochs == 20 and base.method_kwargs == {}  # the registered config is unchanged
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.epochs = 3
  for bad, match in (("epochs=2.5", "'epochs' must be of type int, got 2.5"),
                     ("sparsity=high", "'sparsity' must be of type float"),
                     ("method=3", "'method' must be of type str"),
                     ("model_kwargs=[1]", "'model_kwargs' must be of type Mapping")):
    with pytest.raises(TypeError, match=match):
      configs.apply_overrides(base, [bad])
  with pytest.raises(ValueError, match="key=value"):
    configs.apply_overrides(base, ["epochs"])
  with pytest.raises(KeyError, match="only model_kwargs, method_kwargs"):
    configs.apply_overrides(base, ["epochs.x=1"])


def test_unknown_keys_name_the_closest_valid_key():
  base = configs.get_config("smoke")
  with pytest.raises(KeyError, match="unknown config key 'epcohs'; did you mean 'epochs'"):
    configs.apply_overrides(base, ["epcohs=3"])
  with pytest.raises(KeyError, match="'learnig_rate'; did you mean 'learning_rate'"):
    configs.Config.from_dict({"learnig_rate": 0.1})
  with pytest.raises(KeyError, match="unknown config 'smok'. Did you mean 'smoke'"):
    configs.get_config("smok")


@pytest.mark.parametrize("field,known", [("method", training.METHODS), ("model", models.MODELS),
                                         ("dataset", data.DATASETS),
                                         ("optimizer", training.OPTIMIZERS)])
def test_unknown_names_list_the_known_ones(field, known):
  with pytest.raises(ValueError, match=f"unknown {field} 'nope'") as err:
    configs.Config(**{field: "nope"})
  assert all(k in str(err.value) for k in known)
  with pytest.raises(ValueError, match="sparsity must be in"):
    configs.Config(sparsity=1.0)


def test_results_folder_is_never_overwritten_silently(tmp_path, capsys):
  out = tmp_path / "run"
  run.prepare_out(str(out), resume=False, overwrite=False)  # new: created
  (out / "metrics.csv").write_text("epoch\n1\n")
  with pytest.raises(FileExistsError, match="already exists; pass --resume"):
    run.prepare_out(str(out), resume=False, overwrite=False)
  run.prepare_out(str(out), resume=True, overwrite=False)  # resume keeps it
  assert (out / "metrics.csv").exists()
  run.prepare_out(str(out), resume=False, overwrite=True)  # overwrite empties it
  assert not (out / "metrics.csv").exists()
  with pytest.raises(FileNotFoundError, match="--resume"):
    run.prepare_out(str(tmp_path / "missing"), resume=True, overwrite=False)
  # The CLI turns bad input into one error line and exit status 2, before any training.
  (out / "metrics.csv").write_text("epoch\n1\n")
  assert run.main(["smoke", "--out", str(out)]) == 2
  assert "already exists" in capsys.readouterr().err
  assert run.main(["smoke", "epcohs=1", "--out", str(tmp_path / "x")]) == 2
  assert "did you mean 'epochs'" in capsys.readouterr().err
  assert run.main(["--list"]) == 0 and "digits_rigl" in capsys.readouterr().out
