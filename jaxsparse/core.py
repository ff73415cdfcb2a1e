"""The engine shared by every jaxsparse method: an optax wrapper that keeps masks.

A method is ``sparse_transform(inner, init_masks=..., update_masks=...,
is_update_step=...)``: ``inner`` is any optax optimizer (sgd, adam, a chain,
``inject_hyperparams(...)``); the method supplies how masks start and how they
change. One call to ``update`` does, inside one jitted step:

1. on a mask-update step (``lax.cond`` on the schedule, so no recompilation):
   ``new_masks, survivors = update_masks(...)`` from the current weights
   ``where(mask, params, 0)`` and this step's raw dense gradient (both at the
   same point, as RigL's drop and grow criteria need). Off update steps
   ``new_masks = survivors = masks``. Survivors are the weights that carry over
   unchanged; pruned and (re)grown weights are not survivors;
2. the inner optimizer's per-weight state (momentum, Adam moments, ...) is
   zeroed at every weight that is not a survivor, with ``optax.tree_map_params``;
3. ``u, inner_state <- inner.update(where(survivors, g, 0), state,
   where(survivors, params, 0))``: the inner optimizer never sees the gradient
   or the value of a pruned weight, so its state there stays exactly zero (for
   optax's per-weight optimizers: sgd, momentum, nesterov, adam(w), rmsprop,
   lion, ...: zero state, zero gradient and zero param give zero state);
4. returns ``where(survivors, u, -params)``, so that after
   ``optax.apply_updates`` every masked weight is exactly zero and every
   regrown weight starts at exactly zero.

The mask update comes before the inner update (and sees that update, computed
from the old masks, as ``MaskUpdateInputs.updates``) so that the reset of step
2 fuses into the inner update: XLA then writes the optimizer state once per
step in place, and a non-update step costs what a static mask costs.

How the initial mask reaches the params: the first ``update`` zeroes every
masked weight (step 4). To make the very first forward pass sparse too, apply
the masks once after ``init``:
``params = jaxsparse.apply_masks(params, jaxsparse.get_masks(opt_state))``.

The wrapper must be the last transform in a chain (transforms before it, such
as gradient clipping, are fine): a transform after it would change the updates
that keep masked weights at zero.

Mask-update steps whose weights or gradients contain NaN or inf are
skipped (masks and inner state's reset unchanged), so a bad step cannot corrupt
the masks; the normal optimizer step still runs.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse import masks as masks_lib
from jaxsparse import topk
from jaxsparse.masks import Masks, Params


class SparseState(NamedTuple):
  """State of every jaxsparse method.

  Attributes:
    count: number of ``update`` calls so far (the step the schedules see).
    key: the method's base PRNG key; update ``t`` uses ``fold_in(key, t)``.
    masks: the mask tree (see :mod:`jaxsparse.masks`).
    inner_state: the wrapped optimizer's state.
    aux: method-specific state (e.g. DSR's threshold); ``()`` when unused.
  """
  count: jax.Array
  key: jax.Array
  masks: Masks
  inner_state: optax.OptState
  aux: Any = ()


class MaskUpdateInputs(NamedTuple):
  """What a method's ``update_masks`` sees at a mask-update step."""
  step: jax.Array      # int32 step of this update
  key: jax.Array       # PRNG key for this update
  params: Params       # current weights, where(mask, params, 0), before this step's update
  grads: Params        # raw dense gradient of this step (before masking)
  masks: Masks         # masks before the update
  aux: Any             # method-specific state
  inner_state: optax.OptState  # inner optimizer state before this step
  updates: Params      # the inner optimizer's update of this step (from the masked gradient)


class MaskUpdate(NamedTuple):
  """What a method's ``update_masks`` returns.

  Attributes:
    masks: the new masks.
    survivors: the weights that carry over unchanged (value and optimizer
      state); a subset of old and new masks. Weights in ``masks`` but not in
      ``survivors`` are (re)grown at zero with zeroed optimizer state, even if
      they were active before (dropped and regrown in the same update).
    aux: the method's new ``aux`` state.
  """
  masks: Masks
  survivors: Masks
  aux: Any = ()


InitMasks = Callable[[Params, jax.Array], tuple[Masks, Any]]
UpdateMasks = Callable[[MaskUpdateInputs], MaskUpdate]
Track = Callable[[Any, Params, Masks], Any]


def map_sparse(fn: Callable[..., jax.Array], masks: Masks, *trees: Any) -> Masks:
  """``fn(mask, *leaves)`` on sparse leaves; dense leaves keep their scalar mask."""
  return jax.tree.map(lambda m, *xs: fn(m, *xs) if jnp.ndim(m) else m, masks, *trees)


def masks_from_fn(params: Params, sparse_names: Any, fn: Callable[[str, jax.Array, int], jax.Array]
                  ) -> Masks:
  """Builds a mask tree: ``fn(name, leaf, index)`` for leaves in ``sparse_names``, else dense."""
  names = masks_lib.leaf_names(params)
  leaves, treedef = jax.tree.flatten(params)
  out = [fn(n, leaf, i) if n in sparse_names else masks_lib.dense_mask()
         for i, (n, leaf) in enumerate(zip(names, leaves))]
  return jax.tree.unflatten(treedef, out)


def _all_finite(*trees: Any) -> jax.Array:
  """Whether every float entry of ``trees`` is finite (counted with dots, not reductions:
  see :func:`jaxsparse.topk.count_true`; this runs in every method's update branch)."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return sum(topk.count_true(~jnp.isfinite(x)) for x in leaves) == 0 if leaves else jnp.bool_(True)


def reset_inner_state(inner: optax.GradientTransformation, inner_state: optax.OptState,
                      keep: Masks) -> optax.OptState:
  """Zeroes the inner optimizer's per-weight state wherever ``keep`` is False.

  Uses ``optax.tree_map_params`` to find the state leaves shaped like params
  (momentum, Adam's mu and nu, ...); leaves of another shape (e.g. factored
  second moments) are left unchanged.
  """
  def reset(s, k):
    if jnp.ndim(k) == 0 or jnp.shape(s) != jnp.shape(k):
      return s
    return jnp.where(k, s, jnp.zeros_like(s))

  return optax.tree_map_params(inner, reset, inner_state, keep)


def sparse_transform(inner: optax.GradientTransformation, *, init_masks: InitMasks,
                     update_masks: UpdateMasks | None,
                     is_update_step: Callable[[jax.Array], jax.Array],
                     track: Track | None = None,
                     seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that it trains only the weights the masks keep.

  Args:
    inner: the optax optimizer to wrap.
    init_masks: ``(params, key) -> (masks, aux)``, called once by ``init``.
    update_masks: ``MaskUpdateInputs -> MaskUpdate``, called under
      ``lax.cond`` when ``is_update_step(step)``; ``None`` for fixed masks.
    is_update_step: ``step -> bool`` (traced).
    track: ``(aux, raw_grads, masks) -> aux``, called at every step before the mask
      update (e.g. SNFS's momentum of the dense gradient); ``None``: aux only
      changes at mask updates.
    seed: seed of the method's PRNG key.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  if not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {seed!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Params) -> SparseState:
    key = jax.random.key(int(seed))
    masks, aux = init_masks(params, jax.random.fold_in(key, 2**31 - 1))
    masks_lib.check_masks(params, masks)
    return SparseState(count=jnp.zeros([], jnp.int32), key=key, masks=masks,
                       inner_state=inner.init(params), aux=aux)

  def update_fn(updates: optax.Updates, state: SparseState, params: Params | None = None,
                **extra_args: Any) -> tuple[optax.Updates, SparseState]:
    if params is None:
      raise ValueError("params: jaxsparse methods need params in update(updates, state, params)")
    masks = state.masks
    grads = updates
    aux = state.aux if track is None else track(state.aux, grads, masks)
    new_masks, survivors = masks, masks
    if update_masks is not None:
      def do_update(masks, aux):
        cand = masks_lib.apply_masks(params, masks)
        # The inner update as it would be with the old masks (DeepR's sign test needs
        # it); XLA drops it for methods that do not look at it.
        planned, _ = inner.update(masks_lib.apply_masks(grads, masks), state.inner_state, params,
                                  **extra_args)
        inputs = MaskUpdateInputs(step=state.count, key=jax.random.fold_in(state.key, state.count),
                                  params=cand, grads=grads, masks=masks, aux=aux,
                                  inner_state=state.inner_state, updates=planned)
        new = update_masks(inputs)
        ok = _all_finite(cand, grads)  # else this update is skipped: masks and aux unchanged
        keep_old = lambda n, o: jnp.where(ok, n, o)
        new_masks = jax.tree.map(keep_old, new.masks, masks)
        survivors = jax.tree.map(lambda s, n, o: keep_old(s & n & o, o), new.survivors,
                                 new.masks, masks)
        return new_masks, survivors, jax.tree.map(keep_old, new.aux, aux)

      # Only the masks go through the cond: passing the optimizer state through it
      # would copy that state on every step.
      new_masks, survivors, aux = lax.cond(
          is_update_step(state.count), do_update, lambda masks, aux: (masks, masks, aux),
          masks, aux)
      inner_state = reset_inner_state(inner, state.inner_state, survivors)
    else:
      inner_state = state.inner_state
    u, inner_state = inner.update(masks_lib.apply_masks(grads, survivors), inner_state,
                                  masks_lib.apply_masks(params, survivors), **extra_args)

    out = jax.tree.map(
        lambda du, p, keep: du if jnp.ndim(keep) == 0 else jnp.where(keep, du, -p),
        u, params, survivors)
    return out, SparseState(count=optax.safe_int32_increment(state.count), key=state.key,
                            masks=new_masks, inner_state=inner_state, aux=aux)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def get_sparse_state(opt_state: optax.OptState) -> SparseState:
  """Finds the one :class:`SparseState` inside any optimizer state.

  Works through ``optax.chain``, ``optax.MultiSteps``, ``optax.inject_hyperparams``
  and ``nnx.Optimizer`` states, by walking the pytree.
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SparseState))
           if isinstance(x, SparseState)]
  if len(found) != 1:
    raise ValueError(f"opt_state: expected exactly one jaxsparse SparseState, found {len(found)}; "
                     "was the optimizer built with (exactly one) jaxsparse method?")
  return found[0]


def get_masks(opt_state: optax.OptState) -> Masks:
  """The mask tree held by the jaxsparse method inside ``opt_state``."""
  return get_sparse_state(opt_state).masks
