"""Which leaves are sparse, and how a global sparsity is split over them.

Everything here runs once, on the host, from the params' *shapes*: the result
is a static per-leaf count of kept weights, so masks keep static shapes and a
mask update never recompiles.

Distributions:

* ``uniform``: every sparse leaf gets the same sparsity.
* ``er``: Erdos-Renyi of SET (Mocanu et al. 2018, eq. 1): density
  proportional to ``(n_in + n_out) / (n_in * n_out)`` using the last two dims;
  ``epsilon`` is solved so that the total matches the target.
* ``erk``: Erdos-Renyi-Kernel of RigL (Evci et al. 2020, sec. 3): density
  proportional to ``sum(shape) / prod(shape)``; a leaf whose density would
  exceed 1 is made dense and epsilon is solved again over the others.

The kept counts are rounded with the largest-remainder rule, so the total kept
over the sparse leaves is exactly ``round((1 - s) * N)`` whenever the per-leaf
caps allow it, and each leaf is within one of its real-valued share.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import masks as masks_lib

LeafFilter = Callable[[str, Any], bool]
Distribution = Union[str, Callable[[Mapping[str, tuple], float], Mapping[str, float]]]


def default_filter(name: str, leaf: Any) -> bool:
  """Selects every leaf of rank >= 2 (dense and conv kernels); biases and norms stay dense."""
  del name
  return jnp.ndim(leaf) >= 2


def _matches(pattern: str, name: str) -> bool:
  """``pattern``'s '/'-parts occur as a contiguous run in ``name``'s parts."""
  p, n = pattern.strip("/").split("/"), name.split("/")
  return any(n[i:i + len(p)] == p for i in range(len(n) - len(p) + 1))


INJECT_HINT = ("jaxsparse methods take Python numbers for their hyperparameters (they fix mask "
               "sizes and schedules when the method is built), so a method cannot be wrapped by "
               "optax.inject_hyperparams; put inject_hyperparams inside it instead, as the inner "
               "optimizer: js.sparse_evolutionary_training(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), 0.9)")


def check_number(value: Any, argname: str) -> None:
  """Raises TypeError unless ``value`` is a real Python or numpy number (not a str, a bool
  or a jax array: a jax array here most often comes from ``optax.inject_hyperparams``)."""
  if isinstance(value, jax.Array):
    raise TypeError(f"{argname}: got a jax array ({value!r}); {INJECT_HINT}")
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                    np.floating)):
    raise TypeError(f"{argname} must be a number, got {value!r} ({type(value).__name__})")


def check_sparsity(sparsity: float, argname: str = "sparsity") -> float:
  """Raises unless ``sparsity`` is a number with ``0 <= sparsity < 1`` (TypeError for a
  non-number such as the string ``"0.9"``, ValueError out of range)."""
  check_number(sparsity, argname)
  s = float(sparsity)
  if not 0.0 <= s < 1.0 or math.isnan(s):
    raise ValueError(f"{argname} must be in [0, 1), got {sparsity!r}")
  return s


def leaf_flags(params: Any, *, filter: LeafFilter | None = None,
               keep_dense: Sequence[str] = ()) -> list[bool]:
  """One bool per leaf of ``params``, in flattening order: whether ``filter`` selects it and
  ``keep_dense`` does not exclude it (see :func:`select_leaves`). The one way to choose
  leaves, shared by the methods (sparse leaves) and the regularizers (penalised leaves)."""
  filter = default_filter if filter is None else filter
  if isinstance(keep_dense, str):
    keep_dense = (keep_dense,)
  names = masks_lib.leaf_names(params)
  for pattern in keep_dense:
    if not any(_matches(pattern, n) for n in names):
      raise ValueError(f"keep_dense: '{pattern}' matches no leaf; leaves are {names}")
  return [bool(filter(name, leaf)) and not any(_matches(p, name) for p in keep_dense)
          for name, leaf in zip(names, jax.tree.leaves(params))]


def select_leaves(params: Any, *, filter: LeafFilter | None = None,
                  keep_dense: Sequence[str] = ()) -> dict[str, tuple]:
  """Names and shapes of the leaves that will be sparse, in flattening order.

  Args:
    params: the params tree (flax linen dict, ``nnx.State``, any pytree).
    filter: ``filter(name, leaf) -> bool``; default :func:`default_filter`.
    keep_dense: leaf names (or '/'-separated name parts, e.g. ``"fc1"``) kept
      dense even if the filter selects them. Each must match some leaf.
  """
  if isinstance(keep_dense, str):
    keep_dense = (keep_dense,)
  flags = leaf_flags(params, filter=filter, keep_dense=keep_dense)
  names = masks_lib.leaf_names(params)
  selected = {}
  for name, leaf, flag in zip(names, jax.tree.leaves(params), flags):
    if not flag:
      continue
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"filter: selected leaf '{name}' has dtype {jnp.result_type(leaf)}; "
                       "only floating-point leaves can be sparse")
    if jnp.ndim(leaf) == 0:
      raise ValueError(f"filter: selected leaf '{name}' is a scalar; only arrays can be sparse")
    selected[name] = tuple(jnp.shape(leaf))
  if not selected:
    raise ValueError(f"filter: selected no leaf to make sparse (keep_dense={tuple(keep_dense)}); "
                     f"leaves are {names}")
  return selected


def _er_score(shape: tuple) -> float:
  n_in, n_out = (int(np.prod(shape[:-1])), shape[-1]) if len(shape) < 2 else shape[-2:]
  return (n_in + n_out) / (n_in * n_out)


def _erk_score(shape: tuple) -> float:
  return float(sum(shape)) / float(np.prod(shape))


def _solve_eps(shapes: Mapping[str, tuple], sparsity: float,
               score: Callable[[tuple], float]) -> dict[str, float]:
  """Densities eps * score_l, making leaves dense while eps * score_l > 1 (RigL's re-solve)."""
  sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
  scores = {k: score(s) for k, s in shapes.items()}
  budget = (1.0 - sparsity) * sum(sizes.values())
  dense: set[str] = set()
  while True:
    rest = [k for k in shapes if k not in dense]
    if not rest:
      break
    eps = (budget - sum(sizes[k] for k in dense)) / sum(scores[k] * sizes[k] for k in rest)
    over = [k for k in rest if eps * scores[k] > 1.0]
    if not over:
      break
    dense.update(over)
  return {k: 1.0 if k in dense else eps * scores[k] for k in shapes}


def densities(shapes: Mapping[str, tuple], sparsity: float,
              distribution: Distribution = "uniform") -> dict[str, float]:
  """Per-leaf densities (fraction kept) whose size-weighted mean is ``1 - sparsity``."""
  sparsity = check_sparsity(sparsity)
  if callable(distribution):
    out = distribution(shapes, sparsity)
    if not isinstance(out, Mapping):
      raise TypeError("distribution: the callable must return a dict {leaf name: density} "
                      f"for the sparse leaves {list(shapes)}, got {type(out).__name__}: {out!r:.200}")
    out = dict(out)
    missing = [k for k in shapes if k not in out]
    extra = [k for k in out if k not in shapes]
    if missing or extra:
      raise ValueError("distribution: the callable must return a density for every sparse leaf "
                       f"and no other; missing {missing}, unknown {extra}")
    for k, d in out.items():
      try:
        ok = 0.0 <= float(d) <= 1.0
      except (TypeError, ValueError):
        ok = False
      if not ok:
        raise ValueError(f"distribution: the callable returned density {d!r} for leaf '{k}'; "
                         "densities must be numbers in [0, 1]")
    return {k: float(d) for k, d in out.items()}
  if distribution == "uniform":
    return {k: 1.0 - sparsity for k in shapes}
  if distribution == "er":
    return _solve_eps(shapes, sparsity, _er_score)
  if distribution == "erk":
    return _solve_eps(shapes, sparsity, _erk_score)
  raise ValueError(f"distribution must be 'uniform', 'er', 'erk' or a callable, got {distribution!r}")


def round_counts(sizes: Mapping[str, int], dens: Mapping[str, float], total: int | None = None
                 ) -> dict[str, int]:
  """Largest-remainder rounding of ``dens * sizes`` to integers summing to ``total``.

  ``total`` defaults to ``round(sum(dens * sizes))``; each count stays in
  ``[0, size]`` and within one of its real-valued share.
  """
  raw = {k: min(max(dens[k], 0.0), 1.0) * sizes[k] for k in sizes}
  counts = {k: int(math.floor(v + 1e-9)) for k, v in raw.items()}
  total = int(round(sum(raw.values()))) if total is None else total
  order = sorted(sizes, key=lambda k: (-(raw[k] - counts[k]), list(sizes).index(k)))
  missing = total - sum(counts.values())
  for k in order:
    if missing <= 0:
      break
    if counts[k] < sizes[k] and raw[k] - counts[k] > 0:
      counts[k] += 1
      missing -= 1
  return counts


def kept_counts(params: Any, sparsity: float, *, distribution: Distribution = "uniform",
                filter: LeafFilter | None = None, keep_dense: Sequence[str] = (),
                overrides: Mapping[str, float] | None = None) -> dict[str, int]:
  """Static number of kept weights for every sparse leaf, keyed by leaf name.

  Leaves named in ``overrides`` (pattern -> sparsity) get that sparsity and are
  taken out of the distribution; the remaining sparse leaves share
  ``sparsity`` by ``distribution`` with an exact rounded total.
  """
  sparsity = check_sparsity(sparsity)
  shapes = select_leaves(params, filter=filter, keep_dense=keep_dense)
  sizes = {k: int(np.prod(s)) for k, s in shapes.items()}
  fixed: dict[str, float] = {}
  for pattern, s in (overrides or {}).items():
    hits = [k for k in shapes if _matches(pattern, k)]
    if not hits:
      raise ValueError(f"overrides: '{pattern}' matches no sparse leaf; sparse leaves are {list(shapes)}")
    s = check_sparsity(s, f"overrides['{pattern}']")
    fixed.update({k: s for k in hits})
  counts = {k: int(round((1.0 - s) * sizes[k])) for k, s in fixed.items()}
  rest = {k: v for k, v in shapes.items() if k not in fixed}
  if rest:
    dens = densities(rest, sparsity, distribution)
    rest_sizes = {k: sizes[k] for k in rest}
    counts.update(round_counts(rest_sizes, dens, int(round((1.0 - sparsity) * sum(rest_sizes.values())))))
  check_counts(shapes, counts)
  return {k: counts[k] for k in shapes}


def check_counts(shapes: Mapping[str, tuple], counts: Mapping[str, int]) -> None:
  """Warns (UserWarning) when a sparse leaf keeps fewer weights than it has output units
  (last axis), or none at all: some outputs (e.g. classes of the last layer) then have no
  input weight left and cannot be learned, and with none the layer's output is constant."""
  hint = ("lower the sparsity, use distribution='er' or 'erk', give the leaf its own sparsity "
          "with overrides=, or keep it dense with keep_dense=")
  for k, shape in shapes.items():
    outputs = shape[-1] if shape else 1
    if counts[k] == 0:
      warnings.warn(f"sparsity: leaf '{k}' of shape {shape} keeps no weight at all: its output "
                    f"is constant; {hint}", UserWarning, stacklevel=3)
    elif counts[k] < outputs:
      warnings.warn(f"sparsity: leaf '{k}' of shape {shape} keeps only {counts[k]} weight(s) for "
                    f"its {outputs} output units, so at least {outputs - counts[k]} of them get no "
                    f"input at all; {hint}", UserWarning, stacklevel=3)
