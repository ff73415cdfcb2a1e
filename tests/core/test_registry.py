"""The method registry: every method registers its factory and run-scaled defaults."""
import optax
import pytest

import jaxsparse as js
from jaxsparse.core import registry
from jaxsparse.methods import dst


def test_every_method_is_registered_beside_its_definition():
  assert set(registry.names()) == {"dense", "static", "set", "magnitude", "gradual", "random",
                                   "rigl", "snfs", "dsr", "deepr"}
  assert registry.get("set").factory is js.sparse_evolutionary_training
  assert registry.get("rigl").factory is js.rigl
  assert registry.get("gradual").factory is js.gradual_pruning
  assert not registry.get("dense").hyperparameters and registry.get("static").hyperparameters
  # deepr takes DeepR's L1 and noise arguments besides deep_r's own
  assert set(registry.get("deepr").keywords()) == {
      "learning_rate", "l1", "temperature", "distribution", "filter", "keep_dense", "overrides",
      "seed"}
  assert registry.get("snfs").renamed() == {"prune_rate": "drop_fraction",
                                            "min_prune_rate": "min_drop_fraction"}


def test_defaults_scale_with_the_run_and_explicit_kwargs_win():
  rigl = registry.get("rigl").defaults(1000, 10, 3)
  assert rigl == {"update_stop": 750, "update_period": 50, "seed": 3}
  assert registry.get("rigl").defaults(10_000, 10, 0)["update_period"] == 100
  assert registry.get("rigl").defaults(10, 10, 0) == {"update_stop": 7, "update_period": 1,
                                                      "seed": 0}
  assert registry.get("dsr").defaults(1000, 10, 0) == {
      "update_period": 50, "doubling_steps": (250, 500, 750), "update_stop": 900, "seed": 0}
  assert registry.get("gradual").defaults(1000, 10, 0) == {"begin_step": 100, "num_updates": 10,
                                                           "update_period": 50}
  assert registry.get("set").defaults(1000, 10, 4) == {"update_period": 10, "update_start": 10,
                                                       "seed": 4}
  assert registry.get("magnitude").defaults(1000, 10, 4) == {"prune_step": 500,
                                                             "scope": "global"}
  # build: the defaults, overridden by kwargs
  with pytest.raises(ValueError, match="drop_fraction"):
    registry.build("rigl", optax.sgd(0.1), 0.9, total_steps=1000, steps_per_epoch=10,
                   drop_fraction=1.5)
  tx = registry.build("dense", optax.sgd(0.1), 0.9, total_steps=10, steps_per_epoch=1,
                      drop_fraction=0.5)  # dense ignores hyperparameters
  assert isinstance(tx, optax.GradientTransformation)


def test_register_refuses_bad_input_and_a_taken_name():
  with pytest.raises(ValueError, match="name"):
    registry.register("", dst.rigl)
  with pytest.raises(TypeError, match="factory"):
    registry.register("x", None)
  with pytest.raises(TypeError, match="defaults"):
    registry.register("x", dst.rigl, defaults=3)
  with pytest.raises(ValueError, match="'rigl' is already registered"):
    registry.register("rigl", dst.snfs)
  registry.register("rigl", dst.rigl, registry.get("rigl").defaults)  # the same: a no-op
  with pytest.raises(ValueError, match=r"method must be one of \(.*\), got 'rigl2'"):
    registry.get("rigl2")


def test_build_passes_the_defaults_overridden_by_kwargs():
  seen = []

  def factory(inner, sparsity, *, a=0, b=0, seed=0):
    seen.append((sparsity, a, b, seed))
    return inner

  registry.register("test_build", factory,
                    lambda total_steps, steps_per_epoch, seed: {"a": total_steps,
                                                                "b": steps_per_epoch, "seed": seed})
  try:
    inner = optax.sgd(0.1)
    assert registry.build("test_build", inner, 0.5, total_steps=7, steps_per_epoch=3, seed=2,
                          b=9) is inner
  finally:
    registry._METHODS.pop("test_build")
  assert seen == [(0.5, 7, 9, 2)]
  assert "test_build" not in registry.names()
