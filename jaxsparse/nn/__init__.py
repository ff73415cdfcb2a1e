"""Reference models of the literature in flax.linen and flax.nnx: LeNets, MLPs, CIFAR ResNets
and a GPT-style language model (:mod:`~jaxsparse.nn.transformer`). The sparse layers that run
on block-sparse kernels are in :mod:`jaxsparse.kernels`."""

from jaxsparse.nn import models, transformer
