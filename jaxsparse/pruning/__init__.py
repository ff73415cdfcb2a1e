"""Pruning: magnitude (one-shot, gradual), lottery tickets (:mod:`~jaxsparse.pruning.lottery`:
iterative magnitude pruning with rewinding), saliency criteria (SNIP, GraSP,
SynFlow, OBD), Optimal Brain Surgeon (:mod:`~jaxsparse.pruning.obs`), Kronecker-factored
OBD/OBS and EigenDamage (:mod:`~jaxsparse.pruning.kfac`), structured and N:M masks,
neuron and channel pruning (:mod:`~jaxsparse.pruning.neurons`: merge-and-scale, APoZ,
output sensitivity, correlation), one-shot pruning of trained transformers from calibration
data (Wanda, SparseGPT), and Deep Compression's trained quantization by weight sharing
(:mod:`~jaxsparse.pruning.weight_sharing`)."""

from jaxsparse.pruning import magnitude  # noqa: I001 (criteria builds on magnitude)
from jaxsparse.pruning import (criteria, kfac, lottery, neurons, obs, oneshot, structured,
                               weight_sharing)
