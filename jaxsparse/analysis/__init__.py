"""Measuring a sparse model: FLOPs, storage formats and exports, and what a step becomes when
lowered for an accelerator (:mod:`~jaxsparse.analysis.lowering`)."""

from jaxsparse.analysis import flops, formats, lowering
