"""Exact-count selection of the k smallest / largest scores, with a traced k.

Mask updates need "the k smallest |w| among the active weights" where k is
often only known on device (it depends on the step, or on how many weights
are positive). :func:`smallest_k_mask` answers that in O(n) passes instead of
a full sort: it bisects on the 32-bit order-preserving integer key of each
float32 score for the k-th value (32 counting passes), takes every score below
it and breaks ties at it by lower flat index, so exactly
``min(k, count(valid))`` entries are selected.

:func:`top_k_mask` does the same with ``jax.lax.top_k`` when k is a static
Python int; both agree exactly, including on ties (lower index first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _order_key(x: jax.Array) -> jax.Array:
  """Maps float32 to uint32 so that unsigned order equals float order (-0.0 < +0.0)."""
  bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  sign = bits >> 31
  return jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))


def smallest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                    ) -> jax.Array:
  """Boolean mask of the ``k`` smallest ``scores`` among ``valid`` entries.

  Exactly ``min(k, count(valid))`` entries are True; ties at the threshold go
  to the lower flat (row-major) index. ``k`` may be traced. NaN scores are
  never valid. Cost: 32 counting passes over ``scores`` plus one cumsum.
  """
  shape = scores.shape
  x = scores.reshape(-1)
  ok = ~jnp.isnan(x) if valid is None else valid.reshape(-1) & ~jnp.isnan(x)
  key = _order_key(x)
  k = jnp.clip(jnp.asarray(k, jnp.int32), 0, jnp.sum(ok, dtype=jnp.int32))

  def count_le(t):
    return jnp.sum(ok & (key <= t), dtype=jnp.int32)

  # Smallest t with count_le(t) >= k, by bisection on [lo, hi]; invariant count_le(hi) >= k.
  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = count_le(mid) >= k
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  lo, _ = lax.fori_loop(0, 32, body, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
  below = ok & (key < lo)
  at = ok & (key == lo)
  need = k - jnp.sum(below, dtype=jnp.int32)
  take_at = at & (jnp.cumsum(at, dtype=jnp.int32) <= need)
  out = below | take_at
  return jnp.where(k > 0, out, jnp.zeros_like(out)).reshape(shape)


def largest_k_mask(scores: jax.Array, k: jax.Array | int, valid: jax.Array | None = None
                   ) -> jax.Array:
  """Boolean mask of the ``k`` largest ``scores`` among ``valid`` (ties: lower index first)."""
  return smallest_k_mask(-scores.astype(jnp.float32), k, valid)


def top_k_mask(scores: jax.Array, k: int, valid: jax.Array | None = None) -> jax.Array:
  """Static-k variant of :func:`largest_k_mask` with ``jax.lax.top_k``.

  Invalid entries are never chosen; if fewer than ``k`` are valid, only the
  valid ones are returned. Ties at equal score go to the lower flat index.
  """
  if not isinstance(k, int) or k < 0 or k > scores.size:
    raise ValueError(f"k must be a static int in [0, {scores.size}], got {k!r}")
  x = scores.reshape(-1).astype(jnp.float32)
  ok = ~jnp.isnan(x) if valid is None else valid.reshape(-1) & ~jnp.isnan(x)
  if k == 0:
    return jnp.zeros(scores.shape, bool)
  # Rank invalid entries below every valid one while keeping their relative order.
  key = _order_key(x).astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.uint32)
  _, idx = lax.top_k(jnp.where(ok, key, 0), k)
  out = jnp.zeros(x.shape, bool).at[idx].set(True) & ok
  return out.reshape(scores.shape)


def random_k_mask(key: jax.Array, k: jax.Array | int, valid: jax.Array) -> jax.Array:
  """Exactly ``min(k, count(valid))`` entries of ``valid``, uniformly at random without replacement."""
  u = jax.random.uniform(key, valid.shape, jnp.float32)
  return smallest_k_mask(u, k, valid)
