"""Reference models of the sparse-training literature, in flax.linen and flax.nnx.

Naming convention: each model has a ``flax.linen`` class (``LeNet300100``,
``LeNet5Caffe``, ``MLP``) and a ``flax.nnx`` twin with the same name plus the
suffix ``NNX`` (``LeNet300100NNX``, ...). Twins have the same layers under the
same names, so their parameter trees have the same leaves:

* ``LeNet300100`` / ``MLP``: ``fc1``, ``fc2``, ... (``Dense``/``Linear``:
  ``kernel`` and, with ``use_bias``, ``bias``), plus ``bn1``, ``bn2``, ...
  (``BatchNorm``: ``scale``, ``bias``; stats ``mean``, ``var``) with
  ``batch_norm=True``;
* ``LeNet5Caffe``: ``conv1``, ``conv2`` (``kernel`` of rank 4, ``bias``),
  ``fc1``, ``fc2``.

The CIFAR ResNets, :class:`CifarResNet` (``"resnet20"``, He et al. 2016) and
:class:`WideResNet` (``"wrn"``, WRN-16-4 by default, Zagoruyko & Komodakis
2016), are linen only (no nnx twin): bias-free convs with BatchNorm, so their
sparse leaves are the conv kernels and the final ``fc`` kernel.

The decoder-only language model ``"gpt"`` is :class:`jaxsparse.nn.transformer.GPT`
(``num_classes`` is its vocabulary size; its nnx twin is
:class:`jaxsparse.nn.transformer.GPTNNX`, whose ``input_shape`` is ``(context,)``).

Weight matrices and conv kernels are exactly the leaves named ``kernel`` of
rank >= 2, the usual target of sparsification, and the methods' default
filter selects every leaf of rank >= 2. A model whose sparse leaves are fewer
names its own filter in :data:`SPARSE_FILTERS` (the GPT: its Dense kernels, so
that its embeddings stay dense); :func:`default_sparse_filter` looks it up and
:func:`experiments.training.make_method` uses it when no ``filter`` is given.

All models take NHWC images (or any ``(N, ...)`` array for the MLPs) and
return logits; ``__call__(x, train=False)``: ``train`` only matters with
BatchNorm (batch statistics and, in linen, ``mutable=["batch_stats"]``).
The nnx classes need the input shape at construction, to size their layers;
their BatchNorm is driven by the ``train`` argument, not by ``.train()``/``.eval()``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxsparse.nn import transformer as _transformer

BN_MOMENTUM = 0.9
"""BatchNorm running stats: ``new = 0.9 * old + 0.1 * batch`` (PyTorch's default), linen and nnx alike."""
BN_EPSILON = 1e-5


def _check_features(features: Sequence[int], num_classes: int) -> None:
  if not all(isinstance(f, numbers.Integral) and f > 0 for f in features):
    raise ValueError(f"features must be positive integers, got {features!r}.")
  if not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")


def resolve_lenet5_padding(padding: str | None, height: int, width: int) -> str:
  """The conv padding LeNet-5-Caffe uses on ``height x width`` inputs.

  ``padding=None`` means automatic: ``"VALID"`` (Caffe's, 28x28 -> 4x4x50
  features) for inputs of at least 28x28, else ``"SAME"`` (8x8 digits would
  shrink to nothing with VALID 5x5 convs). Explicit ``"VALID"``/``"SAME"``
  are kept.

  Raises:
    ValueError: naming ``padding`` for another value, or when VALID convs
      leave no spatial extent.
  """
  if padding is None:
    padding = "VALID" if min(height, width) >= 28 else "SAME"
  if padding not in ("VALID", "SAME"):
    raise ValueError(f"padding must be None, 'VALID' or 'SAME', got {padding!r}.")
  if min(_lenet5_spatial(height, width, padding)) < 1:
    hint = "VALID needs at least 16x16; use padding='SAME' or None" if padding == "VALID" else (
        "SAME needs at least 4x4")
    raise ValueError(f"padding={padding!r} leaves no features on {height}x{width} inputs ({hint}).")
  return padding


def _lenet5_spatial(height: int, width: int, padding: str) -> tuple[int, int]:
  """Spatial size after conv5 -> pool2 -> conv5 -> pool2."""

  def size(s):
    for _ in range(2):
      s = s - 4 if padding == "VALID" else s
      s = s // 2
    return s

  return size(height), size(width)


def _image_batch(x: jax.Array, model: str = "LeNet-5") -> jax.Array:
  """Adds a channel axis to ``(N, H, W)`` inputs."""
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4:
    raise ValueError(f"{model} expects (N, H, W, C) or (N, H, W) inputs, got shape {x.shape}.")
  return x


def _max_pool(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


# ------------------------------------------------------------------ flax.linen


def _linen_dense_stack(x: jax.Array, features: Sequence[int], num_classes: int, use_bias: bool,
                       batch_norm: bool, train: bool) -> jax.Array:
  """The MLP body; call inside an ``nn.compact`` method (layers attach to that module)."""
  _check_features(features, num_classes)
  x = x.reshape((x.shape[0], -1))
  for i, width in enumerate(features, start=1):
    x = nn.Dense(width, use_bias=use_bias, name=f"fc{i}")(x)
    if batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       name=f"bn{i}")(x)
    x = nn.relu(x)
  return nn.Dense(num_classes, use_bias=use_bias, name=f"fc{len(features) + 1}")(x)


class MLP(nn.Module):
  """Flatten -> [Dense(f) -> (BatchNorm) -> relu] for f in ``features`` -> Dense(num_classes).

  Layers are named ``fc1`` .. ``fc{len(features)+1}`` and ``bn1`` .. ``bn{len(features)}``.
  E.g. ``MLP((2048, 2048, 2048))`` on 28x28 inputs has 10,020,874 params.
  """

  features: Sequence[int]
  num_classes: int = 10
  use_bias: bool = True
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return _linen_dense_stack(x, tuple(self.features), self.num_classes, self.use_bias,
                              self.batch_norm, train)


class LeNet300100(nn.Module):
  """LeNet-300-100: flatten -> fc1(300) -> relu -> fc2(100) -> relu -> fc3(num_classes).

  266,610 params on 28x28 inputs with 10 classes and biases. With
  ``batch_norm=True`` a BatchNorm (``bn1``, ``bn2``) follows each hidden
  Dense, before the relu; the DSR paper's MNIST setup is
  ``use_bias=False, batch_norm=True``.
  """

  num_classes: int = 10
  use_bias: bool = True
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return _linen_dense_stack(x, (300, 100), self.num_classes, self.use_bias, self.batch_norm,
                              train)


class LeNet5Caffe(nn.Module):
  """Caffe's LeNet-5: conv1(5x5, 20) -> pool -> conv2(5x5, 50) -> pool -> fc1(500) -> relu -> fc2.

  Pools are 2x2 max pools, stride 2; as in Caffe's ``lenet.prototxt`` the only
  nonlinearity is the relu after ``fc1``. 431,080 params on 28x28x1 inputs
  with 10 classes. ``padding`` (see :func:`resolve_lenet5_padding`):
  ``None`` = ``"VALID"`` for inputs of at least 28x28, ``"SAME"`` for
  smaller ones (e.g. 8x8 digits: 131,080 params).
  """

  num_classes: int = 10
  padding: str | None = None
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No BatchNorm or dropout.
    x = _image_batch(x)
    padding = resolve_lenet5_padding(self.padding, x.shape[1], x.shape[2])
    x = nn.Conv(20, (5, 5), padding=padding, use_bias=self.use_bias, name="conv1")(x)
    x = _max_pool(x)
    x = nn.Conv(50, (5, 5), padding=padding, use_bias=self.use_bias, name="conv2")(x)
    x = _max_pool(x)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, use_bias=self.use_bias, name="fc1")(x))
    return nn.Dense(self.num_classes, use_bias=self.use_bias, name="fc2")(x)


# ------------------------------------------------------------------ ResNets for CIFAR-sized inputs


def _check_depth(depth: int, *, step: int, offset: int, minimum: int, example: str) -> int:
  """Blocks per stage, ``(depth - offset) / step``; ValueError naming ``depth`` otherwise."""
  if (isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < minimum
      or (depth - offset) % step):
    raise ValueError(f"depth must be an integer {step}n+{offset} >= {minimum} (e.g. {example}), "
                     f"got {depth!r}.")
  return (int(depth) - offset) // step


_HE_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
"""He et al. 2015 ("MSRA") normal init of the conv kernels, as both ResNet papers use."""


def _conv3x3(features: int, stride: int, name: str) -> nn.Conv:
  """3x3 conv, no bias, He init; padding 1 on each side (as PyTorch: stride 2 halves even sizes)."""
  return nn.Conv(features, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=_HE_INIT, name=name)


def _conv1x1(features: int, stride: int, name: str) -> nn.Conv:
  return nn.Conv(features, (1, 1), strides=(stride, stride), padding="VALID", use_bias=False,
                 kernel_init=_HE_INIT, name=name)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      name=name)


class BasicBlock(nn.Module):
  """He et al. 2016's post-activation basic block: conv3x3-BN-relu-conv3x3-BN, + shortcut, relu.

  The shortcut is the identity, or a 1x1 conv + BN projection (``shortcut_conv``,
  ``shortcut_bn``) where the width or the resolution changes: the paper's option B.
  """

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = _conv3x3(self.features, self.stride, "conv1")(x)
    y = nn.relu(_batch_norm(train, "bn1")(y))
    y = _conv3x3(self.features, 1, "conv2")(y)
    y = _batch_norm(train, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv1x1(self.features, self.stride, "shortcut_conv")(x)
      x = _batch_norm(train, "shortcut_bn")(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  """ResNet-``depth`` for CIFAR (He et al. 2016, *Deep Residual Learning*, sec. 4.2).

  conv3x3(16)-BN-relu -> 3 stages of ``n = (depth - 2) / 6`` basic blocks
  (:class:`BasicBlock`) with 16, 32, 64 filters and strides 1, 2, 2 -> global average
  pool -> ``fc``. Shortcuts are option B (1x1 conv + BN projection where the shape
  changes, identity elsewhere), so ResNet-20 has 272,474 params on 32x32x3 with 10
  classes (272,186 on 28x28x1; option A's parameter-free zero-padding shortcuts would
  give 269,722). Layers: ``conv1``, ``bn1``,
  ``stage{s}_block{b}/{conv1,bn1,conv2,bn2[,shortcut_conv,shortcut_bn]}``, ``fc``.
  Any input size works: 32x32 -> 32, 16, 8 in the three stages; 28x28 -> 28, 14, 7;
  8x8 digits -> 8, 4, 2.
  """

  depth: int = 20
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    blocks = _check_depth(self.depth, step=6, offset=2, minimum=8, example="20, 32, 44, 56, 110")
    _check_features((), self.num_classes)
    x = _image_batch(x, f"ResNet-{self.depth}")
    x = _conv3x3(16, 1, "conv1")(x)
    x = nn.relu(_batch_norm(train, "bn1")(x))
    for s, (width, stride) in enumerate(((16, 1), (32, 2), (64, 2)), start=1):
      for b in range(1, blocks + 1):
        x = BasicBlock(width, stride if b == 1 else 1, name=f"stage{s}_block{b}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class WideBasicBlock(nn.Module):
  """Zagoruyko & Komodakis 2016's pre-activation block: BN-relu-conv3x3-BN-relu-conv3x3, + shortcut.

  Where the width or the resolution changes the shortcut is a 1x1 conv
  (``shortcut``) of the pre-activated input, else the identity.
  """

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    a = nn.relu(_batch_norm(train, "bn1")(x))
    y = _conv3x3(self.features, self.stride, "conv1")(a)
    y = nn.relu(_batch_norm(train, "bn2")(y))
    y = _conv3x3(self.features, 1, "conv2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv1x1(self.features, self.stride, "shortcut")(a)
    return x + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` (Zagoruyko & Komodakis 2016, *Wide Residual Networks*).

  conv3x3(16) -> 3 groups of ``n = (depth - 4) / 6`` pre-activation blocks
  (:class:`WideBasicBlock`) of width ``16k``, ``32k``, ``64k`` (``k = widen_factor``),
  strides 1, 2, 2 -> BN-relu -> global average pool -> ``fc``; no dropout. WRN-16-4
  (the default) has 2,748,890 params on 32x32x3 with 10 classes (2,748,602 on 28x28x1).
  Layers: ``conv1``, ``group{g}_block{b}/{bn1,conv1,bn2,conv2[,shortcut]}``, ``bn``, ``fc``.
  """

  depth: int = 16
  widen_factor: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    blocks = _check_depth(self.depth, step=6, offset=4, minimum=10, example="16, 22, 28, 40")
    k = self.widen_factor
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0:
      raise ValueError(f"widen_factor must be a positive integer, got {k!r}.")
    _check_features((), self.num_classes)
    x = _image_batch(x, f"WRN-{self.depth}-{k}")
    x = _conv3x3(16, 1, "conv1")(x)
    for g, (width, stride) in enumerate(((16 * k, 1), (32 * k, 2), (64 * k, 2)), start=1):
      for b in range(1, blocks + 1):
        x = WideBasicBlock(width, stride if b == 1 else 1, name=f"group{g}_block{b}")(x, train)
    x = nn.relu(_batch_norm(train, "bn")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


MODELS: dict[str, type[nn.Module]] = {
    "lenet300": LeNet300100,
    "lenet5": LeNet5Caffe,
    "mlp": MLP,
    "resnet20": CifarResNet,
    "wrn": WideResNet,
    "gpt": _transformer.GPT,
}
"""Model name -> flax.linen class."""

SPARSE_FILTERS: dict[str, Callable[[str, Any], bool]] = {
    "gpt": _transformer.sparse_filter,   # Dense kernels; embeddings and norms stay dense
}
"""Model name -> its default sparse-leaf filter, for the models where it is not every leaf of
rank >= 2 (:func:`jaxsparse.default_filter`, the methods' default)."""


def default_sparse_filter(name: str) -> Callable[[str, Any], bool] | None:
  """Model ``name``'s default filter of sparse leaves, or None for the methods' default.

  Raises:
    ValueError: for an unknown ``name`` (the message lists the known names).
  """
  _lookup(MODELS, name)
  return SPARSE_FILTERS.get(name)


def _lookup(registry: dict[str, Any], name: str) -> Any:
  if name not in registry:
    raise ValueError(f"Unknown model name {name!r}; known names: {sorted(registry)}.")
  return registry[name]


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
  """A flax.linen model from :data:`MODELS`, e.g. ``create_model("mlp", 10, features=(2048,) * 3)``.

  Raises:
    ValueError: for an unknown ``name`` (the message lists the known names).
  """
  return _lookup(MODELS, name)(num_classes=num_classes, **kwargs)


def init_params(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict[str, Any]:
  """Initializes a linen model on a dummy batch of one ``input_shape`` example (no batch axis).

  Returns:
    The variables dict: ``{"params": ...}`` plus ``"batch_stats"`` for
    models with BatchNorm.
  """
  x = jnp.zeros((1, *tuple(input_shape)), jnp.float32)
  return dict(model.init(jax.random.key(seed), x, train=False))


# ------------------------------------------------------------------ flax.nnx


class MLPNNX(nnx.Module):
  """nnx twin of :class:`MLP`: attributes ``fc1`` .. and, with ``batch_norm``, ``bn1`` ..

  Args:
    input_shape: shape of one example (no batch axis); flattened to the input width.
    features: hidden widths.
    num_classes: output width.
    use_bias: biases in the Linear layers.
    batch_norm: BatchNorm after each hidden Linear, before the relu.
    rngs: ``nnx.Rngs`` for initialization.
  """

  def __init__(self, input_shape: Sequence[int], features: Sequence[int], num_classes: int = 10,
               *, use_bias: bool = True, batch_norm: bool = False, rngs: nnx.Rngs):
    features = tuple(features)
    _check_features(features, num_classes)
    self.num_hidden = len(features)
    self.batch_norm = batch_norm
    widths = (math.prod(input_shape), *features, num_classes)
    for i in range(len(widths) - 1):
      setattr(self, f"fc{i + 1}", nnx.Linear(widths[i], widths[i + 1], use_bias=use_bias,
                                              rngs=rngs))
      if batch_norm and i < len(features):
        setattr(self, f"bn{i + 1}", nnx.BatchNorm(widths[i + 1], momentum=BN_MOMENTUM,
                                                   epsilon=BN_EPSILON, rngs=rngs))

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for i in range(1, self.num_hidden + 1):
      x = getattr(self, f"fc{i}")(x)
      if self.batch_norm:
        x = getattr(self, f"bn{i}")(x, use_running_average=not train)
      x = nnx.relu(x)
    return getattr(self, f"fc{self.num_hidden + 1}")(x)


class LeNet300100NNX(MLPNNX):
  """nnx twin of :class:`LeNet300100` (an :class:`MLPNNX` with features ``(300, 100)``)."""

  def __init__(self, input_shape: Sequence[int], num_classes: int = 10, *, use_bias: bool = True,
               batch_norm: bool = False, rngs: nnx.Rngs):
    super().__init__(input_shape, (300, 100), num_classes, use_bias=use_bias,
                     batch_norm=batch_norm, rngs=rngs)


class LeNet5CaffeNNX(nnx.Module):
  """nnx twin of :class:`LeNet5Caffe`; ``input_shape`` is ``(H, W, C)`` (or ``(H, W)``)."""

  def __init__(self, input_shape: Sequence[int], num_classes: int = 10, *,
               padding: str | None = None, use_bias: bool = True, rngs: nnx.Rngs):
    if len(input_shape) not in (2, 3):
      raise ValueError(f"input_shape must be (H, W, C) or (H, W), got {tuple(input_shape)}.")
    height, width = input_shape[0], input_shape[1]
    channels = input_shape[2] if len(input_shape) == 3 else 1
    self.padding = resolve_lenet5_padding(padding, height, width)
    out_h, out_w = _lenet5_spatial(height, width, self.padding)
    self.conv1 = nnx.Conv(channels, 20, (5, 5), padding=self.padding, use_bias=use_bias,
                          rngs=rngs)
    self.conv2 = nnx.Conv(20, 50, (5, 5), padding=self.padding, use_bias=use_bias, rngs=rngs)
    self.fc1 = nnx.Linear(out_h * out_w * 50, 500, use_bias=use_bias, rngs=rngs)
    self.fc2 = nnx.Linear(500, num_classes, use_bias=use_bias, rngs=rngs)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # No BatchNorm or dropout.
    x = _max_pool(self.conv1(_image_batch(x)))
    x = _max_pool(self.conv2(x))
    x = x.reshape((x.shape[0], -1))
    return self.fc2(nnx.relu(self.fc1(x)))


def _gpt_nnx(input_shape: Sequence[int], num_classes: int = 256, *, rngs: nnx.Rngs,
             **kwargs: Any) -> _transformer.GPTNNX:
  """:class:`jaxsparse.nn.transformer.GPTNNX`; ``input_shape`` is ``(seq_len,)``, the default context."""
  kwargs.setdefault("context", int(input_shape[-1]))
  return _transformer.GPTNNX(num_classes, rngs=rngs, **kwargs)


NNX_MODELS: dict[str, Callable[..., nnx.Module]] = {
    "lenet300": LeNet300100NNX,
    "lenet5": LeNet5CaffeNNX,
    "mlp": MLPNNX,
    "gpt": _gpt_nnx,
}
"""Model name -> flax.nnx class (same names as :data:`MODELS`)."""


def create_nnx_model(name: str, input_shape: Sequence[int], num_classes: int = 10, *,
                     seed: int = 0, **kwargs: Any) -> nnx.Module:
  """A flax.nnx model from :data:`NNX_MODELS`, initialized with ``nnx.Rngs(seed)``.

  E.g. ``create_nnx_model("mlp", (28, 28, 1), 10, features=(2048,) * 3)``.

  Raises:
    ValueError: for an unknown ``name`` (the message lists the known names).
  """
  cls = _lookup(NNX_MODELS, name)
  return cls(tuple(input_shape), num_classes=num_classes, rngs=nnx.Rngs(seed), **kwargs)
