"""Deep Compression storage (Han et al. 2016, Sec. 2 and 5): Huffman codes, relative indices
with fillers, and the bit counts of the paper's P+Q and P+Q+H columns."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse.analysis import compression as cp
from jaxsparse.pruning import weight_sharing as ws


def test_huffman_code_by_hand():
  s = [0] * 5 + [1] * 2 + [2, 3]
  code = cp.huffman_code(s)
  assert {v: len(c) for v, c in code.items()} == {0: 1, 1: 2, 2: 3, 3: 3}
  assert cp.huffman_bits(s) == 5 * 1 + 2 * 2 + 3 + 3 == len(cp.huffman_encode(s, code))
  assert cp.huffman_code([7, 7, 7]) == {7: "0"} and cp.huffman_bits([7, 7, 7]) == 3


@pytest.mark.parametrize("seed", range(6))
def test_huffman_is_prefix_free_optimal_and_round_trips(seed):
  rng = np.random.default_rng(seed)
  k = int(rng.integers(2, 40))
  s = rng.choice(k, size=int(rng.integers(50, 2000)), p=rng.dirichlet(np.ones(k) * 0.5))
  code = cp.huffman_code(s)
  words = list(code.values())
  # Prefix-free, checked pairwise (not through is_prefix_free), and a complete code (Kraft = 1).
  assert not any(a != b and b.startswith(a) for a in words for b in words)
  assert len(set(words)) == len(words) and cp.is_prefix_free(code)
  if len(code) > 1:
    assert sum(2.0 ** -len(w) for w in words) == 1.0
  bits = cp.huffman_encode(s, code)
  np.testing.assert_array_equal(cp.huffman_decode(bits, code), s)
  # No worse than a fixed-width code and within 1 bit/symbol of the entropy (Huffman's bound).
  _, n = np.unique(s, return_counts=True)
  p = n / n.sum()
  entropy = -(p * np.log2(p)).sum() * len(s)
  assert entropy - 1e-6 <= len(bits) <= min(entropy + len(s), len(s) * (k - 1).bit_length())


def test_is_prefix_free_rejects_a_prefix_and_decode_rejects_bad_bits():
  assert not cp.is_prefix_free({0: "0", 1: "01", 2: "11"})
  code = {0: "0", 1: "10", 2: "11"}
  with pytest.raises(ValueError, match="bits: ends inside a codeword"):
    cp.huffman_decode("0101", code)
  with pytest.raises(ValueError, match="symbols must be non-empty"):
    cp.huffman_code([])
  with pytest.raises(ValueError, match="symbols: 5 has no codeword"):
    cp.huffman_encode([5], code)


def test_relative_positions_with_fillers_by_hand():
  kept = np.zeros(20, bool)
  kept[[1, 2, 12, 13]] = True
  codes, filler = cp.relative_positions(kept, 2)   # gaps of 1..4 fit; 10 = 4 + 4 + 2
  np.testing.assert_array_equal(codes, [1, 0, 3, 3, 1, 0])
  np.testing.assert_array_equal(filler, [0, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(cp.positions_from_relative(codes, filler), [1, 2, 12, 13])
  with pytest.raises(ValueError, match="index_bits must be >= 1, got 0"):
    cp.relative_positions(kept, 0)


def test_leaf_bit_counts_match_the_formulas():
  idx = np.full((4, 5), -1)
  idx.ravel()[[1, 2, 12, 13]] = [0, 1, 1, 0]
  s = cp.leaf_compression("w", (4, 5), idx, 4, 2)
  assert (s.kept, s.fillers, s.entries, s.bits, s.index_bits) == (4, 2, 6, 2, 2)
  assert s.dense == 20 * 32
  assert (s.weight_pq, s.index_pq, s.codebook) == (6 * 2, 6 * 2, 4 * 32)
  assert s.pq == 12 + 12 + 128
  # Weight symbols [0, 1, F, F, 1, 0] and index codes [1, 0, 3, 3, 1, 0]: three symbols of
  # count 2 each -> code lengths 1, 2, 2 -> 10 bits per stream.
  assert (s.weight_huffman, s.index_huffman) == (10, 10)
  assert s.huffman == 10 + 10 + 128
  with pytest.raises(ValueError, match="num_clusters must be a power of two"):
    cp.leaf_compression("w", (4, 5), idx, 3, 2)


def test_compression_sizes_of_a_weight_shared_tree_decode_back():
  k1, k2 = jax.random.split(jax.random.key(0))
  w = jax.random.normal(k1, (300, 100))
  w = jnp.where(jax.random.uniform(k2, w.shape) < 0.05, w, 0.0)
  params = {"fc": {"kernel": w, "bias": jnp.zeros(100)}}
  state = ws.weight_sharing(optax.identity()).init(params)
  sizes = js.compression_sizes(params, state)
  bias, kernel = sizes
  assert bias.name == "fc/bias" and bias.pq == bias.huffman == bias.dense == 100 * 32
  assert kernel.bits == 5 and kernel.index_bits == 5 and kernel.kept == int((w != 0).sum())
  idx = np.asarray(state.indices["fc"]["kernel"]).ravel()
  codes, filler = cp.relative_positions(idx >= 0, 5)
  assert kernel.fillers == int(filler.sum()) > 0     # 5% density: gaps over 32 occur
  assert kernel.pq == kernel.entries * (5 + 5) + 32 * 32
  # Decode both Huffman streams and rebuild the positions and the cluster indices.
  symbols = np.where(filler, 32, 0)
  symbols[~filler] = idx[idx >= 0]
  wcode, icode = js.huffman_code(symbols), js.huffman_code(codes)
  wbits, ibits = js.huffman_encode(symbols, wcode), js.huffman_encode(codes, icode)
  assert kernel.weight_huffman == len(wbits) and kernel.index_huffman == len(ibits)
  sym, cod = js.huffman_decode(wbits, wcode), js.huffman_decode(ibits, icode)
  pos = cp.positions_from_relative(cod, sym == 32)
  np.testing.assert_array_equal(pos, np.flatnonzero(idx >= 0))
  np.testing.assert_array_equal(sym[sym != 32], idx[pos])
  t = cp.compression_totals(sizes)
  assert t["ratio_huffman"] > t["ratio_pq"] > 1
  assert js.compression_sizes(params, state, index_bits=8)[1].index_pq == (
      (kernel.kept + int(cp.relative_positions(idx >= 0, 8)[1].sum())) * 8)
  with pytest.raises(ValueError, match="index_bits must be >= 1, got 0"):
    js.compression_sizes(params, state, index_bits=0)
  with pytest.raises(ValueError, match=r"index_bits\['fc/kernel'\] must be >= 1, got 0"):
    js.compression_sizes(params, state, index_bits={"fc/kernel": 0})
