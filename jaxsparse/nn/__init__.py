"""Reference models of the literature in flax.linen and flax.nnx: LeNets, MLPs, CIFAR ResNets,
a GPT-style language model (:mod:`~jaxsparse.nn.transformer`) and the sparsely-gated
mixture-of-experts layer (:mod:`~jaxsparse.nn.moe`). The sparse layers that run
on block-sparse kernels are in :mod:`jaxsparse.kernels`."""

from jaxsparse.nn import models, moe, transformer
from jaxsparse.nn.moe import MoE, MoENNX
