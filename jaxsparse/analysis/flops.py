"""Forward-pass FLOPs of a flax.linen model, dense and at a mask tree (theoretical speedup).

Convention: only the multiply-adds of ``nn.Dense`` and ``nn.Conv`` kernels are
counted, one multiply-add (1 MAC) = 2 FLOPs (:data:`FLOPS_PER_MAC`), per
example. Biases, activations, pooling, BatchNorm and the padded zeros'
skipping are not counted (they are small next to the matmuls and do not
change with the mask). So for one example:

* ``Dense`` with kernel ``(n_in, n_out)``: ``2 * n_in * n_out`` dense,
  ``2 * kept`` sparse (times the leading non-batch positions, if any);
* ``Conv`` with kernel ``(kh, kw, c_in / groups, c_out)`` and an output of
  ``H_out x W_out`` positions: ``2 * H_out * W_out * kh * kw * c_in / groups * c_out``
  dense and ``2 * H_out * W_out * kept`` sparse (every kept weight is used at
  every output position, border positions of SAME padding included).

The sparse count is the theoretical cost of skipping every masked weight; the
ratio dense / sparse is the theoretical speedup (what ShrinkBench reports), not
a measured one. Layer shapes are found by tracing the model with
``jax.eval_shape`` (no compute), so any linen model built from Dense/Conv works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import masks as masks_lib

FLOPS_PER_MAC = 2
"""FLOPs counted per multiply-add."""


class LayerFlops(NamedTuple):
  """Forward FLOPs of one Dense/Conv kernel for one example."""
  name: str            # the kernel's leaf name, e.g. "conv1/kernel"
  kind: str            # "Dense" or "Conv"
  kernel_shape: tuple
  positions: int       # how many times each weight is used (output positions)
  kept: int            # kept weights of the kernel (all of them without a mask)
  dense: int           # FLOPs with every weight
  sparse: int          # FLOPs with only the kept weights

  @property
  def speedup(self) -> float:
    return self.dense / self.sparse if self.sparse else math.inf


def _layer_uses(model: nn.Module, variables: dict, input_shape: Sequence[int]
                ) -> list[tuple[str, str, tuple, int]]:
  """(kernel leaf name, kind, kernel shape, positions) of every Dense/Conv call, in call order."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      kind = "Conv" if isinstance(module, nn.Conv) else "Dense"
      name = "/".join(str(p) for p in module.path) + "/kernel"
      kernel = module.variables["params"]["kernel"]
      positions = math.prod(out.shape[1:-1])  # batch of 1; spatial (or leading) positions
      found.append((name, kind, tuple(kernel.shape), int(positions)))
    return out

  x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  return found


def count_flops(model: nn.Module, params: Any, input_shape: Sequence[int], masks: Any = None, *,
                batch_stats: Any = None) -> list[LayerFlops]:
  """Per-kernel forward FLOPs of ``model`` for one example of ``input_shape`` (no batch axis).

  Args:
    model: a flax.linen model taking ``(x, train=False)``.
    params: its params tree (arrays, or ``jax.ShapeDtypeStruct`` from ``jax.eval_shape``:
      only shapes are used).
    input_shape: the shape of one example, e.g. ``(28, 28, 1)``.
    masks: a mask tree for ``params`` (see :mod:`jaxsparse.core.masks`); None = dense.
    batch_stats: the model's ``batch_stats`` collection, if it has BatchNorm.

  Raises:
    ValueError: naming ``masks`` when it does not match ``params``.
  """
  kept_of: dict[str, int] = {}
  if masks is not None:
    masks_lib.check_masks(params, masks)
    # From the masks alone: the FLOPs of the masked model, whatever the params hold.
    names, p_leaves, _ = masks_lib.flatten_named(params)
    for name, p, m in zip(names, p_leaves, masks_lib.flatten_named(masks)[1]):
      kept_of[name] = int(np.count_nonzero(np.broadcast_to(np.asarray(m, bool), np.shape(p))))
  variables = {"params": params}
  if batch_stats is not None and jax.tree.leaves(batch_stats):
    variables["batch_stats"] = batch_stats
  out = []  # a layer called twice appears twice
  for name, kind, shape, positions in _layer_uses(model, variables, input_shape):
    size = math.prod(shape)
    kept = kept_of.get(name, size)
    out.append(LayerFlops(name, kind, shape, positions, kept,
                          FLOPS_PER_MAC * positions * size, FLOPS_PER_MAC * positions * kept))
  return out


def total_flops(layers: Sequence[LayerFlops]) -> tuple[int, int]:
  """``(dense, sparse)`` FLOPs summed over ``layers``."""
  return sum(layer.dense for layer in layers), sum(layer.sparse for layer in layers)


def flops_summary(layers: Sequence[LayerFlops]) -> str:
  """A printable per-kernel table of dense and sparse FLOPs and the speedup, with the total."""
  width = max([len(layer.name) for layer in layers] + [5])
  lines = [f"{'layer':<{width}}  {'kind':<5} {'dense FLOPs':>14} {'sparse FLOPs':>14} {'speedup':>8}"]
  for layer in layers:
    lines.append(f"{layer.name:<{width}}  {layer.kind:<5} {layer.dense:>14,} {layer.sparse:>14,} "
                 f"{layer.speedup:>7.2f}x")
  dense, sparse = total_flops(layers)
  speedup = dense / sparse if sparse else math.inf
  lines.append(f"{'total':<{width}}  {'':<5} {dense:>14,} {sparse:>14,} {speedup:>7.2f}x")
  return "\n".join(lines)
