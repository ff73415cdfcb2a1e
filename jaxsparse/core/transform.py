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
that keep masked weights at zero. That mistake is detected: at every mask-update
step after the first, ``update`` checks that the params it receives are zero
wherever the mask removes a weight, and counts the steps where they are not in
``SparseState.health.unmasked`` (such a leak persists, so the update steps find
it); :func:`get_masks` then warns, and
:func:`jaxsparse.summary` / :func:`jaxsparse.sparsity` count such weights as
kept (and warn).

A mask update whose inputs are not finite (NaN or inf in the active weights or
in the gradient of the active weights; entries at removed positions do not
count) is skipped, so a bad step cannot corrupt the masks; the normal optimizer
step still runs. The skipped update is not lost: it runs at the next step whose
inputs are finite (``health.pending``), so a one-shot prune hit by a NaN
happens one step later. ``health.skipped`` counts the skips, and
:func:`get_masks` warns while an update is still pending.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxsparse.core import masks as masks_lib
from jaxsparse.core import selection as topk
from jaxsparse.core.masks import Masks, Params


class Health(NamedTuple):
  """What went wrong so far, counted on device (:func:`get_masks` warns about it).

  Attributes:
    skipped: int32, mask updates skipped because the weights or gradients they
      read were not finite.
    pending: bool, a skipped update is waiting; it runs at the next step whose
      inputs are finite.
    unmasked: int32, mask-update steps (not the first step) at which the params
      held a non-zero weight where the mask removes it: a transform after the
      method in ``optax.chain`` changed its updates, or the params were edited.
      (Methods with fixed masks do not check; the reports do.)
  """
  skipped: jax.Array
  pending: jax.Array
  unmasked: jax.Array


def healthy() -> Health:
  """A :class:`Health` with nothing counted."""
  return Health(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.bool_), jnp.zeros([], jnp.int32))


class SparseState(NamedTuple):
  """State of every jaxsparse method.

  Attributes:
    count: number of ``update`` calls so far (the step the schedules see).
    key: the method's base PRNG key; update ``t`` uses ``fold_in(key, t)``.
    masks: the mask tree (see :mod:`jaxsparse.core.masks`).
    inner_state: the wrapped optimizer's state.
    aux: method-specific state (e.g. DSR's threshold); ``()`` when unused.
    health: a :class:`Health` (set by ``init``).
  """
  count: jax.Array
  key: jax.Array
  masks: Masks
  inner_state: optax.OptState
  aux: Any = ()
  health: Any = None


class MaskUpdateInputs(NamedTuple):
  """What a method's ``update_masks`` sees at a mask-update step."""
  step: jax.Array      # int32 step of this update
  key: jax.Array       # PRNG key for this update
  params: Params       # current weights, where(mask, params, 0), before this step's update
  grads: Params        # raw dense gradient of this step (before masking; may be non-finite
                       # at removed positions: only the active entries are checked)
  masks: Masks         # masks before the update
  aux: Any             # method-specific state
  inner_state: optax.OptState  # inner optimizer state before this step
  updates: Params      # the inner optimizer's update of this step (from the masked gradient)
  shapes: Any = None   # the params' shapes and dtypes (jax.ShapeDtypeStruct leaves): with
                       # sparse_transform(flat_update=True) the arrays above may come flattened


class MaskUpdate(NamedTuple):
  """What a method's ``update_masks`` returns.

  Attributes:
    masks: the new masks.
    survivors: the weights that carry over unchanged (value and optimizer
      state); a subset of old and new masks. Weights in ``masks`` but not in
      ``survivors`` are (re)grown at zero with zeroed optimizer state, even if
      they were active before (dropped and regrown in the same update).
    aux: the method's new ``aux`` state.
    values: for a method built with ``grow_values``, a tree like the params:
      the values the (re)grown weights start at (read where ``masks`` and not
      ``survivors``); ``None``: they start at zero.
    units: with ``grow_values="int8"``, a tree like the params of per-leaf
      scalars: the quantum of ``values``, which then start at
      ``unit * clip(round(value / unit), -126, 126)`` (see :func:`sparse_transform`);
      or, where a leaf of ``values`` is int8, at ``unit * value`` (codes in [-126, 126]
      that the method quantised itself, as SET draws them: no rounding pass).
  """
  masks: Masks
  survivors: Masks
  aux: Any = ()
  values: Any = None
  units: Any = None


InitMasks = Callable[[Params, jax.Array], tuple[Masks, Any]]
UpdateMasks = Callable[[MaskUpdateInputs], MaskUpdate]
Track = Callable[[Any, Params, Masks], Any]


def masks_from_fn(params: Params, sparse_names: Any, fn: Callable[[str, jax.Array, int], jax.Array]
                  ) -> Masks:
  """Builds a mask tree: ``fn(name, leaf, index)`` for leaves in ``sparse_names``, else dense."""
  names = masks_lib.leaf_names(params)
  leaves, treedef = jax.tree.flatten(params)
  out = [fn(n, leaf, i) if n in sparse_names else masks_lib.dense_mask()
         for i, (n, leaf) in enumerate(zip(names, leaves))]
  return jax.tree.unflatten(treedef, out)


REGROWTH = ("zero", "init")


def check_regrowth(regrowth: Any) -> None:
  """Raises ValueError unless ``regrowth`` is ``"zero"``, ``"init"`` or a callable."""
  if not callable(regrowth) and regrowth not in REGROWTH:
    raise ValueError(f"regrowth must be one of {REGROWTH} or a callable (key, shape, dtype) -> "
                     f"array, such as the layer's jax.nn.initializers initializer; got {regrowth!r}")


def init_scale(param: jax.Array, mask: jax.Array) -> jax.Array:
  """Standard deviation of ``param`` over the weights ``mask`` keeps (``regrowth="init"``)."""
  m = mask.astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  x = param.astype(jnp.float32)
  mean = jnp.sum(jnp.where(mask, x, 0.0)) / n
  return jnp.sqrt(jnp.sum(jnp.where(mask, (x - mean) ** 2, 0.0)) / n)


def normal_bf16(bits: jax.Array) -> jax.Array:
  """``jax.random.normal(key, shape, jnp.bfloat16)`` from ``jax.random.bits(key, shape,
  jnp.uint32)``, so that a caller can draw its words in one hash with other draws
  (:func:`jaxsparse.core.selection.random_bits_each`).

  As jax does it: a bfloat16 uniform takes the low 8 bits of each word (jax's 8-bit draw),
  7 of them as the mantissa of a float in [1, 2), moved to [nextafter(-1, 0), 1); then
  ``sqrt(2) erf_inv(u)``, all in bfloat16. (A test checks it against jax's own draw.)
  """
  if jnp.result_type(bits) != jnp.uint32:
    raise ValueError(f"bits: jax.random.bits' uint32 words, got dtype {jnp.result_type(bits)}")
  bf16 = jnp.bfloat16
  lo = np.nextafter(np.array(-1.0, bf16), np.array(0.0, bf16), dtype=bf16)
  one = np.array(1.0, bf16)
  mantissa = lax.shift_right_logical(lax.convert_element_type(
      lax.convert_element_type(bits, jnp.uint8), jnp.uint16), jnp.uint16(1))
  floats = lax.bitcast_convert_type(mantissa | one.view(np.uint16), bf16) - one
  u = lax.max(jnp.asarray(lo), floats * (one - lo) + lo)
  return lax.mul(np.array(np.sqrt(2), bf16), lax.erf_inv(u))


def draw_regrowth(regrowth: Any, key: jax.Array, shape: tuple, dtype: Any, scale: jax.Array,
                  bits: jax.Array | None = None) -> jax.Array:
  """Starting values of regrown weights: ``"init"`` a zero-mean normal of standard deviation
  ``scale`` (the layer's at init), or ``regrowth(key, shape, dtype)``. With ``"init"``,
  ``bits`` may hold ``jax.random.bits(key, shape, jnp.uint32)``, drawn by the caller."""
  if regrowth == "init":
    # bfloat16 draws take half the random bits of float32 ones (the threefry hash dominates
    # the cost of an update), and their 8-bit mantissa is finer than the int8 codes the
    # values travel in (steps of 4 / 126 standard deviations).
    if bits is not None and jnp.size(bits) != int(np.prod(shape)):
      raise ValueError(f"bits: one word per value of shape {tuple(shape)}, got shape "
                       f"{jnp.shape(bits)}")
    z = (jax.random.normal(key, shape, jnp.bfloat16) if bits is None else
         normal_bf16(jnp.reshape(bits, shape)))
    return (scale * z.astype(jnp.float32)).astype(dtype)
  if bits is not None:
    raise ValueError(f"bits: only regrowth='init' draws its values from given bits, got "
                     f"regrowth={regrowth!r}")
  out = jnp.asarray(regrowth(key, shape, dtype))
  if out.shape != tuple(shape):
    raise ValueError(f"regrowth: the callable returned shape {out.shape}, expected {tuple(shape)} "
                     "(it is called as regrowth(key, shape, dtype), like a jax.nn.initializers "
                     "initializer)")
  return out.astype(dtype)


def _all_finite(*trees: Any) -> jax.Array:
  """Whether every float entry of ``trees`` is finite: ``x * 0`` is 0 where ``x`` is finite and
  NaN elsewhere, so their sum is NaN exactly when one entry is not finite. One sum over all
  leaves (concatenated, which XLA fuses into the reduction): per-leaf sums cost compile
  time in proportion to the number of leaves; exact on every backend."""
  xs = [jnp.ravel(x).astype(jnp.float32) for t in trees for x in jax.tree.leaves(t)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not xs:
    return jnp.bool_(True)
  return jnp.isfinite(jnp.sum(jnp.concatenate(xs) * 0))


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


_SURVIVOR = 127  # int8 code of a survivor; the other codes are grown values in units


class Codes(NamedTuple):
  """Survivors and grown values in one int8 per weight (:func:`_encode`), and the units."""
  codes: Any
  units: Any


def _encode(survivors: Masks, grown: Masks | None, values: Params | None, units: Any) -> Codes:
  """A survivor is :data:`_SURVIVOR`; any other weight ``clip(round(value / unit), -126, 126)``
  (0 off the grown weights). ``grown=None``: codes of the survivors only."""
  def one(s, g, v, u):
    if not jnp.ndim(s):
      return jnp.where(s, jnp.int8(_SURVIVOR), jnp.int8(0)), jnp.ones([], jnp.float32)
    if g is None:
      return jnp.where(s, jnp.int8(_SURVIVOR), jnp.int8(0)), jnp.ones([], jnp.float32)
    u = jnp.asarray(u, jnp.float32)
    if jnp.result_type(v) == jnp.int8:   # codes already, in units u
      return jnp.where(s, jnp.int8(_SURVIVOR), jnp.where(g, v, jnp.int8(0))), u
    u = jnp.where(u > 0, u, 1.0)
    q = jnp.clip(jnp.round(jnp.where(g & jnp.isfinite(v), v, 0).astype(jnp.float32) / u), -126, 126)
    return jnp.where(s, jnp.int8(_SURVIVOR), q.astype(jnp.int8)), u

  flat_s, treedef = jax.tree.flatten(survivors)
  n = len(flat_s)
  flat_g = [None] * n if grown is None else jax.tree.leaves(grown)
  flat_v = [None] * n if values is None else treedef.flatten_up_to(values)
  flat_u = [None] * n if units is None else treedef.flatten_up_to(units)
  pairs = [one(*a) for a in zip(flat_s, flat_g, flat_v, flat_u)]
  return Codes(jax.tree.unflatten(treedef, [c for c, _ in pairs]),
               jax.tree.unflatten(treedef, [u for _, u in pairs]))


def _decode(codes: Codes, params: Params) -> tuple[Masks, Params]:
  """``(survivors, values)`` from :func:`_encode` (XLA fuses both into their uses)."""
  survivors = jax.tree.map(lambda c: c == _SURVIVOR, codes.codes)
  values = jax.tree.map(
      lambda c, u, p: (jnp.where(c == _SURVIVOR, 0, c).astype(jnp.float32) * u
                       ).astype(jnp.result_type(p)), codes.codes, codes.units, params)
  return survivors, values


def _any_stray(params: Params, masks: Masks) -> jax.Array:
  """Whether a weight is non-zero in ``params`` where ``masks`` removes it: one float sum of
  0/1 over the sparse leaves (> 0 exactly when one term is 1: it may round, never to 0)."""
  xs = [jnp.ravel(~m & (p != 0)) for p, m in zip(masks_lib.flatten_named(params)[1],
                                                 masks_lib.flatten_named(masks)[1]) if jnp.ndim(m)]
  if not xs:
    return jnp.bool_(False)
  return jnp.sum(jnp.concatenate(xs), dtype=jnp.float32) > 0


def sparse_transform(inner: optax.GradientTransformation, *, init_masks: InitMasks,
                     update_masks: UpdateMasks | None,
                     is_update_step: Callable[[jax.Array], jax.Array],
                     track: Track | None = None, grow_values: bool | str = False,
                     flat_update: bool = False, seed: int = 0
                     ) -> optax.GradientTransformationExtraArgs:
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
    grow_values: whether ``update_masks`` returns ``MaskUpdate.values``, the
      starting values of the weights it (re)grows (else they start at zero):
      ``"int8"`` (with ``MaskUpdate.units``) or ``True`` (exact). Whatever
      leaves the update's ``lax.cond`` is written at every step, taken or not,
      so exact values cost a write and a read of the params' size at every step
      (+10-35% of a LeNet-300-100 step on CPU). ``"int8"`` values travel instead
      in the byte per weight that the survivor mask takes anyway (a code:
      survivor, or the value in units), at no cost off update steps; the unit
      must come from the state, not from a reduction over the draws (a
      reduction in the update branch costs at every step on CPU, taken or not).
    flat_update: whether ``update_masks`` may see the leaves flattened (row-major, so flat
      indices are unchanged): its ``params``, ``grads``, ``masks`` and ``updates`` then come
      1-D on CPU with one device (faster to compile there; ``MaskUpdateInputs.shapes`` has
      the shapes), and its masks, survivors and values are read back in the leaves' shapes.
      For methods whose update does not depend on the leaves' shapes; the results are the
      same.
    seed: seed of the method's PRNG key.
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f"inner must be an optax.GradientTransformation, got {type(inner).__name__}")
  if not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed must be an int, got {seed!r}")
  if not isinstance(flat_update, bool):
    raise TypeError(f"flat_update must be a bool, got {flat_update!r}")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: Params) -> SparseState:
    key = jax.random.key(int(seed))
    masks, aux = init_masks(params, jax.random.fold_in(key, 2**31 - 1))
    masks_lib.check_masks(params, masks)
    return SparseState(count=jnp.zeros([], jnp.int32), key=key, masks=masks,
                       inner_state=inner.init(params), aux=aux, health=healthy())

  def update_fn(updates: optax.Updates, state: SparseState, params: Params | None = None,
                **extra_args: Any) -> tuple[optax.Updates, SparseState]:
    if params is None:
      raise ValueError("params: jaxsparse methods need params in update(updates, state, params)")
    masks_lib.check_same_leaves(updates, params, "updates")
    masks = state.masks
    grads = updates
    health = healthy() if state.health is None else state.health
    aux = state.aux if track is None else track(state.aux, grads, masks)
    new_masks, survivors, values = masks, masks, None
    if update_masks is not None:
      shapes = jax.tree.map(lambda p: jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)),
                            params)
      leaf_shapes = [s.shape for s in jax.tree.leaves(shapes)]
      due = is_update_step(state.count) | health.pending

      def run(masks, aux, flat):
        """The mask update under its cond; ``flat``: on flattened leaves (see below)."""
        to_flat = (lambda t: jax.tree.map(lambda x: x.reshape(-1) if jnp.ndim(x) else x, t)
                   ) if flat else (lambda t: t)
        def back(t):    # a tree like the params, its leaves back in their shapes
          if not flat:
            return t
          leaves, treedef = jax.tree.flatten(t)
          return jax.tree.unflatten(treedef, [x.reshape(s) if jnp.ndim(x) else x
                                              for x, s in zip(leaves, leaf_shapes, strict=True)])
        params_, grads_ = to_flat(params), to_flat(grads)

        def unchanged(masks, aux):
          """The cond's outputs when the masks do not change (``ok`` and ``leaks`` aside)."""
          out = (masks, masks, aux)
          if grow_values == "int8":
            return out[:1] + (_encode(masks, None, None, None),) + out[2:]
          if grow_values:
            return out + (jax.tree.map(lambda m, p: jnp.zeros(jnp.shape(p) if jnp.ndim(m) else (),
                                                              jnp.result_type(p)), masks, params_),)
          return out

        def updated(masks, aux):
          cand = masks_lib.apply_masks(params_, masks)
          # The inner update as it would be with the old masks (DeepR's sign test needs
          # it); XLA drops it for methods that do not look at it.
          planned, _ = inner.update(masks_lib.apply_masks(grads, back(masks)), state.inner_state,
                                    params, **extra_args)
          inputs = MaskUpdateInputs(step=state.count,
                                    key=jax.random.fold_in(state.key, state.count),
                                    params=cand, grads=grads_, masks=masks, aux=aux,
                                    inner_state=state.inner_state, updates=to_flat(planned),
                                    shapes=shapes)
          new = update_masks(inputs)
          survivors = jax.tree.map(lambda s, n, o: s & n & o, new.survivors, new.masks, masks)
          out = (new.masks, survivors, new.aux)
          if not grow_values:
            return out
          if new.values is None or (grow_values == "int8" and new.units is None):
            raise ValueError(f"update_masks: built with grow_values={grow_values!r} but returned "
                             "no values" + (" or units" if grow_values == "int8" else ""))
          grown = jax.tree.map(lambda n, s: n & ~s, new.masks, survivors)
          if grow_values == "int8":
            return out[:1] + (_encode(survivors, grown, new.values, new.units),) + out[2:]
          return out + (jax.tree.map(
              lambda v, g, p: (jnp.where(g, v, 0).astype(jnp.result_type(p)) if jnp.ndim(g)
                               else jnp.zeros([], jnp.result_type(p))), new.values, grown,
              params_),)

        def do_update(masks, aux):
          # Only what the method trains has to be finite: a NaN gradient at a removed
          # weight (e.g. the derivative of a norm at zero) must not block the update.
          ok = _all_finite(masks_lib.apply_masks(params_, masks),
                           masks_lib.apply_masks(grads_, masks))
          # After the first step every removed weight must be zero on entry, since the
          # previous step's output zeroed it; if not, something after the method changed
          # the updates. Such a leak persists (the next outputs are changed the same way),
          # so it is looked for at mask-update steps only, where the pass costs little next
          # to the update; a pass at every step cost 10% of a scanned LeNet-300-100 step, a
          # cond 3%. With fixed masks, the reports (js.summary, js.sparsity) find it.
          leaks = (state.count > 0) & _any_stray(params_, masks)
          # Not finite: skipped (and retried), masks and aux unchanged. A cond, not a select
          # between old and new per output leaf: a skipped update is not computed, and an
          # update's outputs take no extra pass (on CPU, DSR's ResNet-20 step compiles 10
          # kernels fewer; the results are the same bit for bit).
          out = lax.cond(ok, updated, unchanged, masks, aux)
          return out[:3] + (ok, leaks) + out[3:]

        def no_update(masks, aux):
          out = unchanged(masks, aux)
          return out[:3] + (jnp.bool_(True), jnp.bool_(False)) + out[3:]

        # Only the masks (and the survivors, or their int8 codes with the values of grown
        # weights) go through the cond: passing the optimizer state through it would copy
        # that state on every step.
        out = lax.cond(due, do_update, no_update, to_flat(masks), aux)
        codes = out[1]._replace(codes=back(out[1].codes)) if grow_values == "int8" else back(out[1])
        return (back(out[0]), codes) + tuple(out[2:5]) + tuple(back(r) for r in out[5:])

      # XLA:CPU compiles a kernel over a leaf of shape (3, 3, 16, 16) or (100, 10) 3-5x slower
      # than over the same entries flat, and a mask update holds several kernels per leaf. So
      # on CPU a method whose update reads leaves as flat arrays (``flat_update``) gets them
      # flattened (ResNet-20's RigL step: 16.7 s to compile -> 12.8 s; the update is traced
      # once per branch). Elsewhere a reshape can copy (TPU tiles, GPU conv layouts) or
      # regather a sharded leaf, at every step: the leaves keep their shapes; so do they on a
      # CPU process with several devices (topk.one_device).
      if flat_update and topk.one_device():
        new_masks, survivors, aux, ok, leaked, *rest = topk.cpu_or_default(
            functools.partial(run, flat=True), functools.partial(run, flat=False), masks, aux)
      else:
        new_masks, survivors, aux, ok, leaked, *rest = run(masks, aux, False)
      if grow_values == "int8":
        survivors, values = _decode(survivors, params)
      elif grow_values:
        values = rest[0]
      skipped = due & ~ok
      health = health._replace(skipped=health.skipped + skipped.astype(jnp.int32), pending=skipped)
      inner_state = reset_inner_state(inner, state.inner_state, survivors)
    else:
      leaked = jnp.bool_(False)  # fixed masks: no update step to look at (see above)
      inner_state = state.inner_state
    health = health._replace(unmasked=health.unmasked + leaked.astype(jnp.int32))
    u, inner_state = inner.update(masks_lib.apply_masks(grads, survivors), inner_state,
                                  masks_lib.apply_masks(params, survivors), **extra_args)

    if values is None:
      out = jax.tree.map(
          lambda du, p, keep: du if jnp.ndim(keep) == 0 else jnp.where(keep, du, -p),
          u, params, survivors)
    else:
      out = jax.tree.map(
          lambda du, p, keep, v: du if jnp.ndim(keep) == 0 else jnp.where(keep, du, v - p),
          u, params, survivors, values)
    return out, SparseState(count=optax.safe_int32_increment(state.count), key=state.key,
                            masks=new_masks, inner_state=inner_state, aux=aux, health=health)

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


def _concrete(x: Any) -> bool:
  return isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)


def warn_health(state: SparseState) -> None:
  """Warns (RuntimeWarning) about what ``state.health`` records, when it is concrete."""
  h = state.health
  if not isinstance(h, Health) or not all(_concrete(x) for x in h):
    return
  if int(h.unmasked):
    warnings.warn(
        f"jaxsparse: at {int(h.unmasked)} checked step(s) the params held non-zero weights where "
        "the masks remove them. A transform after the jaxsparse method in optax.chain changes its updates: "
        "put the method last and make the rest of the chain its inner optimizer, e.g. "
        "js.sparse_evolutionary_training(optax.chain(optax.scale_by_adam(), optax.scale_by_learning_rate(1e-3)), 0.9). "
        "js.summary and js.sparsity count those weights as kept.", RuntimeWarning, stacklevel=3)
  if bool(h.pending):
    warnings.warn(
        f"jaxsparse: a scheduled mask update is pending: it was skipped (skips so far: "
        f"{int(h.skipped)}) because the weights or gradients it reads were not finite, and it "
        "runs at the next step whose are. Until then the masks are not what the schedule says "
        "(a one-shot prune has not happened).", RuntimeWarning, stacklevel=3)


def get_masks(opt_state: optax.OptState) -> Masks:
  """The mask tree held by the jaxsparse method inside ``opt_state``.

  Outside jit, warns (RuntimeWarning) when the state records a problem: masked
  weights that were non-zero in the params (a transform after the method in
  a chain), or a mask update still pending after non-finite steps.
  """
  state = get_sparse_state(opt_state)
  warn_health(state)
  return state.masks
