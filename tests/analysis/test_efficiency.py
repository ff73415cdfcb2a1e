"""Pruned-parameter efficiency (jaxsparse's definition of Hoefler et al. 2021's metric)."""
import pytest

import jaxsparse as js
from jaxsparse.analysis import efficiency


def test_hand_computed_values():
  # 85% at 90% sparsity against a dense 89%: -4 points over 0.9 of the weights removed.
  assert js.pruned_parameter_efficiency(0.85, 0.89, 0.9) == pytest.approx(-0.04 / 0.9)
  assert efficiency.pruned_parameter_efficiency(0.80, 0.90, 0.5) == pytest.approx(-0.2)
  assert js.pruned_parameter_efficiency(0.91, 0.90, 0.25) == pytest.approx(0.04)  # a gain
  assert js.pruned_parameter_efficiency(0.9, 0.9, 1.0) == 0.0


@pytest.mark.parametrize("args,match", [
    ((0.8, 0.9, 0.0), "sparsity must be in"), ((0.8, 0.9, 1.2), "sparsity must be in"),
    ((0.8, 0.9, -0.5), "sparsity must be in"), ((float("nan"), 0.9, 0.5), "accuracy must be"),
    ((0.8, None, 0.5), "dense_accuracy must be"), ((0.8, 0.9, True), "sparsity must be"),
])
def test_bad_input_names_the_argument(args, match):
  with pytest.raises(ValueError, match=match):
    js.pruned_parameter_efficiency(*args)
