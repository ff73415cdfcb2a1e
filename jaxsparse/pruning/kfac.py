"""Kronecker-factored structured pruning: Kron-OBD, Kron-OBS and EigenDamage (Wang et al. 2019).

Wang, Grosse, Fidler & Zhang (2019), "EigenDamage: Structured Pruning in the
Kronecker-Factored Eigenbasis" (ICML). The Fisher of one layer is replaced by its
K-FAC approximation (Martens & Grosse 2015; for convolutions, KFC: Grosse & Martens
2016)::

  F ~= A (x) S,   A = E[a a^T],   S = E[g g^T]

where ``a`` is the layer's input (for a conv, one unfolded patch, or with
``conv_factor="channel"`` one kernel offset's input channels; with a bias, a
trailing 1, or ``1 / (kh kw)`` per offset, is appended) and ``g`` the gradient of one
example's loss w.r.t. the layer's pre-activation output. In flax's ``(in, out)`` layout the
layer's weights with the bias as an extra row form ``W`` of shape ``(d_in [+1], d_out)``; filter j
(output channel j) is the column ``F_j = W[:, j]`` and ``vec(W)`` is ordered so
that the Kronecker product above (``A`` over inputs, ``S`` over outputs) is
exact for one example at one position. For conv layers (and Dense layers
applied at several positions, e.g. tokens), KFC's spatial homogeneity and
uncorrelated-derivatives assumptions give ``A`` = the mean of ``a a^T`` over
examples *and positions* and ``S`` = the mean over examples of the *sum* over
positions of ``g g^T``, so that ``A (x) S`` has the Fisher's scale.

Criteria (per filter j; higher = keep, like :mod:`jaxsparse.pruning.criteria`):

* **Kron-OBD** (structured OBD, ``1/2 F_j^T H_jj F_j``, with the K-FAC block ``H_jj = S_jj A``):
  ``dL_j = 1/2 S_jj F_j^T A F_j``.
* **Kron-OBS** (structured OBS with ``H^-1 = A^-1 (x) S^-1``):
  ``dL_j = 1/2 F_j^T A F_j / [S^-1]_jj``. Removing the set Q of filters at the least
  quadratic cost moves ``W`` by ``dW = -W[:, Q] C^T`` with
  ``C = S^-1[:, Q] ([S^-1]_QQ)^-1`` (``A`` cancels); for one filter this is the paper's
  ``-S^-1 e_j (x) F_j / [S^-1]_jj``. It is :func:`jaxsparse.pruning.obs.compensating_update`
  applied to every row of ``W`` with ``H^-1 = S^-1``. The factors are damped as in
  K-FAC (factored Tikhonov damping with pi, Martens & Grosse 2015, sec. 6.3):
  ``A + pi sqrt(lambda) I`` and ``S + sqrt(lambda) / pi I``,
  ``pi = sqrt((tr A / dim A) / (tr S / dim S))``.
* **EigenDamage**: with ``A = Q_A L_A Q_A^T`` and ``S = Q_S L_S Q_S^T``
  the weights in the Kronecker-factored eigenbasis are ``W' = Q_A^T W Q_S``,
  where the Fisher is diagonal, ``L_A (x) L_S``, so OBD is exact there:
  ``1/2 W'_ik^2 L_A,i L_S,k``. Summed over k it is the importance of input
  eigen-direction i, summed over i that of output eigen-direction k; one global
  threshold over all of them prunes rows and columns of ``W'``, and the layer
  becomes the bottleneck ``x -> x Q_A[:, I] -> W'[I, K] -> Q_S[:, K]^T``
  (a conv with ``|I|`` filters, then two 1x1 maps). A layer whose bottleneck
  would hold more parameters than the layer is left as it was (as the authors' code does).
  For a conv the input factor is either KFC's over the whole unfolded patch
  (``kron_factors(conv_factor="patch")``, the default): the bottleneck is then a
  ``kh x kw`` conv with ``|I|`` filters, then two 1x1 maps, and its first map costs
  ``kh kw c_in |I|``; or, as in the paper's conv bottleneck (its figure: 1x1, 3x3, 1x1) and
  the authors' code (``use_patch=True``), over input channels only (``conv_factor="channel"``:
  ``A`` pooled over positions and kernel offsets, ``(c_in [+1])``). Then
  ``W'[o] = Q_A^T W[o] Q_S`` at each kernel offset o, the importances sum ``W'[o]_ik^2`` over
  the offsets, and the layer becomes 1x1 ``Q_A[:, I]`` (at the input's resolution) ->
  ``kh x kw`` conv ``W'[:, :, I, K]`` -> 1x1 ``Q_S[:, K]^T``, whose product is again one conv
  (:func:`bottleneck_matrix`).

Structured masks go through :mod:`jaxsparse.pruning.structured`
(:func:`~jaxsparse.pruning.structured.filters`, :func:`structured_masks`,
:func:`propagate_channels`). The network's output layer is never pruned by default.

The factors come from :func:`kron_factors`, which runs the user's
``loss_fn(params, batch)`` (the mean loss over the batch, the convention of
:mod:`jaxsparse.pruning.criteria`) with ``flax.linen.intercept_methods``: every
``nn.Dense`` and ``nn.Conv`` call records its input, and a zero added to its output
gives ``dL/dy`` through ``jax.grad``. The labels in ``batch`` make it the
empirical Fisher; the paper's code samples them from the model's predictive
distribution (the true Fisher): pass a batch whose labels are such samples for that.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.analysis import flops as flops_lib
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.pruning import criteria, obs, structured

CRITERIA = ("obd", "obs")


class KronFactors(NamedTuple):
  """K-FAC factors of one Dense/Conv layer.

  Attributes:
    a: ``E[a a^T]`` over the layer's inputs (patches), ``(d_in [+1], d_in [+1])``.
    s: ``E[g g^T]`` over the output gradients of one example's loss, ``(d_out, d_out)``.
    has_bias: whether ``a`` carries the bias's trailing 1 (the layer has a bias).
    window: ``()`` when ``a`` spans the layer's whole input (a Dense input, a conv's unfolded
      patch); the conv's kernel window ``(kh, kw)`` when ``a`` is the *channel* factor
      ``(c_in [+1], c_in [+1])`` (``kron_factors(conv_factor="channel")``).
    in_positions: with a channel factor, the spatial positions of one calibration example's
      input to the layer (where EigenDamage's 1x1 ``Q_A`` map runs); 0 otherwise.
  """
  a: jax.Array
  s: jax.Array
  has_bias: bool
  window: tuple = ()
  in_positions: int = 0


class Bottleneck(NamedTuple):
  """EigenDamage's factored layer ``x_aug -> x_aug q_a -> w -> q_s^T`` (flax layout).

  Attributes:
    q_a: kept input eigenvectors ``(d_in [+1], k_in)``; with a bias, its last row is
      the bias of the first map (channel form: it meets a constant ``1 / (kh kw)`` input).
    w: the weights in the eigenbasis: ``(k_in, k_out)`` (patch or Dense factors), or, for a
      conv's channel factors, the conv kernel ``(kh, kw, k_in, k_out)`` between a 1x1 map
      ``q_a`` (``c_in [+1] -> k_in``) and a 1x1 map ``q_s^T`` (``k_out -> c_out``).
    q_s: kept output eigenvectors ``(d_out, k_out)``.
    in_positions: channel form: the spatial positions at which the 1x1 ``q_a`` runs (the
      layer's input positions per example); 0 for the patch form.
  """
  q_a: jax.Array
  w: jax.Array
  q_s: jax.Array
  in_positions: int = 0


class KronPruneResult(NamedTuple):
  """What :func:`kron_prune` returns: pruned params, their masks and the per-filter ``dL``."""
  params: Any
  masks: Any
  scores: dict


class EigenDamageResult(NamedTuple):
  """What :func:`eigendamage` returns.

  Attributes:
    params: the params with each bottlenecked layer's kernel (and bias) replaced by the
      product of its factors (:func:`merge_bottlenecks`).
    bottlenecks: kernel name -> :class:`Bottleneck`, or None where the layer is kept whole.
    importances: kernel name -> ``(input importances, output importances)`` in the eigenbasis.
  """
  params: Any
  bottlenecks: dict
  importances: dict


class _Layer(NamedTuple):
  """What the interceptor learns about one Dense/Conv call (static)."""
  name: str            # kernel leaf name, e.g. "conv1/kernel"
  kind: str            # "Dense" or "Conv"
  kernel_shape: tuple
  out_shape: tuple
  use_bias: bool
  conv: tuple          # (kernel_size, strides, padding, input_dilation, kernel_dilation)
  in_shape: tuple = ()  # the layer's input shape (batch first)


# ------------------------------------------------------------------ capture


def _module_name(module: nn.Module) -> str:
  """The module's kernel leaf name (a top-level module's is just ``kernel``)."""
  return "/".join([str(p) for p in module.path] + ["kernel"])


def _conv_config(module: nn.Conv) -> tuple:
  """The conv's patch geometry; ValueError for what unfolding into patches does not cover."""
  ks = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (
      module.kernel_size,)
  rank = len(ks)
  name = _module_name(module)
  if module.feature_group_count != 1:
    raise ValueError(f"kron_factors: layer '{name}' has feature_group_count="
                     f"{module.feature_group_count}; only ungrouped convs are supported")
  padding = module.padding
  if isinstance(padding, str):
    if padding.upper() not in ("SAME", "VALID"):
      raise ValueError(f"kron_factors: layer '{name}' has padding={padding!r}; "
                       "only 'SAME', 'VALID' and explicit paddings are supported")
    padding = padding.upper()
  else:
    from flax.linen.linear import canonicalize_padding
    padding = tuple(tuple(p) for p in canonicalize_padding(padding, rank))

  def per_dim(v):
    if v is None:
      return (1,) * rank
    return (int(v),) * rank if isinstance(v, int) else tuple(int(x) for x in v)

  return (ks, per_dim(module.strides), padding, per_dim(module.input_dilation),
          per_dim(module.kernel_dilation))


def _find_layers(loss_fn, params, batch) -> list[_Layer]:
  """Every Dense/Conv called inside ``loss_fn``, by tracing it once (``jax.eval_shape``)."""
  found: dict[str, _Layer] = {}

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      name = _module_name(module)
      kind = "Conv" if isinstance(module, nn.Conv) else "Dense"
      conv = _conv_config(module) if kind == "Conv" else ()
      if kind == "Conv" and len(conv[0]) + 2 != jnp.ndim(args[0]):
        raise ValueError(f"kron_factors: layer '{name}' gets an input of rank "
                         f"{jnp.ndim(args[0])}; batched (N, *spatial, C) inputs are needed")
      layer = _Layer(name, kind, tuple(module.variables["params"]["kernel"].shape),
                     tuple(out.shape), bool(module.use_bias), conv, tuple(jnp.shape(args[0])))
      if name in found:
        raise ValueError(f"kron_factors: layer '{name}' is called more than once in loss_fn; "
                         "K-FAC factors of shared weights are not supported")
      found[name] = layer
    return out

  with nn.intercept_methods(interceptor):
    # A fresh function each time: jax caches traces by function, and a cached trace would not
    # run the interceptor.
    jax.eval_shape(lambda p, b: loss_fn(p, b), params, batch)
  return list(found.values())


def _patches(x: jax.Array, layer: _Layer) -> jax.Array:
  """Inputs as rows ``(N, positions, d_in)`` in the kernel's ``reshape(-1, d_out)`` row order."""
  n = x.shape[0]
  if layer.kind == "Dense":
    return x.reshape(n, -1, x.shape[-1])
  ks, strides, padding, lhs_dil, rhs_dil = layer.conv
  spatial = "".join("HWD"[i] for i in range(len(ks)))
  dn = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
  p = jax.lax.conv_general_dilated_patches(
      x, ks, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
      dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
  c = x.shape[-1]
  # lax orders a patch's features channel-major (c, *window); flax kernels are (*window, c).
  p = p.reshape(n, -1, c, math.prod(ks))
  return jnp.swapaxes(p, -1, -2).reshape(n, -1, c * math.prod(ks))


def _channel_rows(x: jax.Array, layer: _Layer) -> jax.Array:
  """A conv's input as rows ``(N, positions * kh kw, c_in)``: one row per (position, offset)."""
  p = _patches(x, layer)
  return p.reshape(p.shape[0], -1, x.shape[-1])


def _factor_sums(loss_fn, params, batch, layers: Sequence[_Layer], n: int,
                 conv_factor: str = "patch"):
  """Per layer: sum over examples of ``mean_t a a^T`` and of ``sum_t g g^T`` on one batch
  (``conv_factor="channel"``: a conv's ``a`` is one kernel offset's channels, the mean over
  positions and offsets, with the constant ``1 / (kh kw)`` for the bias)."""
  zeros = {layer.name: jnp.zeros((n,) + layer.out_shape[1:], jnp.float32) for layer in layers}

  def with_perturbation(eps):
    inputs = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
        name = _module_name(module)
        if name in eps:
          inputs[name] = args[0]
          return out + eps[name].astype(out.dtype)   # d loss / d eps = d loss / d output
      return out

    with nn.intercept_methods(interceptor):
      loss = loss_fn(params, batch)
    return loss, inputs

  grads, inputs = jax.grad(with_perturbation, has_aux=True)(zeros)
  out = {}
  for layer in layers:
    x = inputs[layer.name].astype(jnp.float32)
    if layer.kind == "Conv" and conv_factor == "channel":
      a = _channel_rows(x, layer)
      one = 1.0 / math.prod(layer.conv[0])   # the bias, repeated at every offset, sums to b
    else:
      a, one = _patches(x, layer), 1.0
    if layer.use_bias:
      a = jnp.concatenate([a, jnp.full(a.shape[:-1] + (1,), one, a.dtype)], axis=-1)
    # loss_fn is a mean over the batch: n * dL/dy is one example's own gradient.
    g = n * grads[layer.name].astype(jnp.float32).reshape(n, -1, layer.out_shape[-1])
    hi = jax.lax.Precision.HIGHEST
    a_sum = jnp.einsum("ntd,nte->de", a, a, precision=hi) / a.shape[1]
    s_sum = jnp.einsum("ntd,nte->de", g, g, precision=hi)
    out[layer.name] = (a_sum, s_sum)
  return out


CONV_FACTORS = ("patch", "channel")


def kron_factors(loss_fn: criteria.LossFn, params: Any, batches: Any, *,
                 layers: Sequence[str] | None = None,
                 conv_factor: str = "patch") -> dict[str, KronFactors]:
  """K-FAC factors ``A = E[a a^T]``, ``S = E[g g^T]`` of every flax Dense/Conv layer.

  Wang et al. (2019), K-FAC (KFC for convs; see the module docstring).

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``, the *mean* loss over the batch,
      calling a flax.linen model's ``apply`` (its Dense/Conv calls are intercepted).
    params: the model's params.
    batches: one calibration batch (a pytree of arrays with a leading example axis,
      e.g. ``(x, y)``) or a list of them; the factors are averaged over all examples.
    layers: kernel leaf names (e.g. ``["conv1/kernel"]``) to compute; None = all.
    conv_factor: a conv's input factor. ``"patch"``: KFC's, over the unfolded patch
      ``(kh kw c_in [+1])``. ``"channel"``: EigenDamage's over input channels only,
      ``(c_in [+1])``: the mean of ``a a^T`` over examples, output positions and kernel offsets,
      ``a`` being one offset's ``c_in`` inputs with ``1 / (kh kw)`` appended for the bias (the
      authors' ``ComputeCovAPatch``, their ``use_patch=True``). Dense layers are not affected.

  Returns:
    kernel leaf name -> :class:`KronFactors`.
  """
  if conv_factor not in CONV_FACTORS:
    raise ValueError(f"conv_factor must be one of {CONV_FACTORS}, got {conv_factor!r}")
  if isinstance(batches, list):
    if not batches:
      raise ValueError("batches: got an empty list; give at least one calibration batch")
    batch_list = batches
  else:
    batch_list = [batches]
  sizes = [criteria.check_batch(b, "K-FAC") for b in batch_list]
  if not callable(loss_fn):
    raise ValueError(f"loss_fn must be a callable (params, batch) -> scalar, got {loss_fn!r}")
  first = batch_list[0]
  try:
    found = _find_layers(loss_fn, params, first)
  except Exception as e:  # the model's own error (a shape mismatch), reported against batch
    if isinstance(e, ValueError) and str(e).startswith("kron_factors:"):
      raise
    shapes = jax.tree.map(lambda l: tuple(jnp.shape(l)), first)
    raise ValueError(f"batch: loss_fn(params, batch) fails on a calibration batch of shapes "
                     f"{shapes}: {e}") from e
  criteria.check_loss(loss_fn, params, first)
  if not found:
    raise ValueError("loss_fn: it calls no flax.linen Dense or Conv layer (K-FAC factors are "
                     "computed for those)")
  if layers is not None:
    known = [layer.name for layer in found]
    missing = [n for n in layers if n not in known]
    if missing:
      raise ValueError(f"layers: {missing} are not Dense/Conv kernels called by loss_fn; "
                       f"those are {known}")
    found = [layer for layer in found if layer.name in layers]
  ref = jax.tree.map(lambda l: tuple(jnp.shape(l)[1:]), first)
  for i, b in enumerate(batch_list[1:], 1):
    got = jax.tree.map(lambda l: tuple(jnp.shape(l)[1:]), b)
    if got != ref:
      raise ValueError(f"batches[{i}]: example shapes {got} differ from batches[0]'s {ref}")

  sums, steps = None, {}
  for b, n in zip(batch_list, sizes):
    if n not in steps:   # one jitted function per batch size
      steps[n] = jax.jit(functools.partial(_factor_sums, loss_fn, layers=found, n=n,
                                           conv_factor=conv_factor))
    part = steps[n](params, b)
    sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
  total = sum(sizes)
  out = {}
  for layer in found:
    channel = layer.kind == "Conv" and conv_factor == "channel"
    out[layer.name] = KronFactors(
        sums[layer.name][0] / total, sums[layer.name][1] / total, layer.use_bias,
        tuple(layer.conv[0]) if channel else (),
        math.prod(layer.in_shape[1:-1]) if channel else 0)
  return out


# ------------------------------------------------------------------ helpers


def check_damping(damping: float) -> float:
  """Raises ValueError (naming ``damping``) unless it is a finite number > 0."""
  if isinstance(damping, bool) or not isinstance(damping, (int, float, np.floating)) or not (
      math.isfinite(float(damping)) and damping > 0):
    raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
  return float(damping)


@jax.jit
def _damp(a: jax.Array, s: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
  tiny = jnp.finfo(jnp.float32).tiny
  pi = jnp.sqrt(jnp.maximum(jnp.trace(a) / a.shape[0], tiny)
                / jnp.maximum(jnp.trace(s) / s.shape[0], tiny))
  root = jnp.sqrt(lam)
  return (a + pi * root * jnp.eye(a.shape[0], dtype=a.dtype),
          s + root / pi * jnp.eye(s.shape[0], dtype=s.dtype))


def damped_factors(factors: KronFactors, damping: float) -> KronFactors:
  """K-FAC's factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3).

  ``A + pi sqrt(damping) I`` and ``S + sqrt(damping) / pi I`` with
  ``pi = sqrt((tr A / dim A) / (tr S / dim S))``, so the damping splits between
  factors of very different scales.
  """
  a, s = _damp(factors.a, factors.s, jnp.float32(check_damping(damping)))
  return KronFactors(a, s, factors.has_bias)


def _spd_inverse(s: jax.Array) -> jax.Array:
  """Inverse of a (damped, so positive definite) factor by Cholesky."""
  eye = jnp.eye(s.shape[0], dtype=s.dtype)
  return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(s), eye)


def _leaves(params: Any) -> dict[str, Any]:
  return dict(zip(masks_lib.leaf_names(params), jax.tree.leaves(params)))


def _bias_name(kernel: str) -> str:
  return kernel.rsplit("/", 1)[0] + "/bias" if "/" in kernel else "bias"


def layer_matrix(params: Any, name: str, factors: KronFactors) -> jax.Array:
  """A layer's weights as ``W = [[kernel.reshape(-1, d_out)], [bias]]``, matching ``factors``.

  For a conv's channel factors (``factors.window``), one such matrix per kernel offset,
  ``(kh kw, c_in [+1], d_out)``, the bias row repeated in each (it meets the input
  ``1 / (kh kw)`` at every offset; the authors' ``fetch_mat_weights(use_patch=True)``).
  """
  leaves = _leaves(params)
  if name not in leaves:
    raise ValueError(f"factors: layer '{name}' is not a leaf of params; leaves are {list(leaves)}")
  k = jnp.asarray(leaves[name], jnp.float32)
  window = tuple(factors.window)
  if window and tuple(k.shape[:-2]) != window:
    raise ValueError(f"factors: layer '{name}' has kernel {k.shape} but channel factors for a "
                     f"{window} window")
  w = k.reshape(-1, k.shape[-2], k.shape[-1]) if window else k.reshape(-1, k.shape[-1])
  if factors.has_bias:
    b = leaves.get(_bias_name(name))
    if b is None:
      raise ValueError(f"factors: layer '{name}' has a bias in its factors but params hold no "
                       f"'{_bias_name(name)}'")
    row = jnp.broadcast_to(jnp.asarray(b, jnp.float32).reshape(1, -1),
                           w.shape[:-2] + (1, w.shape[-1]))
    w = jnp.concatenate([w, row], axis=-2)
  if w.shape[-2:] != (factors.a.shape[0], factors.s.shape[0]):
    raise ValueError(f"factors: layer '{name}' has weights {w.shape} (with bias row) but factors "
                     f"A {factors.a.shape} and S {factors.s.shape}")
  return w


def _set_layer(leaves: dict, name: str, has_bias: bool, w: jax.Array) -> None:
  """Writes ``W`` back into the kernel (and bias) leaves of ``leaves`` (in place)."""
  k = leaves[name]
  d = math.prod(jnp.shape(k)[:-1])
  leaves[name] = w[:d].reshape(jnp.shape(k)).astype(jnp.result_type(k))
  if has_bias:
    b = leaves[_bias_name(name)]
    leaves[_bias_name(name)] = w[d].reshape(jnp.shape(b)).astype(jnp.result_type(b))


def _rebuild(params: Any, leaves: dict) -> Any:
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [leaves[n] for n in masks_lib.leaf_names(params)])


def _check_factors(factors: Mapping[str, KronFactors], patch_only: str = "") -> None:
  """``patch_only``: the criterion's name when it needs KFC's patch factors for convs."""
  if not isinstance(factors, Mapping) or not factors:
    raise ValueError("factors: expected a non-empty dict kernel name -> KronFactors "
                     f"(from kron_factors), got {type(factors).__name__}")
  for name, f in factors.items():
    if not isinstance(f, KronFactors):
      raise TypeError(f"factors['{name}'] must be a KronFactors, got {type(f).__name__}")
    if patch_only and f.window:
      raise ValueError(f"factors['{name}'] are channel factors (conv_factor='channel'); "
                       f"{patch_only} needs kron_factors(..., conv_factor='patch')")


# ------------------------------------------------------------------ Kron-OBD / Kron-OBS


@jax.jit
def _kron_obd(w, a, s):
  return 0.5 * jnp.diagonal(s) * jnp.sum(w * (a @ w), axis=0)


@jax.jit
def _kron_obs(w, a, s, lam):
  a, s = _damp(a, s, lam)
  s_inv = _spd_inverse(s)
  return 0.5 * jnp.sum(w * (a @ w), axis=0) / jnp.diagonal(s_inv)


def kron_obd_scores(params: Any, factors: Mapping[str, KronFactors]) -> dict[str, jax.Array]:
  """Kron-OBD ``dL_j = 1/2 S_jj F_j^T A F_j`` per filter (Wang et al. 2019).

  Returns kernel name -> ``(d_out,)`` scores (the bias is part of each filter).
  """
  _check_factors(factors, "Kron-OBD")
  return {n: _kron_obd(layer_matrix(params, n, f), f.a, f.s) for n, f in factors.items()}


def kron_obs_scores(params: Any, factors: Mapping[str, KronFactors], *,
                    damping: float = 1e-3) -> dict[str, jax.Array]:
  """Kron-OBS ``dL_j = 1/2 F_j^T A F_j / [S^-1]_jj`` per filter (Wang et al. 2019).

  ``A`` and ``S`` are damped by :func:`damped_factors`.
  """
  _check_factors(factors, "Kron-OBS")
  lam = jnp.float32(check_damping(damping))
  return {n: _kron_obs(layer_matrix(params, n, f), f.a, f.s, lam) for n, f in factors.items()}


@jax.jit
def _obs_update(w, a, s, lam, removed):
  s_inv = _spd_inverse(_damp(a, s, lam)[1])
  # The same OBS solve as for single weights, once per input row, with H^-1 = S^-1:
  # dW[i, :] = -S^-1[:, Q] ([S^-1]_QQ)^-1 W[i, Q]  (A cancels out of the update).
  delta = jax.vmap(obs.compensating_update, in_axes=(0, None, None))(w, s_inv, removed)
  return jnp.where(removed[None, :], 0.0, w + delta)


def kron_obs_update(params: Any, factors: Mapping[str, KronFactors], masks: Any, *,
                    damping: float = 1e-3) -> Any:
  """Kron-OBS's compensating update for the filters that ``masks`` removes (Wang et al. 2019).

  A filter j is removed when its kernel mask ``[..., j]`` is all False. The kept
  filters of the same layer move by ``dW = -W[:, Q] C^T``,
  ``C = S^-1[:, Q] ([S^-1]_QQ)^-1`` (the optimal joint update for the set Q; one
  filter: ``-S^-1 e_j (x) F_j / [S^-1]_jj``), and the removed ones (kernel and bias) become 0.
  """
  _check_factors(factors, "Kron-OBS")
  lam = jnp.float32(check_damping(damping))
  masks_lib.check_masks(params, masks)
  leaves = _leaves(params)
  mleaves = _leaves(masks)
  for n, f in factors.items():
    w = layer_matrix(params, n, f)
    m = jnp.broadcast_to(jnp.asarray(mleaves[n], bool), jnp.shape(leaves[n]))
    removed = structured.removed_channels(m)
    if not bool(jnp.any(removed)):
      continue
    _set_layer(leaves, n, f.has_bias, _obs_update(w, f.a, f.s, lam, removed))
  return _rebuild(params, leaves)


def filter_score_tree(params: Any, scores: Mapping[str, jax.Array]) -> Any:
  """A leaf-shaped score tree whose :func:`structured.filters` pool is exactly ``scores``.

  Each filter's score sits on its first weight (zeros elsewhere), so the sum over the
  filter is the score itself; leaves not in ``scores`` get zeros.
  """
  out = []
  for n, leaf in zip(masks_lib.leaf_names(params), jax.tree.leaves(params)):
    z = np.zeros(jnp.shape(leaf), np.float32)   # built on the host: no op to compile per shape
    if n in scores:
      sc = np.asarray(scores[n], np.float32)
      if sc.shape != (z.shape[-1],):
        raise ValueError(f"scores['{n}'] has shape {sc.shape}, expected ({z.shape[-1]},)")
      z.reshape(-1, z.shape[-1])[0] = sc
    out.append(z)
  return jax.tree.unflatten(jax.tree.structure(params), out)


def output_kernel(params: Any) -> str:
  """The network's output layer: the last rank >= 2 leaf in the params' definition order."""
  kernels = {n for n, l in _leaves(params).items() if jnp.ndim(l) >= 2}
  ordered = [n for n in structured.definition_order(params) if n in kernels]
  if not ordered:
    raise ValueError("params: no kernel (leaf of rank >= 2) found")
  return ordered[-1]


def prunable_layers(params: Any, factors: Mapping[str, KronFactors],
                    output_layer: str | None = "last") -> list[str]:
  """The layers of ``factors`` that may lose filters: all but ``output_layer``
  (``"last"``: :func:`output_kernel`; a kernel name; None: none kept)."""
  if output_layer is not None and not isinstance(output_layer, str):
    raise TypeError(f"output_layer must be 'last', a kernel name or None, got {output_layer!r}")
  out = output_kernel(params) if output_layer == "last" else output_layer
  return [n for n in factors if n != out]


def kron_prune(params: Any, factors: Mapping[str, KronFactors], sparsity: float, *,
               criterion: str = "obs", damping: float = 1e-3, scope: str = "global",
               links: Sequence[structured.ChannelLink] = (),
               output_layer: str | None = "last") -> KronPruneResult:
  """One-shot filter pruning by Kron-OBD or Kron-OBS (Wang et al. 2019).

  Args:
    params, factors: the model and its :func:`kron_factors`.
    sparsity: fraction of the prunable layers' filters to remove (per layer with
      ``scope="local"``, one threshold on ``dL`` over all of them with ``"global"``).
    criterion: ``"obd"`` (no weight update) or ``"obs"`` (with :func:`kron_obs_update`).
    damping: lambda of :func:`damped_factors` (Kron-OBS).
    links: channel links; the removed channels are propagated to biases and
      consumers by :func:`structured.propagate_channels`.
    output_layer: the layer never pruned (see :func:`prunable_layers`).
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  dist.check_sparsity(sparsity)
  check_damping(damping)
  _check_factors(factors)
  names = prunable_layers(params, factors, output_layer)
  if not names:
    raise ValueError("factors: no prunable layer (only the output layer has factors)")
  sub = {n: factors[n] for n in names}
  scores = (kron_obd_scores(params, sub) if criterion == "obd"
            else kron_obs_scores(params, sub, damping=damping))
  masks = structured.structured_masks(filter_score_tree(params, scores), structured.filters(),
                                      sparsity, scope=scope, filter=lambda n, l: n in scores)
  if links:
    masks = structured.propagate_channels(params, masks, links)
  new = params if criterion == "obd" else kron_obs_update(params, sub, masks, damping=damping)
  return KronPruneResult(masks_lib.apply_masks(new, masks), masks, scores)


# ------------------------------------------------------------------ EigenDamage


@jax.jit
def _eigen(w, a, s):
  la, qa = jnp.linalg.eigh(a)
  ls, qs = jnp.linalg.eigh(s)
  la, ls = jnp.maximum(la, 0.0), jnp.maximum(ls, 0.0)   # round-off can make them slightly < 0
  hi = jax.lax.Precision.HIGHEST
  # w: (d_in, d_out), or (offsets, c_in, d_out) for channel factors (one rotation per offset).
  wp = jnp.matmul(jnp.matmul(qa.T, w, precision=hi), qs, precision=hi)
  imp = 0.5 * jnp.square(wp) * la[:, None] * ls[None, :]
  imp = imp.reshape((-1,) + imp.shape[-2:]).sum(axis=0)   # summed over kernel offsets
  return qa, wp, qs, imp.sum(axis=1), imp.sum(axis=0)


def eigenbasis(params: Any, factors: Mapping[str, KronFactors]) -> dict[str, tuple]:
  """Per layer (numpy arrays): the full :class:`Bottleneck` ``(Q_A, W' = Q_A^T W Q_S, Q_S)`` and
  the importances of the input and output eigen-directions (Wang et al. 2019, OBD in the KFE):
  ``1/2 sum_k W'_ik^2 L_A,i L_S,k`` and ``1/2 sum_i W'_ik^2 L_A,i L_S,k``.

  With a conv's channel factors ``W'`` is the kernel rotated into both eigenbases at every
  offset, ``W'[o] = Q_A^T W[o] Q_S`` (shape ``(kh, kw, c_in [+1], c_out)``), and each
  ``W'_ik^2`` above is summed over the offsets (the authors' ``_get_unit_importance`` with
  ``use_patch=True``: the Fisher taken as ``I_offsets (x) A (x) S``)."""
  _check_factors(factors)
  out = {}
  for n, f in factors.items():
    qa, wp, qs, imp_in, imp_out = jax.device_get(_eigen(layer_matrix(params, n, f), f.a, f.s))
    if f.window:
      wp = wp.reshape(tuple(f.window) + wp.shape[-2:])
    out[n] = (Bottleneck(qa, wp, qs, int(f.in_positions)), imp_in, imp_out)
  return out


def bottleneck_size(b: Bottleneck) -> int:
  """Parameters of the factored layer: ``q_a`` (with the bias row), ``w`` and ``q_s``."""
  return int(np.size(b.q_a) + np.size(b.w) + np.size(b.q_s))


def bottleneck_matrix(b: Bottleneck, has_bias: bool, xp: Any = jnp) -> Any:
  """The single layer a bottleneck computes, as :func:`layer_matrix`'s patch-layout ``W``
  ``(kh kw c_in [+1], d_out)`` (Dense: ``(d_in [+1], d_out)``): the three maps are linear.

  Patch form: ``q_a w q_s^T``. Channel form: the kernel at offset o is
  ``q_a[:c_in] w[o] q_s^T`` and the bias ``1/(kh kw) sum_o q_a[c_in] w[o] q_s^T`` (the
  constant ``1/(kh kw)`` channel's contribution; exact when nothing is pruned). ``xp``:
  ``jnp`` (differentiable) or ``np`` (on the host).
  """
  mm = (functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST) if xp is jnp
        else np.matmul)
  prod = mm(mm(b.q_a, b.w), b.q_s.T)           # (..., d_in [+1], d_out)
  if np.ndim(b.w) == 2:
    return prod
  prod = prod.reshape((-1,) + prod.shape[-2:])  # (offsets, c_in [+1], d_out)
  if not has_bias:
    return prod.reshape(-1, prod.shape[-1])
  return xp.concatenate([prod[:, :-1].reshape(-1, prod.shape[-1]),
                         prod[:, -1].mean(axis=0, keepdims=True)], axis=0)


def merge_bottlenecks(params: Any, bottlenecks: Mapping[str, Bottleneck | None],
                      has_bias: Mapping[str, bool] | None = None) -> Any:
  """Params with each layer's kernel (and bias) replaced by its bottleneck's product
  (:func:`bottleneck_matrix`; differentiable).

  The product runs the bottleneck exactly (the three maps are linear); fine-tune
  ``w`` through it (the paper keeps ``Q_A``, ``Q_S`` fixed). ``has_bias``: per layer,
  whether ``q_a``'s last row is the bias (default: whether params hold ``<layer>/bias``).
  """
  leaves = _leaves(params)
  for n, b in bottlenecks.items():
    if b is None:
      continue
    if n not in leaves:
      raise ValueError(f"bottlenecks: layer '{n}' is not a leaf of params")
    bias = (_bias_name(n) in leaves) if has_bias is None else bool(has_bias[n])
    _set_layer(leaves, n, bias, bottleneck_matrix(b, bias))
  return _rebuild(params, leaves)


def eigendamage(params: Any, factors: Mapping[str, KronFactors], sparsity: float, *,
                output_layer: str | None = "last", max_layer_pruning: float = 0.95,
                basis: Mapping[str, tuple] | None = None) -> EigenDamageResult:
  """EigenDamage: one-shot structured pruning in the Kronecker-factored eigenbasis (Wang 2019).

  Args:
    params, factors: the model and its :func:`kron_factors` (with ``conv_factor="channel"``
      a conv becomes 1x1 -> kh x kw conv -> 1x1, the paper's conv bottleneck; with
      ``"patch"`` a kh x kw conv -> 1x1 -> 1x1).
    sparsity: the fraction of all eigen-directions (input and output ones of every
      prunable layer together) removed by one global threshold on their importance.
    output_layer: the layer never factored (see :func:`prunable_layers`).
    max_layer_pruning: at most this fraction of a layer's input (or output)
      directions is removed; the most important ones stay (the authors' code's
      ``prune_ratio_limit``), so no layer collapses.
    basis: :func:`eigenbasis` of these params and factors, if already computed (e.g.
      when searching the sparsity that meets a FLOPs budget).

  A layer whose bottleneck would hold more parameters than the layer keeps its weights
  (its entry in ``bottlenecks`` is None).
  """
  s = dist.check_sparsity(sparsity)
  if isinstance(max_layer_pruning, bool) or not isinstance(
      max_layer_pruning, (int, float)) or not 0.0 <= max_layer_pruning < 1.0:
    raise ValueError(f"max_layer_pruning must be in [0, 1), got {max_layer_pruning!r}")
  _check_factors(factors)
  names = prunable_layers(params, factors, output_layer)
  if not names:
    raise ValueError("factors: no prunable layer (only the output layer has factors)")
  eig = (eigenbasis(params, {n: factors[n] for n in names}) if basis is None
         else {n: basis[n] for n in names})
  pooled = np.concatenate([np.concatenate([np.asarray(e[1]), np.asarray(e[2])])
                           for e in eig.values()])
  k = int(round(s * pooled.size))
  # Ties broken by position (stable sort), so the count removed is exact.
  removed = np.zeros(pooled.size, bool)
  removed[np.argsort(pooled, kind="stable")[:k]] = True
  bottlenecks, importances, offset = {}, {}, 0
  leaves = _leaves(params)
  for n, (full, imp_in, imp_out) in eig.items():
    d_in, d_out = imp_in.shape[0], imp_out.shape[0]
    keep_in = _keep(np.asarray(imp_in), ~removed[offset:offset + d_in], max_layer_pruning)
    offset += d_in
    keep_out = _keep(np.asarray(imp_out), ~removed[offset:offset + d_out], max_layer_pruning)
    offset += d_out
    w = np.asarray(full.w)[..., keep_in, :][..., keep_out]
    b = Bottleneck(np.asarray(full.q_a)[:, keep_in], w, np.asarray(full.q_s)[:, keep_out],
                   full.in_positions)
    original = leaves[n].size + (d_out if factors[n].has_bias else 0)
    bottlenecks[n] = b if bottleneck_size(b) < original else None
    importances[n] = (imp_in, imp_out)
  for n, b in bottlenecks.items():   # the product on the host: no compile per bottleneck shape
    if b is not None:
      b64 = b._replace(q_a=np.asarray(b.q_a, np.float64), w=np.asarray(b.w, np.float64),
                       q_s=np.asarray(b.q_s, np.float64))
      _set_layer(leaves, n, factors[n].has_bias, bottleneck_matrix(b64, factors[n].has_bias, np))
  return EigenDamageResult(_rebuild(params, leaves), bottlenecks, importances)


def _keep(importance: np.ndarray, kept: np.ndarray, max_pruning: float) -> np.ndarray:
  """Kept indices: ``kept``, topped up with the most important ones to the layer's minimum."""
  minimum = max(1, math.ceil((1.0 - max_pruning) * importance.size))
  if kept.sum() < minimum:
    kept = np.zeros_like(kept)
    kept[np.argsort(-importance, kind="stable")[:minimum]] = True
  return np.flatnonzero(kept)


def eigendamage_flops(layers: Sequence[flops_lib.LayerFlops],
                      bottlenecks: Mapping[str, Bottleneck | None]) -> list[flops_lib.LayerFlops]:
  """``layers`` (:func:`jaxsparse.analysis.flops.count_flops` of the dense model) with each
  bottlenecked layer's cost replaced by its three maps' (same FLOPs convention: 2 per
  multiply-add, biases and bias rows not counted).

  Patch form (``w`` is ``(k_in, k_out)``): all three maps run at the layer's output positions
  (the first is the original conv with ``k_in`` filters, the other two are 1x1), so
  ``kept = d_in k_in + k_in k_out + k_out d_out``. Channel form (``w`` is
  ``(kh, kw, k_in, k_out)``): the 1x1 ``q_a`` runs at the layer's ``in_positions``
  (``c_in k_in`` each), the ``kh x kw`` conv ``k_in -> k_out`` and the 1x1 ``q_s^T`` at its
  output positions: ``2 (in_positions c_in k_in + positions (kh kw k_in k_out + k_out d_out))``.
  The counts assume ``count_flops`` used the calibration batches' input shape.
  """
  out = []
  for layer in layers:
    b = bottlenecks.get(layer.name)
    if b is None:
      out.append(layer)
      continue
    k_in, k_out = np.shape(b.w)[-2:]
    d_out = layer.kernel_shape[-1]
    if np.ndim(b.w) == 2:
      d_in = math.prod(layer.kernel_shape[:-1])
      kept = d_in * k_in + k_in * k_out + k_out * d_out
      macs = layer.positions * kept
    else:
      if tuple(np.shape(b.w)[:-2]) != tuple(layer.kernel_shape[:-2]):
        raise ValueError(f"bottlenecks['{layer.name}']: w has shape {np.shape(b.w)} but the "
                         f"layer's kernel is {layer.kernel_shape}")
      if isinstance(b.in_positions, bool) or not isinstance(
          b.in_positions, (int, np.integer)) or b.in_positions < 1:
        raise ValueError(f"bottlenecks['{layer.name}']: a channel-form bottleneck needs "
                         f"in_positions >= 1 (the layer's input positions), got {b.in_positions!r}")
      first = layer.kernel_shape[-2] * k_in
      rest = math.prod(np.shape(b.w)[:-2]) * k_in * k_out + k_out * d_out
      kept = first + rest
      macs = int(b.in_positions) * first + layer.positions * rest
    out.append(layer._replace(kept=int(kept), sparse=flops_lib.FLOPS_PER_MAC * int(macs)))
  return out


__all__ = [
    "CONV_FACTORS", "KronFactors", "Bottleneck", "KronPruneResult", "EigenDamageResult",
    "kron_factors", "check_damping", "damped_factors", "layer_matrix", "kron_obd_scores",
    "kron_obs_scores", "kron_obs_update", "filter_score_tree", "output_kernel", "prunable_layers",
    "kron_prune", "eigenbasis", "bottleneck_size", "bottleneck_matrix", "merge_bottlenecks",
    "eigendamage", "eigendamage_flops",
]
