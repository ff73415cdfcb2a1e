"""jaxsparse: sparse neural network training as pure optax transformations over mask pytrees."""

from jaxsparse import (bayesian, criteria, distributions, dst, ephemeral, flops, formats, kernels,
                       masks, obs, oneshot, regularisers, schedules, sharding, structured, text,
                       topk, transformer)
from jaxsparse.core import (Health, MaskUpdate, MaskUpdateInputs, SparseState, get_masks,
                            get_sparse_state, sparse_transform)
from jaxsparse.criteria import (grasp_masks, obd_scores, score_masks, score_pruning, snip_masks,
                                synflow_masks)
from jaxsparse.deep_rewiring import add_langevin_noise, deep_r, deep_r_optimizer
from jaxsparse.distributions import default_filter, densities, kept_counts, select_leaves
from jaxsparse.magnitude import (gradual_pruning, magnitude_masks, magnitude_pruning,
                                 random_pruning, rewind)
from jaxsparse.dst import dsr, dynamic_sparse, rigl, snfs
from jaxsparse.ephemeral import topk_gradients
from jaxsparse.regularisers import (add_group_lasso, add_l1, group_lasso_proximal, l1_proximal,
                                    sensitivity_decay, threshold_and_freeze)
from jaxsparse.flops import count_flops, flops_summary, total_flops
from jaxsparse.formats import (best_formats, export_sparse, sparse_inference, storage_sizes,
                               storage_summary)
from jaxsparse.kernels import (BSR, SparseDense, SparseLinear, bsr_from_dense, bsr_matmul,
                               bsr_to_dense, load_masks)
from jaxsparse.masks import apply_masks, check_masks, count_leaves, sparsity, summary
from jaxsparse.obs import obs_prune
from jaxsparse.oneshot import owl_sparsities, sparsegpt, wanda_mask
from jaxsparse.sparse_evolutionary import set  # noqa: A004 (the method's name in the literature)
from jaxsparse.static import dense, keep_masks, static_sparse
from jaxsparse.structured import filter_l1_masks, nm_masks, propagate_channels, slimming_masks


# What `from jaxsparse import *` binds: the public functions and classes, not the submodules
# (`masks`, `static`, ... would take common variable names), and not `set` (SET: `js.set`),
# which would rebind the builtin in the importer's namespace.
__all__ = [
    "BSR", "Health", "MaskUpdate", "MaskUpdateInputs", "SparseDense", "SparseLinear",
    "SparseState", "add_group_lasso", "add_l1", "add_langevin_noise", "apply_masks",
    "best_formats", "bsr_from_dense", "bsr_matmul", "bsr_to_dense", "check_masks",
    "count_flops", "count_leaves", "deep_r", "deep_r_optimizer", "default_filter", "dense",
    "densities", "dsr", "dynamic_sparse", "export_sparse", "filter_l1_masks", "flops_summary",
    "get_masks", "get_sparse_state", "gradual_pruning", "grasp_masks", "group_lasso_proximal",
    "keep_masks", "kept_counts", "l1_proximal", "load_masks", "magnitude_masks",
    "magnitude_pruning", "nm_masks", "obd_scores", "obs_prune", "owl_sparsities",
    "propagate_channels", "random_pruning", "rewind", "rigl", "score_masks", "score_pruning",
    "select_leaves", "sensitivity_decay", "slimming_masks", "snfs", "snip_masks",
    "sparse_inference", "sparse_transform", "sparsegpt", "sparsity", "static_sparse",
    "storage_sizes", "storage_summary", "summary", "synflow_masks", "threshold_and_freeze",
    "topk_gradients", "total_flops", "wanda_mask"
]

__version__ = "0.1.0"
