"""Comparing sparse networks across sparsities: pruned-parameter efficiency.

Hoefler et al. 2021 (*Sparsity in Deep Learning*, JMLR, Sec. 8) ask that sparse models be
compared by how much quality each removed parameter costs, not by accuracy at one sparsity.
The survey's exact formula could not be checked here, so :func:`pruned_parameter_efficiency`
is jaxsparse's own definition of that idea, stated precisely below.
"""

from __future__ import annotations

import math
import numbers


def pruned_parameter_efficiency(accuracy: float, dense_accuracy: float, sparsity: float
                                ) -> float:
  """Accuracy change per removed parameter fraction, relative to the dense baseline
  (jaxsparse's definition of the survey's metric; Hoefler et al. 2021, Sec. 8):

  ``(accuracy - dense_accuracy) / sparsity``

  in the units of the accuracies (fractions give "accuracy per unit of sparsity"; e.g.
  0.85 at 90% against a dense 0.89 gives -0.0444: 0.44 points lost per 10% removed).
  0 means pruning cost nothing; closer to 0 (or positive) is better, so methods compare
  at different sparsities. It is the slope of the straight line from the dense model to
  the sparse one on the accuracy-vs-sparsity plot.

  Raises:
    ValueError: naming ``sparsity`` unless ``0 < sparsity <= 1`` (the dense model
      itself has no efficiency), or an accuracy that is not finite.
  """
  for name, value in (("accuracy", accuracy), ("dense_accuracy", dense_accuracy),
                      ("sparsity", sparsity)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
      raise ValueError(f"{name} must be a finite real number, got {value!r}")
  if not 0 < sparsity <= 1:
    raise ValueError(f"sparsity must be in (0, 1] (the fraction of parameters removed), "
                     f"got {sparsity!r}")
  return (float(accuracy) - float(dense_accuracy)) / float(sparsity)
