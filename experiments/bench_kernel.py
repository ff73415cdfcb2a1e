"""Benchmark: block-sparse Pallas matmul vs jnp.dot (and jax.experimental.sparse).

One command on a GPU machine (the shapes of issue 6):

    python -m experiments.bench_kernel

X is 16384 x 8192, W 8192 x 8192 in bfloat16, at 90% and 50% block sparsity
with 64x64 and 128x128 blocks: forward, forward + both backward matmuls, and one
SGD step of an MLP with hidden width 8192 (three sparse 8192 x 8192 layers).
Every time is the median of ``--repeats`` runs after ``--warmup`` runs, each
ended by ``block_until_ready``; ratios are dense time / sparse time, measured in
the same process. ``--small`` runs tiny shapes (one sparsity, one block size; the CPU runs the
kernels in interpret mode) as a smoke check; its timings mean nothing.
``--json PATH`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.kernels import (BsrMatmulConfig, KernelConfig, SparseDense, bsr_from_dense,
                               bsr_matmul, bsr_with_data, expand_block_mask, resolve_backend,
                               tune_bsr_matmul)
from jaxsparse.kernels.pallas_matmul import bsr_matmul_reference

from experiments import common


def check_kernel(backend) -> None:
  """Before timing: the kernel on this device equals the reference (bf16, 64 x 64 blocks).

  The test suite runs the kernels in interpret mode only (CI has no GPU); this is
  the check that the compiled GPU / TPU kernel computes the right thing.
  """
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(256, 256)), jnp.bfloat16)
  a = bsr_from_dense(w, rng.random((4, 4)) < 0.5, (64, 64))
  np.testing.assert_allclose(np.asarray(bsr_matmul(x, a, backend=backend), np.float32),
                             np.asarray(bsr_matmul_reference(x, a), np.float32),
                             rtol=2e-2, atol=0.5)


def median_time(fn: Callable[..., Any], *args: Any, warmup: int, repeats: int) -> float:
  """Median wall time in seconds of ``fn(*args)`` (compiled by the warm-up runs)."""
  return common.median_seconds({"fn": lambda: fn(*args)}, repeats=repeats, warmup=warmup)["fn"]


def random_block_mask(grid: tuple[int, int], sparsity: float, seed: int) -> np.ndarray:
  """A block mask with exactly ``round((1 - sparsity) * n_blocks)`` kept blocks."""
  n = grid[0] * grid[1]
  keep = max(1, round((1 - sparsity) * n))
  flat = np.zeros(n, bool)
  flat[np.random.default_rng(seed).permutation(n)[:keep]] = True
  return flat.reshape(grid)


def matmul_rows(x, w, bm, block, args, backend) -> list[dict]:
  """Forward and forward+backward: kernel, jnp.dot, and jax.experimental.sparse."""
  nnz = int(bm.sum())
  a = bsr_from_dense(w, bm, block, nnz_max=nnz)
  mask = expand_block_mask(jnp.asarray(bm), block)
  w_masked = jnp.where(mask, w, 0)
  t = lambda f, *xs: median_time(f, *xs, warmup=args.warmup, repeats=args.repeats)
  kw = dict(backend=backend, block_m=args.block_m)
  tuned = {}
  if args.tune:   # per-kernel launch configs for this shape, found by timing (then looked up)
    tuned = dict(config=[list(c) for c in tune_bsr_matmul(x, a, backend=backend)])

  dense_fwd = jax.jit(lambda x, w: jnp.dot(x, w))
  sparse_fwd = jax.jit(lambda x, a: bsr_matmul(x, a, **kw))

  def dense_step(x, w):
    y, vjp = jax.vjp(jnp.dot, x, w)
    return vjp(y)

  def sparse_step(x, d):
    y, vjp = jax.vjp(lambda x, d: bsr_matmul(x, bsr_with_data(a, d), **kw), x, d)
    return vjp(y)

  rows = []
  td = t(dense_fwd, x, w)
  ts = t(sparse_fwd, x, a)
  rows.append(dict(case="forward", impl="pallas_bsr", dense_ms=td * 1e3, ms=ts * 1e3,
                   ratio=td / ts, **tuned))
  if args.compare_order:   # the launch order before 2026-11-30: one block column at a time
    c = KernelConfig(args.block_m or 128, backend.num_warps, backend.num_stages, rows_outer=False)
    old = jax.jit(lambda x, a: bsr_matmul(x, a, backend=backend,
                                          config=BsrMatmulConfig(c, c, c)))
    to = t(old, x, a)
    rows.append(dict(case="forward", impl="pallas_bsr, rows inner (old order)",
                     dense_ms=td * 1e3, ms=to * 1e3, ratio=td / to))
  tdb = t(jax.jit(dense_step), x, w)
  tsb = t(jax.jit(sparse_step), x, a.data)
  rows.append(dict(case="fwd+dX+dW", impl="pallas_bsr", dense_ms=tdb * 1e3, ms=tsb * 1e3,
                   ratio=tdb / tsb, **tuned))
  if not args.skip_jsparse:
    from jax.experimental import sparse as jsparse
    f = jax.jit(lambda x, wt: (wt @ x.T).T)      # sparse (N x K) @ dense, the native op
    for name, cls in (("BCSR", jsparse.BCSR), ("BCOO", jsparse.BCOO)):
      # In the benchmark dtype first; if that fails (e.g. no bf16 cuSPARSE path), in float32.
      errors = []
      for dt in dict.fromkeys([x.dtype, jnp.dtype(jnp.float32)]):
        impl = f"jax.experimental.sparse.{name}" + ("" if dt == x.dtype else f" ({dt})")
        try:
          wt = cls.fromdense(w_masked.T.astype(dt), nse=nnz * block[0] * block[1])
          tj = t(f, x.astype(dt), wt)
          rows.append(dict(case="forward", impl=impl, dense_ms=td * 1e3, ms=tj * 1e3,
                           ratio=td / tj))
          break
        except Exception as e:  # noqa: BLE001 (reported in the table, not hidden)
          errors.append(f"{dt}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
      else:
        rows.append(dict(case="forward", impl=f"jax.experimental.sparse.{name}",
                         dense_ms=td * 1e3, ms=float("nan"), ratio=float("nan"),
                         error="; ".join(errors)))
  return rows


class MLP(nn.Module):
  """``depth`` SparseDense layers of ``width`` (relu) and a dense 10-way head."""
  width: int
  depth: int
  block: tuple[int, int]
  nnz_max: int | None
  mode: str
  backend: str | None
  block_m: int | None
  dtype: Any

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.relu(SparseDense(self.width, block_shape=self.block, nnz_max=self.nnz_max,
                              mode=self.mode, backend=self.backend, block_m=self.block_m,
                              use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                              name=f"fc{i + 1}")(x))
    return nn.Dense(10, dtype=self.dtype, param_dtype=self.dtype, name="head")(x)


def mlp_row(m, width, depth, sparsity, block, args, backend, dtype) -> dict:
  """One SGD step of the MLP: masked BSR kernel path vs the dense model."""
  grid = (width // block[0], width // block[1])
  masks_np = [random_block_mask(grid, sparsity, seed=100 + i) for i in range(depth)]
  nnz = int(masks_np[0].sum())
  x = jax.random.normal(jax.random.key(1), (m, width), dtype)
  y = jax.random.randint(jax.random.key(2), (m,), 0, 10)
  tx = optax.sgd(1e-3)

  def make_step(model, masks):
    def step(params, opt_state, x, y):
      def loss(p):
        v = {"params": p} if masks is None else {"params": p, "masks": masks}
        logits = model.apply(v, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      l, g = jax.value_and_grad(loss)(params)
      u, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, u), opt_state, l
    return jax.jit(step)

  dense = MLP(width, depth, block, None, "masked_dense", backend, args.block_m, dtype)
  sparse = MLP(width, depth, block, nnz, "bsr", backend, args.block_m, dtype)
  params = dense.init(jax.random.key(0), x[:2])["params"]
  masks = {f"fc{i + 1}": {"kernel": expand_block_mask(jnp.asarray(b), block)}
           for i, b in enumerate(masks_np)}
  opt_state = tx.init(params)
  t = lambda f: median_time(f, params, opt_state, x, y, warmup=args.warmup, repeats=args.repeats)
  td = t(make_step(dense, None))
  ts = t(make_step(sparse, masks))
  return dict(case=f"MLP step (width {width}, {depth} sparse layers)", impl="SparseDense bsr",
              dense_ms=td * 1e3, ms=ts * 1e3, ratio=td / ts)


def main(argv: list[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--small", action="store_true", help="tiny shapes: a CPU smoke check")
  p.add_argument("--sparsities", type=float, nargs="+", default=None,
                 help="block sparsities (default 0.9 0.5; --small: 0.9)")
  p.add_argument("--blocks", type=int, nargs="+", default=None,
                 help="square block sizes (default 64 128; --small: 32)")
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--block-m", type=int, default=None, help="rows of X per kernel program")
  p.add_argument("--backend", default=None, help="kernel backend (default: automatic)")
  p.add_argument("--num-warps", type=int, default=4, help="Triton num_warps")
  p.add_argument("--num-stages", type=int, default=3, help="Triton num_stages")
  p.add_argument("--tune", action="store_true",
                 help="tune each kernel's launch config per shape first (tune_bsr_matmul); "
                      "the MLP step then uses the configs tuned for its shapes")
  p.add_argument("--compare-order", action="store_true",
                 help="also time the forward with the old launch order (rows_outer=False)")
  p.add_argument("--skip-jsparse", action="store_true", help="skip jax.experimental.sparse")
  p.add_argument("--skip-mlp", action="store_true", help="skip the MLP training step")
  p.add_argument("--json", default=None, help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  if args.tune and args.block_m is not None:
    p.error("--tune and --block-m exclude each other: tuning chooses block_m per kernel")

  dtype = jnp.dtype(args.dtype)
  if args.small:
    m, k, n, width, depth = 64, 128, 128, 128, 2
    blocks = args.blocks or [32]
    args.sparsities = args.sparsities or [0.9]
    args.repeats, args.warmup = min(args.repeats, 3), 1
  else:
    m, k, n, width, depth = 16384, 8192, 8192, 8192, 3
    blocks = args.blocks or [64, 128]
    args.sparsities = args.sparsities or [0.9, 0.5]
  be = resolve_backend(args.backend, num_warps=args.num_warps, num_stages=args.num_stages)
  dev = jax.devices()[0]
  check_kernel(be)
  print(f"device: {dev.device_kind} ({dev.platform}); jax {jax.__version__}; backend {be.name}"
        f"{' (interpret mode: timings are not meaningful)' if be.interpret else ''}")
  print(f"X {m}x{k}, W {k}x{n}, {args.dtype}; median of {args.repeats} after {args.warmup} "
        "warm-up runs; ratio = dense ms / sparse ms")

  x = jax.random.normal(jax.random.key(0), (m, k), dtype)
  w = jax.random.normal(jax.random.key(1), (k, n), dtype)
  rows = []
  for s in args.sparsities:
    for b in blocks:
      block = (b, b)
      bm = random_block_mask((k // b, n // b), s, seed=b)
      for r in matmul_rows(x, w, bm, block, args, be):
        rows.append(dict(sparsity=s, block=b, ideal=1 / (1 - s), **r))
  if not args.skip_mlp:
    for s in args.sparsities[:1]:
      b = blocks[0]
      rows.append(dict(sparsity=s, block=b, ideal=1 / (1 - s),
                       **mlp_row(m, width, depth, s, (b, b), args, be, dtype)))

  print("\n" + common.markdown_table(
      ["sparsity", "block", "case", "implementation", "dense ms", "sparse ms", "ratio", "ideal"],
      [[f"{r['sparsity']:.0%}", r["block"], r["case"],
        r["impl"] + (f" ({r['error']})" if "error" in r else ""), f"{r['dense_ms']:.3f}",
        f"{r['ms']:.3f}", f"{r['ratio']:.2f}x", f"{r['ideal']:.1f}x"] for r in rows],
      align="rrllrrrr"))
  if args.json:
    meta = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__,
                backend=be.name, small=args.small, dtype=args.dtype)
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
