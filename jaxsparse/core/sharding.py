"""Sharding helpers: place params, masks and optimizer state on a device mesh.

jaxsparse adds no parallelism of its own. A training step is an ordinary
``jax.jit`` function; these helpers only build the :class:`jax.sharding.NamedSharding`
trees that go into ``jax.device_put`` and into ``jax.jit``'s ``in_shardings``
and ``out_shardings``, for three common layouts:

* ``"data_parallel"``: every param replicated, the batch split over the mesh;
* ``"fsdp"``: each param split along one of its dims (the largest one the
  mesh axes divide; a leaf that no dim fits stays replicated);
* ``"tensor_parallel"``: kernels (rank >= 2) split along their output (last)
  dim, everything else replicated.

:func:`state_shardings` gives every part of an optimizer state the sharding
of the param it belongs to: a sparse leaf's mask, the inner optimizer's
per-weight state (momentum, Adam moments, found by tree structure) and
per-sparse-leaf ``aux`` arrays of the param's shape (DST momenta, DeepR's
signs). Everything else is replicated: step counts, PRNG keys, dense leaves'
scalar masks, DSR's threshold, and SET's per-leaf lists of active flat indices
(1-D, length nnz; they have no layout in common with the param).

Under ``jax.jit`` every jaxsparse method computes the same values on any mesh
(JAX's SPMD semantics), up to the float rounding of sharded reductions in the
model itself; global selections (global magnitude top-k, DSR's threshold and
reallocation) stay global, with XLA inserting the collectives. Random draws
do not depend on the mesh: ``jax.random`` values depend only on key and shape,
and with ``jax_threefry_partitionable=True`` (the default since JAX 0.5) each
device generates only its own shard.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxsparse.core import transform as core
from jaxsparse.core import masks as masks_lib

LAYOUTS = ("data_parallel", "fsdp", "tensor_parallel")
AxisNames = str | Sequence[str] | None


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str], *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """``jax.make_mesh`` with ``AxisType.Auto`` axes, the mode jaxsparse supports.

  Recent JAX (0.10 here) ``jax.make_mesh`` defaults to ``AxisType.Explicit`` axes
  (shardings in the types), under which many ops (scatters, reshapes,
  concatenations inside the mask updates) need explicit ``out_sharding``
  arguments; jaxsparse does not provide them yet.
  """
  return jax.make_mesh(tuple(axis_shapes), tuple(axis_names),
                       axis_types=(AxisType.Auto,) * len(axis_shapes), devices=devices)


def _check_mesh(mesh: Mesh) -> Mesh:
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  explicit = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
  if explicit:
    raise ValueError(f"mesh: axes {tuple(explicit)} are not AxisType.Auto; jaxsparse supports "
                     "Auto mesh axes only (use jaxsparse.core.sharding.make_mesh, or jax.make_mesh(..., "
                     "axis_types=(jax.sharding.AxisType.Auto,) * n))")
  return mesh


def _axes(mesh: Mesh, axis: AxisNames, default: tuple[str, ...]) -> tuple[str, ...]:
  """``axis`` as a tuple of mesh axis names (``default`` when None); unknown names raise."""
  _check_mesh(mesh)
  names = default if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
  for name in names:
    if name not in mesh.axis_names:
      raise ValueError(f"axis: mesh axis {name!r} does not exist; the mesh has axes "
                       f"{tuple(mesh.axis_names)}")
  return names


def _axis_size(mesh: Mesh, entry: Any) -> int:
  """Number of devices a PartitionSpec entry (None, a name or a tuple of names) spans."""
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else tuple(entry)
  return math.prod(mesh.shape[n] for n in names)


def _spec(entry: Any, dim: int, ndim: int) -> PartitionSpec:
  """PartitionSpec splitting only ``dim`` of a rank-``ndim`` array over ``entry``."""
  parts = [None] * ndim
  parts[dim] = entry if len(entry) > 1 else entry[0]
  return PartitionSpec(*parts)


def replicated(mesh: Mesh) -> NamedSharding:
  """The sharding that keeps a full copy on every device of ``mesh``."""
  return NamedSharding(_check_mesh(mesh), PartitionSpec())


def batch_sharding(mesh: Mesh, axis: AxisNames = None) -> NamedSharding:
  """Splits the leading (batch) dim of the inputs over ``axis`` (default: every mesh axis)."""
  names = _axes(mesh, axis, tuple(mesh.axis_names))
  return NamedSharding(mesh, PartitionSpec(names if len(names) > 1 else names[0]))


def param_shardings(params: Any, mesh: Mesh, layout: str = "data_parallel", *,
                    axis: AxisNames = None) -> Any:
  """A tree of ``NamedSharding`` like ``params`` for one of :data:`LAYOUTS`.

  Args:
    params: the params tree (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).
    mesh: the device mesh.
    layout: ``"data_parallel"``, ``"fsdp"`` or ``"tensor_parallel"``.
    axis: mesh axis name(s) the params are split over: for ``"fsdp"`` all
      mesh axes by default, for ``"tensor_parallel"`` the last mesh axis.

  ``"fsdp"`` splits each leaf along its largest dim divisible by the axes'
  total size (ties: the first such dim); ``"tensor_parallel"`` splits every
  leaf of rank >= 2 along its last dim. A leaf the axes do not divide stays
  replicated (check the result with :func:`describe`).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  if layout == "data_parallel":
    if axis is not None:
      raise ValueError(f"axis: the data_parallel layout replicates params; got axis={axis!r}")
    rep = replicated(_check_mesh(mesh))
    return jax.tree.map(lambda _: rep, params)
  names = _axes(mesh, axis, tuple(mesh.axis_names) if layout == "fsdp" else mesh.axis_names[-1:])
  size = _axis_size(mesh, names)

  def leaf(p):
    shape = np.shape(p)
    if layout == "fsdp":
      fits = [d for d in range(len(shape)) if shape[d] % size == 0]
      dims = sorted(fits, key=lambda d: -shape[d])[:1]
    else:
      dims = [len(shape) - 1] if len(shape) >= 2 and shape[-1] % size == 0 else []
    if not dims:
      return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, _spec(names, dims[0], len(shape)))

  return jax.tree.map(leaf, params)


def check_sharding(tree: Any, shardings: Any) -> None:
  """Raises ValueError (naming the leaf) unless each sharding fits its leaf.

  Each ``NamedSharding`` must name only axes of its mesh, have at most as many
  spec entries as the leaf has dims, and split each dim into equal parts (the
  dim divisible by the product of the sizes of the axes it is split over).
  """
  t_def, s_def = jax.tree.structure(tree), jax.tree.structure(shardings)
  if t_def != s_def:
    raise ValueError(f"shardings: tree structure does not match.\n  tree:      {t_def}\n"
                     f"  shardings: {s_def}")
  for name, x, s in zip(masks_lib.leaf_names(tree), jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    if not isinstance(s, NamedSharding):
      raise TypeError(f"shardings: leaf '{name}' has {type(s).__name__}, expected NamedSharding")
    shape = np.shape(x)
    if len(s.spec) > len(shape):
      raise ValueError(f"shardings: leaf '{name}' of shape {shape} has spec {s.spec} with "
                       f"{len(s.spec)} entries for {len(shape)} dims")
    for dim, entry in enumerate(s.spec):
      names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
      for n in names:
        if n not in s.mesh.axis_names:
          raise ValueError(f"shardings: leaf '{name}' uses mesh axis {n!r}, which does not "
                           f"exist; the mesh has axes {tuple(s.mesh.axis_names)}")
      parts = _axis_size(s.mesh, entry)
      if shape[dim] % parts:
        raise ValueError(f"shardings: leaf '{name}' of shape {shape}: dim {dim} (size "
                         f"{shape[dim]}) is not divisible into {parts} parts by {s.spec}")


def shard(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` after :func:`check_sharding`."""
  check_sharding(tree, shardings)
  return jax.device_put(tree, shardings)


def _mesh_of(shardings: Any) -> Mesh:
  leaves = jax.tree.leaves(shardings)
  if not leaves or not all(isinstance(s, NamedSharding) for s in leaves):
    raise TypeError("param_shardings must be a non-empty tree of NamedSharding")
  mesh = leaves[0].mesh
  if any(s.mesh != mesh for s in leaves):
    raise ValueError("param_shardings: all shardings must use the same mesh")
  return mesh


def _fits(s: NamedSharding, shape: tuple) -> bool:
  return 1 <= len(shape) and len(s.spec) <= len(shape) and all(
      shape[d] % _axis_size(s.mesh, e) == 0 for d, e in enumerate(s.spec))


def state_shardings(param_shardings: Any, opt_state: Any) -> Any:
  """Shardings for ``opt_state`` (arrays or ``jax.eval_shape`` output) that follow the params.

  * Inside a :class:`jaxsparse.SparseState`: a sparse leaf's mask gets its
    param's sharding; in ``aux``, a sequence with one array per sparse leaf,
    each of its leaf's shape, gets the sparse leaves' shardings.
  * Anywhere in the state: a subtree with the params' tree structure
    (momentum, Adam's ``mu`` and ``nu``, ...) gets the params' shardings,
    leaf by leaf, where the sharding fits the leaf's shape.
  * Every other leaf is replicated.
  """
  mesh = _mesh_of(param_shardings)
  rep = replicated(mesh)
  p_def = jax.tree.structure(param_shardings)
  p_flat = jax.tree.leaves(param_shardings)

  def like_params(tree):
    return jax.tree.unflatten(p_def, [s if _fits(s, np.shape(x)) else rep
                                      for s, x in zip(p_flat, p_def.flatten_up_to(tree))])

  def walk(x, sparse):
    if isinstance(x, core.SparseState):
      m_flat = p_def.flatten_up_to(x.masks)
      sp = [(s, np.shape(m)) for s, m in zip(p_flat, m_flat) if np.ndim(m) > 0]
      return core.SparseState(count=rep, key=rep, masks=like_params(x.masks),
                              inner_state=walk(x.inner_state, ()), aux=walk(x.aux, tuple(sp)),
                              health=walk(x.health, ()))
    if jax.tree.structure(x) == p_def and p_def.num_leaves > 1:
      return like_params(x)
    if (sparse and isinstance(x, (tuple, list)) and not hasattr(x, "_fields")
        and len(x) == len(sparse) and all(np.shape(a) == shp for a, (_, shp) in zip(x, sparse))):
      return type(x)(s for s, _ in sparse)
    children, treedef = jax.tree_util.tree_flatten(x, is_leaf=lambda y: y is not x)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1 and children and children[0] is x:
      return rep  # a leaf
    return jax.tree.unflatten(treedef, [walk(c, sparse) for c in children])

  return walk(opt_state, ())


def shard_like(param_shardings: Any, opt_state: Any) -> Any:
  """Puts ``opt_state`` on the mesh with :func:`state_shardings` (masks and state follow params)."""
  return jax.device_put(opt_state, state_shardings(param_shardings, opt_state))


def describe(shardings: Any) -> str:
  """One line per leaf: its name and PartitionSpec (to check a layout by eye)."""
  return "\n".join(f"{n}: {s.spec}" for n, s in zip(masks_lib.leaf_names(shardings),
                                                     jax.tree.leaves(shardings)))
