"""Sparse Dense layers (flax.linen and flax.nnx) backed by the block-sparse kernel.

The layer keeps a dense ``kernel`` parameter (so every jaxsparse method,
optimizer and checkpoint sees the usual ``(in, out)`` leaf) and a boolean
mask of the kernel's shape. At each call the masked kernel is converted to
:class:`~jaxsparse.kernels.bsr.BSR` inside ``jit`` (fixed ``nnz_max``, so a
mask update does not recompile) and multiplied with
:func:`~jaxsparse.kernels.pallas_matmul.bsr_matmul`; the gradient reaches the
dense kernel through the block gather, non-zero only in stored blocks.

Two paths, chosen statically by :func:`choose_path` (ask it, or the layer's
``kernel_path``, which one a layer uses):

* ``"bsr"``: the Pallas kernel;
* ``"masked_dense"``: ``x @ where(mask, kernel, 0)``, used when the block
  structure cannot help: a block shape that does not divide the kernel, no
  accelerator (Pallas would only run in interpret mode), or ``nnz_max`` above
  ``max_density`` of all blocks.

Both compute the same function. Note: on the ``"bsr"`` path the kernel's
gradient is zero in dropped blocks, so a grow criterion that needs the dense
gradient (RigL) must get it from the masked-dense path.

Masks come from jaxsparse: in linen, pass the mask tree as the ``"masks"``
collection, ``model.apply({"params": params, "masks": get_masks(opt_state)},
x)`` (a missing collection or the scalar dense mask keeps every block); in
nnx, :func:`load_masks` copies the mask tree into the layers' ``mask``
variables.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.core import masks as masks_lib
from jaxsparse.kernels import bsr as bsr_lib
from jaxsparse.kernels import pallas_matmul

Array = jax.Array
MODES = ("auto", "bsr", "masked_dense")


class KernelPath(NamedTuple):
  """Which matmul a sparse layer runs, and why."""
  path: str     # "bsr" or "masked_dense"
  reason: str


def choose_path(kernel_shape: tuple[int, ...], block_shape: tuple[int, int],
                nnz_max: int | None = None, *, mode: str = "auto",
                backend: str | pallas_matmul.Backend | None = None,
                max_density: float = 0.6) -> KernelPath:
  """Static choice between the block-sparse kernel and the masked dense matmul.

  Args:
    kernel_shape: the ``(in, out)`` kernel shape.
    block_shape: ``(bk, bn)``.
    nnz_max: the block budget (``None``: every block).
    mode: ``"auto"``, or force ``"bsr"`` / ``"masked_dense"``.
    backend: the kernel backend (see :func:`pallas_matmul.resolve_backend`).
    max_density: in ``"auto"``, the largest ``nnz_max / n_blocks`` for which
      the kernel is used (the dense matmul wins on denser matrices).

  Raises:
    ValueError: naming ``mode``, or the kernel/block shape when ``mode="bsr"``
      cannot be honoured.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
  if len(kernel_shape) != 2:
    raise ValueError(f"kernel must be 2D (in, out) for a sparse Dense layer, got shape "
                     f"{tuple(kernel_shape)}.")
  if mode == "masked_dense":
    return KernelPath("masked_dense", "requested (mode='masked_dense')")
  try:
    bk, bn = bsr_lib.check_block_shape(kernel_shape, block_shape)
  except ValueError:
    if mode == "bsr":
      raise
    return KernelPath("masked_dense", f"block_shape {tuple(block_shape)} does not divide the "
                      f"kernel shape {tuple(kernel_shape)}")
  be = pallas_matmul.resolve_backend(backend)
  if mode == "bsr":
    return KernelPath("bsr", f"requested (mode='bsr', backend {be.name})")
  if be.interpret or be.strategy == "xla":
    return KernelPath("masked_dense", f"no accelerator kernel on platform {be.platform!r} "
                      f"(backend {be.name})")
  total = (kernel_shape[0] // bk) * (kernel_shape[1] // bn)
  density = (total if nnz_max is None else min(nnz_max, total)) / total
  if density > max_density:
    return KernelPath("masked_dense", f"nnz_max allows {density:.0%} of the blocks "
                      f"(> max_density {max_density:.0%})")
  return KernelPath("bsr", f"backend {be.name}, at most {density:.0%} of the blocks")


def sparse_dense(x: Array, kernel: Array, mask: Any = None, bias: Array | None = None, *,
                 block_shape: tuple[int, int] = (64, 64), nnz_max: int | None = None,
                 path: str = "bsr", backend: str | pallas_matmul.Backend | None = None,
                 block_m: int | None = None) -> Array:
  """``x @ where(mask, kernel, 0) + bias`` on the given path (functional core of the layers).

  ``mask`` may be ``None``/the scalar dense mask, an elementwise mask of the
  kernel's shape or a block mask.

  Raises:
    ValueError: naming ``kernel`` when it is not 2D, ``path`` when unknown,
      ``x`` when its last axis or dtype does not match the kernel.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim != 2:
    raise ValueError(f"kernel must be 2D (in, out) for a sparse Dense layer, got shape "
                     f"{kernel.shape}.")
  if x.shape[-1] != kernel.shape[0]:
    raise ValueError(f"x has shape {x.shape}; its last axis must equal the kernel's input "
                     f"dimension {kernel.shape[0]}.")
  if path == "bsr":
    w = bsr_lib.bsr_from_dense(kernel, mask, block_shape, nnz_max)
    y = pallas_matmul.bsr_matmul(x, w, backend=backend, block_m=block_m)
  elif path == "masked_dense":
    if x.dtype != kernel.dtype:
      raise ValueError(f"x has dtype {x.dtype} but kernel has dtype {kernel.dtype}.")
    if mask is not None and jnp.ndim(mask) == 2 and jnp.shape(mask) != kernel.shape:
      mask = bsr_lib.expand_block_mask(jnp.asarray(mask), block_shape)
    w = kernel if mask is None else jnp.where(mask, kernel, jnp.zeros_like(kernel))
    y = jnp.matmul(x, w)   # XLA accumulates low-precision dots in float32 on GPU/TPU
  else:
    raise ValueError(f"path must be 'bsr' or 'masked_dense', got {path!r}.")
  return y if bias is None else y + bias.astype(y.dtype)


class SparseDense(nn.Module):
  """A linen ``Dense`` whose matmul skips the blocks its jaxsparse mask removes.

  The mask is read from the ``"masks"`` collection (entry ``kernel``), i.e.
  the jaxsparse mask tree passed next to the params. Inputs and kernel are
  cast to ``dtype`` (default: their promoted dtype); accumulation is float32.
  """
  features: int
  block_shape: tuple[int, int] = (64, 64)
  nnz_max: int | None = None
  mode: str = "auto"
  backend: str | pallas_matmul.Backend | None = None
  max_density: float = 0.6
  block_m: int | None = None
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Array] = nn.initializers.zeros_init()

  def kernel_path(self, in_features: int) -> KernelPath:
    """The path this layer takes for inputs with ``in_features`` features."""
    return choose_path((in_features, self.features), self.block_shape, self.nnz_max,
                       mode=self.mode, backend=self.backend, max_density=self.max_density)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,),
                      self.param_dtype) if self.use_bias else None
    mask = self.get_variable("masks", "kernel") if self.has_variable("masks", "kernel") else None
    dtype = self.dtype or jnp.result_type(x, kernel)
    choice = self.kernel_path(x.shape[-1])
    return sparse_dense(x.astype(dtype), kernel.astype(dtype), mask,
                        None if bias is None else bias.astype(dtype),
                        block_shape=self.block_shape, nnz_max=self.nnz_max, path=choice.path,
                        backend=self.backend, block_m=self.block_m)


class SparseMask(nnx.Variable):
  """The boolean mask of a :class:`SparseLinear` kernel (not a Param: optimizers skip it)."""


class SparseLinear(nnx.Module):
  """An nnx ``Linear`` whose matmul skips the blocks its mask removes (see :class:`SparseDense`)."""

  def __init__(self, in_features: int, out_features: int, *,
               block_shape: tuple[int, int] = (64, 64), nnz_max: int | None = None,
               mode: str = "auto", backend: str | pallas_matmul.Backend | None = None,
               max_density: float = 0.6,
               block_m: int | None = None, use_bias: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               kernel_init: Callable[..., Array] = nn.initializers.lecun_normal(),
               bias_init: Callable[..., Array] = nn.initializers.zeros_init(),
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.block_shape, self.nnz_max, self.mode = tuple(block_shape), nnz_max, mode
    self.backend, self.max_density, self.block_m = backend, max_density, block_m
    self.dtype = dtype
    self.path = self.kernel_path()   # validates mode / shapes at construction
    self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias \
        else None
    self.mask = SparseMask(jnp.ones((in_features, out_features), bool))

  def kernel_path(self) -> KernelPath:
    """The path this layer takes (static)."""
    return choose_path((self.in_features, self.out_features), self.block_shape, self.nnz_max,
                       mode=self.mode, backend=self.backend, max_density=self.max_density)

  def __call__(self, x: Array) -> Array:
    kernel = self.kernel[...]
    dtype = self.dtype or jnp.result_type(x, kernel)
    bias = None if self.bias is None else self.bias[...].astype(dtype)
    return sparse_dense(x.astype(dtype), kernel.astype(dtype), self.mask[...], bias,
                        block_shape=self.block_shape, nnz_max=self.nnz_max,
                        path=self.path.path, backend=self.backend, block_m=self.block_m)


def load_masks(model: nnx.Module, masks: Any) -> None:
  """Copies a jaxsparse mask tree (shaped like the model's Param state) into the
  ``mask`` of every :class:`SparseLinear` in ``model``; a dense (scalar) mask
  keeps every weight.

  Raises:
    ValueError: naming the layer when ``masks`` has no entry for its kernel or
      the mask's shape is wrong.
  """
  by_name = dict(zip(masks_lib.leaf_names(masks), jax.tree.leaves(masks)))
  for path, module in nnx.iter_modules(model):
    if not isinstance(module, SparseLinear):
      continue
    name = "/".join(str(p) for p in (*path, "kernel"))
    if name not in by_name:
      raise ValueError(f"masks: no mask for SparseLinear kernel '{name}'.")
    m = jnp.asarray(by_name[name])
    if m.ndim == 0:
      m = jnp.broadcast_to(m, module.mask.shape)
    if m.shape != module.mask.shape or m.dtype != jnp.bool_:
      raise ValueError(f"masks: '{name}' has shape {m.shape} and dtype {m.dtype}; expected a "
                       f"bool mask of shape {module.mask.shape}.")
    module.mask[...] = m
