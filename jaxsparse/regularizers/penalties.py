"""Sparsity regularizers as optax transforms, and the threshold-and-freeze step.

Two kinds of transform, modelled on ``optax.add_decayed_weights``:

* **gradient** transforms (:func:`add_l1`, :func:`add_group_lasso`) add the
  (sub)gradient of the penalty to the updates; put them *before* the
  optimizer, ``optax.chain(add_l1(lam), optax.sgd(lr))``;
* **step** transforms (:func:`l1_proximal`, :func:`group_lasso_proximal`,
  :func:`sensitivity_decay`) act on the step the optimizer has produced;
  put them *after* the optimizer, ``optax.chain(optax.sgd(lr), l1_proximal(lam, lr))``.
  The proximal ones soft-threshold ``v = params + updates`` (proximal gradient
  descent), which leaves exact zeros.

Penalties (Tibshirani 1996 for L1):
L1 ``lam * sum |w|``; group lasso ``lam * sum_g ||w_g||_2`` (Yuan & Lin 2006;
groups are output neurons/filters, input neurons, or a user grouping).

Which leaves are regularized: ``filter(name, leaf) -> bool`` and ``keep_dense``, the
arguments with which the methods choose their sparse leaves
(:func:`jaxsparse.core.distributions.leaf_flags`); by default the kernels (rank >= 2).
``mask`` (as in ``optax.add_decayed_weights``, a tree of bools or a callable
``params -> tree of bools``) is their deprecated predecessor: it warns and still works.

After training, :func:`threshold_and_freeze` turns the regularized dense
params into ``(params, masks)`` for ``jaxsparse.keep_masks(inner, masks)``.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib

Params = Any
ScalarOrSchedule = Union[float, optax.Schedule]
LeafMask = Union[None, Any, Callable[[Params], Any]]
GroupSpec = Union[str, Callable[[str, jax.Array], Any], dict]

GROUPINGS = ("output", "input")
"""Named groupings: ``"output"``: one group per output neuron / conv filter (all
axes but the last); ``"input"``: one group per input neuron (all axes but the
second to last, i.e. a row of a Dense kernel ``(in, out)``)."""


class RegularizerState(NamedTuple):
  """State of the regularizers: the step count (for schedules of lambda or eta)."""
  count: jax.Array


# ------------------------------------------------------------------ argument checks


def _check_scalar_or_schedule(value: Any, argname: str) -> None:
  if callable(value):
    return
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{argname} must be a non-negative float or an optax schedule, got {value!r}")
  if not np.isfinite(value) or value < 0:
    raise ValueError(f"{argname} must be a finite non-negative number, got {value!r}")


def _value(v: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  return jnp.asarray(v(count) if callable(v) else v, jnp.float32)


class Selection(NamedTuple):
  """Which leaves a regularizer acts on: ``filter`` and ``keep_dense`` as the methods take
  them, or the deprecated optax-style ``mask``."""
  filter: dist.LeafFilter | None = None
  keep_dense: Sequence[str] = ()
  mask: LeafMask = None


def _selection(fn: str, mask: LeafMask, filter: dist.LeafFilter | None,
               keep_dense: Sequence[str]) -> Selection:
  """The leaves ``fn`` regularises; ``mask`` warns (deprecated for filter and keep_dense)."""
  if filter is not None and not callable(filter):
    raise TypeError(f"filter must be a callable (name, leaf) -> bool, got {filter!r}")
  if mask is not None:
    if filter is not None or keep_dense:
      raise TypeError(f"{fn}(): pass filter and keep_dense, not mask (their deprecated "
                      "predecessor) with them")
    warnings.warn(f"{fn}(): 'mask' is deprecated; use 'filter' (a (name, leaf) -> bool, as the "
                  "methods take) and 'keep_dense'", DeprecationWarning, stacklevel=3)
  return Selection(filter, keep_dense, mask)


def _leaf_flags(sel: Selection, params: Params) -> list[bool]:
  """One static bool per leaf of ``params``: is this leaf regularized."""
  mask = sel.mask
  if mask is None:
    return dist.leaf_flags(params, filter=sel.filter, keep_dense=sel.keep_dense)
  tree = mask(params) if callable(mask) else mask
  try:
    flags = jax.tree.leaves(jax.tree.map(lambda m, p: jax.tree.map(lambda _: bool(m), p), tree, params))
  except (ValueError, TypeError) as err:
    raise ValueError(f"mask: must be a tree of bools with the params' structure ({err})") from err
  return flags


def _map_flagged(fn: Callable[..., jax.Array], flags: Sequence[bool], *trees: Any) -> Any:
  """``fn(*leaves)`` on flagged leaves; the first tree's leaf is returned unchanged elsewhere."""
  flat = [jax.tree.leaves(t) for t in trees]
  treedef = jax.tree.structure(trees[0])
  out = [fn(*xs) if f else xs[0] for f, *xs in zip(flags, *flat)]
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------------ groups


class Groups(NamedTuple):
  """A leaf's grouping: int32 ids with the leaf's shape and their static count."""
  ids: jax.Array
  num: int


def _named_group_ids(shape: tuple, grouping: str, name: str) -> Groups:
  if len(shape) < 2:
    raise ValueError(f"groups={grouping!r}: leaf '{name}' has shape {shape}; named groupings "
                     "need a kernel of rank >= 2 (exclude it with mask or give its ids)")
  axis = len(shape) - 1 if grouping == "output" else len(shape) - 2
  n = shape[axis]
  bshape = [1] * len(shape)
  bshape[axis] = n
  ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32).reshape(bshape), shape)
  return Groups(ids, n)


def _user_group_ids(ids: Any, shape: tuple, name: str) -> Groups:
  arr = np.asarray(ids)
  if arr.shape != shape:
    raise ValueError(f"groups: the group ids for leaf '{name}' have shape {arr.shape} but the leaf "
                     f"has shape {shape}; every weight needs a group id")
  if not np.issubdtype(arr.dtype, np.integer) or (arr.size and arr.min() < 0):
    raise ValueError(f"groups: the group ids for leaf '{name}' must be non-negative integers, "
                     f"got dtype {arr.dtype}" + (f" with min {arr.min()}" if arr.size else ""))
  return Groups(jnp.asarray(arr, jnp.int32), int(arr.max()) + 1 if arr.size else 0)


def _check_groups_arg(groups: Any) -> None:
  if isinstance(groups, str):
    if groups not in GROUPINGS:
      raise ValueError(f"groups must be one of {GROUPINGS}, a dict leaf name -> ids, or a "
                       f"callable (name, leaf) -> ids; got {groups!r}")
  elif not (callable(groups) or isinstance(groups, dict)):
    raise TypeError(f"groups must be one of {GROUPINGS}, a dict or a callable, got "
                    f"{type(groups).__name__}")


def group_ids(params: Params, groups: GroupSpec, mask: LeafMask = None, *,
              filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
              ) -> list[Groups | None]:
  """Per leaf (flattening order), its :class:`Groups`, or None if not regularized.

  Raises ValueError (naming the leaf) when a user grouping does not cover a
  regularized leaf (missing, or ids of another shape).
  """
  return _group_ids(params, groups, _selection("group_ids", mask, filter, keep_dense))


def _group_ids(params: Params, groups: GroupSpec, sel: Selection) -> list[Groups | None]:
  _check_groups_arg(groups)
  names = masks_lib.leaf_names(params)
  out = []
  for name, leaf, flag in zip(names, jax.tree.leaves(params), _leaf_flags(sel, params)):
    shape = tuple(jnp.shape(leaf))
    if not flag:
      out.append(None)
    elif isinstance(groups, str):
      out.append(_named_group_ids(shape, groups, name))
    elif isinstance(groups, dict):
      if name not in groups:
        raise ValueError(f"groups: no group ids for the regularized leaf '{name}' (the dict has "
                         f"{sorted(groups)}); add it or exclude it with filter or keep_dense")
      out.append(_user_group_ids(groups[name], shape, name))
    else:
      out.append(_user_group_ids(groups(name, leaf), shape, name))
  return out


def group_norms(w: jax.Array, g: Groups) -> jax.Array:
  """``||w_g||_2`` for every group, shape ``(g.num,)``."""
  sq = jax.ops.segment_sum(jnp.square(w.astype(jnp.float32)).reshape(-1), g.ids.reshape(-1),
                           num_segments=g.num)
  return jnp.sqrt(sq)


# ------------------------------------------------------------------ penalties


def l1_penalty(params: Params, strength: float, mask: LeafMask = None, *,
               filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
               ) -> jax.Array:
  """``strength * sum |w|`` over the regularized leaves."""
  flags = _leaf_flags(_selection("l1_penalty", mask, filter, keep_dense), params)
  return strength * sum((jnp.sum(jnp.abs(p)) for p, f in zip(jax.tree.leaves(params), flags) if f),
                        jnp.float32(0))


def group_lasso_penalty(params: Params, strength: float, groups: GroupSpec = "output",
                        mask: LeafMask = None, *, filter: dist.LeafFilter | None = None,
                        keep_dense: Sequence[str] = ()) -> jax.Array:
  """``strength * sum_g ||w_g||_2`` over the regularized leaves."""
  gs = _group_ids(params, groups, _selection("group_lasso_penalty", mask, filter, keep_dense))
  return strength * sum((jnp.sum(group_norms(p, g)) for p, g in zip(jax.tree.leaves(params), gs)
                         if g is not None), jnp.float32(0))


# ------------------------------------------------------------------ gradient transforms


def _init(params: Params) -> RegularizerState:
  del params
  return RegularizerState(count=jnp.zeros([], jnp.int32))


def add_l1(strength: ScalarOrSchedule, mask: LeafMask = None, *,
           filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
           ) -> optax.GradientTransformation:
  """Adds the L1 subgradient ``strength * sign(w)`` to the updates (0 at w = 0).

  Use before the optimizer. Subgradient steps make weights oscillate around
  zero rather than reach it; for exact zeros use :func:`l1_proximal`. The L1 family:
  :func:`l1_penalty` (the value), this (its subgradient), :func:`l1_proximal` (its prox);
  network slimming's ``bn_scale_l1`` is this on the BatchNorm scales.
  """
  _check_scalar_or_schedule(strength, "strength")
  sel = _selection("add_l1", mask, filter, keep_dense)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: add_l1 needs params in update(updates, state, params)")
    lam = _value(strength, state.count)
    flags = _leaf_flags(sel, params)
    updates = _map_flagged(lambda u, p: u + (lam * jnp.sign(p)).astype(u.dtype), flags,
                           updates, params)
    return updates, RegularizerState(optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(_init, update_fn)


def _group_grad(p: jax.Array, g: Groups, lam: jax.Array) -> jax.Array:
  norms = group_norms(p, g)
  inv = jnp.where(norms > 0, 1.0 / jnp.where(norms > 0, norms, 1.0), 0.0)
  return (lam * p * inv[g.ids]).astype(p.dtype)


def add_group_lasso(strength: ScalarOrSchedule, groups: GroupSpec = "output",
                    mask: LeafMask = None, *, filter: dist.LeafFilter | None = None,
                    keep_dense: Sequence[str] = ()) -> optax.GradientTransformation:
  """Adds the group-lasso subgradient ``strength * w_g / ||w_g||_2`` (0 for a zero group).

  Args:
    strength: lambda (>= 0) or a schedule.
    groups: ``"output"`` (neurons / filters), ``"input"`` (input neurons), a
      dict ``leaf name -> int ids`` of the leaf's shape, or a callable
      ``(name, leaf) -> ids``.
    filter, keep_dense: which leaves (see the module docstring; ``mask`` is deprecated).
  """
  _check_scalar_or_schedule(strength, "strength")
  _check_groups_arg(groups)
  sel = _selection("add_group_lasso", mask, filter, keep_dense)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: add_group_lasso needs params in update(updates, state, params)")
    lam = _value(strength, state.count)
    gs = _group_ids(params, groups, sel)
    treedef = jax.tree.structure(updates)
    out = [u if g is None else u + _group_grad(p, g, lam).astype(u.dtype)
           for u, p, g in zip(jax.tree.leaves(updates), jax.tree.leaves(params), gs)]
    return jax.tree.unflatten(treedef, out), RegularizerState(optax.safe_int32_increment(state.count))

  def init_fn(params):
    _group_ids(params, groups, sel)  # a grouping that does not cover a leaf fails here
    return _init(params)

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ proximal transforms


def soft_threshold(v: jax.Array, tau: jax.Array) -> jax.Array:
  """The prox of ``tau * |.|``: ``sign(v) * max(|v| - tau, 0)``."""
  return jnp.sign(v) * jnp.maximum(jnp.abs(v) - tau, 0).astype(v.dtype)


def group_soft_threshold(v: jax.Array, g: Groups, tau: jax.Array) -> jax.Array:
  """The prox of ``tau * sum_g ||.||_2``: ``v_g * max(0, 1 - tau / ||v_g||)``."""
  norms = group_norms(v, g)
  scale = jnp.where(norms > tau, 1.0 - tau / jnp.where(norms > 0, norms, 1.0), 0.0)
  return (v * scale[g.ids]).astype(v.dtype)


def _prox_transform(prox: Callable[[jax.Array, jax.Array, Any], jax.Array], strength, learning_rate,
                    leaf_info: Callable[[Params], list]) -> optax.GradientTransformation:
  """``updates <- prox(params + updates, lr * lam) - params`` on the regularized leaves."""
  _check_scalar_or_schedule(strength, "strength")
  _check_scalar_or_schedule(learning_rate, "learning_rate")

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("params: proximal transforms need params in update(updates, state, params)")
    tau = _value(learning_rate, state.count) * _value(strength, state.count)
    info = leaf_info(params)
    treedef = jax.tree.structure(updates)
    # p + (prox - p) is exactly 0 where prox is 0 (x + (-x) == 0 in IEEE arithmetic).
    out = [u if i is None else prox(p + u, tau, i) - p
           for u, p, i in zip(jax.tree.leaves(updates), jax.tree.leaves(params), info)]
    return jax.tree.unflatten(treedef, out), RegularizerState(optax.safe_int32_increment(state.count))

  def init_fn(params):
    leaf_info(params)  # e.g. a grouping that does not cover a leaf fails here
    return _init(params)

  return optax.GradientTransformation(init_fn, update_fn)


def l1_proximal(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule,
                mask: LeafMask = None, *, filter: dist.LeafFilter | None = None,
                keep_dense: Sequence[str] = ()) -> optax.GradientTransformation:
  """Proximal L1 (ISTA): ``w <- soft_threshold(w + u, lr * strength)``, after the optimizer.

  ``learning_rate`` must be the optimizer's (the prox of ``lr * lam * |.|``
  follows a step of size ``lr``). Weights below the threshold become exactly 0.
  """
  sel = _selection("l1_proximal", mask, filter, keep_dense)

  def info(params):
    return [True if f else None for f in _leaf_flags(sel, params)]
  return _prox_transform(lambda v, tau, _: soft_threshold(v, tau), strength, learning_rate, info)


def group_lasso_proximal(strength: ScalarOrSchedule, learning_rate: ScalarOrSchedule,
                         groups: GroupSpec = "output", mask: LeafMask = None, *,
                         filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
                         ) -> optax.GradientTransformation:
  """Proximal group lasso: ``w_g <- v_g * max(0, 1 - lr * strength / ||v_g||)``, ``v = w + u``.

  Whole groups whose norm is below ``lr * strength`` become exactly 0.
  """
  _check_groups_arg(groups)
  sel = _selection("group_lasso_proximal", mask, filter, keep_dense)
  return _prox_transform(lambda v, tau, g: group_soft_threshold(v, g, tau), strength, learning_rate,
                         lambda params: _group_ids(params, groups, sel))


# ------------------------------------------------------------------ sensitivity-driven


OutputFn = Callable[[Params, Any], jax.Array]


def output_sensitivity(output_fn: OutputFn, params: Params, inputs: Any,
                       alpha: jax.Array | None = None) -> Params:
  """Tartaglione et al. 2018, eq. 2: ``S(w) = sum_k alpha_k |d y_k / d w|``.

  ``y = mean over the batch of output_fn(params, inputs)``, shape ``(C,)``
  (the paper's y is the network output, e.g. softmax probabilities).
  ``alpha`` defaults to ``1 / C``.

  How and at what cost: ``jax.vjp`` once through the network, then the pullback
  is ``vmap``-ed over the C one-hot cotangents, giving the C gradients
  ``d y_k / d w`` (the absolute value must be taken per output, so they cannot
  be summed into one backward pass). That is C backward passes of the batch
  (one forward) and C x |params| transient memory. A jvp would need one
  forward-mode pass per weight, so reverse mode is the right tool for
  ``C << |params|``. Pass a sub-batch as ``inputs`` to make it cheaper.
  """
  def mean_out(p):
    y = output_fn(p, inputs)
    return y.reshape((-1, y.shape[-1])).mean(0)

  y, pullback = jax.vjp(mean_out, params)
  c = y.shape[-1]
  a = jnp.full((c,), 1.0 / c, jnp.float32) if alpha is None else jnp.asarray(alpha, jnp.float32)
  if a.shape != (c,):
    raise ValueError(f"alpha must have shape ({c},) (one weight per output), got {a.shape}")
  (grads,) = jax.vmap(pullback)(jnp.eye(c, dtype=y.dtype))
  return jax.tree.map(lambda gk: jnp.tensordot(a, jnp.abs(gk).astype(jnp.float32), axes=1), grads)


class SensitivityState(NamedTuple):
  """State of :func:`sensitivity_decay`: step count and the last insensitivity's mean (a diagnostic)."""
  count: jax.Array
  mean_insensitivity: jax.Array


def sensitivity_decay(strength: ScalarOrSchedule, output_fn: OutputFn, *,
                      alpha: jax.Array | None = None, mask: LeafMask = None,
                      filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
                      ) -> optax.GradientTransformationExtraArgs:
  """Sensitivity-driven regularization, Tartaglione et al. 2018, eq. 5.

  Adds ``-strength * w * max(0, 1 - S(w))`` to the optimizer's step, so with
  ``optax.chain(optax.sgd(eta), sensitivity_decay(lam, f))`` the update is
  ``w <- w - eta dL/dw - lam w max(0, 1 - S)`` exactly as in the paper
  (lambda is not scaled by eta). Put it after the optimizer. The update needs
  the batch: ``tx.update(grads, state, params, inputs=x)``; the sensitivity
  is :func:`output_sensitivity` (C extra backward passes per step).
  """
  _check_scalar_or_schedule(strength, "strength")
  if not callable(output_fn):
    raise TypeError(f"output_fn must be a callable (params, inputs) -> outputs, got {output_fn!r}")
  sel = _selection("sensitivity_decay", mask, filter, keep_dense)

  def init_fn(params):
    del params
    return SensitivityState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None, *, inputs=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("params: sensitivity_decay needs params in update(updates, state, params)")
    if inputs is None:
      raise ValueError("inputs: sensitivity_decay needs the batch, update(..., inputs=x)")
    lam = _value(strength, state.count)
    sens = output_sensitivity(output_fn, params, inputs, alpha)
    flags = _leaf_flags(sel, params)
    insens = [jnp.maximum(0.0, 1.0 - s) for s, f in zip(jax.tree.leaves(sens), flags) if f]
    out = _map_flagged(lambda u, p, s: u - (lam * p * jnp.maximum(0.0, 1.0 - s)).astype(u.dtype),
                       flags, updates, params, sens)
    mean_ins = (sum(jnp.sum(i) for i in insens) / max(1, sum(i.size for i in insens))
                if insens else jnp.float32(0))
    return out, SensitivityState(optax.safe_int32_increment(state.count),
                                 jnp.asarray(mean_ins, jnp.float32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------ threshold and freeze


def threshold_and_freeze(params: Params, threshold: float = 0.0, mask: LeafMask = None, *,
                         filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()
                         ) -> tuple[Params, Any]:
  """Turns a regularized dense model into ``(params, masks)`` for ``jaxsparse.keep_masks``.

  On the regularized leaves (``filter`` and ``keep_dense``; default the kernels), weights with
  ``|w| <= threshold`` are removed: their mask entry is False and they are set
  to exactly 0. Other leaves get the dense mask (scalar True). Fine-tune with
  ``jaxsparse.keep_masks(inner, masks)`` from the returned params.
  """
  if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
    raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
  flags = _leaf_flags(_selection("threshold_and_freeze", mask, filter, keep_dense), params)
  treedef = jax.tree.structure(params)
  masks = [jnp.abs(p) > threshold if f else masks_lib.dense_mask()
           for p, f in zip(jax.tree.leaves(params), flags)]
  masks = jax.tree.unflatten(treedef, masks)
  return masks_lib.apply_masks(params, masks), masks


def __getattr__(name: str):
  if name == "RegulariserState":  # deprecated for one release (American spelling)
    import warnings
    warnings.warn("RegulariserState is deprecated; use RegularizerState", DeprecationWarning,
                  stacklevel=2)
    return RegularizerState
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
