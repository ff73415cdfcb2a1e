"""Structured sparsity: masks made of whole groups (filters, input neurons, blocks) or N:M.

A :class:`Structure` says how a leaf's weights form groups: ``pool`` reduces a
leaf-shaped score array to one score per group (a sum), and ``expand`` turns
a boolean group mask back into an element mask of the leaf's shape. Any
criterion's scores (magnitude, SNIP, ..., see :mod:`jaxsparse.pruning.criteria`) and
any method that selects weights by score (pruning, or the drop/grow steps of
SET, RigL, DSR) can thus select groups instead of weights::

  group_mask = largest_k_mask(structure.pool(scores), k)
  mask = structure.expand(group_mask, leaf.shape)

Structures (axes follow flax's layouts: Dense kernels are ``(in, out)``, conv
kernels ``(kh, kw, in, out)``):

* :func:`filters`: whole output channels / filters (last axis). With
  ``|w|`` scores the pooled score is the filter's L1 norm (Li et al. 2017).
* :func:`input_neurons`: whole input neurons / input channels (axis -2).
* :func:`blocks`: rectangular blocks of the trailing axes (block shape given).
* :func:`nm_mask`: N:M, the N largest of every M consecutive weights along
  the input axis (Mishra et al. 2021).

Network slimming (Liu et al. 2017): :func:`bn_scale_l1` adds the subgradient of
``lambda * sum |gamma|`` over BatchNorm scales to the gradients (an optax
transform), and :func:`slimming_masks` keeps channels above one global
threshold on ``|gamma|``.

What "removing a channel" means for the mask tree (:func:`propagate_channels`):
channel c of a producer layer is removed when its whole filter
``kernel[..., c]`` is masked. Removal then also sets False (a) the producer's
bias entry c and the entries c of any per-channel leaves named (e.g. the
BatchNorm scale and bias that follow it), making those leaves sparse, so the
channel's activation is exactly zero; and (b) the consumer's input slice for
c (rows ``kernel[c, :]`` of a Dense consumer, ``kernel[..., c, :]`` of a conv
consumer; for a Dense layer after a flatten of NHWC features, every row
``r`` with ``r % C == c``). The consumer's weights on a removed channel see a
zero input, so masking them changes no output; it makes the mask tree count
them as removed and keeps their gradient out of training.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.core import selection as topk, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.regularizers import penalties



class Structure(NamedTuple):
  """A grouping of a leaf's weights.

  Attributes:
    name: a readable name (used in error messages).
    pool: ``scores (leaf shape) -> group scores``: the sum over each group.
    expand: ``(group_mask, leaf shape) -> element mask`` of the leaf's shape.
  """
  name: str
  pool: Callable[[jax.Array], jax.Array]
  expand: Callable[[jax.Array, tuple], jax.Array]


def _axis(axis: int, ndim: int, what: str) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{what}: axis {axis} is out of range for a leaf of rank {ndim}")
  return axis % ndim


def _channel_structure(name: str, axis: int) -> Structure:
  def pool(scores):
    a = _axis(axis, scores.ndim, name)
    return jnp.sum(scores, axis=tuple(i for i in range(scores.ndim) if i != a))

  def expand(group_mask, shape):
    a = _axis(axis, len(shape), name)
    if group_mask.shape != (shape[a],):
      raise ValueError(f"{name}: group mask shape {group_mask.shape} does not match axis {a} "
                       f"of leaf shape {tuple(shape)}")
    view = [1] * len(shape)
    view[a] = shape[a]
    return jnp.broadcast_to(group_mask.reshape(view), tuple(shape))

  return Structure(name, pool, expand)


def filters(axis: int = -1) -> Structure:
  """Whole filters / output channels / output neurons: the groups are slices along ``axis``."""
  return _channel_structure("filters", axis)


def input_neurons(axis: int = -2) -> Structure:
  """Whole input neurons (Dense rows) or input channels (conv): slices along ``axis``."""
  return _channel_structure("input_neurons", axis)


def blocks(block_shape: Sequence[int]) -> Structure:
  """Rectangular blocks of shape ``block_shape`` tiling the leaf's trailing axes.

  ``block_shape`` has one entry per trailing axis (e.g. ``(4, 4)`` on a Dense
  kernel); each must divide the leaf's size on that axis.
  """
  bs = tuple(int(b) for b in block_shape)
  if not bs or any(b <= 0 for b in bs):
    raise ValueError(f"block_shape must be a non-empty tuple of positive ints, got {block_shape!r}")

  def check(shape):
    shape = tuple(shape)
    if len(bs) > len(shape):
      raise ValueError(f"block_shape {bs} has more axes than the leaf shape {shape}")
    tail = shape[len(shape) - len(bs):]
    if any(s % b for s, b in zip(tail, bs)):
      raise ValueError(f"block_shape {bs} does not divide the leaf's trailing axes {tail} "
                       f"(leaf shape {shape})")
    return shape[:len(shape) - len(bs)], tail

  def pool(scores):
    lead, tail = check(scores.shape)
    split = lead + tuple(x for s, b in zip(tail, bs) for x in (s // b, b))
    inner = tuple(len(lead) + 2 * i + 1 for i in range(len(bs)))
    return jnp.sum(scores.reshape(split), axis=inner)

  def expand(group_mask, shape):
    lead, tail = check(shape)
    grid = lead + tuple(s // b for s, b in zip(tail, bs))
    if group_mask.shape != grid:
      raise ValueError(f"blocks: group mask shape {group_mask.shape} != block grid {grid}")
    out = group_mask
    for i, b in enumerate(bs):
      out = jnp.repeat(out, b, axis=len(lead) + i)
    return out.reshape(tuple(shape))

  return Structure(f"blocks{bs}", pool, expand)


def _largest_k(scores: jax.Array, k: int | jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """``topk.top_k_mask`` for a static k (groups are few), ``topk.largest_k_mask`` for a traced one."""
  if isinstance(k, (int, np.integer)):
    return topk.top_k_mask(scores, int(k), valid)
  return topk.largest_k_mask(scores, k, valid)


def structure_mask(scores: jax.Array, structure: Structure, k: int | jax.Array,
                   active: jax.Array | None = None) -> jax.Array:
  """Element mask keeping the ``k`` highest-scoring groups (``active``: element mask of live groups).

  ``k`` may be traced (e.g. inside a DST method's mask update).
  """
  group_scores = structure.pool(scores.astype(jnp.float32))
  valid = None if active is None else structure.pool(active.astype(jnp.float32)) > 0
  return structure.expand(_largest_k(group_scores, k, valid), scores.shape)


def nm_mask(scores: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
  """N:M mask: the ``n`` largest ``scores`` of every ``m`` consecutive entries along ``axis``.

  ``axis=-2`` is the input axis of Dense and conv kernels. Ties: lower index first.
  """
  if not isinstance(n, (int, np.integer)) or not isinstance(m, (int, np.integer)) or m <= 0 \
      or n < 0:
    raise ValueError(f"n and m must be ints with 1 <= n <= m, got n={n!r}, m={m!r}")
  if n == 0:
    raise ValueError(f"n must be >= 1: n=0 removes every weight of the leaf (got n={n}, m={m})")
  if n > m:
    raise ValueError(f"n must be <= m for N:M sparsity, got n={n}, m={m}")
  a = _axis(axis, scores.ndim, "nm_mask")
  length = scores.shape[a]
  if length % m:
    raise ValueError(f"m={m} does not divide the leaf's axis {a} of length {length} "
                     f"(shape {scores.shape})")
  x = jnp.moveaxis(scores.astype(jnp.float32), a, -1)
  g = x.reshape(x.shape[:-1] + (length // m, m))
  # Rank within each group by (score desc, index asc): a stable argsort of -score.
  order = jnp.argsort(-g, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  keep = (ranks < n).reshape(x.shape)
  return jnp.moveaxis(keep, -1, a)


def nm_masks(scores: Any, n: int, m: int, *, axis: int = -2,
             filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = ()) -> Any:
  """:func:`nm_mask` on every sparse leaf of a score tree (e.g. ``|params|``); others dense."""
  names = dist.select_leaves(scores, filter=filter, keep_dense=keep_dense)
  return core.masks_from_fn(scores, names, lambda name, leaf, i: nm_mask(leaf, n, m, axis))


def _pooled(scores: Any, structure: Structure, filter, keep_dense):
  shapes = dist.select_leaves(scores, filter=filter, keep_dense=keep_dense)
  names = masks_lib.leaf_names(scores)
  pooled = {n: structure.pool(jnp.asarray(l).astype(jnp.float32))
            for n, l in zip(names, jax.tree.leaves(scores)) if n in shapes}
  return shapes, pooled


def structured_masks(scores: Any, structure: Structure, sparsity: float, *,
                     scope: str = "local", filter: dist.LeafFilter | None = None,
                     keep_dense: Sequence[str] = ()) -> Any:
  """Masks that keep the highest-scoring groups of every sparse leaf to ``sparsity`` of its groups.

  ``scope="local"``: each leaf keeps ``round((1 - sparsity) * groups)`` groups;
  ``"global"``: one threshold over all leaves' group scores. Raises
  ValueError if a leaf would lose every group (a layer with no filter left).
  """
  masks_lib.check_scope(scope)
  s = dist.check_sparsity(sparsity)
  shapes, pooled = _pooled(scores, structure, filter, keep_dense)
  group_masks = {}
  if scope == "local":
    for name, gs in pooled.items():
      k = int(round((1.0 - s) * gs.size))
      if k == 0:
        raise ValueError(f"sparsity={sparsity} would remove every group ({structure.name}) of "
                         f"layer '{name}' ({gs.size} groups); lower the sparsity, use "
                         "scope='local' with overrides, or keep the layer dense (keep_dense=)")
      group_masks[name] = _largest_k(gs.reshape(-1), k).reshape(gs.shape)
  else:
    flat = jnp.concatenate([g.reshape(-1) for g in pooled.values()])
    keep = _largest_k(flat, int(round((1.0 - s) * flat.size)))
    offsets = np.cumsum([0] + [g.size for g in pooled.values()])
    for j, (name, gs) in enumerate(pooled.items()):
      gm = keep[offsets[j]:offsets[j + 1]].reshape(gs.shape)
      if not bool(jnp.any(gm)):
        raise ValueError(f"sparsity={sparsity} with scope='global' would remove every group "
                         f"({structure.name}) of layer '{name}'; lower the sparsity, use "
                         "scope='local', or keep the layer dense (keep_dense=)")
      group_masks[name] = gm
  return core.masks_from_fn(scores, shapes,
                            lambda name, leaf, i: structure.expand(group_masks[name], leaf.shape))


def definition_order(tree: Any) -> list[str]:
  """Leaf names in the order the containers hold them (a linen params dict keeps its
  modules in definition order; ``jax.tree`` would sort the keys)."""
  out: list[str] = []

  def walk(x, prefix):
    if isinstance(x, Mapping) and not hasattr(x, "tree_flatten_with_keys"):
      for k, v in x.items():
        walk(v, prefix + (str(k),))
    else:
      out.extend("/".join(prefix + ((n,) if n else ())) for n in masks_lib.leaf_names(x))

  walk(tree, ())
  return out


def output_kernel(params: Any) -> str | None:
  """The network's output layer: the last leaf of rank >= 2 (a kernel) in definition order.

  Its filters are the network's outputs (one per class), so structured pruning keeps them.
  None when ``params`` has no kernel.
  """
  kernels = {n for n, leaf in zip(masks_lib.leaf_names(params), jax.tree.leaves(params))
             if jnp.ndim(leaf) >= 2}
  ordered = [n for n in definition_order(params) if n in kernels]
  return ordered[-1] if ordered else None


def filter_l1_masks(params: Any, sparsity: float, *, scope: str = "local",
                    filter: dist.LeafFilter | None = None, keep_dense: Sequence[str] = (),
                    output_layer: str | None = "last") -> Any:
  """Li et al. (2017): remove the filters with the smallest ``s_j = sum |K_j|``, per layer.

  The output layer's filters are the network's outputs (one per class): removing one
  removes a class, so that layer stays dense. ``output_layer="last"`` (default) is
  the last leaf of rank >= 2 (a kernel) in the params' definition order (the order of
  a flax linen params dict; ``nnx.State`` sorts its keys, so with nnx name it); a name
  (or '/'-parts of one, as in ``keep_dense``) names it; ``None`` prunes it too.
  """
  if output_layer is not None and not isinstance(output_layer, str):
    raise TypeError(f"output_layer must be 'last', a leaf name or None, got {output_layer!r}")
  keep = tuple([keep_dense] if isinstance(keep_dense, str) else keep_dense)
  if output_layer == "last":
    keep = keep + tuple(n for n in [output_kernel(params)] if n is not None)
  elif output_layer is not None:
    if not any(dist._matches(output_layer, n) for n in masks_lib.leaf_names(params)):
      raise ValueError(f"output_layer: '{output_layer}' matches no leaf; leaves are "
                       f"{masks_lib.leaf_names(params)}")
    keep = keep + (output_layer,)
  return structured_masks(jax.tree.map(jnp.abs, params), filters(), sparsity, scope=scope,
                          filter=filter, keep_dense=keep)


# ------------------------------------------------------------------ channel propagation


class ChannelLink(NamedTuple):
  """Pairs a producer kernel with the consumer of its output channels.

  Attributes:
    producer: name of the producing kernel (its last axis are the channels).
    consumer: name of the consuming kernel (its axis -2 holds the channels,
      possibly flattened NHWC: row ``r`` is channel ``r % C``).
    per_channel: names of per-channel leaves of the producer (its bias, the
      following BatchNorm's scale and bias), shape ``(C,)``.
  """
  producer: str
  consumer: str
  per_channel: tuple = ()


def removed_channels(mask: jax.Array) -> jax.Array:
  """Channels (last axis) whose whole filter is masked: ``(C,)`` bool."""
  return ~jnp.any(mask.reshape(-1, mask.shape[-1]), axis=0)


def propagate_channels(params: Any, masks: Any, links: Sequence[ChannelLink]) -> Any:
  """Removes each producer's fully-masked channels where they are produced and consumed.

  See the module docstring for what "removes" means. Leaves named in a link
  that are dense become sparse. Raises ValueError naming a missing leaf or
  mismatched channel counts.
  """
  masks_lib.check_masks(params, masks)
  names = masks_lib.leaf_names(params)
  flat_p, treedef = jax.tree.flatten(params)
  flat_m = list(jax.tree.leaves(masks))
  index = {n: i for i, n in enumerate(names)}

  def full(i):
    m = flat_m[i]
    return jnp.broadcast_to(jnp.asarray(m, bool), jnp.shape(flat_p[i]))

  for link in links:
    for leaf in (link.producer, link.consumer, *link.per_channel):
      if leaf not in index:
        raise ValueError(f"links: leaf '{leaf}' is not in params; leaves are {names}")
    ip, ic = index[link.producer], index[link.consumer]
    gone = removed_channels(full(ip))
    c = gone.shape[0]
    flat_m[ip] = full(ip) & ~gone
    for name in link.per_channel:
      i = index[name]
      if jnp.shape(flat_p[i]) != (c,):
        raise ValueError(f"links: per-channel leaf '{name}' has shape {jnp.shape(flat_p[i])}, "
                         f"expected ({c},) like the channels of '{link.producer}'")
      flat_m[i] = full(i) & ~gone
    cshape = jnp.shape(flat_p[ic])
    if len(cshape) < 2 or cshape[-2] % c:
      raise ValueError(f"links: consumer '{link.consumer}' of shape {cshape} has an input axis "
                       f"(-2) that is not a multiple of the {c} channels of '{link.producer}'")
    rows = jnp.tile(gone, cshape[-2] // c)            # row r is channel r % c (NHWC flatten)
    flat_m[ic] = full(ic) & ~rows[:, None]
  return jax.tree.unflatten(treedef, flat_m)


# ------------------------------------------------------------------ network slimming


def is_bn_scale(name: str, leaf: Any) -> bool:
  """Default selector of BatchNorm scales: a rank-1 leaf named ``.../bn*/scale``."""
  parts = name.split("/")
  return jnp.ndim(leaf) == 1 and parts[-1] == "scale" and len(parts) > 1 and \
      parts[-2].startswith("bn")


def bn_scale_l1(strength: float = 1e-4,
                selector: Callable[[str, Any], bool] = is_bn_scale) -> optax.GradientTransformation:
  """Network slimming's sparsity penalty (Liu et al. 2017, eq. 1): adds ``strength * sign(gamma)``.

  ``strength`` is lambda (1e-4 in the paper); put it before the optimizer in
  an ``optax.chain``, like ``optax.add_decayed_weights``. It is
  ``jaxsparse.add_l1(strength, filter=selector)``.
  """
  if not isinstance(strength, (int, float)) or strength < 0:
    raise ValueError(f"strength must be a float >= 0, got {strength!r}")
  if not callable(selector):
    raise TypeError(f"selector must be a callable (name, leaf) -> bool, got {selector!r}")
  # The L1 subgradient of add_l1 (one implementation), on the leaves the selector picks.
  return penalties.add_l1(strength, filter=selector)


def slimming_masks(params: Any, sparsity: float, *,
                   selector: Callable[[str, Any], bool] = is_bn_scale) -> Any:
  """One global threshold on ``|gamma|`` over all BatchNorm scales: keep the largest ``1 - sparsity``.

  Returns a mask tree whose BatchNorm-scale leaves are sparse (channel masks);
  spread them to kernels and biases with :func:`propagate_channels` (the
  BatchNorm's producer kernel's filters: see :func:`slimming_links`).
  Raises ValueError if a layer would lose every channel.
  """
  s = dist.check_sparsity(sparsity)
  names = masks_lib.leaf_names(params)
  chosen = {n: jnp.abs(l) for n, l in zip(names, jax.tree.leaves(params)) if selector(n, l)}
  if not chosen:
    raise ValueError(f"selector: no BatchNorm scale found in params; leaves are {names}")
  flat = jnp.concatenate([v.reshape(-1) for v in chosen.values()])
  keep = _largest_k(flat, int(round((1.0 - s) * flat.size)))
  offsets = np.cumsum([0] + [v.size for v in chosen.values()])
  per = {}
  for j, name in enumerate(chosen):
    per[name] = keep[offsets[j]:offsets[j + 1]]
    if not bool(jnp.any(per[name])):
      raise ValueError(f"sparsity={sparsity} would remove every channel of '{name}' "
                       "(one global threshold); lower the sparsity")
  return core.masks_from_fn(params, per, lambda name, leaf, i: per[name])


def channel_masks_to_filters(params: Any, masks: Any, links: Sequence[ChannelLink]) -> Any:
  """Copies a per-channel mask (first of ``link.per_channel``) onto the producer's filters, then propagates."""
  masks_lib.check_masks(params, masks)
  names = masks_lib.leaf_names(params)
  flat_m, treedef = jax.tree.flatten(masks)
  flat_p = jax.tree.leaves(params)
  index = {n: i for i, n in enumerate(names)}
  for link in links:
    if not link.per_channel:
      raise ValueError(f"links: link for '{link.producer}' names no per_channel leaf to copy from")
    src = flat_m[index[link.per_channel[0]]]
    ip = index[link.producer]
    shape = jnp.shape(flat_p[ip])
    base = jnp.broadcast_to(jnp.asarray(flat_m[ip], bool), shape)
    flat_m[ip] = base & jnp.broadcast_to(jnp.asarray(src, bool), shape)
  return propagate_channels(params, jax.tree.unflatten(treedef, flat_m), links)


def mlp_links(num_layers: int, *, batch_norm: bool = False, use_bias: bool = True
              ) -> list[ChannelLink]:
  """Links of jaxsparse's MLP/LeNet-300-100 (``fc1 .. fc{num_layers}``, ``bn1 ..``)."""
  links = []
  for i in range(1, num_layers):
    per = ((f"fc{i}/bias",) if use_bias else ()) + (
        (f"bn{i}/scale", f"bn{i}/bias") if batch_norm else ())
    if batch_norm:  # the BatchNorm scale is the channel mask's source
      per = (f"bn{i}/scale", *[p for p in per if p != f"bn{i}/scale"])
    links.append(ChannelLink(f"fc{i}/kernel", f"fc{i + 1}/kernel", per))
  return links


def group_sparsity(mask: jax.Array, structure: Structure) -> float:
  """Fraction of ``structure``'s groups that are entirely removed in ``mask`` (host-side)."""
  kept = structure.pool(mask.astype(jnp.float32)) > 0
  return 1.0 - float(jnp.mean(kept))


__all__ = [
    "Structure", "filters", "input_neurons", "blocks", "structure_mask", "nm_mask", "nm_masks",
    "structured_masks", "output_kernel", "filter_l1_masks", "ChannelLink", "removed_channels",
    "propagate_channels", "is_bn_scale", "bn_scale_l1", "slimming_masks",
    "channel_masks_to_filters", "mlp_links", "group_sparsity",
]

