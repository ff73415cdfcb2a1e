"""Storage formats: sizes match the REFERENCES formulas, best format, exports."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

from jaxsparse.analysis import formats
from jaxsparse.kernels import BSR, bsr_to_dense


def lg(n):
  return math.ceil(math.log2(n)) if n > 1 else 0


def test_ceil_log2_is_exact():
  for n in [1, 2, 3, 4, 5, 255, 256, 257, 2**40, 2**40 + 1]:
    assert formats.ceil_log2(n) == (lg(n) if n < 2**30 else (n - 1).bit_length())
  assert formats.ceil_log2(2**40 + 1) == 41
  with pytest.raises(ValueError, match="n must be"):
    formats.ceil_log2(0)


def test_sizes_match_the_formulas():
  rng = np.random.default_rng(0)
  r, c, b = 64, 48, 32
  mask = rng.random((r, c)) < 0.1
  mask[:16, :16] = True                                   # one full block
  k = int(mask.sum())
  kb = int(mask.reshape(4, 16, 3, 16).any(axis=(1, 3)).sum())
  s = formats.leaf_sizes(mask, (r, c), b, (16, 16))
  assert s.kept == k
  assert s.dense == r * c * b
  assert s.bitmap == r * c + k * b
  assert s.coo == k * (lg(r) + lg(c) + b)
  assert s.csr == k * (lg(c) + b) + (r + 1) * lg(k + 1)
  assert s.bsr == kb * (16 * 16 * b + lg(c / 16)) + (r / 16 + 1) * lg(kb + 1)
  # a hand-computed case: 4x4, k = 3, 8-bit values, 2x2 blocks, 2 blocks kept
  m = np.zeros((4, 4), bool)
  m[0, 0] = m[0, 1] = m[3, 3] = True
  h = formats.leaf_sizes(m, (4, 4), 8, (2, 2))
  assert (h.dense, h.bitmap, h.coo, h.csr) == (128, 16 + 24, 3 * (2 + 2 + 8), 3 * 10 + 5 * 2)
  assert h.bsr == 2 * (4 * 8 + 1) + 3 * 2
  assert h.best == "coo"      # 36 bits < bitmap 40 = CSR 40 < BSR 72 < dense 128
  # BSR does not apply when the block does not divide; rank-4 leaves are (H*W*I, O) matrices
  assert formats.leaf_sizes(m, (4, 4), 8, (3, 3)).bsr is None
  conv = formats.leaf_sizes(True, (3, 3, 4, 8), 32, (4, 4))
  assert conv.dense == 36 * 8 * 32 and conv.kept == 288
  assert formats.matrix_shape(()) == (1, 1) and formats.matrix_shape((7,)) == (1, 7)


def test_best_format_per_leaf_and_dtype_bits():
  rng = np.random.default_rng(1)
  block = np.zeros((64, 64), bool)
  block[:16, 16:32] = block[32:48, :16] = True
  params = {"dense": jnp.ones((8, 8)), "blocky": jnp.ones((64, 64), jnp.bfloat16),
            "tiny": jnp.ones((256, 256)), "half": jnp.ones((64, 64))}
  tiny = np.zeros((256, 256), bool)
  tiny[rng.integers(0, 256, 20), rng.integers(0, 256, 20)] = True
  masks = {"dense": jnp.asarray(True), "blocky": jnp.asarray(block), "tiny": jnp.asarray(tiny),
           "half": jnp.asarray(rng.random((64, 64)) < 0.5)}
  best = formats.best_formats(params, masks)
  assert best["dense"][0] == "dense" and best["dense"][1] == 8 * 8 * 4
  assert best["blocky"][0] == "bsr"
  assert best["tiny"][0] in ("coo", "csr")
  assert best["half"][0] == "bitmap"
  sizes = {s.name: s for s in formats.storage_sizes(params, masks)}
  assert sizes["blocky"].value_bits == 16 and sizes["tiny"].value_bits == 32
  for s in sizes.values():
    assert s.sizes()[s.best] == min(s.sizes().values())
  text = formats.storage_summary(params, masks)
  assert "blocky" in text and "best per leaf" in text
  with pytest.raises(ValueError, match="value_bits"):
    formats.leaf_sizes(block, (64, 64), 0)
  with pytest.raises(ValueError, match="mask"):
    formats.storage_sizes(params, {"dense": True})


@pytest.mark.parametrize("fmt", ["bcoo", "bcsr", "csr", "bsr"])
def test_exports_round_trip(fmt):
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(32, 48)), jnp.float32)
  m = jnp.asarray(rng.random((32, 48)) < 0.2)
  params = {"w": w, "b": jnp.ones(48), "v": jnp.ones(5)}
  masks = {"w": m, "b": jnp.asarray(True), "v": jnp.asarray([True, False, True, True, False])}
  out = formats.export_sparse(params, masks, fmt)
  want = np.where(m, w, 0)
  x = rng.normal(size=(3, 32)).astype(np.float32)
  if fmt == "bcoo":
    assert isinstance(out["w"], jsparse.BCOO) and out["w"].nse == int(m.sum())
    got = out["w"].todense()
  elif fmt == "bcsr":
    assert isinstance(out["w"], jsparse.BCSR)
    got = out["w"].todense()
  elif fmt == "csr":
    assert isinstance(out["w"], formats.CSRArrays) and out["w"].data.size == int(m.sum())
    got = out["w"].todense()
    np.testing.assert_allclose(out["w"].matmul(x), x @ want, rtol=1e-5, atol=1e-5)
  else:
    assert isinstance(out["w"], BSR)
    got = bsr_to_dense(out["w"])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(out["v"], [1, 0, 1, 1, 0])
  np.testing.assert_array_equal(out["b"], np.ones(48))
  with pytest.raises(ValueError, match="format must be"):
    formats.export_sparse(params, masks, "ell")


def test_csr_bad_input():
  with pytest.raises(ValueError, match="2D"):
    formats.csr_from_dense(np.ones((2, 2, 2)))
  with pytest.raises(ValueError, match="mask has shape"):
    formats.csr_from_dense(np.ones((2, 2)), np.ones((3, 2), bool))
  empty = formats.csr_from_dense(np.ones((3, 2)), False)
  assert empty.data.size == 0 and list(empty.indptr) == [0, 0, 0, 0]
