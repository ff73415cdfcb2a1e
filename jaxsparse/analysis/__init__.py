"""Measuring a sparse model: FLOPs, storage formats and exports, Deep Compression's storage
(:mod:`~jaxsparse.analysis.compression`: relative indices, shared weights, Huffman coding),
what a step becomes when lowered for an accelerator (:mod:`~jaxsparse.analysis.lowering`),
what a method does to its masks over training (:mod:`~jaxsparse.analysis.structure`), and
pruned-parameter efficiency for comparing sparsities (:mod:`~jaxsparse.analysis.efficiency`)."""

from jaxsparse.analysis import compression, efficiency, flops, formats, lowering, structure
