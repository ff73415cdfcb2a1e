"""What a jitted function becomes on an accelerator, inspected from any machine.

JAX lowers a function for CUDA or TPU without the device being present. The
program it produces shows failures that a CPU run cannot: a Triton kernel the
GPU compiler will reject, or an integer matmul that XLA's GPU backend runs on
floating-point units (exact only below 2**24). These helpers make those checks
one call each, so the CPU test suite guards accelerator behaviour:

* :func:`lower` — the StableHLO module of ``fn(*args)`` for a platform;
* :func:`triton_kernels` / :func:`verify_triton_kernels` — the Triton modules a
  Pallas ``pallas_call`` embeds, parsed and run through the MLIR verifier, as the
  GPU compiler does before anything else;
* :func:`integer_dots` — ``dot_general`` ops over integer operands;
* :func:`host_transfers` — ops that move data between device and host mid-program;
* :func:`op_counts` — how many of each StableHLO op (program size);
* :func:`large_constants` — arrays written into the program as constants (its size again).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Iterator, NamedTuple

import jax
from jaxlib.mlir import ir

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# The custom call that carries a Triton module as MLIR bytecode (jaxlib <= 0.10.2 lowers
# Pallas to it on GPU; newer jaxlibs compile it to PTX while lowering, on a GPU machine).
TRITON_TARGET = "__gpu$xla.gpu.triton"


def lower(fn: Callable[..., Any], *args: Any, platform: str, **kwargs: Any) -> ir.Module:
  """The StableHLO module of ``jax.jit(fn)(*args, **kwargs)`` lowered for ``platform``.

  ``args`` may be arrays or ``jax.ShapeDtypeStruct``s; no device of that platform is needed.
  ``fn`` may also be a ``jax.stages.Traced`` (``jax.jit(f).trace(*args)``), given without
  ``args``, to lower one trace for several platforms.

  Raises:
    ValueError: naming ``platform`` when it is not one of :data:`PLATFORMS`.
  """
  if platform not in PLATFORMS:
    raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
  if isinstance(fn, jax.stages.Traced):
    traced = fn
  else:
    traced = (fn if hasattr(fn, "trace") else jax.jit(fn)).trace(*args, **kwargs)
  return traced.lower(lowering_platforms=(platform,)).compiler_ir("stablehlo")


def _ops(op: Any) -> Iterator[Any]:
  """Every operation nested in ``op`` (all regions, all blocks), depth first."""
  for region in op.regions:
    for block in region.blocks:
      for child in block.operations:
        yield child.operation
        yield from _ops(child.operation)


def op_counts(module: ir.Module) -> collections.Counter:
  """Count of each op name (``"stablehlo.gather"``, ...) in ``module``, nested ones included."""
  return collections.Counter(op.name for op in _ops(module.operation))


class TritonKernel(NamedTuple):
  """A Triton module embedded in a lowered program: the kernel's name and its MLIR bytecode."""
  name: str
  bytecode: bytes


def triton_kernels(module: ir.Module) -> list[TritonKernel]:
  """The Triton modules embedded in ``module`` (lowered for ``"cuda"`` or ``"rocm"``)."""
  out = []
  for op in _ops(module.operation):
    if op.name != "stablehlo.custom_call":
      continue
    if ir.StringAttr(op.attributes["call_target_name"]).value != TRITON_TARGET:
      continue
    config = ir.DictAttr(op.attributes["mhlo.backend_config"])
    out.append(TritonKernel(ir.StringAttr(config["name"]).value,
                            ir.StringAttr(config["ir"]).value_bytes))
  return out


def verify_triton_kernels(module: ir.Module) -> list[str]:
  """Parses every embedded Triton module in a fresh context and runs the MLIR verifier.

  This is the first thing the GPU compiler does with the module ("Failed to parse Triton
  module" on a device), so a kernel that passes here gets past that stage there.

  Returns:
    The names of the verified kernels, in program order.
  Raises:
    ValueError: when ``module`` embeds no Triton kernel (nothing would be checked).
    RuntimeError: naming the kernel and quoting the verifier for the first one that fails.
  """
  from jaxlib.triton import dialect as tt_dialect
  kernels = triton_kernels(module)
  if not kernels:
    raise ValueError("module embeds no Triton kernel: lower it for 'cuda' with the triton "
                     "backend (and a jaxlib that embeds the module as bytecode)")
  for k in kernels:
    ctx = ir.Context()
    tt_dialect.register_dialect(ctx)
    try:
      with ctx:
        parsed = ir.Module.parse(k.bytecode)
        if not parsed.operation.verify():
          raise RuntimeError("verifier returned false")
    except Exception as e:  # MLIRError, or the RuntimeError above
      raise RuntimeError(f"Triton kernel {k.name!r} does not verify: {e}") from e
  return [k.name for k in kernels]


class IntegerDot(NamedTuple):
  """A ``dot_general`` with integer operands: where it is and what it multiplies."""
  location: str
  operand_types: tuple[str, ...]


def integer_dots(module: ir.Module) -> list[IntegerDot]:
  """Every ``stablehlo.dot_general`` in ``module`` whose operands are integer (or bool) tensors.

  XLA's GPU backend computes such a dot on floating-point units, so a count above 2**24
  in an f32 accumulator is rounded; a program meant for GPU or TPU should hold none.
  """
  out = []
  for op in _ops(module.operation):
    if op.name != "stablehlo.dot_general":
      continue
    types = [ir.RankedTensorType(v.type).element_type for v in op.operands]
    if any(isinstance(t, ir.IntegerType) for t in types):
      out.append(IntegerDot(str(op.location), tuple(str(v.type) for v in op.operands)))
  return out


_HOST_OPS = ("stablehlo.send", "stablehlo.recv", "stablehlo.infeed", "stablehlo.outfeed")


def host_transfers(module: ir.Module) -> list[str]:
  """Ops in ``module`` that move data between the device and the host while it runs.

  Sends, receives, in/outfeeds and Python callbacks (``jax.debug.print``,
  ``jax.pure_callback``, ``io_callback``): each one stalls a GPU or TPU step on the host.
  A jitted train step should hold none. Returns one description per op.
  """
  out = []
  for op in _ops(module.operation):
    if op.name in _HOST_OPS:
      out.append(f"{op.name} at {op.location}")
    elif op.name == "stablehlo.custom_call":
      target = ir.StringAttr(op.attributes["call_target_name"]).value
      if "callback" in target:
        out.append(f"custom_call {target} at {op.location}")
  return out


class Constant(NamedTuple):
  """A constant array written into a lowered program: where it is, its type, its size."""
  location: str
  type: str
  elements: int


def large_constants(module: ir.Module, min_elements: int = 1024) -> list[Constant]:
  """Every ``stablehlo.constant`` in ``module`` of at least ``min_elements`` entries that are
  not all the same (a splat is stored as one value, whatever its shape).

  An index array baked into a program as a constant grows the program with the model:
  SET's train step on a 10M-parameter MLP once held 107 MB of them (214 MB of StableHLO),
  and XLA folded gathers through them at compile time (about 3 s of 4.8-5.6 on CPU). Built
  in the program from an iota, such an array costs a few ops whatever its size.

  Raises:
    ValueError: naming ``min_elements`` when it is not a positive int.
  """
  if isinstance(min_elements, bool) or not isinstance(min_elements, int) or min_elements < 1:
    raise ValueError(f"min_elements must be a positive int, got {min_elements!r}")
  out = []
  for op in _ops(module.operation):
    if op.name != "stablehlo.constant":
      continue
    t = ir.RankedTensorType(op.results[0].type)
    elements = math.prod(t.shape)
    if elements < min_elements:
      continue
    try:
      splat = ir.DenseElementsAttr(op.attributes["value"]).is_splat
    except (TypeError, ValueError):  # e.g. a dense_resource blob: never a splat
      splat = False
    if not splat:
      out.append(Constant(str(op.location), str(t), elements))
  return out
