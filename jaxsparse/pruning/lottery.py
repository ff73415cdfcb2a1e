"""Lottery tickets (Frankle & Carbin 2019): iterative magnitude pruning with rewinding.

A loop over the caller's training: each round trains the current
ticket (``jaxsparse.keep_masks`` inside the caller's ``train_fn``), removes
``rate`` (20%) of the remaining weights of every sparse layer by magnitude
(the output layer at ``output_rate``, half the rate by default), and rewinds
the survivors to their values at init or at an early step k
(``jaxsparse.rewind``). When ``targets`` are given, the round that would
overshoot a target prunes a smaller fraction (the same for every layer,
halved for the output layer) so that the sparse leaves land exactly on it.

  from jaxsparse.pruning.lottery import lottery_ticket   # or js.lottery_ticket
  rounds = lottery_ticket(train_fn, init_params, targets=(0.9, 0.95), rewind_params=init_params)
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import masks as masks_lib, selection as topk, transform as core
from jaxsparse.core import distributions as dist
from jaxsparse.pruning.magnitude import rewind


class Round(NamedTuple):
  """One IMP round: the ticket that was trained and what training returned."""
  index: int
  sparsity: float
  masks: Any
  result: Any


def _next_counts(kept: dict, is_output: dict, p: float, output_rate_ratio: float) -> dict:
  return {n: k - int(round(k * (p * output_rate_ratio if is_output[n] else p)))
          for n, k in kept.items()}


def imp_step_counts(kept: dict, is_output: dict, sizes: dict, rate: float, output_rate: float,
                    target: float | None) -> dict:
  """Per-leaf kept counts after one round: ``rate`` of each layer's survivors (the output
  layer's: ``output_rate``).

  If that would pass ``target`` sparsity, the rate is reduced (bisection,
  keeping the output layer's ratio) to land on ``target``.
  """
  ratio = output_rate / rate if rate > 0 else 1.0
  total = sum(sizes.values())
  new = _next_counts(kept, is_output, rate, ratio)
  if target is None or 1 - sum(new.values()) / total <= target + 1e-12:
    return new
  want = int(round((1 - target) * total))
  lo, hi = 0.0, rate
  for _ in range(60):
    mid = (lo + hi) / 2
    if sum(_next_counts(kept, is_output, mid, ratio).values()) > want:
      lo = mid
    else:
      hi = mid
  new = _next_counts(kept, is_output, hi, ratio)
  # Fix the last few weights of rounding on the largest non-output leaf.
  big = max((n for n in new if not is_output[n]), key=lambda n: new[n], default=None)
  if big is not None:
    new[big] = max(1, new[big] + want - sum(new.values()))
  return new


def prune_by_magnitude(params: Any, masks: Any, counts: dict) -> Any:
  """Keeps the ``counts[name]`` largest ``|w|`` among each sparse leaf's active weights."""
  names = masks_lib.leaf_names(params)
  flat_m, treedef = jax.tree.flatten(masks)
  flat_p = jax.tree.leaves(params)
  out = [topk.largest_k_mask(jnp.abs(p), counts[n], m) if n in counts else m
         for n, p, m in zip(names, flat_p, flat_m)]
  return jax.tree.unflatten(treedef, out)


def lottery_ticket(train_fn: Callable[[Any, Any], tuple[Any, Any]], init_params: Any, *,
                   targets: Sequence[float] = (0.9,), rate: float = 0.2,
                   output_layer: str | None = None, output_rate: float | None = None,
                   rewind_params: Any = None, filter: dist.LeafFilter | None = None,
                   keep_dense: Sequence[str] = (),
                   on_round: Callable[[Round], None] | None = None) -> list[Round]:
  """Iterative magnitude pruning with rewinding, until the last of ``targets``.

  Args:
    train_fn: ``(start_params, masks) -> (trained_params, result)``; it must
      train with the masks fixed (e.g. ``jaxsparse.keep_masks``).
    init_params: the dense initialization (round 0 trains it dense).
    targets: sparsities (over the sparse leaves) at which a ticket is trained
      and returned; rounds land exactly on each.
    rate: fraction of each layer's remaining weights removed per round (0.2).
    output_layer: a '/'-name part that picks the output layer's sparse leaf
      (e.g. ``"fc3"``); it is pruned at ``output_rate`` (default ``rate / 2``).
    rewind_params: the weights survivors rewind to (init, or step k of the
      dense run: "late resetting"); default ``init_params``.
    on_round: called after every round (progress, logging).

  Returns:
    Every trained round (round 0 is dense), in order.
  """
  if not 0 < rate < 1:
    raise ValueError(f"rate must be in (0, 1), got {rate!r}")
  output_rate = rate / 2 if output_rate is None else output_rate
  if not 0 <= output_rate < 1:
    raise ValueError(f"output_rate must be in [0, 1), got {output_rate!r}")
  targets = sorted(dist.check_sparsity(t, "targets") for t in targets)
  if not targets:
    raise ValueError("targets must name at least one sparsity")
  rewind_params = init_params if rewind_params is None else rewind_params
  shapes = dist.select_leaves(init_params, filter=filter, keep_dense=keep_dense)
  if output_layer is not None and not any(output_layer in n.split("/") for n in shapes):
    raise ValueError(f"output_layer: '{output_layer}' matches no sparse leaf; sparse leaves are "
                     f"{list(shapes)}")
  is_output = {n: output_layer is not None and output_layer in n.split("/") for n in shapes}
  sizes = {n: int(np.prod(s)) for n, s in shapes.items()}
  kept = dict(sizes)
  masks = core.masks_from_fn(init_params, shapes,
                             lambda n, leaf, i: jnp.ones(jnp.shape(leaf), bool))
  rounds: list[Round] = []
  start = init_params
  index = 0
  while True:
    trained, result = train_fn(start, masks)
    sp = 1 - sum(kept.values()) / sum(sizes.values())
    rounds.append(Round(index, sp, masks, result))
    if on_round is not None:
      on_round(rounds[-1])
    remaining = [t for t in targets if t > sp + 1e-9]
    if not remaining:
      return rounds
    kept = imp_step_counts(kept, is_output, sizes, rate, output_rate, remaining[0])
    masks = prune_by_magnitude(masks_lib.apply_masks(trained, masks), masks, kept)
    start = rewind(rewind_params, masks)
    index += 1
