"""jaxsparse: sparse neural network training as pure optax transformations over mask pytrees.

Subpackages, in import order (each imports only from those above it):

* :mod:`jaxsparse.core`: mask trees, exact-count selection, the optax wrapper every method
  uses, layer densities, schedules, shardings;
* :mod:`jaxsparse.methods`: static masks, SET, RigL / SNFS / DSR and the vocabulary they are
  built from, DeepR;
* :mod:`jaxsparse.pruning`: magnitude, criteria, OBS, structured and one-shot pruning;
* :mod:`jaxsparse.regularizers`: penalties, stochastic gates, ephemeral sparsity;
* :mod:`jaxsparse.kernels`: block-sparse formats, Pallas matmuls, sparse layers;
* :mod:`jaxsparse.nn`: reference models; :mod:`jaxsparse.analysis`: FLOPs, storage, lowering.

Every public function and class is also importable from here (see ``__all__``).
"""

import importlib as _importlib
import warnings as _warnings

from jaxsparse import analysis, core, kernels, methods, nn, pruning, regularizers
from jaxsparse.analysis.compression import (compression_sizes, huffman_code, huffman_decode,
                                            huffman_encode)
from jaxsparse.analysis.efficiency import pruned_parameter_efficiency
from jaxsparse.analysis.flops import count_flops, flops_summary, total_flops
from jaxsparse.analysis.formats import (best_formats, export_sparse, sparse_inference,
                                        storage_sizes, storage_summary)
from jaxsparse.analysis.structure import StructureRecorder
from jaxsparse.core.distributions import default_filter, densities, kept_counts, select_leaves
from jaxsparse.core.masks import apply_masks, check_masks, count_leaves, sparsity, summary
from jaxsparse.core.transform import (Health, MaskUpdate, MaskUpdateInputs, SparseState,
                                      get_masks, get_sparse_state, sparse_transform)
from jaxsparse.kernels import (BSR, SparseDense, SparseLinear, bsr_from_dense, bsr_matmul,
                               bsr_to_dense, load_masks)
from jaxsparse.methods.deep_rewiring import add_langevin_noise, deep_r, deep_r_optimizer
from jaxsparse.methods.dst import dsr, dynamic_sparse, rigl, snfs
from jaxsparse.methods.sparse_evolutionary import sparse_evolutionary_training
from jaxsparse.methods.static import dense, keep_masks, static_sparse
from jaxsparse.pruning.criteria import (grasp_masks, obd_scores, score_masks, score_pruning,
                                        snip_masks, synflow_masks)
from jaxsparse.pruning.kfac import (eigendamage, kron_factors, kron_obd_scores, kron_obs_scores,
                                    kron_prune)
from jaxsparse.pruning.lottery import lottery_ticket
from jaxsparse.pruning.magnitude import (gradual_pruning, magnitude_masks, magnitude_pruning,
                                         random_pruning, rewind)
from jaxsparse.pruning.neurons import (activation_stats, apoz_scores, correlation_scores,
                                       least_squares_compensation, merge_and_scale,
                                       neuron_masks, sensitivity_scores)
from jaxsparse.pruning.obs import obs_prune
from jaxsparse.pruning.oneshot import owl_sparsities, sparsegpt, wanda_mask
from jaxsparse.pruning.structured import (filter_l1_masks, nm_masks, propagate_channels,
                                          slimming_masks)
from jaxsparse.pruning.weight_sharing import (WeightSharingState, kmeans_1d, share_weights,
                                              weight_sharing)
from jaxsparse.nn.moe import MoE, MoENNX, moe_apply, total_aux_loss
from jaxsparse.regularizers.distillation import distillation_loss
from jaxsparse.regularizers.dropout import drop_connect, targeted_dropout, targeting_masks
from jaxsparse.regularizers.ephemeral import topk_gradients
from jaxsparse.regularizers.penalties import (add_group_lasso, add_l1, group_lasso_proximal,
                                              l1_proximal, sensitivity_decay,
                                              threshold_and_freeze)

# What `from jaxsparse import *` binds: the public functions and classes, not the subpackages
# (`core`, `nn`, ... would take common variable names), and no name of a builtin.
__all__ = [
    "BSR", "Health", "MaskUpdate", "MaskUpdateInputs", "MoE", "MoENNX", "SparseDense",
    "SparseLinear", "SparseState", "StructureRecorder", "WeightSharingState",
    "activation_stats", "add_group_lasso", "add_l1", "add_langevin_noise", "apoz_scores",
    "apply_masks", "best_formats", "bsr_from_dense", "bsr_matmul", "bsr_to_dense",
    "check_masks", "compression_sizes", "correlation_scores", "count_flops", "count_leaves",
    "deep_r", "deep_r_optimizer", "default_filter", "dense", "densities", "distillation_loss",
    "drop_connect", "dsr", "dynamic_sparse", "eigendamage", "export_sparse", "filter_l1_masks",
    "flops_summary", "get_masks", "get_sparse_state", "gradual_pruning", "grasp_masks",
    "group_lasso_proximal", "huffman_code", "huffman_decode", "huffman_encode", "keep_masks",
    "kept_counts", "kmeans_1d", "kron_factors", "kron_obd_scores", "kron_obs_scores",
    "kron_prune", "l1_proximal", "least_squares_compensation", "load_masks", "lottery_ticket",
    "magnitude_masks", "magnitude_pruning", "merge_and_scale", "moe_apply", "neuron_masks",
    "nm_masks", "obd_scores", "obs_prune", "owl_sparsities", "propagate_channels",
    "pruned_parameter_efficiency", "random_pruning", "rewind", "rigl", "score_masks",
    "score_pruning", "select_leaves", "sensitivity_decay", "sensitivity_scores",
    "share_weights", "slimming_masks", "snfs", "snip_masks", "sparse_evolutionary_training",
    "sparse_inference", "sparse_transform", "sparsegpt", "sparsity", "static_sparse",
    "storage_sizes", "storage_summary", "summary", "synflow_masks", "targeted_dropout",
    "targeting_masks", "threshold_and_freeze", "topk_gradients", "total_aux_loss",
    "total_flops", "wanda_mask", "weight_sharing",
]

__version__ = "0.1.0"

# Deprecated for one release: the flat module names of 0.1 (`js.dst`, `from jaxsparse import
# masks`), British `regularisers`, and `js.set`, which shadows the builtin when imported by name.
_DEPRECATED_MODULES = {
    "masks": "jaxsparse.core.masks", "topk": "jaxsparse.core.selection",
    "distributions": "jaxsparse.core.distributions", "schedules": "jaxsparse.core.schedules",
    "sharding": "jaxsparse.core.sharding", "static": "jaxsparse.methods.static",
    "sparse_evolutionary": "jaxsparse.methods.sparse_evolutionary",
    "dst": "jaxsparse.methods.dst", "deep_rewiring": "jaxsparse.methods.deep_rewiring",
    "magnitude": "jaxsparse.pruning.magnitude", "criteria": "jaxsparse.pruning.criteria",
    "obs": "jaxsparse.pruning.obs", "structured": "jaxsparse.pruning.structured",
    "oneshot": "jaxsparse.pruning.oneshot", "regularisers": "jaxsparse.regularizers.penalties",
    "bayesian": "jaxsparse.regularizers.bayesian", "ephemeral": "jaxsparse.regularizers.ephemeral",
    "models": "jaxsparse.nn.models", "transformer": "jaxsparse.nn.transformer",
    "flops": "jaxsparse.analysis.flops", "formats": "jaxsparse.analysis.formats",
    "lowering": "jaxsparse.analysis.lowering",
}
# Application code that left the library for the repository's `experiments` package.
_MOVED_OUT = {"data": "experiments.data", "training": "experiments.training",
              "checkpoint": "experiments.checkpoint", "text": "experiments.text"}


def __getattr__(name: str):
  if name == "set":
    _warnings.warn("jaxsparse.set is deprecated (it shadows the builtin when imported by name); "
                   "use jaxsparse.sparse_evolutionary_training", DeprecationWarning, stacklevel=2)
    return sparse_evolutionary_training
  if name in _DEPRECATED_MODULES:
    new = _DEPRECATED_MODULES[name]
    _warnings.warn(f"jaxsparse.{name} is deprecated; use {new}", DeprecationWarning, stacklevel=2)
    return _importlib.import_module(new)
  if name in _MOVED_OUT:
    raise AttributeError(f"jaxsparse.{name} moved out of the library to {_MOVED_OUT[name]} (the "
                         "repository's experiments package; run from the repository root)")
  raise AttributeError(f"module 'jaxsparse' has no attribute {name!r}")
