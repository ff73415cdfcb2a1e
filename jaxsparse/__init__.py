"""jaxsparse: sparse neural network training as pure optax transformations over mask pytrees."""

from jaxsparse import distributions, masks, schedules, topk
from jaxsparse.core import (MaskUpdate, MaskUpdateInputs, SparseState, get_masks, get_sparse_state,
                            sparse_transform)
from jaxsparse.distributions import default_filter, densities, kept_counts, select_leaves
from jaxsparse.magnitude import (gradual_pruning, magnitude_masks, magnitude_pruning,
                                 random_pruning, rewind)
from jaxsparse.masks import apply_masks, check_masks, count_leaves, sparsity, summary
from jaxsparse.sparse_evolutionary import set  # noqa: A004 (the method's name in the literature)
from jaxsparse.static import dense, keep_masks, static_sparse

__version__ = "0.1.0"
