"""Checkpoint and resume of a training run with orbax.

A checkpoint holds everything the run needs to continue bit for bit: the whole
training state (params, batch stats, the optimizer state with the jaxsparse
:class:`~jaxsparse.core.transform.SparseState` inside it: masks, step counter, PRNG key,
method state such as DSR's threshold) and, as JSON, the number of finished
epochs (the data position: :func:`experiments.training.train` shuffles epoch
``e`` with ``fold_in(key, e)``, so the epoch index is the whole iterator
state), the per-epoch history and the run's config.

Checkpoints are taken at epoch granularity: a run killed mid-epoch resumes from
the end of the last finished epoch and redoes the interrupted one, which gives
the same result because an epoch is a pure function of the state and the key.
orbax writes each checkpoint to a temporary folder and renames it when done,
so a kill during a save leaves the previous checkpoint intact.

The state is stored as a flat dict of arrays (leaf ``i`` under key
``"leaf_00000i"``) plus the leaf names, shapes and dtypes, so that a resume can
check the structure against the new run's state before reading any array and
refuse, naming the leaves, when the config changed a shape. PRNG key arrays
are stored as their raw ``uint32`` data.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import masks as masks_lib

if TYPE_CHECKING:  # for the annotations only
  import orbax.checkpoint as ocp

STATE = "state"
META = "meta"


def _ocp():
  """orbax.checkpoint, imported on first use: it is not part of jaxsparse's base install."""
  try:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("experiments.checkpoint needs orbax-checkpoint: "
                      "pip install 'jaxsparse[experiments]'") from e
  return ocp


class Restored(NamedTuple):
  """What :func:`restore` returns."""
  state: Any        # the state, with the structure of the ``template`` given to restore
  epoch: int        # number of finished epochs (the next epoch to run)
  history: list     # per-epoch metrics dicts of the finished epochs
  config: dict      # the config of the run that wrote the checkpoint


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flatten(tree: Any) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
  """Flat ``{leaf_i: array}`` and the per-leaf ``name``/``shape``/``dtype`` records."""
  arrays, specs = {}, []
  for i, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
    name = masks_lib.path_name(path)
    if _is_key(leaf):
      leaf = jax.random.key_data(leaf)
      name += " (prng key data)"
    arr = np.asarray(leaf)
    arrays[f"leaf_{i:06d}"] = arr
    specs.append(dict(name=name, shape=list(arr.shape), dtype=str(arr.dtype)))
  return arrays, specs


def _unflatten(template: Any, arrays: dict[str, Any]) -> Any:
  leaves, treedef = jax.tree.flatten(template)
  out = []
  for i, t in enumerate(leaves):
    a = arrays[f"leaf_{i:06d}"]
    if _is_key(t):
      out.append(jax.random.wrap_key_data(jnp.asarray(a), impl=jax.random.key_impl(t)))
    else:
      out.append(jnp.asarray(a, dtype=jnp.result_type(t)))
  return jax.tree.unflatten(treedef, out)


def manager(directory: str | os.PathLike, *, max_to_keep: int | None = 2) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` over ``directory`` (created if needed), saving synchronously."""
  options = _ocp().CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return _ocp().CheckpointManager(os.path.abspath(os.fspath(directory)), options=options,
                               item_names=(STATE, META))


def latest_epoch(directory: str | os.PathLike) -> int | None:
  """Finished epochs of the newest complete checkpoint in ``directory``, or None when there is none."""
  if not os.path.isdir(directory):
    return None
  with manager(directory) as mngr:
    return mngr.latest_step()


def save(mngr: ocp.CheckpointManager, epoch: int, state: Any, *, history: list,
         config: dict) -> None:
  """Saves ``state`` after ``epoch`` finished epochs (blocks until the checkpoint is on disk)."""
  arrays, specs = _flatten(state)
  meta = dict(epoch=int(epoch), history=list(history), config=dict(config), leaves=specs)
  mngr.save(int(epoch), args=_ocp().args.Composite(**{
      STATE: _ocp().args.StandardSave(arrays), META: _ocp().args.JsonSave(meta)}))
  mngr.wait_until_finished()


def _restore_arrays(mngr: ocp.CheckpointManager, step: int, specs: list[dict]) -> dict[str, Any]:
  abstract = {f"leaf_{i:06d}": jax.ShapeDtypeStruct(tuple(s["shape"]), np.dtype(s["dtype"]))
              for i, s in enumerate(specs)}
  return mngr.restore(step, args=_ocp().args.Composite(**{
      STATE: _ocp().args.StandardRestore(abstract)}))[STATE]


def config_changes(old: dict, new: dict) -> str:
  """``"key: old -> new, ..."`` for the keys whose JSON values differ; ``""`` when none do."""
  old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # tuples -> lists
  keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
  return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def restore(mngr: ocp.CheckpointManager, template: Any, *, config: dict | None = None,
            epoch: int | None = None) -> Restored:
  """Restores the newest checkpoint (or the one after ``epoch`` epochs) into ``template``'s structure.

  ``template`` is the freshly initialized state of the resuming run; its leaves
  give the structure, shapes and dtypes to restore into.

  Raises:
    FileNotFoundError: when ``mngr``'s directory holds no checkpoint.
    ValueError: when the checkpoint's leaves differ in number, name, shape or
      dtype from ``template``'s (the new config changes the model or the
      method's state); the message names the first differing leaves and the
      config keys that differ.
  """
  step = mngr.latest_step() if epoch is None else int(epoch)
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {mngr.directory}")
  meta = mngr.restore(step, args=_ocp().args.Composite(**{META: _ocp().args.JsonRestore()}))[META]
  _, specs = _flatten(template)
  if specs != meta["leaves"]:
    old = {s["name"]: s for s in meta["leaves"]}
    new = {s["name"]: s for s in specs}
    diffs = []
    for name in list(dict.fromkeys([*old, *new])):
      o, n = old.get(name), new.get(name)
      if o != n:
        fmt = lambda s: "absent" if s is None else f"{tuple(s['shape'])} {s['dtype']}"  # noqa: E731
        diffs.append(f"{name}: checkpoint {fmt(o)}, this run {fmt(n)}")
    if not diffs:
      diffs.append("the leaves are in a different order")
    cfg = (config_changes(meta.get("config", {}), config) or "none") if config is not None else (
        "not given")
    raise ValueError(
        f"cannot resume from {mngr.directory} (epoch {step}): the checkpointed state does not "
        f"match this run's state, so the config changes shapes or the method. Differences: "
        f"{'; '.join(diffs[:5])}{' ...' if len(diffs) > 5 else ''}. Config changes: {cfg}. "
        "Start a new run in another folder instead.")
  arrays = _restore_arrays(mngr, step, specs)
  return Restored(_unflatten(template, arrays), int(meta["epoch"]), list(meta["history"]),
                  dict(meta["config"]))


def read(directory: str | os.PathLike, epoch: int | None = None
         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The raw arrays (leaf name -> numpy array) and metadata of a checkpoint, without a template.

  For inspecting or comparing checkpoints; ``epoch`` defaults to the newest.
  """
  with manager(directory) as mngr:
    step = mngr.latest_step() if epoch is None else int(epoch)
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    meta = mngr.restore(step, args=_ocp().args.Composite(**{META: _ocp().args.JsonRestore()}))[META]
    specs = meta["leaves"]
    arrays = _restore_arrays(mngr, step, specs)
  return {s["name"]: np.asarray(arrays[f"leaf_{i:06d}"]) for i, s in enumerate(specs)}, meta
