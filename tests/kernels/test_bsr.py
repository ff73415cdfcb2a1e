"""The BSR pytree: conversion, tables, fixed nnz_max under jit, bad input."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxsparse.kernels import (BSR, block_mask, bsr_block_mask, bsr_from_dense, bsr_overflow,
                               bsr_to_dense, expand_block_mask, is_block_structured)


def numpy_tables(bm):
  """Reference tables from their definition (row-major slots, column-major transpose)."""
  rows, cols = np.nonzero(bm)
  slot = {(r, c): s for s, (r, c) in enumerate(zip(rows, cols))}
  t_cols, t_rows = np.nonzero(bm.T)
  return dict(indptr=np.concatenate([[0], np.cumsum(bm.sum(1))]), indices=cols, rows=rows,
              t_indptr=np.concatenate([[0], np.cumsum(bm.sum(0))]), t_indices=t_rows,
              t_perm=np.array([slot[(r, c)] for r, c in zip(t_rows, t_cols)], int))


@functools.partial(jax.jit, static_argnums=2)
def _convert(w, bm, block_shape):
  a = bsr_from_dense(w, bm, block_shape)
  return a, bsr_to_dense(a), bsr_block_mask(a)


# A few grid/block shapes (each compiles once); hypothesis draws the masks and values.
@settings(max_examples=20, deadline=None)
@given(shape=st.sampled_from([(1, 1, 2, 3), (3, 4, 2, 1), (4, 2, 4, 4)]),
       density=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_round_trip_exact_and_tables(shape, density, seed):
  nbr, nbc, bk, bn = shape
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(nbr * bk, nbc * bn)).astype(np.float32)
  bm = rng.random((nbr, nbc)) < density
  a, dense_out, bm_out = _convert(w, bm, (bk, bn))
  assert a.data.shape == (nbr * nbc, bk, bn) and a.shape == w.shape and a.grid == (nbr, nbc)
  dense = np.where(np.asarray(expand_block_mask(jnp.asarray(bm), (bk, bn))), w, 0)
  np.testing.assert_array_equal(dense_out, dense)
  np.testing.assert_array_equal(bm_out, bm)
  nnz = int(bm.sum())
  assert int(a.nnz) == nnz
  ref = numpy_tables(bm)
  for name in ("indptr", "t_indptr"):
    np.testing.assert_array_equal(getattr(a, name), ref[name])
  for name in ("indices", "rows", "t_indices", "t_perm"):
    np.testing.assert_array_equal(np.asarray(getattr(a, name))[:nnz], ref[name])
  # every stored block is the right slice of w; padding slots are zero
  data, rows, cols = np.asarray(a.data), np.asarray(a.rows), np.asarray(a.indices)
  for s in range(nnz):
    r, c = rows[s], cols[s]
    np.testing.assert_array_equal(data[s], w[r * bk:(r + 1) * bk, c * bn:(c + 1) * bn])
  assert not np.any(data[nnz:])


def test_elementwise_mask_round_trip_is_where_mask():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(32, 48)).astype(np.float32)
  m = rng.random((32, 48)) < 0.1
  a = bsr_from_dense(w, m, (16, 16))
  np.testing.assert_array_equal(bsr_to_dense(a), np.where(m, w, 0))
  np.testing.assert_array_equal(bsr_block_mask(a), block_mask(m, w.shape, (16, 16)))
  assert not bool(is_block_structured(jnp.asarray(m), (16, 16)))
  assert bool(is_block_structured(expand_block_mask(jnp.asarray(m[:2, :3]), (16, 16)), (16, 16)))


def test_scalar_and_missing_mask_keep_every_block():
  w = jnp.arange(32 * 32, dtype=jnp.float32).reshape(32, 32)
  for m in (None, True, jnp.asarray(True)):
    a = bsr_from_dense(w, m, (16, 16))
    assert int(a.nnz) == 4
    np.testing.assert_array_equal(bsr_to_dense(a), w)
  assert int(bsr_from_dense(w, False, (16, 16)).nnz) == 0


def test_new_mask_rebuilds_tables_in_jit_without_recompiling():
  w = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)
  traces = []

  @jax.jit
  def convert(w, m):
    traces.append(1)
    a = bsr_from_dense(w, m, (16, 16), nnz_max=5)
    return a, bsr_to_dense(a)

  masks = [np.eye(4, dtype=bool), np.zeros((4, 4), bool), np.ones((4, 4), bool)]
  masks[1][3, 0] = True
  outs = [convert(w, m) for m in masks]
  assert len(traces) == 1
  for m, (a, dense) in zip(masks[:2], outs[:2]):
    assert isinstance(a, BSR) and a.data.shape == (5, 16, 16)
    assert not bool(bsr_overflow(a))
    np.testing.assert_array_equal(dense, jnp.where(expand_block_mask(jnp.asarray(m), (16, 16)),
                                                   w, 0))
  # 16 blocks > nnz_max = 5 under jit: the first 5 blocks (row-major) are kept, overflow flagged
  a, dense = outs[2]
  assert bool(bsr_overflow(a)) and int(a.nnz) == 16
  kept = np.zeros((4, 4), bool)
  kept.flat[:5] = True
  np.testing.assert_array_equal(bsr_block_mask(a), kept)
  np.testing.assert_array_equal(dense, jnp.where(expand_block_mask(jnp.asarray(kept), (16, 16)),
                                                 w, 0))


def test_pytree_round_trip():
  a = bsr_from_dense(jnp.ones((32, 32)), np.eye(2, dtype=bool), (16, 16), 3)
  leaves, treedef = jax.tree.flatten(a)
  assert len(leaves) == 8
  b = jax.tree.unflatten(treedef, leaves)
  assert b.shape == (32, 32) and b.block_shape == (16, 16) and b.nnz_max == 3


def test_bad_inputs():
  w = jnp.ones((32, 48))
  with pytest.raises(ValueError, match="block_shape .* does not divide"):
    bsr_from_dense(w, None, (16, 32))
  with pytest.raises(ValueError, match="block_shape"):
    bsr_from_dense(w, None, (16, 0))
  with pytest.raises(ValueError, match="block_shape"):
    bsr_from_dense(w, None, 16)
  with pytest.raises(ValueError, match="2D"):
    bsr_from_dense(jnp.ones((2, 16, 16)), None, (16, 16))
  with pytest.raises(ValueError, match="nnz_max=2 is too small: the mask has 6"):
    bsr_from_dense(w, None, (16, 16), nnz_max=2)
  with pytest.raises(ValueError, match="nnz_max"):
    bsr_from_dense(w, None, (16, 16), nnz_max=0)
  with pytest.raises(ValueError, match="mask has shape"):
    bsr_from_dense(w, jnp.ones((3, 3), bool), (16, 16))
  with pytest.raises(ValueError, match="mask must be boolean"):
    bsr_from_dense(w, jnp.ones((32, 48)), (16, 16))
