"""Sparsely-gated mixture of experts (Shazeer et al. 2017, "Outrageously Large Neural
Networks: The Sparsely-Gated Mixture-of-Experts Layer"), in flax.linen and flax.nnx.

The layer is ``y = sum_i G(x)_i E_i(x)`` over ``num_experts`` experts ``E_i`` (one-hidden-layer
ReLU MLPs as in the paper, or single Dense layers with ``hidden_features=None``) with the
noisy top-k gate (sec. 2.1, eq. 3-5)::

  H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i)     (noise in training only)
  G(x)   = Softmax(KeepTopK(H(x), k))

``W_g`` and ``W_noise`` start at zero (appendix A: no signal and some noise, so the load starts
balanced). Load balancing (appendix A) adds ``w_importance * CV(Importance(X))^2 + w_load *
CV(Load(X))^2`` with ``Importance(X)_i = sum_x G(x)_i`` (eq. 6) and the smooth load estimator
``Load(X)_i = sum_x P(x, i)``, ``P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) /
Softplus((x W_noise)_i))`` (eq. 8-10). Without noise (evaluation) the load is the count of
tokens whose gate is non-zero. CV is the population coefficient of variation. Switch
Transformer's ``alpha * E * sum_i f_i P_i`` (Fedus et al. 2021, eq. 4-6) is the option
``balance="switch"``.

**Experts' compute is skipped**, not masked: each (token, choice) pair is sorted by expert
(``argsort``, all first choices before all second choices, then by token), given a slot in its
expert's buffer of ``capacity = min(T, ceil(capacity_factor * k * T / E))`` rows (static under
``jit``), and the experts run as one batched matmul over ``[E, capacity, d]``; outputs are
gathered back and weighted by the gates. Pairs beyond an expert's capacity are dropped (they
contribute 0; the gates are not renormalised) and counted. The expert FLOPs are ``E * capacity
~ capacity_factor * k * T`` rows, independent of ``E``; only the gate ``x W_g`` grows with
``E``.

**The auxiliary loss is returned through flax's ``sow``** (the idiomatic way: the model's
signature stays ``x -> y`` however deeply the layer is nested). The linen :class:`MoE` sows it
into the collection ``"losses"`` (``apply(..., mutable=["losses", "intermediates"])``) and
its :class:`MoEStats` into ``"intermediates"``; the nnx :class:`MoENNX` sows both as
``nnx.Intermediate`` (``y, inter = nnx.capture(model, nnx.Intermediate)(x)``).
:func:`total_aux_loss` sums every ``aux_loss`` in such a tree; add it to the task loss. The
pure function :func:`moe_apply` returns ``(y, stats)``::

  # net: a model holding MoE layers (training: noise from the "gating" rng stream)
  logits, cols = net.apply({"params": params}, x, rngs={"gating": key},
                           mutable=["losses", "intermediates"])
  loss = cross_entropy(logits, y) + total_aux_loss(cols["losses"])
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.stats import norm

BALANCES = ("shazeer", "switch")
"""Load-balancing losses: Shazeer et al. 2017 (CV^2 of importance and load) or Switch's."""


class Gating(NamedTuple):
  """The noisy top-k gate of a batch of ``T`` tokens over ``E`` experts.

  Attributes:
    gates: ``[T, k]`` softmax over the k kept logits (eq. 3).
    experts: ``[T, k]`` int32 expert of each gate, best first.
    logits: ``[T, E]`` ``H(x)`` (with noise when a key was given).
    clean_logits: ``[T, E]`` ``x W_g``.
    noise_std: ``[T, E]`` ``Softplus(x W_noise) + noise_epsilon``, or None without noise.
  """
  gates: jax.Array
  experts: jax.Array
  logits: jax.Array
  clean_logits: jax.Array
  noise_std: jax.Array | None


class MoEStats(NamedTuple):
  """What one call of the layer measured.

  Attributes:
    aux_loss: the load-balancing loss (scalar).
    importance: ``[E]`` sum of gates per expert (eq. 6).
    load: ``[E]`` smooth load estimate (eq. 10) with noise, else tokens routed per expert.
    expert_counts: ``[E]`` int32 (token, choice) pairs each expert computed (after capacity).
    dropped: int32, pairs dropped because their expert was full.
  """
  aux_loss: jax.Array
  importance: jax.Array
  load: jax.Array
  expert_counts: jax.Array
  dropped: jax.Array


def _check_int(value: Any, name: str, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
  return int(value)


def _check_positive(value: Any, name: str, allow_zero: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
    raise TypeError(f"{name} must be a number, got {value!r}")
  if value < 0 or (value == 0 and not allow_zero):
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
  return float(value)


def check_moe_args(num_experts: int, k: int, capacity_factor: float, balance: str = "shazeer",
                   w_importance: float = 0.1, w_load: float = 0.1, switch_alpha: float = 0.01,
                   noise_epsilon: float = 1e-2) -> None:
  """Raises ValueError / TypeError naming the first bad argument of an MoE layer."""
  _check_int(num_experts, "num_experts")
  _check_int(k, "k")
  if k > num_experts:
    raise ValueError(f"k must be <= num_experts ({num_experts}), got {k}")
  _check_positive(capacity_factor, "capacity_factor")
  if balance not in BALANCES:
    raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
  for name, v in (("w_importance", w_importance), ("w_load", w_load),
                  ("switch_alpha", switch_alpha), ("noise_epsilon", noise_epsilon)):
    _check_positive(v, name, allow_zero=True)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
  """Rows per expert buffer: ``min(T, ceil(capacity_factor * k * T / E))`` (a token reaches an
  expert at most once, so ``T`` rows always suffice)."""
  check_moe_args(num_experts, k, capacity_factor)
  # round() first: 1.25 * 2 * 64 / 8 is 20.000000000000004 in floats, and ceil would give 21.
  return max(1, min(num_tokens, math.ceil(round(capacity_factor * k * num_tokens / num_experts,
                                                9))))


def noisy_top_k_gating(x: jax.Array, w_gate: jax.Array, w_noise: jax.Array | None, k: int,
                       key: jax.Array | None = None, noise_epsilon: float = 1e-2) -> Gating:
  """Shazeer et al. 2017, eq. 3-5: ``Softmax(KeepTopK(H(x), k))`` for ``x`` of shape ``[T, d]``.

  The noise ``N(0, 1) * (Softplus(x W_noise) + noise_epsilon)`` is added only when ``key`` and
  ``w_noise`` are given (training). ``noise_epsilon`` (0 in the paper's equations) keeps the
  std away from 0, where the load estimator (eq. 9) would divide by zero.
  """
  clean = x @ w_gate
  if key is None or w_noise is None:
    logits, std = clean, None
  else:
    std = jax.nn.softplus(x @ w_noise) + noise_epsilon
    logits = clean + jax.random.normal(key, clean.shape, clean.dtype) * std
  top, experts = jax.lax.top_k(logits, k)
  return Gating(jax.nn.softmax(top, axis=-1), experts.astype(jnp.int32), logits, clean, std)


def importance(gating: Gating, num_experts: int) -> jax.Array:
  """``Importance(X)_i = sum_x G(x)_i`` (Shazeer et al. 2017, eq. 6)."""
  return jnp.zeros(num_experts, gating.gates.dtype).at[gating.experts.reshape(-1)].add(
      gating.gates.reshape(-1))


def routed_counts(gating: Gating, num_experts: int) -> jax.Array:
  """Tokens routed to each expert (non-zero gate), before capacity: the load without noise."""
  return jnp.zeros(num_experts, jnp.int32).at[gating.experts.reshape(-1)].add(1)


def load_estimate(gating: Gating, k: int) -> jax.Array:
  """The smooth load ``Load(X)_i = sum_x P(x, i)`` (Shazeer et al. 2017, eq. 8-10).

  ``P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / std_i)``: the probability that
  expert i is in the top k when its own noise is drawn again and the others' kept. The k-th
  largest of the other logits is the (k+1)-th largest of all when i is in the top k, else the
  k-th; with ``k == E`` every expert is always chosen (P = 1). Needs the noisy gate.
  """
  if gating.noise_std is None:
    raise ValueError("gating: the load estimator needs the noisy gate (a key and w_noise)")
  num_experts = gating.logits.shape[-1]
  if k == num_experts:
    return jnp.full(num_experts, gating.logits.shape[0], gating.logits.dtype)
  top, _ = jax.lax.top_k(gating.logits, k + 1)
  chosen = jnp.any(gating.experts[:, :, None] == jnp.arange(num_experts), axis=1)
  threshold = jnp.where(chosen, top[:, k:k + 1], top[:, k - 1:k])
  return norm.cdf((gating.clean_logits - threshold) / gating.noise_std).sum(axis=0)


def cv_squared(v: jax.Array, eps: float = 1e-10) -> jax.Array:
  """Squared coefficient of variation ``Var(v) / Mean(v)^2`` (population variance)."""
  v = v.astype(jnp.float32)
  if v.shape[0] == 1:
    return jnp.zeros([], jnp.float32)
  return jnp.var(v) / (jnp.mean(v) ** 2 + eps)


def shazeer_balance_loss(importance: jax.Array, load: jax.Array, w_importance: float,
                         w_load: float) -> jax.Array:
  """``w_importance * CV(Importance)^2 + w_load * CV(Load)^2`` (Shazeer et al. 2017, eq. 7, 11)."""
  return w_importance * cv_squared(importance) + w_load * cv_squared(load)


def switch_balance_loss(gating: Gating, alpha: float) -> jax.Array:
  """Switch Transformer's ``alpha * E * sum_i f_i P_i`` (Fedus et al. 2021, eq. 4-6): ``f_i``
  the fraction of (token, choice) pairs routed to expert i (before capacity; with k = 1 the
  fraction of tokens), ``P_i`` the mean router probability ``softmax(H(x))_i``."""
  num_tokens, k = gating.experts.shape
  num_experts = gating.logits.shape[-1]
  f = routed_counts(gating, num_experts).astype(jnp.float32) / (num_tokens * k)
  p = jax.nn.softmax(gating.logits.astype(jnp.float32), axis=-1).mean(axis=0)
  return alpha * num_experts * jnp.sum(f * p)


def dispatch(x: jax.Array, experts: jax.Array, num_experts: int, capacity: int
             ) -> tuple[jax.Array, jax.Array]:
  """Sorts the (token, choice) pairs by expert into ``[E, capacity, d]`` buffers.

  Priority within an expert: all first choices before all second choices, then token order
  (a token's first choice is never dropped for another's second). Returns ``(buffers, slots)``:
  ``slots[t, j]`` is the row ``e * capacity + position`` of pair (t, j) in the flattened
  buffers, or ``E * capacity`` when it was dropped. Empty rows are zero.
  """
  x, experts = jnp.asarray(x), jnp.asarray(experts)
  num_tokens, k = experts.shape
  flat = experts.T.reshape(-1)                               # choice-major priority
  order = jnp.argsort(flat, stable=True)
  counts = jnp.zeros(num_experts, jnp.int32).at[flat].add(1)
  starts = jnp.cumsum(counts) - counts
  pos_sorted = jnp.arange(flat.shape[0], dtype=jnp.int32) - starts[flat[order]]
  pos = jnp.zeros_like(pos_sorted).at[order].set(pos_sorted)
  slots = jnp.where(pos < capacity, flat * capacity + pos, num_experts * capacity)
  tokens = jnp.tile(jnp.arange(num_tokens), k)
  buffers = jnp.zeros((num_experts * capacity, x.shape[-1]), x.dtype)
  buffers = buffers.at[slots].set(x[tokens], mode="drop")
  return buffers.reshape(num_experts, capacity, x.shape[-1]), slots.reshape(k, num_tokens).T


def combine(outputs: jax.Array, slots: jax.Array, gates: jax.Array) -> jax.Array:
  """``y_t = sum_j gates[t, j] * outputs[slots[t, j]]`` with dropped pairs contributing 0."""
  flat = outputs.reshape(-1, outputs.shape[-1])
  flat = jnp.concatenate([flat, jnp.zeros((1, flat.shape[-1]), flat.dtype)])  # the drop row
  return jnp.einsum("tk,tko->to", gates.astype(flat.dtype), flat[slots])


def experts_apply(params: dict[str, jax.Array], buffers: jax.Array,
                  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu) -> jax.Array:
  """All experts on their own buffers as batched matmuls: ``[E, C, d] -> [E, C, out]``."""
  h = buffers
  if "wi" in params:
    h = activation(jnp.einsum("ecd,edh->ech", h, params["wi"]) + params["bi"][:, None, :])
  return jnp.einsum("ech,eho->eco", h, params["wo"]) + params["bo"][:, None, :]


def _check_input(x: jax.Array, in_features: int) -> None:
  if jnp.ndim(x) < 2:
    raise ValueError(f"x must have shape [..., tokens, features] (rank >= 2), got shape "
                     f"{jnp.shape(x)}")
  if x.shape[-1] != in_features:
    raise ValueError(f"x has {x.shape[-1]} features on its last axis; the layer's in_features "
                     f"is {in_features}")


def moe_apply(params: dict[str, jax.Array], x: jax.Array, *, k: int, capacity_factor: float,
              key: jax.Array | None = None, balance: str = "shazeer", w_importance: float = 0.1,
              w_load: float = 0.1, switch_alpha: float = 0.01, noise_epsilon: float = 1e-2,
              activation: Callable[[jax.Array], jax.Array] = jax.nn.relu
              ) -> tuple[jax.Array, MoEStats]:
  """The MoE layer as a pure function of its params (``w_gate``, ``w_noise``, ``wi``, ``bi``,
  ``wo``, ``bo``; see :class:`MoE`): ``x [..., d] -> (y [..., out], MoEStats)``.

  ``key`` turns on the gate's noise (training); all leading axes of ``x`` are tokens.
  """
  num_experts = params["w_gate"].shape[-1]
  check_moe_args(num_experts, k, capacity_factor, balance, w_importance, w_load, switch_alpha,
                 noise_epsilon)
  _check_input(x, params["w_gate"].shape[0])
  x = jnp.asarray(x)
  lead = x.shape[:-1]
  tokens = x.reshape(-1, x.shape[-1])
  gating = noisy_top_k_gating(tokens, params["w_gate"], params.get("w_noise"), k, key,
                              noise_epsilon)
  capacity = expert_capacity(tokens.shape[0], num_experts, k, capacity_factor)
  buffers, slots = dispatch(tokens, gating.experts, num_experts, capacity)
  y = combine(experts_apply(params, buffers, activation), slots, gating.gates)
  imp = importance(gating, num_experts)
  routed = routed_counts(gating, num_experts)
  load = routed.astype(imp.dtype) if gating.noise_std is None else load_estimate(gating, k)
  if balance == "shazeer":
    aux = shazeer_balance_loss(imp, load, w_importance, w_load)
  else:
    aux = switch_balance_loss(gating, switch_alpha)
  kept = slots < num_experts * capacity
  counts = jnp.zeros(num_experts, jnp.int32).at[gating.experts.reshape(-1)].add(
      kept.reshape(-1).astype(jnp.int32))
  stats = MoEStats(aux, imp, load, counts, jnp.sum(~kept, dtype=jnp.int32))
  return y.reshape(*lead, y.shape[-1]), stats


def total_aux_loss(tree: Any) -> jax.Array:
  """Sum of every leaf under a dict key ``aux_loss``: the sowed losses of all MoE layers in a
  linen ``"losses"`` collection or an nnx ``nnx.pop(model, nnx.Intermediate)`` state.

  Sowing appends, so apply a linen model with ``{"params": ...}`` only (``init`` also returns
  a ``"losses"`` collection, which ``apply`` would extend) and pop nnx intermediates each step.
  """
  total = jnp.zeros([], jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    # Dict keys only: MoEStats (sowed beside it) also has an aux_loss *attribute*.
    if any(isinstance(p, jax.tree_util.DictKey) and p.key == "aux_loss" for p in path):
      total = total + jnp.sum(leaf)
  return total


def _expert_init() -> Callable:
  # lecun_normal with each expert's own fan-in (axis 0 indexes experts).
  return nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


class MoE(nn.Module):
  """Sparsely-gated mixture-of-experts layer (Shazeer et al. 2017) in flax.linen.

  Params: ``w_gate``, ``w_noise`` ``[d, E]`` (zeros), ``wi`` ``[E, d, hidden]``, ``bi``
  ``[E, hidden]`` (absent with ``hidden_features=None``), ``wo`` ``[E, hidden or d, features]``,
  ``bo`` ``[E, features]``. Noise is drawn from the rng stream ``"gating"`` when
  ``deterministic=False`` and ``noisy_gating``. Sows ``aux_loss`` into ``"losses"`` and
  :class:`MoEStats` (``moe_stats``) into ``"intermediates"``.
  """

  features: int
  num_experts: int
  k: int = 2
  hidden_features: int | None = None
  capacity_factor: float = 1.25
  noisy_gating: bool = True
  balance: str = "shazeer"
  w_importance: float = 0.1
  w_load: float = 0.1
  switch_alpha: float = 0.01
  noise_epsilon: float = 1e-2
  activation: Callable[[jax.Array], jax.Array] = jax.nn.relu

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    check_moe_args(self.num_experts, self.k, self.capacity_factor, self.balance,
                   self.w_importance, self.w_load, self.switch_alpha, self.noise_epsilon)
    _check_int(self.features, "features")
    if jnp.ndim(x) < 2:
      _check_input(x, 0)
    if self.has_variable("params", "w_gate"):  # before flax's own shape error on self.param
      _check_input(x, self.get_variable("params", "w_gate").shape[0])
    d, e = x.shape[-1], self.num_experts
    params = {"w_gate": self.param("w_gate", nn.initializers.zeros, (d, e))}
    if self.noisy_gating:
      params["w_noise"] = self.param("w_noise", nn.initializers.zeros, (d, e))
    if self.hidden_features is not None:
      _check_int(self.hidden_features, "hidden_features")
      params["wi"] = self.param("wi", _expert_init(), (e, d, self.hidden_features))
      params["bi"] = self.param("bi", nn.initializers.zeros, (e, self.hidden_features))
    n_in = d if self.hidden_features is None else self.hidden_features
    params["wo"] = self.param("wo", _expert_init(), (e, n_in, self.features))
    params["bo"] = self.param("bo", nn.initializers.zeros, (e, self.features))
    key = None if deterministic or not self.noisy_gating else self.make_rng("gating")
    y, stats = moe_apply(params, x, k=self.k, capacity_factor=self.capacity_factor, key=key,
                         balance=self.balance, w_importance=self.w_importance,
                         w_load=self.w_load, switch_alpha=self.switch_alpha,
                         noise_epsilon=self.noise_epsilon, activation=self.activation)
    self.sow("losses", "aux_loss", stats.aux_loss)
    self.sow("intermediates", "moe_stats", stats)
    return y


class MoENNX(nnx.Module):
  """nnx twin of :class:`MoE`: the same params (as ``nnx.Param`` attributes of the same names
  and shapes) and the same outputs for the same weights. Noise comes from the ``"gating"``
  stream of ``rngs`` (or its default); ``aux_loss`` and ``moe_stats`` are sowed as
  ``nnx.Intermediate``."""

  def __init__(self, in_features: int, features: int, num_experts: int, *, k: int = 2,
               hidden_features: int | None = None, capacity_factor: float = 1.25,
               noisy_gating: bool = True, balance: str = "shazeer", w_importance: float = 0.1,
               w_load: float = 0.1, switch_alpha: float = 0.01, noise_epsilon: float = 1e-2,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, rngs: nnx.Rngs):
    check_moe_args(num_experts, k, capacity_factor, balance, w_importance, w_load, switch_alpha,
                   noise_epsilon)
    _check_int(in_features, "in_features")
    _check_int(features, "features")
    if not isinstance(rngs, nnx.Rngs):
      raise TypeError(f"rngs must be an nnx.Rngs, got {type(rngs).__name__}")
    self.in_features, self.k, self.capacity_factor = in_features, k, capacity_factor
    self.balance, self.activation = balance, activation
    self.w_importance, self.w_load, self.switch_alpha = w_importance, w_load, switch_alpha
    self.noise_epsilon = noise_epsilon
    d, e = in_features, num_experts
    self.w_gate = nnx.Param(jnp.zeros((d, e)))
    self.w_noise = nnx.Param(jnp.zeros((d, e))) if noisy_gating else None
    init = _expert_init()
    if hidden_features is not None:
      _check_int(hidden_features, "hidden_features")
      self.wi = nnx.Param(init(rngs.params(), (e, d, hidden_features)))
      self.bi = nnx.Param(jnp.zeros((e, hidden_features)))
    else:
      self.wi = self.bi = None
    n_in = d if hidden_features is None else hidden_features
    self.wo = nnx.Param(init(rngs.params(), (e, n_in, features)))
    self.bo = nnx.Param(jnp.zeros((e, features)))
    self.rngs = rngs["gating"].fork()

  def __call__(self, x: jax.Array, deterministic: bool = False) -> jax.Array:
    _check_input(x, self.in_features)
    params = {n: getattr(self, n)[...] for n in ("w_gate", "w_noise", "wi", "bi", "wo", "bo")
              if getattr(self, n) is not None}
    key = None if deterministic or self.w_noise is None else self.rngs()
    y, stats = moe_apply(params, x, k=self.k, capacity_factor=self.capacity_factor, key=key,
                         balance=self.balance, w_importance=self.w_importance,
                         w_load=self.w_load, switch_alpha=self.switch_alpha,
                         noise_epsilon=self.noise_epsilon, activation=self.activation)
    self.sow(nnx.Intermediate, "aux_loss", stats.aux_loss)
    self.sow(nnx.Intermediate, "moe_stats", stats)
    return y
