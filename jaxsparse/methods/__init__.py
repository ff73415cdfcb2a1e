"""Sparse training methods: the static baselines, SET, the dynamic sparse training vocabulary
(RigL, SNFS, DSR and any drop/redistribute/grow combination) and DeepR."""

from jaxsparse.methods import deep_rewiring, dst, sparse_evolutionary, static
