"""Stochastic sparsity as Flax layers: L0 hard-concrete gates and sparse variational dropout.

**L0 hard concrete** (Louizos, Welling & Kingma 2018, sec. 4). With
``beta = 2/3, gamma = -0.1, zeta = 1.1``, a gate with parameter ``log_alpha`` is

  u ~ U(0, 1);  s = sigmoid((log u - log(1 - u) + log_alpha) / beta);
  z = clip(s * (zeta - gamma) + gamma, 0, 1)                         (eq. 10)

with ``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (eq. 12),
so the expected L0 norm is the sum of that over the gates. At test time
``z = clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (eq. 13).
Gates sit on single weights (``gates="weight"``) or on groups: a Dense layer's
input neurons (``"neuron"``, a row of the kernel, as in the paper's code) or a
conv layer's output channels (``"channel"``). ``log_alpha`` is stored with a
shape that broadcasts against the kernel (``(in, 1)``, ``(1, 1, 1, out)``),
so a group's size is ``kernel.size / log_alpha.size`` and the expected-L0
penalty (:func:`l0_penalty`) counts expected non-zero *weights*.

**Sparse variational dropout** (Molchanov, Ashukha & Vetrov 2017). Each weight
has ``theta`` (the layer's ``kernel``) and ``log_sigma2``;
``log_alpha = log sigma^2 - log theta^2``. Training uses the local
reparameterisation trick (eq. 6): ``b ~ N(x theta, x^2 sigma^2)``. The KL
term is approximated by (eq. 14)

  -KL ~= k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(1 / alpha) - k1,
  k1 = 0.63576, k2 = 1.87320, k3 = 1.48695,

and weights with ``log_alpha > 3`` are removed at test time.
:func:`sparse_vd_to_masked` turns a trained model into ordinary
``kernel``/``bias`` params plus masks for :func:`jaxsparse.keep_masks`.

Layers come as flax.linen modules (``L0Dense``, ``L0Conv``, ``SparseVDDense``,
``SparseVDConv``; randomness from the ``"gates"`` / ``"noise"`` rng streams)
and flax.nnx twins with the suffix ``NNX``. Every layer takes
``deterministic`` (True: the test-time behaviour). The penalties and
conversions take a linen params dict, an ``nnx.State`` or an ``nnx.Module``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxsparse.core import masks as masks_lib

# Louizos et al. 2018, sec. 4 / appendix: stretch interval and temperature.
BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
# Molchanov et al. 2017, eq. 14.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
LOG_ALPHA_THRESHOLD = 3.0
"""Sparse VD removes weights with ``log_alpha > 3`` (Molchanov et al. 2017, sec. 4)."""

L0_GATES = ("weight", "neuron")
L0_CONV_GATES = ("weight", "channel")
_SUPPORTED_VD_DTYPES = (jnp.float32, jnp.float64, jnp.bfloat16)

# ------------------------------------------------------------------ L0: the distribution


def hard_concrete_sample(key: jax.Array, log_alpha: jax.Array, shape: Sequence[int] | None = None,
                         *, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA
                         ) -> jax.Array:
  """A hard-concrete gate sample (Louizos et al. 2018, eq. 10); ``shape`` broadcasts ``log_alpha``."""
  shape = jnp.shape(log_alpha) if shape is None else tuple(shape)
  dtype = jnp.result_type(log_alpha)
  u = jax.random.uniform(key, shape, dtype, minval=1e-6, maxval=1.0 - 1e-6)
  s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / beta)
  return jnp.clip(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_test_gate(log_alpha: jax.Array, *, gamma: float = GAMMA, zeta: float = ZETA
                            ) -> jax.Array:
  """The deterministic test-time gate ``clip(sigmoid(log_alpha) (zeta - gamma) + gamma, 0, 1)`` (eq. 13)."""
  return jnp.clip(jax.nn.sigmoid(log_alpha) * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_prob_nonzero(log_alpha: jax.Array, *, beta: float = BETA, gamma: float = GAMMA,
                               zeta: float = ZETA) -> jax.Array:
  """``P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta))`` (eq. 12)."""
  return jax.nn.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def expected_l0(log_alpha: jax.Array, group_size: int = 1, *, beta: float = BETA,
                gamma: float = GAMMA, zeta: float = ZETA) -> jax.Array:
  """Expected L0 norm: ``group_size * sum_j P(z_j != 0)`` (eq. 12; group form, sec. 4.2)."""
  return group_size * jnp.sum(hard_concrete_prob_nonzero(log_alpha, beta=beta, gamma=gamma,
                                                         zeta=zeta))


def _log_alpha_init(droprate_init: float) -> Callable:
  """Louizos et al.'s init: ``N(log(1 - p) - log(p), 0.01^2)`` for a drop rate ``p``."""
  mean = math.log(1.0 - droprate_init) - math.log(droprate_init)

  def init(key, shape, dtype=jnp.float32):
    return mean + 0.01 * jax.random.normal(key, shape, dtype)
  return init


def _check_l0_args(gates: str, allowed: tuple, droprate_init: float) -> None:
  if gates not in allowed:
    raise ValueError(f"gates must be one of {allowed}, got {gates!r}")
  if not 0.0 < droprate_init < 1.0:
    raise ValueError(f"droprate_init must be in (0, 1), got {droprate_init!r}")


def _gate_shape(kernel_shape: tuple, gates: str) -> tuple:
  if gates == "weight":
    return kernel_shape
  if gates == "neuron":  # Dense input neurons: rows of (in, out)
    return (kernel_shape[0], 1)
  return (1,) * (len(kernel_shape) - 1) + (kernel_shape[-1],)  # conv output channels


def _l0_dense_forward(x, kernel, bias, log_alpha, gates, deterministic, key):
  if deterministic:
    y = x @ (kernel * hard_concrete_test_gate(log_alpha).astype(kernel.dtype))
  elif gates == "weight":  # one sample of the weight gates per minibatch
    y = x @ (kernel * hard_concrete_sample(key, log_alpha).astype(kernel.dtype))
  else:  # one sample per example of the input-neuron gates
    z = hard_concrete_sample(key, log_alpha[:, 0], x.shape)
    y = (x * z.astype(x.dtype)) @ kernel
  return y if bias is None else y + bias


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, tuple(strides), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _l0_conv_forward(x, kernel, bias, log_alpha, gates, deterministic, key, strides, padding):
  if deterministic:
    y = _conv(x, kernel * hard_concrete_test_gate(log_alpha).astype(kernel.dtype), strides, padding)
  elif gates == "weight":
    y = _conv(x, kernel * hard_concrete_sample(key, log_alpha).astype(kernel.dtype), strides, padding)
  else:  # one sample per example of the output-channel gates, on the conv output
    y = _conv(x, kernel, strides, padding)
    y = y * hard_concrete_sample(key, log_alpha, (x.shape[0],) + (1,) * (y.ndim - 2)
                                 + (y.shape[-1],)).astype(y.dtype)
  return y if bias is None else y + bias


# ------------------------------------------------------------------ sparse VD: the math


def vd_neg_kl(log_alpha: jax.Array) -> jax.Array:
  """Molchanov et al. 2017, eq. 14: ``-KL ~= k1 sigmoid(k2 + k3 la) - 0.5 log1p(1/alpha) - k1``."""
  return K1 * jax.nn.sigmoid(K2 + K3 * log_alpha) - 0.5 * jax.nn.softplus(-log_alpha) - K1


def vd_log_alpha(theta: jax.Array, log_sigma2: jax.Array, eps: float = 1e-8) -> jax.Array:
  """``log alpha = log sigma^2 - log theta^2`` (``eps`` keeps it finite at theta = 0)."""
  return log_sigma2 - jnp.log(jnp.square(theta) + eps)


def _check_vd_input(x: jax.Array) -> None:
  dtype = jnp.result_type(x)
  if not any(dtype == d for d in _SUPPORTED_VD_DTYPES):
    why = (" (float16's range cannot hold the variances of the local reparameterisation: "
           "sigma^2 starts at exp(-10))" if dtype == jnp.float16 else "")
    raise TypeError(f"x: sparse VD layers need float32, float64 or bfloat16 inputs, got {dtype}"
                    f"{why}; cast the input first")


def _vd_noise(key, mean, var):
  return mean + jnp.sqrt(var + 1e-8) * jax.random.normal(key, mean.shape, mean.dtype)


def _vd_dense_forward(x, theta, log_sigma2, bias, deterministic, key, threshold):
  _check_vd_input(x)
  x = x.astype(theta.dtype)
  if deterministic:
    y = x @ jnp.where(vd_log_alpha(theta, log_sigma2) > threshold, 0.0, theta)
  else:  # local reparameterisation trick (eq. 6)
    y = _vd_noise(key, x @ theta, jnp.square(x) @ jnp.exp(log_sigma2))
  return y if bias is None else y + bias


def _vd_conv_forward(x, theta, log_sigma2, bias, deterministic, key, threshold, strides, padding):
  _check_vd_input(x)
  x = x.astype(theta.dtype)
  if deterministic:
    y = _conv(x, jnp.where(vd_log_alpha(theta, log_sigma2) > threshold, 0.0, theta), strides,
              padding)
  else:
    y = _vd_noise(key, _conv(x, theta, strides, padding),
                  _conv(jnp.square(x), jnp.exp(log_sigma2), strides, padding))
  return y if bias is None else y + bias


# ------------------------------------------------------------------ flax.linen layers


class L0Dense(nn.Module):
  """Dense layer with hard-concrete L0 gates on its weights or its input neurons (Louizos 2018)."""

  features: int
  use_bias: bool = True
  gates: str = "weight"
  droprate_init: float = 0.5
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_l0_args(self.gates, L0_GATES, self.droprate_init)
    kshape = (x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kshape)
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    log_alpha = self.param("log_alpha", _log_alpha_init(self.droprate_init),
                           _gate_shape(kshape, self.gates))
    key = None if deterministic else self.make_rng("gates")
    return _l0_dense_forward(x, kernel, bias, log_alpha, self.gates, deterministic, key)


class L0Conv(nn.Module):
  """NHWC conv with hard-concrete L0 gates on its weights or output channels (Louizos 2018)."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  gates: str = "weight"
  droprate_init: float = 0.5
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_l0_args(self.gates, L0_CONV_GATES, self.droprate_init)
    kshape = (*self.kernel_size, x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kshape)
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    log_alpha = self.param("log_alpha", _log_alpha_init(self.droprate_init),
                           _gate_shape(kshape, self.gates))
    key = None if deterministic else self.make_rng("gates")
    return _l0_conv_forward(x, kernel, bias, log_alpha, self.gates, deterministic, key,
                            self.strides, self.padding)


class SparseVDDense(nn.Module):
  """Sparse variational dropout Dense layer (Molchanov 2017), local reparameterisation."""

  features: int
  use_bias: bool = True
  log_sigma2_init: float = -10.0
  threshold: float = LOG_ALPHA_THRESHOLD
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_vd_input(x)
    kshape = (x.shape[-1], self.features)
    theta = self.param("kernel", self.kernel_init, kshape)
    log_sigma2 = self.param("log_sigma2", nn.initializers.constant(self.log_sigma2_init), kshape)
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    key = None if deterministic else self.make_rng("noise")
    return _vd_dense_forward(x, theta, log_sigma2, bias, deterministic, key, self.threshold)


class SparseVDConv(nn.Module):
  """Sparse variational dropout NHWC conv layer (Molchanov 2017), local reparameterisation."""

  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  log_sigma2_init: float = -10.0
  threshold: float = LOG_ALPHA_THRESHOLD
  kernel_init: Callable = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_vd_input(x)
    kshape = (*self.kernel_size, x.shape[-1], self.features)
    theta = self.param("kernel", self.kernel_init, kshape)
    log_sigma2 = self.param("log_sigma2", nn.initializers.constant(self.log_sigma2_init), kshape)
    bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
    key = None if deterministic else self.make_rng("noise")
    return _vd_conv_forward(x, theta, log_sigma2, bias, deterministic, key, self.threshold,
                            self.strides, self.padding)


# ------------------------------------------------------------------ flax.nnx layers


def _stream(rngs: nnx.Rngs, name: str):
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
  return rngs[name].fork()


class L0DenseNNX(nnx.Module):
  """nnx twin of :class:`L0Dense` (params ``kernel``, ``bias``, ``log_alpha``; stream ``gates``)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               gates: str = "weight", droprate_init: float = 0.5, rngs: nnx.Rngs):
    _check_l0_args(gates, L0_GATES, droprate_init)
    kshape = (in_features, out_features)
    self.gates = gates
    self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), kshape))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.log_alpha = nnx.Param(_log_alpha_init(droprate_init)(rngs.params(),
                                                              _gate_shape(kshape, gates)))
    self.rngs = _stream(rngs, "gates")

  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    key = None if deterministic else self.rngs()
    bias = None if self.bias is None else self.bias[...]
    return _l0_dense_forward(x, self.kernel[...], bias, self.log_alpha[...], self.gates,
                             deterministic, key)


class L0ConvNNX(nnx.Module):
  """nnx twin of :class:`L0Conv`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
               strides: Sequence[int] = (1, 1), padding: str = "SAME", use_bias: bool = True,
               gates: str = "weight", droprate_init: float = 0.5, rngs: nnx.Rngs):
    _check_l0_args(gates, L0_CONV_GATES, droprate_init)
    kshape = (*kernel_size, in_features, out_features)
    self.gates, self.strides, self.padding = gates, tuple(strides), padding
    self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), kshape))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.log_alpha = nnx.Param(_log_alpha_init(droprate_init)(rngs.params(),
                                                              _gate_shape(kshape, gates)))
    self.rngs = _stream(rngs, "gates")

  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    key = None if deterministic else self.rngs()
    bias = None if self.bias is None else self.bias[...]
    return _l0_conv_forward(x, self.kernel[...], bias, self.log_alpha[...], self.gates,
                            deterministic, key, self.strides, self.padding)


class SparseVDDenseNNX(nnx.Module):
  """nnx twin of :class:`SparseVDDense` (params ``kernel``, ``log_sigma2``, ``bias``; stream ``noise``)."""

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               log_sigma2_init: float = -10.0, threshold: float = LOG_ALPHA_THRESHOLD,
               rngs: nnx.Rngs):
    kshape = (in_features, out_features)
    self.threshold = threshold
    self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), kshape))
    self.log_sigma2 = nnx.Param(jnp.full(kshape, log_sigma2_init, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.rngs = _stream(rngs, "noise")

  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_vd_input(x)
    key = None if deterministic else self.rngs()
    bias = None if self.bias is None else self.bias[...]
    return _vd_dense_forward(x, self.kernel[...], self.log_sigma2[...], bias, deterministic, key,
                             self.threshold)


class SparseVDConvNNX(nnx.Module):
  """nnx twin of :class:`SparseVDConv`."""

  def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
               strides: Sequence[int] = (1, 1), padding: str = "SAME", use_bias: bool = True,
               log_sigma2_init: float = -10.0, threshold: float = LOG_ALPHA_THRESHOLD,
               rngs: nnx.Rngs):
    kshape = (*kernel_size, in_features, out_features)
    self.threshold, self.strides, self.padding = threshold, tuple(strides), padding
    self.kernel = nnx.Param(nn.initializers.lecun_normal()(rngs.params(), kshape))
    self.log_sigma2 = nnx.Param(jnp.full(kshape, log_sigma2_init, jnp.float32))
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.rngs = _stream(rngs, "noise")

  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_vd_input(x)
    key = None if deterministic else self.rngs()
    bias = None if self.bias is None else self.bias[...]
    return _vd_conv_forward(x, self.kernel[...], self.log_sigma2[...], bias, deterministic, key,
                            self.threshold, self.strides, self.padding)


# ------------------------------------------------------------------ penalties and conversion


def _as_dict(tree: Any) -> Any:
  """A nested dict of arrays from a linen params dict, an ``nnx.State`` or an ``nnx.Module``."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)
  return tree


def _layers(tree: Any, marker: str) -> list[dict]:
  """Every sub-dict holding ``marker`` and ``kernel`` (a gated / VD layer's params)."""
  out = []
  if isinstance(tree, dict):
    if marker in tree and "kernel" in tree:
      out.append(tree)
    else:
      for v in tree.values():
        out.extend(_layers(v, marker))
  return out


def l0_penalty(params: Any) -> jax.Array:
  """Expected number of non-zero weights over every L0 layer: ``sum |g| P(z_g != 0)``."""
  total = jnp.float32(0)
  for layer in _layers(_as_dict(params), "log_alpha"):
    la = layer["log_alpha"]
    total = total + expected_l0(la, int(np.prod(jnp.shape(layer["kernel"]))) // int(np.size(la)))
  return total


def l0_zero_gates(params: Any) -> tuple[int, int]:
  """``(exactly-zero test-time gates, all gates)`` over every L0 layer (host-side)."""
  zero = total = 0
  for layer in _layers(_as_dict(params), "log_alpha"):
    z = hard_concrete_test_gate(layer["log_alpha"])
    zero += int(jnp.sum(z == 0))
    total += int(z.size)
  return zero, total


def sparse_vd_kl(params: Any) -> jax.Array:
  """The KL term ``sum -vd_neg_kl(log_alpha)`` over every sparse VD layer's weights."""
  total = jnp.float32(0)
  for layer in _layers(_as_dict(params), "log_sigma2"):
    total = total - jnp.sum(vd_neg_kl(vd_log_alpha(layer["kernel"], layer["log_sigma2"])))
  return total


def _convert(tree: Any, marker: str, fn: Callable[[dict], tuple[dict, dict]]) -> tuple[Any, Any]:
  if isinstance(tree, dict):
    if marker in tree and "kernel" in tree:
      return fn(tree)
    pairs = {k: _convert(v, marker, fn) for k, v in tree.items()}
    return {k: p for k, (p, _) in pairs.items()}, {k: m for k, (_, m) in pairs.items()}
  return tree, jax.tree.map(lambda _: masks_lib.dense_mask(), tree)


def _plain_layer(layer: dict, kernel: jax.Array, keep: jax.Array) -> tuple[dict, dict]:
  params = {"kernel": jnp.where(keep, kernel, 0.0).astype(layer["kernel"].dtype)}
  masks = {"kernel": keep}
  if "bias" in layer:
    params["bias"], masks["bias"] = layer["bias"], masks_lib.dense_mask()
  return params, masks


def l0_to_masked(params: Any) -> tuple[Any, Any]:
  """L0 layers -> ordinary ``{kernel, bias}`` params (kernel times the test-time gate) and masks.

  The masks are False where the test-time gate is exactly zero; other leaves
  pass through with the dense mask. The params fit the same model built with
  ``nn.Dense`` / ``nnx.Linear`` layers of the same names.
  """
  def fn(layer):
    z = hard_concrete_test_gate(layer["log_alpha"])
    keep = jnp.broadcast_to(z > 0, jnp.shape(layer["kernel"]))
    return _plain_layer(layer, layer["kernel"] * z, keep)
  return _convert(_as_dict(params), "log_alpha", fn)


def sparse_vd_to_masked(params: Any, threshold: float = LOG_ALPHA_THRESHOLD) -> tuple[Any, Any]:
  """Sparse VD layers -> ordinary ``{kernel, bias}`` params and masks (``log_alpha <= threshold`` kept)."""
  def fn(layer):
    keep = vd_log_alpha(layer["kernel"], layer["log_sigma2"]) <= threshold
    return _plain_layer(layer, layer["kernel"], keep)
  return _convert(_as_dict(params), "log_sigma2", fn)


def sparse_vd_sparsity(params: Any, threshold: float = LOG_ALPHA_THRESHOLD) -> float:
  """Fraction of sparse VD weights with ``log_alpha > threshold``."""
  _, masks = sparse_vd_to_masked(params, threshold)
  kept = [m for m in jax.tree.leaves(masks) if jnp.ndim(m)]
  total = sum(m.size for m in kept)
  return 1.0 - sum(int(jnp.sum(m)) for m in kept) / total if total else 0.0
