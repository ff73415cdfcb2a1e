"""Lottery tickets: IMP's per-round counts, and the loop's rounds, masks and rewinding."""
import jax.numpy as jnp
import numpy as np
import pytest

import jaxsparse as js
from jaxsparse.pruning.lottery import Round, imp_step_counts, lottery_ticket


def test_lottery_rounds_prune_20_percent_output_at_half_rate_and_land_on_targets():
  sizes = {"fc1/kernel": 1000, "fc2/kernel": 500, "fc3/kernel": 100}
  out = {"fc1/kernel": False, "fc2/kernel": False, "fc3/kernel": True}
  kept = imp_step_counts(dict(sizes), out, sizes, 0.2, 0.1, target=0.9)
  assert kept == {"fc1/kernel": 800, "fc2/kernel": 400, "fc3/kernel": 90}
  for _ in range(30):
    kept = imp_step_counts(kept, out, sizes, 0.2, 0.1, target=0.9)
  assert sum(kept.values()) == round(0.1 * 1600)
  assert kept["fc3/kernel"] / 100 > kept["fc1/kernel"] / 1000   # the output layer is pruned less


def test_lottery_ticket_rounds_land_on_targets_with_nested_masks_rewound_to_init():
  init = {"fc1": {"kernel": jnp.arange(1.0, 201.0).reshape(20, 10), "bias": jnp.ones(10)},
          "fc3": {"kernel": jnp.arange(1.0, 51.0).reshape(10, 5), "bias": jnp.ones(5)}}
  seen = []

  def train_fn(start, masks):   # "training" doubles every weight: the magnitudes keep their order
    seen.append(start)
    return {k: {**v, "kernel": 2 * v["kernel"]} for k, v in start.items()}, len(seen)

  rounds = lottery_ticket(train_fn, init, targets=(0.5, 0.8), output_layer="fc3")
  assert all(isinstance(r, Round) for r in rounds)
  assert [r.index for r in rounds] == list(range(len(rounds)))
  assert rounds[0].sparsity == 0.0 and [r.result for r in rounds] == list(range(1, len(rounds) + 1))
  sparsities = [r.sparsity for r in rounds]
  assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.8)
  assert any(s == pytest.approx(0.5) for s in sparsities)
  for prev, cur in zip(rounds, rounds[1:]):   # every ticket is a subset of the previous one
    for name in ("fc1", "fc3"):
      old, new = np.asarray(prev.masks[name]["kernel"]), np.asarray(cur.masks[name]["kernel"])
      assert not (new & ~old).any()
  last = rounds[-1].masks
  # magnitude pruning keeps the largest weights; the output layer is pruned at half the rate
  fc1 = np.asarray(last["fc1"]["kernel"]).ravel()
  assert fc1[-int(fc1.sum()):].all()
  assert np.asarray(last["fc3"]["kernel"]).mean() > fc1.mean()
  # the survivors start every round at their initial values (rewinding)
  np.testing.assert_array_equal(np.asarray(seen[-1]["fc1"]["kernel"]),
                                np.asarray(js.apply_masks(init, last)["fc1"]["kernel"]))
  with pytest.raises(ValueError, match="rate"):
    lottery_ticket(train_fn, init, rate=1.0)
  with pytest.raises(ValueError, match="output_layer"):
    lottery_ticket(train_fn, init, output_layer="fc9")
  with pytest.raises(ValueError, match="targets"):
    lottery_ticket(train_fn, init, targets=())
