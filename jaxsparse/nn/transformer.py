"""A GPT-style decoder-only language model in flax.linen (and a flax.nnx twin), and what one-shot
pruning needs of it.

:class:`GPT` (registry name ``"gpt"``): token + learned position embeddings,
``depth`` pre-norm blocks ``x += attn(ln1(x)); x += mlp(ln2(x))`` with causal
multi-head self-attention (separate ``query``/``key``/``value``/``out`` Dense
layers, as in LLaMA, so that each is pruned on its own) and a GELU MLP
(``fc1``, ``fc2``), a final LayerNorm and an untied ``head`` (or, with
``tie_embeddings``, the transposed token embedding). Dense layers have no bias
by default. Leaves::

  embed/embedding (V, D)       pos_embed (context, D)        ln_f/{scale,bias}
  blocks_i/ln1, ln2            blocks_i/attn/{query,key,value,out}/kernel (D, D)
  blocks_i/mlp/fc1/kernel (D, rD)   blocks_i/mlp/fc2/kernel (rD, D)   head/kernel (D, V)

:func:`sparse_filter` selects the Dense kernels (embeddings and norms stay
dense); pass it as ``filter=`` to any jaxsparse method. The one-shot pruners
(:mod:`jaxsparse.pruning.oneshot`) prune the blocks' kernels and leave the head dense,
as SparseGPT and Wanda do.

:func:`stages` splits the model into the pure functions the layer-by-layer
calibration runs one after the other: the embedding, then each block.

Block-sparse MLP: ``GPT(..., sparse_mlp=SparseMLP(block_shape=(128, 128), nnz_max=...))``
builds ``mlp/fc1`` and ``mlp/fc2`` as :class:`jaxsparse.kernels.SparseDense` (same ``kernel``
leaves), which read their masks from the ``"masks"`` collection:
``model.apply({"params": params, "masks": masks}, tokens)``. Prune with the plain GPT (the
one-shot pruners record ``nn.Dense`` inputs), then run the same params and masks on it.

:class:`GPTNNX` is the flax.nnx twin: the same modules under the same names, so
``nnx.state(model, nnx.Param)`` has exactly the linen params' leaves and shapes
(``state = nnx.state(model, nnx.Param); nnx.replace_by_pure_dict(state, linen_params);
nnx.update(model, state)`` copies them over).

FLOPs: ``js.count_flops(model, params, (seq_len,), masks)`` counts the Dense
kernels at every position; :func:`lm_flops` adds the attention's two
``T x T`` matmuls per block, which no mask changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxsparse.analysis import flops as flops_lib

_INIT_STD = 0.02


def _dense(features: int, name: str, use_bias: bool, std: float = _INIT_STD) -> nn.Dense:
  return nn.Dense(features, use_bias=use_bias, kernel_init=nn.initializers.normal(std), name=name)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with separate ``query``/``key``/``value``/``out`` Dense layers."""

  num_heads: int
  use_bias: bool = False
  out_std: float = _INIT_STD

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"num_heads={self.num_heads} does not divide the width {d}")
    hd = d // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, hd)
    q = split(_dense(d, "query", self.use_bias)(x))
    k = split(_dense(d, "key", self.use_bias)(x))
    v = split(_dense(d, "value", self.use_bias)(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return _dense(d, "out", self.use_bias, self.out_std)(y)


class Block(nn.Module):
  """Pre-norm block ``x += attn(ln1(x)); x += mlp(ln2(x))``: ``ln1, attn, ln2, mlp/fc1, mlp/fc2``."""

  num_heads: int
  mlp_ratio: int = 4
  use_bias: bool = False
  out_std: float = _INIT_STD
  sparse_mlp: SparseMLP | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + CausalSelfAttention(self.num_heads, self.use_bias, self.out_std, name="attn")(
        nn.LayerNorm(name="ln1")(x))
    return x + FeedForward(self.mlp_ratio, self.use_bias, self.out_std, self.sparse_mlp,
                           name="mlp")(nn.LayerNorm(name="ln2")(x))


class SparseMLP(NamedTuple):
  """How a :class:`GPT`'s ``mlp/fc1`` and ``mlp/fc2`` run on the block-sparse kernel
  (:class:`jaxsparse.kernels.SparseDense`'s arguments; see :func:`jaxsparse.kernels.choose_path`).

  Attributes:
    block_shape: ``(bk, bn)``, dividing both kernels' shapes.
    nnz_max: the block budget of each layer (fc1 and fc2 have the same number of blocks
      for square blocks); None: every block (then ``mode="auto"`` takes the dense path).
    mode: ``"auto"``, ``"bsr"`` or ``"masked_dense"``.
    backend: the kernel backend (None: Triton on GPU, interpret mode on CPU).
  """
  block_shape: tuple[int, int] = (64, 64)
  nnz_max: int | None = None
  mode: str = "auto"
  backend: str | None = None


class FeedForward(nn.Module):
  """``fc2(gelu(fc1(x)))``, hidden width ``mlp_ratio * D``; ``sparse``: fc1, fc2 as SparseDense."""

  mlp_ratio: int
  use_bias: bool
  out_std: float
  sparse: SparseMLP | None = None

  def _layer(self, features: int, name: str, std: float) -> nn.Module:
    if self.sparse is None:
      return _dense(features, name, self.use_bias, std)
    from jaxsparse.kernels import SparseDense  # late: the kernels import Pallas
    return SparseDense(features, tuple(self.sparse.block_shape), self.sparse.nnz_max,
                       self.sparse.mode, self.sparse.backend, use_bias=self.use_bias,
                       kernel_init=nn.initializers.normal(std), name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = nn.gelu(self._layer(self.mlp_ratio * d, "fc1", _INIT_STD)(x))
    return self._layer(d, "fc2", self.out_std)(h)


def _check_tokens(tokens: jax.Array, context: int) -> None:
  """ValueError naming ``inputs`` unless ``tokens`` is (batch, seq_len) with seq_len <= context."""
  if tokens.ndim != 2:
    raise ValueError(f"inputs: expected tokens of shape (batch, seq_len), got {tokens.shape}")
  if tokens.shape[1] > context:
    raise ValueError(f"inputs: sequences of {tokens.shape[1]} tokens are longer than the "
                     f"model's context={context}")


class GPT(nn.Module):
  """Decoder-only LM; ``__call__(tokens (B, T) ints, train=False) -> logits (B, T, V)``.

  Attributes:
    num_classes: the vocabulary size (256 for bytes); named as in the model registry.
    context: the longest sequence (size of the learned position embedding).
    width: the model width D.
    depth: the number of blocks.
    num_heads: attention heads (must divide ``width``).
    mlp_ratio: the MLP's hidden width is ``mlp_ratio * width``.
    tie_embeddings: logits from the transposed token embedding instead of ``head``.
    use_bias: biases in the Dense layers.
    sparse_mlp: a :class:`SparseMLP`: the MLP layers run on the block-sparse kernel with
      the masks passed as the ``"masks"`` collection (same params as without it).

  Residual output projections (``attn/out``, ``mlp/fc2``) start at std
  ``0.02 / sqrt(2 depth)`` (GPT-2), the other Dense kernels and the embeddings at 0.02.
  """

  num_classes: int = 256
  context: int = 128
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_ratio: int = 4
  tie_embeddings: bool = False
  use_bias: bool = False
  sparse_mlp: SparseMLP | None = None

  def setup(self):
    _check_config(self)
    init = nn.initializers.normal(_INIT_STD)
    self.embed = nn.Embed(self.num_classes, self.width, embedding_init=init)
    self.pos_embed = self.param("pos_embed", init, (self.context, self.width))
    self.blocks = [_block(self) for _ in range(self.depth)]
    self.ln_f = nn.LayerNorm()
    if not self.tie_embeddings:
      self.head = _dense(self.num_classes, "head", False)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token plus position embeddings of ``tokens`` (B, T), T <= ``context``."""
    _check_tokens(tokens, self.context)
    return self.embed(tokens.astype(jnp.int32)) + self.pos_embed[:tokens.shape[1]]

  def block(self, x: jax.Array, index: int) -> jax.Array:
    """Block ``index`` applied to hidden states ``x`` (B, T, D)."""
    return self.blocks[index](x)

  def logits(self, x: jax.Array) -> jax.Array:
    """The final LayerNorm and the output layer."""
    x = self.ln_f(x)
    return self.embed.attend(x) if self.tie_embeddings else self.head(x)

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics
    x = self.embed_tokens(tokens)
    for blk in self.blocks:
      x = blk(x)
    return self.logits(x)


def _check_config(model: Any) -> None:
  """The size arguments of :class:`GPT` / :class:`GPTNNX`, each error naming its argument."""
  for field in ("num_classes", "context", "width", "depth", "num_heads", "mlp_ratio"):
    value = getattr(model, field)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"{field} must be a positive int, got {value!r}")
  if model.width % model.num_heads:
    raise ValueError(f"num_heads={model.num_heads} does not divide width={model.width}")
  sparse = getattr(model, "sparse_mlp", None)
  if sparse is not None and not isinstance(sparse, SparseMLP):
    raise TypeError(f"sparse_mlp must be a jaxsparse.nn.transformer.SparseMLP or None, got "
                    f"{sparse!r}")


def sparse_filter(name: str, leaf: Any) -> bool:
  """The Dense kernels (leaves ``.../kernel`` of rank 2); embeddings, norms and biases stay dense."""
  return name.split("/")[-1] == "kernel" and jnp.ndim(leaf) == 2


def block_filter(name: str, leaf: Any) -> bool:
  """The Dense kernels inside the blocks (what SparseGPT and Wanda prune; the head stays dense)."""
  return sparse_filter(name, leaf) and name.startswith("blocks_")


def _block(model: "GPT") -> Block:
  """A block of ``model`` (unbound: the same module for every block)."""
  return Block(model.num_heads, model.mlp_ratio, model.use_bias,
               _INIT_STD / math.sqrt(2 * model.depth), model.sparse_mlp)


class Stage(NamedTuple):
  """One step of the layer-by-layer calibration.

  Attributes:
    name: a label (the block's params key).
    apply: ``apply(params, x) -> next x``, where ``params`` is ``params[scope]``.
    scope: the top-level params key the stage reads; None: the whole params tree.
  """
  name: str
  apply: Callable[[Any, jax.Array], jax.Array]
  scope: str | None = None


@dataclasses.dataclass(frozen=True)
class _EmbedStage:
  model: "GPT"

  def __call__(self, params, tokens):
    return self.model.apply({"params": params}, tokens, method=GPT.embed_tokens)


@dataclasses.dataclass(frozen=True)
class _BlockStage:
  block: Block

  def __call__(self, params, x):
    return self.block.apply({"params": params}, x)


def stages(model: GPT) -> list[Stage]:
  """The embedding, then each block ``blocks_i`` (scope ``"blocks_i"``), as pure functions.

  Chained, they compute the hidden states before ``ln_f``. Every block stage has the
  same ``apply`` (an equal, hashable object), so jitted calibration code compiles once
  for all blocks of a model.
  """
  if not isinstance(model, GPT):
    raise TypeError(f"model must be a jaxsparse.nn.transformer.GPT, got {type(model).__name__}")
  if model.sparse_mlp is not None:
    raise ValueError("model: the one-shot pruners record nn.Dense inputs, and sparse_mlp makes "
                     "the MLP SparseDense; calibrate the same GPT without sparse_mlp (the params "
                     "and masks are the same)")
  block = _BlockStage(_block(model))
  return [Stage("embed", _EmbedStage(model))] + [
      Stage(f"blocks_{i}", block, f"blocks_{i}") for i in range(model.depth)]


# ------------------------------------------------------------------ flax.nnx twin


def _linear(d_in: int, d_out: int, use_bias: bool, rngs: nnx.Rngs,
            std: float = _INIT_STD) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=nnx.initializers.normal(std),
                    rngs=rngs)


class CausalSelfAttentionNNX(nnx.Module):
  """nnx twin of :class:`CausalSelfAttention`: ``query``, ``key``, ``value``, ``out``."""

  def __init__(self, width: int, num_heads: int, *, use_bias: bool = False,
               out_std: float = _INIT_STD, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.query = _linear(width, width, use_bias, rngs)
    self.key = _linear(width, width, use_bias, rngs)
    self.value = _linear(width, width, use_bias, rngs)
    self.out = _linear(width, width, use_bias, rngs, out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    hd = d // self.num_heads
    split = lambda y: y.reshape(b, t, self.num_heads, hd)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(hd)
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d))


class FeedForwardNNX(nnx.Module):
  """nnx twin of :class:`FeedForward`: ``fc1``, ``fc2``."""

  def __init__(self, width: int, mlp_ratio: int, *, use_bias: bool = False,
               out_std: float = _INIT_STD, rngs: nnx.Rngs):
    self.fc1 = _linear(width, mlp_ratio * width, use_bias, rngs)
    self.fc2 = _linear(mlp_ratio * width, width, use_bias, rngs, out_std)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(nnx.gelu(self.fc1(x)))


class BlockNNX(nnx.Module):
  """nnx twin of :class:`Block`: ``ln1``, ``attn``, ``ln2``, ``mlp``."""

  def __init__(self, width: int, num_heads: int, mlp_ratio: int = 4, *, use_bias: bool = False,
               out_std: float = _INIT_STD, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = CausalSelfAttentionNNX(width, num_heads, use_bias=use_bias, out_std=out_std,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.mlp = FeedForwardNNX(width, mlp_ratio, use_bias=use_bias, out_std=out_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class GPTNNX(nnx.Module):
  """nnx twin of :class:`GPT` (same arguments, plus ``rngs``); ``__call__(tokens, train=False)``.

  Its Param leaves are the linen GPT's, with the same names and shapes (``embed/embedding``,
  ``pos_embed``, ``blocks_i/...``, ``ln_f``, ``head/kernel``), so :func:`sparse_filter` and
  :func:`block_filter` select the same kernels, and linen params load into it (the same
  logits) with ``nnx.replace_by_pure_dict(state, params)`` on ``state = nnx.state(model,
  nnx.Param)``, then ``nnx.update(model, state)``. The same initializers, but not
  the same random draws as linen's ``init``. Train it with any jaxsparse method through
  ``nnx.Optimizer(model, js.rigl(..., filter=sparse_filter), wrt=nnx.Param)``.
  """

  def __init__(self, num_classes: int = 256, context: int = 128, width: int = 128,
               depth: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
               tie_embeddings: bool = False, use_bias: bool = False, *, rngs: nnx.Rngs):
    self.num_classes, self.context, self.width, self.depth = num_classes, context, width, depth
    self.num_heads, self.mlp_ratio = num_heads, mlp_ratio
    self.tie_embeddings, self.use_bias = tie_embeddings, use_bias
    _check_config(self)
    init = nnx.initializers.normal(_INIT_STD)
    self.embed = nnx.Embed(num_classes, width, embedding_init=init, rngs=rngs)
    self.pos_embed = nnx.Param(init(rngs.params(), (context, width)))
    out_std = _INIT_STD / math.sqrt(2 * depth)
    for i in range(depth):  # blocks_i attributes: the linen GPT's names
      setattr(self, f"blocks_{i}", BlockNNX(width, num_heads, mlp_ratio, use_bias=use_bias,
                                            out_std=out_std, rngs=rngs))
    self.ln_f = nnx.LayerNorm(width, rngs=rngs)
    if not tie_embeddings:
      self.head = _linear(width, num_classes, False, rngs)

  def embed_tokens(self, tokens: jax.Array) -> jax.Array:
    """Token plus position embeddings of ``tokens`` (B, T), T <= ``context``."""
    _check_tokens(tokens, self.context)
    return self.embed(tokens.astype(jnp.int32)) + self.pos_embed[:tokens.shape[1]]

  def logits(self, x: jax.Array) -> jax.Array:
    """The final LayerNorm and the output layer."""
    x = self.ln_f(x)
    return self.embed.attend(x) if self.tie_embeddings else self.head(x)

  def __call__(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    del train  # no dropout, no batch statistics
    x = self.embed_tokens(tokens)
    for i in range(self.depth):
      x = getattr(self, f"blocks_{i}")(x)
    return self.logits(x)


# ------------------------------------------------------------------ loss, perplexity, training


def lm_loss(model: GPT, params: Any, windows: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats) of ``windows`` (B, T + 1): inputs ``[:, :-1]``."""
  logits = model.apply({"params": params}, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), windows[:, 1:]).mean()


@functools.partial(jax.jit, static_argnums=0)
def _window_nll_sum(model, params, windows):
  logits = model.apply({"params": params}, windows[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), windows[:, 1:]).sum()


def perplexity(model: GPT, params: Any, windows: np.ndarray, batch_size: int = 64) -> float:
  """``exp`` of the mean next-token cross-entropy over all predicted tokens of ``windows``."""
  windows = np.asarray(windows)
  total = 0.0
  for i in range(0, len(windows), batch_size):
    # A last, shorter batch compiles once more.
    total += float(_window_nll_sum(model, params, jnp.asarray(windows[i:i + batch_size])))
  return float(math.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


# ------------------------------------------------------------------ FLOPs


class LMFlops(NamedTuple):
  """Forward FLOPs of one sequence of ``seq_len`` tokens."""
  dense_layers: int   # Dense kernels, all weights
  sparse_layers: int  # Dense kernels, kept weights only
  attention: int      # QK^T and AV, 2 * 2 * T^2 * D per block (the causal half not skipped)
  seq_len: int

  @property
  def dense(self) -> int:
    return self.dense_layers + self.attention

  @property
  def sparse(self) -> int:
    return self.sparse_layers + self.attention


def lm_flops(model: GPT, params: Any, seq_len: int, masks: Any = None) -> LMFlops:
  """Dense-kernel FLOPs from :func:`jaxsparse.count_flops` plus the attention matmuls."""
  layers = flops_lib.count_flops(model, params, (seq_len,), masks)
  dense, sparse = flops_lib.total_flops(layers)
  if model.tie_embeddings:  # the transposed embedding is the output layer: dense, not a Dense
    dense += flops_lib.FLOPS_PER_MAC * seq_len * model.width * model.num_classes
    sparse += flops_lib.FLOPS_PER_MAC * seq_len * model.width * model.num_classes
  attention = model.depth * 2 * flops_lib.FLOPS_PER_MAC * seq_len * seq_len * model.width
  return LMFlops(dense, sparse, attention, seq_len)
