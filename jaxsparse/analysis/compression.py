"""Deep Compression's storage (Han, Mao & Dally 2016, ICLR): pruned, weight-shared leaves
stored as relative positions and cluster indices, then Huffman coded.

Built on :mod:`jaxsparse.analysis.formats` (its matrix view of a leaf and its dense cost).
For a leaf viewed as an ``r x c`` matrix, flattened row-major, with ``k`` kept weights
shared by ``2**b`` centroids and positions stored as differences of ``p`` bits:

* index differences (Sec. 2, Fig. 2): the gap ``d >= 1`` from the previous kept position
  (the first from position -1) is stored as ``d - 1`` in ``p`` bits; a gap larger than
  ``2**p`` first takes ``f = ceil(d / 2**p) - 1`` filler entries (a zero weight, gap ``2**p``
  each), so a leaf stores ``n = k + fillers`` entries;
* after pruning + quantization (P+Q, Table 1): ``n * (b + p) + 2**b * 32`` bits (the
  cluster index of every entry, its index difference, and a codebook of float32 centroids);
* after Huffman coding (P+Q+H, Sec. 5): ``H(weights) + H(differences) + 2**b * 32`` bits, where
  ``H(s)`` is the length of the Huffman code of the symbol stream ``s`` (:func:`huffman_bits`;
  fillers are a symbol of their own in the weight stream, so the stream decodes). As in the
  paper, the Huffman tables themselves are not counted.

Leaves that are not weight-shared (biases) are stored dense at 32 bits in both columns.
Host-side summaries (numpy), not for use under ``jit``.
"""

from __future__ import annotations

import heapq
from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from jaxsparse.analysis import formats
from jaxsparse.core import masks as masks_lib
from jaxsparse.pruning import weight_sharing as ws

CONV_INDEX_BITS = 8
"""Bits of a relative index in conv layers (Deep Compression Sec. 2)."""
FC_INDEX_BITS = 5
"""Bits of a relative index in fully connected layers (Sec. 2)."""
CENTROID_BITS = 32
"""Bits of one codebook entry (float32)."""


# --------------------------------------------------------------------------------- Huffman


def huffman_code(symbols: Any) -> dict[int, str]:
  """A Huffman code (Huffman 1952) for the symbols of ``symbols``: symbol -> '0'/'1' string.

  Built with a heap from the symbol counts; ties broken by symbol so the code is
  deterministic. A stream of one distinct symbol gets the 1-bit code ``'0'``.

  Raises:
    ValueError: naming ``symbols`` when empty.
  """
  s = np.asarray(symbols).ravel()
  if s.size == 0:
    raise ValueError("symbols must be non-empty, got an empty array")
  values, counts = np.unique(s, return_counts=True)
  if len(values) == 1:
    return {int(values[0]): "0"}
  # Heap items: (count, tie-break, {symbol: code suffix so far}).
  heap = [(int(n), i, {int(v): ""}) for i, (v, n) in enumerate(zip(values, counts))]
  heapq.heapify(heap)
  order = len(heap)
  while len(heap) > 1:
    n0, _, a = heapq.heappop(heap)
    n1, _, b = heapq.heappop(heap)
    merged = {v: "0" + c for v, c in a.items()}
    merged.update({v: "1" + c for v, c in b.items()})
    heapq.heappush(heap, (n0 + n1, order, merged))
    order += 1
  return dict(sorted(heap[0][2].items()))


def is_prefix_free(code: Mapping[int, str]) -> bool:
  """Whether no codeword of ``code`` is a prefix of another (so a stream decodes uniquely)."""
  words = sorted(code.values())
  # In sorted order a prefix sorts right before some word it prefixes.
  return all(not words[i + 1].startswith(words[i]) for i in range(len(words) - 1)) and \
      len(set(words)) == len(words)


def huffman_encode(symbols: Any, code: Mapping[int, str]) -> str:
  """The bit string ('0'/'1' characters) of ``symbols`` under ``code``.

  Raises:
    ValueError: naming ``symbols`` when one has no codeword.
  """
  try:
    return "".join(code[int(v)] for v in np.asarray(symbols).ravel())
  except KeyError as e:
    raise ValueError(f"symbols: {e.args[0]} has no codeword in code") from None


def huffman_decode(bits: str, code: Mapping[int, str]) -> np.ndarray:
  """The symbols of the bit string ``bits`` under the prefix-free ``code`` (int64 array).

  Raises:
    ValueError: naming ``bits`` when it does not end at a codeword boundary or holds a
      sequence that is no codeword.
  """
  decode = {c: v for v, c in code.items()}
  longest = max(len(c) for c in decode)
  out, word = [], ""
  for ch in bits:
    word += ch
    if word in decode:
      out.append(decode[word])
      word = ""
    elif len(word) >= longest:
      raise ValueError(f"bits: '{word}' is no codeword of code")
  if word:
    raise ValueError(f"bits: ends inside a codeword ('{word}')")
  return np.asarray(out, np.int64)


def huffman_bits(symbols: Any) -> int:
  """Length in bits of the Huffman coding of ``symbols``: ``sum_s count(s) * len(code(s))``."""
  s = np.asarray(symbols).ravel()
  if s.size == 0:
    return 0
  code = huffman_code(s)
  values, counts = np.unique(s, return_counts=True)
  return int(sum(int(n) * len(code[int(v)]) for v, n in zip(values, counts)))


# ------------------------------------------------------------------- relative positions


def relative_positions(kept: Any, index_bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Deep Compression's relative indices (Sec. 2, Fig. 2) of the flat boolean ``kept``.

  Returns ``(codes, filler)``: one entry per stored weight, ``codes`` the gap minus one
  (in ``[0, 2**index_bits)``) and ``filler`` True for the zero fillers inserted where a gap
  exceeds ``2**index_bits``. Positions are the row-major order of ``kept``.

  Raises:
    ValueError: naming ``index_bits`` when < 1.
  """
  if isinstance(index_bits, bool) or not isinstance(index_bits, int) or index_bits < 1:
    raise ValueError(f"index_bits must be >= 1, got {index_bits!r}")
  span = 2 ** index_bits
  pos = np.flatnonzero(np.asarray(kept, bool).ravel())
  gaps = np.diff(np.concatenate([[-1], pos]))
  fill = (gaps - 1) // span  # fillers before each kept weight
  n = len(pos) + int(fill.sum())
  codes = np.full(n, span - 1, np.int64)  # a filler's gap is the largest, 2**p
  filler = np.ones(n, bool)
  at = np.cumsum(fill + 1) - 1  # where each kept weight lands among the entries
  codes[at] = gaps - fill * span - 1
  filler[at] = False
  return codes, filler


def positions_from_relative(codes: Any, filler: Any) -> np.ndarray:
  """The kept flat positions back from :func:`relative_positions` (its inverse)."""
  at = np.cumsum(np.asarray(codes, np.int64) + 1) - 1
  return at[~np.asarray(filler, bool)]


# ------------------------------------------------------------------------ accounting


class CompressionSizes(NamedTuple):
  """Deep Compression's storage of one leaf, in bits (see the module docstring)."""
  name: str
  shape: tuple
  total: int          # weights in the leaf
  kept: int           # kept weights
  fillers: int        # filler entries of the relative indexing
  bits: int           # cluster-index bits b (32: stored dense, not shared)
  index_bits: int     # relative-index bits p (0: stored dense)
  dense: int          # original size, 32-bit dense
  weight_pq: int      # entries * b
  index_pq: int       # entries * p
  codebook: int       # 2**b * 32 (0 for a dense leaf)
  weight_huffman: int
  index_huffman: int

  @property
  def entries(self) -> int:
    return self.kept + self.fillers

  @property
  def pq(self) -> int:
    """Bits after pruning + quantization."""
    return self.weight_pq + self.index_pq + self.codebook

  @property
  def huffman(self) -> int:
    """Bits after pruning + quantization + Huffman coding."""
    return self.weight_huffman + self.index_huffman + self.codebook


def _index_bits(index_bits: int | Mapping[str, int] | None, name: str, leaf: Any) -> int:
  default = CONV_INDEX_BITS if np.ndim(leaf) == 4 else FC_INDEX_BITS
  if index_bits is None:
    p = default
  elif isinstance(index_bits, Mapping):
    p = index_bits.get(name, default)
  else:
    p = index_bits
  if isinstance(p, bool) or not isinstance(p, int) or p < 1:
    where = f"index_bits['{name}']" if isinstance(index_bits, Mapping) else "index_bits"
    raise ValueError(f"{where} must be >= 1, got {p!r}")
  return p


def leaf_compression(name: str, shape: tuple, indices: Any, num_clusters: int,
                     index_bits: int) -> CompressionSizes:
  """:class:`CompressionSizes` of one weight-shared leaf from its cluster ``indices`` (-1
  where pruned) and codebook size ``num_clusters`` (a power of two)."""
  if num_clusters < 1 or num_clusters & (num_clusters - 1):
    raise ValueError(f"num_clusters must be a power of two >= 1, got {num_clusters}")
  b = max(num_clusters.bit_length() - 1, 0)
  r, c = formats.matrix_shape(shape)
  idx = np.asarray(indices).reshape(r * c)
  codes, filler = relative_positions(idx >= 0, index_bits)
  symbols = np.full(len(codes), num_clusters, np.int64)  # fillers: a symbol of their own
  symbols[~filler] = idx[idx >= 0]
  n = len(codes)
  b_stored = max(b, 1)  # one cluster still takes a bit per entry in a fixed-width stream
  return CompressionSizes(
      name, tuple(int(s) for s in shape), r * c, int((idx >= 0).sum()), int(filler.sum()), b,
      index_bits, formats.dense_bits(r, c, r * c, CENTROID_BITS), n * b_stored, n * index_bits,
      num_clusters * CENTROID_BITS, huffman_bits(symbols), huffman_bits(codes))


def compression_sizes(params: Any, state: Any, *,
                      index_bits: int | Mapping[str, int] | None = None) -> list[CompressionSizes]:
  """Per-leaf :class:`CompressionSizes` of ``params`` weight-shared by
  :func:`~jaxsparse.pruning.weight_sharing.weight_sharing` (``state``: its state, or an
  optimizer state holding it). ``index_bits``: int, or leaf name -> bits; default 8 for conv
  kernels and 5 for the others (Sec. 2). Leaves that are not shared count as 32-bit dense.

  Raises:
    ValueError: naming ``index_bits`` when < 1, or ``state`` when it holds no weight sharing.
  """
  state = ws._find_state(state)
  masks_lib.check_same_leaves(state.indices, params, "state.indices", shapes=False)
  out = []
  for name, p, i, c in zip(masks_lib.leaf_names(params), jax.tree.leaves(params),
                           jax.tree.leaves(state.indices), jax.tree.leaves(state.centroids)):
    shape = tuple(int(s) for s in np.shape(p))
    if np.size(c) == 0:
      r, cols = formats.matrix_shape(shape)
      dense = formats.dense_bits(r, cols, r * cols, CENTROID_BITS)
      out.append(CompressionSizes(name, shape, r * cols, r * cols, 0, CENTROID_BITS, 0, dense,
                                  dense, 0, 0, dense, 0))
      continue
    out.append(leaf_compression(name, shape, i, int(np.size(c)),
                                _index_bits(index_bits, name, p)))
  return out


def compression_totals(sizes: list[CompressionSizes]) -> dict[str, float]:
  """Totals over leaves: weights, kept, fillers, dense / P+Q / P+Q+H bits and the two
  compression ratios (dense bits over compressed bits)."""
  t = dict(total=sum(s.total for s in sizes), kept=sum(s.kept for s in sizes),
           fillers=sum(s.fillers for s in sizes), dense=sum(s.dense for s in sizes),
           pq=sum(s.pq for s in sizes), huffman=sum(s.huffman for s in sizes))
  t["ratio_pq"] = t["dense"] / t["pq"]
  t["ratio_huffman"] = t["dense"] / t["huffman"]
  return t
