"""Measuring a sparse model: FLOPs, storage formats and exports, what a step becomes when
lowered for an accelerator (:mod:`~jaxsparse.analysis.lowering`), and what a method does to
its masks over training (:mod:`~jaxsparse.analysis.structure`)."""

from jaxsparse.analysis import flops, formats, lowering, structure
