"""Sparsity through the loss or the layers: L1 and group-lasso penalties and proximal steps
(:mod:`~jaxsparse.regularizers.penalties`), stochastic gates (L0, sparse variational dropout:
:mod:`~jaxsparse.regularizers.bayesian`), and ephemeral sparsity, which is recomputed at
every step instead of kept (top-k gradients, k-winners activations:
:mod:`~jaxsparse.regularizers.ephemeral`), and knowledge distillation into a sparse student
(:func:`~jaxsparse.regularizers.distillation.distillation_loss`), and dropout on the weights
as ephemeral sparsity (DropConnect, targeted dropout: :mod:`~jaxsparse.regularizers.dropout`)."""

from jaxsparse.regularizers import bayesian, distillation, dropout, ephemeral, penalties
from jaxsparse.regularizers.distillation import distillation_loss
from jaxsparse.regularizers.dropout import drop_connect, targeted_dropout, targeting_masks
