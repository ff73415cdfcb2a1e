"""Measuring a sparse model: FLOPs, storage formats and exports, Deep Compression's storage
(:mod:`~jaxsparse.analysis.compression`: relative indices, shared weights, Huffman coding),
what a step becomes when lowered for an accelerator (:mod:`~jaxsparse.analysis.lowering`),
and what a method does to its masks over training (:mod:`~jaxsparse.analysis.structure`)."""

from jaxsparse.analysis import compression, flops, formats, lowering, structure
