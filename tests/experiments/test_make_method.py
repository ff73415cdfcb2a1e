"""make_method builds the registered methods; deprecated keyword names still work through it."""
import jax
import numpy as np
import optax
import pytest

import jaxsparse as js
from experiments import training
from tests.helpers import batches, loss_fn, mlp_params


def _masks_after(tx, steps=4):
  params = mlp_params(jax.random.key(0))
  state, update = tx.init(params), jax.jit(tx.update)
  for x, y in batches(steps, batch=16):
    updates, state = update(jax.grad(loss_fn)(params, x, y), state, params)
    params = optax.apply_updates(params, updates)
  return jax.tree.leaves(js.get_masks(state))


@pytest.mark.parametrize("name,old,new", [("set", "zeta", "drop_fraction"),
                                          ("snfs", "prune_rate", "drop_fraction"),
                                          ("snfs", "min_prune_rate", "min_drop_fraction")])
def test_deprecated_method_kwargs_warn_and_build_the_same_method(name, old, new):
  make = lambda **kw: training.make_method(name, optax.sgd(0.05), 0.8, total_steps=8,
                                           steps_per_epoch=2, **kw)
  with pytest.warns(DeprecationWarning, match=f"'{old}' is deprecated; use '{new}'"):
    deprecated = make(**{old: 0.4})
  for a, b in zip(_masks_after(deprecated), _masks_after(make(**{new: 0.4}))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(TypeError, match=f"takes no argument '{new}x'; did you mean '{new}'"):
    make(**{f"{new}x": 0.4})


def test_methods_are_the_registry_and_unknown_ones_are_refused():
  assert set(training.METHODS) == set(js.core.registry.names())
  with pytest.raises(ValueError, match=r"method must be one of \(.*'rigl'.*\), got 'rigl2'"):
    training.make_method("rigl2", optax.sgd(0.1), 0.5, total_steps=10, steps_per_epoch=1)
