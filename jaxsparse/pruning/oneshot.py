"""One-shot pruning of a trained network from calibration activations: magnitude, Wanda, SparseGPT, OWL.

No retraining: each Dense kernel ``W`` (``(d_in, d_out)``, flax's layout) is pruned
from the inputs ``X`` (tokens x d_in) it receives on a few calibration sequences.
Every method takes a target, ``sparsity=s`` (unstructured) or ``nm=(N, M)`` (N kept
of every M consecutive inputs, per output: 2:4, 4:8), and returns a boolean mask
of ``W``'s shape (True = kept), usable with :func:`jaxsparse.keep_masks`.

* **Magnitude** (layer-wise): remove the ``round(s d_in d_out)`` smallest ``|W|`` of the layer.
* **Wanda** (Sun et al. 2023, eq. 1): score ``S_ij = |W_ij| ||X_j||_2`` (``X_j``: input
  feature j over all calibration tokens); each output unit removes its ``round(s d_in)``
  lowest scores (the paper's per-output comparison group). No weight update.
* **SparseGPT** (Frantar & Alistarh 2023, Algorithm 1): layer-wise OBS with
  ``H = 2 X^T X / n + lambda I``, ``lambda = percdamp * mean(diag H)`` (1%). With ``U``
  the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``), the inputs are processed
  left to right; input j's pruned weights get the OBS error ``err = w / U_jj`` and the
  not yet processed inputs of the same output move by ``-err U_j,j:`` (Hassibi &
  Stork's update with the inverse Hessian of the remaining inputs, whose rows are
  ``U``'s). The updates are lazy: applied within a block of ``blocksize`` inputs, and
  to the rest of the row once per block. The mask is chosen adaptively per block:
  the ``round``-ed share of the block with the smallest ``w^2 / U_jj^2`` over all
  outputs (so the layer removes exactly ``round(s d_in d_out)``), or for N:M, at
  every M-th input, the M - N smallest of the next M per output.
* **OWL** (Yin et al. 2023): per block of the network, the outlier ratio ``D_l``
  (share of the block's Wanda scores above ``m`` times their mean, on the dense
  model) is mapped linearly onto ``[0, 2 lam]`` and shifted so the blocks' densities
  average ``1 - s``: a block with more outliers is pruned less (:func:`owl_sparsities`).
  It sets the per-block sparsity that Wanda or SparseGPT then reaches. With ``nm``,
  each block keeps ``N_l`` of every M (mixed N:M) with ``N_l ~ M (1 - s_l)`` and the
  mean of the ``N_l`` equal to N.

Exact counts: magnitude and SparseGPT remove exactly ``round(s * size)`` weights per
layer, Wanda exactly ``round(s * d_in)`` per output; ties go to the lower index.

:func:`prune` runs a model's calibration stage by stage (for the LM: embedding, then
each block; :func:`jaxsparse.nn.transformer.stages`): a stage's Dense inputs are recorded
with the earlier stages already pruned (the papers' sequential scheme), its kernels are
pruned, then the calibration activations go through the pruned stage. Only one stage's
activations and one layer's ``H`` are live at a time. The per-layer work (``X^T X``
accumulation, the Cholesky factors, the column loop) is jitted, in float32 with
``Precision.HIGHEST`` dots. Sharded params and inputs stay sharded: a kernel split
over its outputs is pruned in place (SparseGPT's rows are independent given ``H``,
which is replicated; the per-block selection exchanges only histograms), and
calibration tokens split over devices give ``X^T X`` by an all-reduce.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.pruning import structured
from jaxsparse.core import selection as topk

METHODS = ("magnitude", "wanda", "sparsegpt")
_HIGHEST = lax.Precision.HIGHEST


class InputStats(NamedTuple):
  """A layer's calibration inputs X (n tokens x d_in), summed over tokens.

  Attributes:
    gram: ``X^T X`` (d_in, d_in), or None where only the diagonal is needed.
    sq: ``sum_t X_tj^2`` (d_in,): the squared Wanda norms ``||X_j||_2^2``.
    count: n, the number of tokens.
  """
  gram: jax.Array | None
  sq: jax.Array
  count: jax.Array

  @property
  def norms(self) -> jax.Array:
    """``||X_j||_2`` over the calibration tokens (Wanda's activation factor)."""
    return jnp.sqrt(self.sq)

  @property
  def hessian(self) -> jax.Array:
    """SparseGPT's ``H = 2 X^T X / n`` (undamped)."""
    if self.gram is None:
      raise ValueError("these InputStats hold no X^T X (made with gram=False)")
    return 2.0 * self.gram / self.count

  def __add__(self, other: "InputStats") -> "InputStats":
    gram = None if self.gram is None else self.gram + other.gram
    return InputStats(gram, self.sq + other.sq, self.count + other.count)


def input_stats(x: jax.Array, gram: bool = True) -> InputStats:
  """:class:`InputStats` of activations ``x`` (..., d_in); every leading position is a token."""
  x2 = jnp.reshape(x, (-1, jnp.shape(x)[-1])).astype(jnp.float32)
  g = jnp.matmul(x2.T, x2, precision=_HIGHEST) if gram else None
  return InputStats(g, jnp.sum(x2 * x2, axis=0), jnp.asarray(x2.shape[0], jnp.float32))


# ------------------------------------------------------------------ argument checks


def _check_kernel(kernel: Any, argname: str = "kernel") -> tuple[int, int]:
  shape = jnp.shape(kernel)
  if len(shape) != 2 or not jnp.issubdtype(jnp.result_type(kernel), jnp.floating):
    raise ValueError(f"{argname}: expected a Dense kernel, a float array of shape (d_in, d_out); "
                     f"got shape {shape} and dtype {jnp.result_type(kernel)}")
  return shape


def check_target(sparsity: Any = None, nm: Any = None) -> tuple[float | None, tuple[int, int] | None]:
  """Exactly one of ``sparsity`` in [0, 1) and ``nm = (N, M)`` with 1 <= N <= M."""
  if (sparsity is None) == (nm is None):
    raise ValueError(f"give exactly one of sparsity= (unstructured) and nm=(N, M); got "
                     f"sparsity={sparsity!r}, nm={nm!r}")
  if sparsity is not None:
    return dist.check_sparsity(sparsity, "sparsity"), None
  ok = isinstance(nm, (tuple, list)) and len(nm) == 2 and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in nm)
  if not ok:
    raise ValueError(f"nm must be a pair of ints (N, M), e.g. (2, 4); got {nm!r}")
  n, m = int(nm[0]), int(nm[1])
  if not 1 <= m:
    raise ValueError(f"nm=({n}, {m}): M must be >= 1")
  if not 1 <= n <= m:
    raise ValueError(f"nm=({n}, {m}): N must satisfy 1 <= N <= M (N weights kept of every M)")
  return None, (n, m)


def _check_nm_fits(d_in: int, nm: tuple[int, int] | None, argname: str = "kernel") -> None:
  if nm is not None and d_in % nm[1]:
    raise ValueError(f"{argname}: nm={nm}: M={nm[1]} does not divide the input width "
                     f"d_in={d_in}")


def _stats_for(x: Any, d_in: int, gram: bool, argname: str = "x") -> InputStats:
  """``x`` as :class:`InputStats`: activations (..., d_in) or stats already summed."""
  if isinstance(x, InputStats):
    if jnp.shape(x.sq) != (d_in,):
      raise ValueError(f"{argname}: InputStats of width {jnp.shape(x.sq)[0]} for a kernel with "
                       f"d_in={d_in} inputs")
    if gram and x.gram is None:
      raise ValueError(f"{argname}: SparseGPT needs InputStats with gram (X^T X)")
    return x
  shape = jnp.shape(x)
  if len(shape) < 1 or shape[-1] != d_in:
    raise ValueError(f"{argname}: calibration activations of shape {shape}, but the kernel "
                     f"has d_in={d_in} inputs; expected shape (..., {d_in})")
  return input_stats(x, gram)


def _count(s: float, n: int) -> int:
  """How many of ``n`` weights a sparsity ``s`` removes: ``round(s * n)``."""
  return int(round(s * n))


def _bisect(pred: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, steps: int
            ) -> jax.Array:
  """The smallest ``v`` in ``[lo, hi]`` with ``pred(v)`` (``pred`` monotone, true at ``hi``)."""
  def body(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    ok = pred(mid)
    return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
  return lax.fori_loop(0, steps, body, (lo, hi))[0]


def _smallest_k(scores: jax.Array, k: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """The ``k`` smallest of a 2-D ``scores`` among ``valid``: exactly ``min(k, count(valid))``,
  ties to the lower row-major index (the same set as :func:`jaxsparse.core.selection.smallest_k_mask`).

  By bisection: 32 steps on the float's order-preserving key for the k-th value, then
  ~log2(size) steps on the flat index among the ties. Each step is one count, so a
  sharded ``scores`` exchanges only scalars, and it compiles several times faster than
  the radix select, which matters inside SparseGPT's column loop (one compile per layer
  shape).
  """
  valid = jnp.ones(scores.shape, bool) if valid is None else valid
  key = jnp.where(valid, topk._order_key(scores), jnp.uint32(0xFFFFFFFF))
  k = jnp.minimum(k, jnp.sum(valid, dtype=jnp.int32))
  v = _bisect(lambda t: jnp.sum(key <= t, dtype=jnp.int32) >= k, jnp.uint32(0),
              jnp.uint32(0xFFFFFFFF), 32)
  below = (key < v) & valid
  need = k - jnp.sum(below, dtype=jnp.int32)
  tie = (key == v) & valid
  idx = (lax.broadcasted_iota(jnp.int32, scores.shape, 0) * scores.shape[1]
         + lax.broadcasted_iota(jnp.int32, scores.shape, 1))
  last = _bisect(lambda t: jnp.sum(tie & (idx <= t), dtype=jnp.int32) >= need, jnp.int32(0),
                 jnp.int32(scores.size - 1), max(1, int(scores.size - 1).bit_length()))
  return below | (tie & (idx <= last) & (need > 0))


# ------------------------------------------------------------------ per-layer: magnitude, Wanda


@jax.jit
def _smallest_per_layer(scores: jax.Array, k: jax.Array) -> jax.Array:
  return ~_smallest_k(scores, k)


@jax.jit
def _smallest_per_output(scores: jax.Array, k: jax.Array) -> jax.Array:
  """Keep mask removing the ``k`` lowest scores of every output (column); ties: lower index."""
  order = jnp.argsort(scores, axis=0, stable=True)
  ranks = jnp.argsort(order, axis=0, stable=True)
  return ranks >= k


@functools.partial(jax.jit, static_argnums=(1, 2))
def _nm_keep(scores: jax.Array, n: int, m: int) -> jax.Array:
  return structured.nm_mask(scores, n, m, axis=0)


def magnitude_mask(kernel: jax.Array, *, sparsity: float | None = None,
                   nm: tuple[int, int] | None = None) -> jax.Array:
  """Layer-wise magnitude pruning (Han et al. 2015): keep mask without the smallest ``|W|``."""
  d_in, d_out = _check_kernel(kernel)
  sparsity, nm = check_target(sparsity, nm)
  _check_nm_fits(d_in, nm)
  scores = jnp.abs(jnp.asarray(kernel, jnp.float32))
  if nm is not None:
    return _nm_keep(scores, *nm)
  return _smallest_per_layer(scores, jnp.int32(_count(sparsity, d_in * d_out)))


def wanda_scores(kernel: jax.Array, norms: jax.Array) -> jax.Array:
  """``|W_ij| * ||X_j||_2`` (Sun et al. 2023, eq. 1), in the kernel's ``(d_in, d_out)`` layout."""
  return jnp.abs(jnp.asarray(kernel, jnp.float32)) * jnp.asarray(norms, jnp.float32)[:, None]


def wanda_mask(kernel: jax.Array, x: jax.Array | InputStats, *, sparsity: float | None = None,
               nm: tuple[int, int] | None = None) -> jax.Array:
  """Wanda's keep mask of ``kernel`` from calibration inputs ``x`` (..., d_in) or their stats.

  Unstructured: each output removes its ``round(sparsity * d_in)`` lowest scores. N:M:
  each output keeps the N highest of every M consecutive inputs.
  """
  d_in, _ = _check_kernel(kernel)
  sparsity, nm = check_target(sparsity, nm)
  _check_nm_fits(d_in, nm)
  scores = wanda_scores(kernel, _stats_for(x, d_in, gram=False).norms)
  if nm is not None:
    return _nm_keep(scores, *nm)
  return _smallest_per_output(scores, jnp.int32(_count(sparsity, d_in)))


# ------------------------------------------------------------------ per-layer: SparseGPT


def _upper_cholesky_of_inverse(h: jax.Array, percdamp: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``U`` upper triangular with ``U^T U = (H + lambda I)^-1``, and the inputs that are never active.

  An input that is zero on every calibration token (``H_jj = 0``) gets ``H_jj = 1``, so
  ``H`` stays invertible; its weights are zeroed (they never contribute), as in the
  authors' code.
  """
  c = h.shape[0]
  eye = jnp.eye(c, dtype=jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = jnp.where((eye > 0) & dead[None, :], 1.0, h)
  h = h + percdamp * jnp.mean(jnp.diagonal(h)) * eye
  low = jnp.linalg.cholesky(h)
  hinv = jax.scipy.linalg.cho_solve((low, True), eye)
  hinv = 0.5 * (hinv + hinv.T)  # symmetric to the last bit before the second factorization
  return jnp.linalg.cholesky(hinv).T, dead


@functools.partial(jax.jit, static_argnames=("blocksize", "nm"))
def _sparsegpt_rows(w: jax.Array, h: jax.Array, counts: jax.Array, percdamp: jax.Array, *,
                    blocksize: int, nm: tuple[int, int] | None):
  """SparseGPT on ``w`` (rows = outputs, columns = inputs); returns (new w, keep mask)."""
  r, c = w.shape
  b = blocksize
  nb = -(-c // b)
  cp = nb * b
  u, dead = _upper_cholesky_of_inverse(h.astype(jnp.float32), percdamp)
  w = jnp.where(dead[None, :], 0.0, w.astype(jnp.float32))
  # Pad the inputs to whole blocks: zero weights, identity factor (padded inputs touch nothing).
  w = jnp.pad(w, ((0, 0), (0, cp - c)))
  u = jnp.eye(cp, dtype=jnp.float32).at[:c, :c].set(u)
  col = jnp.arange(cp)

  def column(i, carry):
    """OBS step for input i of the block: prune, then move the block's later inputs."""
    w1, pruned1, err1, u1 = carry
    wi = lax.dynamic_index_in_dim(w1, i, axis=1, keepdims=False)
    q = jnp.where(lax.dynamic_index_in_dim(pruned1, i, axis=1, keepdims=False), 0.0, wi)
    urow = lax.dynamic_index_in_dim(u1, i, axis=0, keepdims=False)   # zero left of i
    err = (wi - q) / urow[i]
    w1 = w1 - err[:, None] * urow[None, :]
    w1 = lax.dynamic_update_index_in_dim(w1, q, i, axis=1)  # exact zeros, exact kept values
    err1 = lax.dynamic_update_index_in_dim(err1, err, i, axis=1)
    return w1, pruned1, err1, u1

  def block(bi, carry):
    w, pruned = carry
    i1 = bi * b
    w1 = lax.dynamic_slice(w, (0, i1), (r, b))
    u1 = lax.dynamic_slice(u, (i1, i1), (b, b))
    d2 = jnp.square(jnp.diagonal(u1))
    err1 = jnp.zeros((r, b), jnp.float32)
    if nm is None:
      # Adaptive mask selection: this block's share, over all outputs, by w^2 / U_jj^2.
      valid = jnp.broadcast_to(i1 + jnp.arange(b) < c, (r, b))
      pruned1 = _smallest_k(jnp.square(w1) / d2, counts[bi], valid)
      w1, pruned1, err1, _ = lax.fori_loop(0, b, column, (w1, pruned1, err1, u1))
    else:
      n, m = nm

      def group(g, carry):
        w1, pruned1, err1, u1 = carry
        j = g * m
        # At every M-th input, per output: prune the M - N lowest w^2 / U_jj^2 of the next M.
        scores = jnp.square(lax.dynamic_slice(w1, (0, j), (r, m))) / lax.dynamic_slice(
            d2, (j,), (m,))
        pruned1 = lax.dynamic_update_slice(
            pruned1, ~structured.nm_mask(scores, n, m, axis=-1), (0, j))
        return lax.fori_loop(j, j + m, column, (w1, pruned1, err1, u1))

      pruned1 = jnp.zeros((r, b), bool)
      w1, pruned1, err1, _ = lax.fori_loop(0, b // m, group, (w1, pruned1, err1, u1))
    w = lax.dynamic_update_slice(w, w1, (0, i1))
    # Lazy batch update of every input after the block: W[:, i2:] -= Err1 U[i1:i2, i2:].
    tail = jnp.matmul(err1, lax.dynamic_slice(u, (i1, 0), (b, cp)), precision=_HIGHEST)
    w = w - jnp.where(col[None, :] >= i1 + b, tail, 0.0)
    pruned = lax.dynamic_update_slice(pruned, pruned1, (0, i1))
    return w, pruned

  w, pruned = lax.fori_loop(0, nb, block, (w, jnp.zeros((r, cp), bool)))
  return w[:, :c], ~pruned[:, :c]


def sparsegpt_counts(sparsity: float, d_in: int, d_out: int, blocksize: int) -> np.ndarray:
  """Weights SparseGPT removes in each block of ``blocksize`` inputs: the rounded cumulative
  share, ``round(s d_out i2) - round(s d_out i1)``, so the layer removes ``round(s d_in d_out)``."""
  ends = np.minimum(np.arange(1, -(-d_in // blocksize) + 1) * blocksize, d_in)
  cum = np.array([_count(sparsity, d_out * int(e)) for e in ends])
  return np.diff(np.concatenate([[0], cum])).astype(np.int32)


def sparsegpt(kernel: jax.Array, x: jax.Array | InputStats, *, sparsity: float | None = None,
              nm: tuple[int, int] | None = None, blocksize: int = 128,
              percdamp: float = 0.01) -> tuple[jax.Array, jax.Array]:
  """SparseGPT on one Dense kernel: ``(updated kernel, keep mask)``, both ``(d_in, d_out)``.

  Args:
    kernel: the layer's kernel (d_in, d_out).
    x: calibration inputs (..., d_in), or their :class:`InputStats` (with ``gram``).
    sparsity, nm: the target (exactly one).
    blocksize: B, the inputs per lazy-update block and per adaptive mask selection
      (the paper's 128 for both); a multiple of M for N:M.
    percdamp: the damping, as a fraction of the mean diagonal of ``H``.

  The pruned weights are exactly zero; the kept ones carry the OBS updates.
  """
  d_in, d_out = _check_kernel(kernel)
  sparsity, nm = check_target(sparsity, nm)
  _check_nm_fits(d_in, nm)
  if not isinstance(blocksize, (int, np.integer)) or blocksize < 1:
    raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
  b = int(min(blocksize, d_in))  # d_in itself is a multiple of M (checked above)
  if nm is not None and b % nm[1]:
    raise ValueError(f"blocksize={blocksize} must be a multiple of M={nm[1]} for nm={nm}")
  dist.check_number(percdamp, "percdamp")
  if not percdamp > 0:
    raise ValueError(f"percdamp must be > 0, got {percdamp!r}")
  stats = _stats_for(x, d_in, gram=True)
  counts = sparsegpt_counts(sparsity or 0.0, d_in, d_out, b)
  w, keep = _sparsegpt_rows(jnp.asarray(kernel).T, stats.hessian, jnp.asarray(counts),
                            jnp.float32(percdamp), blocksize=b, nm=nm)
  return w.T.astype(jnp.result_type(kernel)), keep.T


# ------------------------------------------------------------------ OWL


def outlier_ratio(scores: Sequence[jax.Array], m: float) -> float:
  """Share of the entries of ``scores`` (taken together) above ``m`` times their mean."""
  total = sum(float(jnp.sum(s)) for s in scores)
  size = sum(int(np.prod(jnp.shape(s))) for s in scores)
  threshold = m * total / size
  return sum(int(jnp.sum(s > threshold)) for s in scores) / size


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> np.ndarray:
  """OWL's per-block sparsities from the blocks' outlier ratios ``D_l``.

  ``D_l`` is mapped linearly onto ``[0, 2 lam]`` (min to 0, max to 2 lam), shifted so
  that the densities ``1 - s_l`` average ``1 - sparsity``: ``s_l`` spans a range of
  width ``2 lam`` with mean ``sparsity``, the most outlier-rich block lowest. Equal
  ratios give every block ``sparsity``. Raises if some ``s_l`` leaves [0, 1).
  """
  sparsity = dist.check_sparsity(sparsity, "sparsity")
  dist.check_number(lam, "lam")
  if not lam >= 0:
    raise ValueError(f"lam must be >= 0, got {lam!r}")
  d = np.asarray(ratios, np.float64)
  spread = d.max() - d.min()
  r = np.zeros_like(d) if spread == 0 else (d - d.min()) / spread * 2 * lam
  s = sparsity - (r - r.mean())
  if np.any(s < 0) or np.any(s >= 1):
    raise ValueError(f"lam={lam}: OWL's block sparsities {np.round(s, 4).tolist()} leave [0, 1) "
                     f"around sparsity={sparsity}; use a smaller lam")
  return s


def owl_nm(sparsities: Sequence[float], nm: tuple[int, int]) -> list[int]:
  """Mixed N:M from OWL's block sparsities: ``N_l ~ M (1 - s_l)``, largest remainders,
  so that the ``N_l`` sum to (number of blocks) * N; each within [1, M]."""
  n, m = nm
  target = m * (1.0 - np.asarray(sparsities, np.float64))
  base = np.floor(target).astype(int)
  short = len(target) * n - int(base.sum())
  order = np.argsort(-(target - base), kind="stable")
  base[order[:short]] += 1
  if np.any(base < 1) or np.any(base > m):
    raise ValueError(f"nm={nm}: OWL's per-block N {base.tolist()} leave [1, {m}]; use a smaller lam")
  return base.tolist()


class OWL(NamedTuple):
  """OWL's hyperparameters (Yin et al. 2023): outlier threshold ``m`` (times the mean score),
  and ``lam``, half the range of the block sparsities."""
  m: float = 5.0
  lam: float = 0.08


# ------------------------------------------------------------------ the whole model


@functools.partial(jax.jit, static_argnums=(0, 3))
def _capture(stage: Callable, params: Any, x: jax.Array, gram: bool) -> dict[str, InputStats]:
  """Runs ``stage`` and returns the :class:`InputStats` of every ``nn.Dense`` call in it."""
  found: dict[str, InputStats] = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, nn.Dense):
      name = "/".join(str(p) for p in module.path) + "/kernel"
      stats = input_stats(args[0], gram)
      found[name] = found[name] + stats if name in found else stats
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    stage(params, x)
  return found


@functools.partial(jax.jit, static_argnums=0)
def _forward(stage: Callable, params: Any, x: jax.Array) -> jax.Array:
  return stage(params, x)


def _chunks(x: Any, batch_size: int | None):
  n = jnp.shape(x)[0]
  size = n if batch_size is None else int(batch_size)
  return [x[i:i + size] for i in range(0, n, size)]


def _stage_stats(stage, params, xs, gram: bool, prefix: str) -> dict[str, InputStats]:
  """Stats of the stage's Dense inputs summed over the chunks ``xs``, names with ``prefix``."""
  total: dict[str, InputStats] = {}
  for x in xs:
    for name, s in _capture(stage, params, x, gram).items():
      name = prefix + name
      total[name] = total[name] + s if name in total else s
  return total


class PruneResult(NamedTuple):
  """What :func:`prune` returns.

  Attributes:
    params: the pruned params (SparseGPT: with its weight updates; exact zeros where pruned).
    masks: a mask tree for ``params``: boolean arrays on the pruned kernels, scalar True
      elsewhere (feed it to :func:`jaxsparse.keep_masks` to fine-tune).
    targets: layer name -> its target: the sparsity, or ``(N, M)``.
    norms: layer name -> ``||X_j||_2`` of the calibration inputs the layer was pruned with.
    outlier_ratios: stage name -> OWL's outlier ratio ``D_l`` (empty without ``owl``).
  """
  params: Any
  masks: Any
  targets: dict[str, Any]
  norms: dict[str, jax.Array]
  outlier_ratios: dict[str, float]


def _set_leaf(tree: Any, name: str, value: Any) -> Any:
  keys = name.split("/")

  def put(node, i):
    node = dict(node)
    node[keys[i]] = value if i == len(keys) - 1 else put(node[keys[i]], i + 1)
    return node

  return put(tree, 0)


def _get_leaf(tree: Any, name: str) -> Any:
  for k in name.split("/"):
    tree = tree[k]
  return tree


def _keep_sharding(new: jax.Array, old: Any) -> jax.Array:
  """``new`` placed like ``old`` (a sharded kernel stays sharded the same way).

  On one device ``new`` already lies where ``old`` does; it is left uncommitted, as the
  params it joins are, so that a jitted function of the pruned params (a perplexity)
  reuses its compilation for the dense ones.
  """
  sharding = getattr(old, "sharding", None)
  if sharding is None or len(sharding.device_set) == 1:
    return new
  return jax.device_put(new, sharding)


def prune(stages: Sequence[Any], params: Any, inputs: jax.Array, method: str, *,
          sparsity: float | None = None, nm: tuple[int, int] | None = None,
          owl: OWL | None = None, layers: Sequence[str] | None = None, blocksize: int = 128,
          percdamp: float = 0.01, batch_size: int | None = None,
          callback: Callable[[str], None] | None = None) -> PruneResult:
  """One-shot pruning of a model, stage by stage, from calibration ``inputs``.

  Args:
    stages: the model as a sequence of stages, e.g. :func:`jaxsparse.nn.transformer.stages`:
      objects with ``apply(params, x) -> x`` and ``scope`` (the top-level params key
      ``apply`` is given; None: all params), or plain callables of all params. Stage
      ``i + 1`` gets the output of stage ``i`` with its kernels already pruned. Give
      equal stages an equal, hashable ``apply``: the jitted calibration compiles once per
      distinct ``apply``.
    params: the model's params tree (a nested dict, as flax linen's).
    inputs: the calibration batch the first stage takes (for the LM: tokens (n, T)).
    method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
    sparsity, nm: the target (exactly one), for every pruned layer (per stage with OWL).
    owl: :class:`OWL` hyperparameters for OWL's per-stage sparsities (Wanda or SparseGPT).
    layers: names of the kernels to prune (default: every ``nn.Dense`` kernel the stages
      call). Each must be the kernel of a Dense layer called inside a stage.
    blocksize, percdamp: SparseGPT's, see :func:`sparsegpt`.
    batch_size: calibration sequences per jitted call (default: all at once).
    callback: called with each pruned layer's name (progress reporting).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  sparsity, nm = check_target(sparsity, nm)
  if owl is not None:
    if not isinstance(owl, OWL):
      raise TypeError(f"owl must be a jaxsparse.pruning.oneshot.OWL or None, got {owl!r}")
    if method == "magnitude":
      raise ValueError("owl: OWL sets the layer sparsities of Wanda or SparseGPT; "
                       "method='magnitude' takes no owl")
  if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
    raise ValueError(f"batch_size must be None or a positive int, got {batch_size!r}")
  fns = [getattr(s, "apply", s) for s in stages]
  names = [getattr(s, "name", f"stage{i}") for i, s in enumerate(stages)]
  scopes = [getattr(s, "scope", None) for s in stages]
  for scope in scopes:
    if scope is not None and scope not in params:
      raise ValueError(f"stages: scope {scope!r} is not a top-level key of params")
  sub = lambda p, i: p if scopes[i] is None else p[scopes[i]]
  full = lambda n, i: n if scopes[i] is None else f"{scopes[i]}/{n}"
  leaf_names = set(masks_lib.leaf_names(params))
  gram = method == "sparsegpt"

  xs = _chunks(inputs, batch_size)
  # Which Dense kernels each stage calls (shapes only: no compute).
  called = []
  shape_x = jax.ShapeDtypeStruct(jnp.shape(xs[0]), jnp.result_type(xs[0]))
  for i, fn in enumerate(fns):
    out = jax.eval_shape(lambda p, x: _capture(fn, p, x, False), sub(params, i), shape_x)
    called.append([full(n, i) for n in out if full(n, i) in leaf_names])
    shape_x = jax.eval_shape(lambda p, x: _forward(fn, p, x), sub(params, i), shape_x)
  all_called = [n for c in called for n in c]
  if layers is None:
    chosen = set(all_called)
  else:
    chosen = set()
    for name in ([layers] if isinstance(layers, str) else layers):
      if name not in all_called:
        what = ("is not a leaf of params" if name not in leaf_names else
                "is not the kernel of an nn.Dense layer called in the stages")
        raise ValueError(f"layers: '{name}' {what}; the Dense kernels are {all_called}")
      chosen.add(name)
  if not chosen:
    raise ValueError("layers: the stages call no nn.Dense layer, so there is nothing to prune")

  # OWL: per-stage sparsities from the dense model's Wanda scores.
  stage_targets: list[tuple[float | None, tuple[int, int] | None]] = [(sparsity, nm)] * len(fns)
  ratios: dict[str, float] = {}
  if owl is not None:
    acts, pruned_stages = xs, []
    for i, fn in enumerate(fns):
      mine = [n for n in called[i] if n in chosen]
      if mine:
        stats = _stage_stats(fn, sub(params, i), acts, gram=False, prefix=full("", i))
        ratios[names[i]] = outlier_ratio(
            [wanda_scores(_get_leaf(params, n), stats[n].norms) for n in mine], owl.m)
        pruned_stages.append(i)
      acts = [_forward(fn, sub(params, i), x) for x in acts]
    target_s = sparsity if nm is None else 1.0 - nm[0] / nm[1]
    s_l = owl_sparsities([ratios[names[i]] for i in pruned_stages], target_s, owl.lam)
    n_l = None if nm is None else owl_nm(s_l, nm)
    for j, i in enumerate(pruned_stages):
      stage_targets[i] = (float(s_l[j]), None) if nm is None else (None, (n_l[j], nm[1]))

  new_params = params
  masks = jax.tree.map(lambda _: masks_lib.dense_mask(), params)
  targets, norms = {}, {}
  acts = xs
  for i, fn in enumerate(fns):
    mine = [n for n in called[i] if n in chosen]
    if mine:
      stats = _stage_stats(fn, sub(new_params, i), acts, gram, prefix=full("", i))
      s_i, nm_i = stage_targets[i]
      for name in mine:
        kernel = _get_leaf(new_params, name)
        if method == "magnitude":
          keep = magnitude_mask(kernel, sparsity=s_i, nm=nm_i)
        elif method == "wanda":
          keep = wanda_mask(kernel, stats[name], sparsity=s_i, nm=nm_i)
        else:
          new_kernel, keep = sparsegpt(kernel, stats[name], sparsity=s_i, nm=nm_i,
                                       blocksize=blocksize, percdamp=percdamp)
          new_params = _set_leaf(new_params, name, _keep_sharding(new_kernel, kernel))
        keep = _keep_sharding(keep, kernel)
        if method != "sparsegpt":
          new_params = _set_leaf(new_params, name, jnp.where(keep, kernel, 0).astype(kernel.dtype))
        masks = _set_leaf(masks, name, keep)
        targets[name] = s_i if nm_i is None else nm_i
        norms[name] = stats[name].norms
        if callback is not None:
          callback(name)
    if i + 1 < len(fns):
      acts = [_forward(fn, sub(new_params, i), x) for x in acts]
  return PruneResult(new_params, masks, targets, norms, ratios)
