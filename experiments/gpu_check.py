"""The GPU check: correctness first, then every speed number that only a device can give.

One command on an H100/H200 (at most 9.5 minutes: 550 s of part limits), each part in its own process
with its own time limit, so that a slow or failing part cannot eat the others:

    python -m experiments.gpu_check [--jaxpruner DIR] [--out results/gpu_check]

Parts, in order (``--parts`` picks some; ``--limits part=seconds`` overrides a limit):

1. ``correctness`` — the compiled block-sparse kernels (forward, dX, dW) against a
   float64 numpy reference: float32 and bfloat16, blocks 16x16, 32x64, 64x64 and
   128x128, M from 1 to 512, random, empty-row/column, single-block, full and empty
   masks with ``nnz_max > nnz``; a new mask must not recompile.
2. ``exactness`` — global magnitude selection (``topk.largest_k_masks``) over 1e8 and
   1e9 entries with heavy ties: the kept count is exactly k, and no dropped score
   exceeds a kept one.
3. ``kernels`` — :mod:`experiments.bench_kernel`: X 16384x8192 @ W 8192x8192 bf16 at
   90%/50% block sparsity, blocks 64/128, forward (also in the launch order used
   before 2026-11-30) and forward+dX+dW, and the three-layer width-8192 MLP training
   step; ratio = ``jnp.dot`` time / kernel time.
4. ``torch_bsr`` — PyTorch's Triton BSR kernel (``torch.sparse._triton_ops
   .bsr_dense_mm``) on the same shapes and masks, when torch is importable (it is
   not a dependency of jaxsparse).
5. ``steps`` — :mod:`experiments.bench_step`: static, SET, RigL and DSR train steps
   (non-update and update) against the dense step, with compile times, and
   jaxpruner's SET side by side when ``--jaxpruner DIR`` names a checkout.
6. ``mask_update`` — :mod:`experiments.bench_mask_update`: global magnitude and DSR
   reallocation at 1M/10M/100M parameters against a dense step.
7. ``lm_forward`` — the forward pass of a block-pruned GPT (width 2048, 4 blocks, context
   1024, batch 8, bfloat16; random init) whose MLP layers run on the block-sparse kernel
   (``GPT(sparse_mlp=SparseMLP(...))``, i.e. ``SparseDense``) against the same pruned model
   run dense: the MLP kernels pruned to 90% and 50% of their 128x128 and 64x64 blocks
   (block magnitude per layer; attention, embeddings, head dense). Logits checked against
   a float32 dense forward first; then interleaved medians, and the FLOPs ratio
   (``transformer.lm_flops``) as the ideal.
8. ``kernels_tuned`` (not run by default) — the kernel benchmark again, after
   ``tune_bsr_matmul`` picks each kernel's launch config per shape.

It writes ``report.md`` and ``report.json`` (and one JSON per part) under ``--out``,
labelled with the device's name and the JAX version. ``--small`` runs every part
at toy sizes on any machine (on CPU the kernels run in interpret mode; its times
mean nothing), as a smoke test of the command itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

PARTS = ("correctness", "exactness", "kernels", "torch_bsr", "steps", "mask_update",
         "lm_forward", "kernels_tuned")
DEFAULT_PARTS = PARTS[:-1]
# Seconds per part, process start and compilation included; 550 s in all.
LIMITS = dict(correctness=60, exactness=40, kernels=90, torch_bsr=40, steps=150, mask_update=50,
              lm_forward=120, kernels_tuned=180)


# ------------------------------------------------------------------------- the parts


def _rel_err(got, want) -> float:
  import numpy as np
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def part_correctness(small: bool) -> dict:
  """Compiled kernels against float64 numpy, for every dtype, block shape and mask kind."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxsparse.kernels import (bsr_from_dense, bsr_matmul, bsr_to_dense, bsr_with_data,
                                 expand_block_mask, resolve_backend)

  be = resolve_backend()
  blocks = [(16, 16), (32, 64)] if small else [(16, 16), (32, 64), (64, 64), (128, 128)]
  ms = [1, 40] if small else [1, 100, 512]
  tol = {"float32": 1e-5, "bfloat16": 1e-2}
  rows = []
  for dtype in ("float32", "bfloat16"):
    for block in blocks:
      nbr, nbc = 4, 3
      k, n = nbr * block[0], nbc * block[1]
      rng = np.random.default_rng(block[0] * 7 + block[1])
      kinds = {"random": rng.random((nbr, nbc)) < 0.5, "full": np.ones((nbr, nbc), bool),
               "single": np.zeros((nbr, nbc), bool), "empty": np.zeros((nbr, nbc), bool)}
      kinds["single"][2, 1] = True
      holes = rng.random((nbr, nbc)) < 0.7
      holes[1, :] = False
      holes[:, 0] = False
      kinds["empty_row_col"] = holes
      for m in ms if block == (64, 64) or small else ms[1:]:
        traces = []

        @jax.jit
        def run(x, w, bm, ct):
          traces.append(1)
          a = bsr_from_dense(w, bm, block, nnz_max=nbr * nbc)   # nnz_max > nnz but for "full"
          y, vjp = jax.vjp(lambda x, d: bsr_matmul(x, bsr_with_data(a, d), backend=be), x, a.data)
          dx, dd = vjp(ct)
          return y, dx, bsr_with_data(a, dd)

        x = jnp.asarray(rng.normal(size=(m, k)), dtype)
        w = jnp.asarray(rng.normal(size=(k, n)), dtype)
        ct = jnp.asarray(rng.normal(size=(m, n)), dtype)
        x64, w64, ct64 = (np.asarray(v, np.float64) for v in (x, w, ct))
        for kind, bm in kinds.items():
          y, dx, dw_bsr = run(x, w, jnp.asarray(bm), ct)
          mask = np.asarray(expand_block_mask(jnp.asarray(bm), block))
          wm = np.where(mask, w64, 0)
          errs = dict(y=_rel_err(y, x64 @ wm), dx=_rel_err(dx, ct64 @ wm.T),
                      dw=_rel_err(bsr_to_dense(dw_bsr), np.where(mask, x64.T @ ct64, 0)))
          ok = all(e <= tol[dtype] for e in errs.values())
          rows.append(dict(dtype=dtype, block=list(block), m=m, mask=kind, **errs, ok=ok))
        rows[-1]["traces"] = len(traces)
        if len(traces) != 1:
          rows[-1]["ok"] = False
          rows[-1]["error"] = f"{len(traces)} traces for {len(kinds)} masks: a mask change recompiled"
  bad = [r for r in rows if not r["ok"]]
  lines = [f"{len(rows) - len(bad)} of {len(rows)} cases within tolerance (backend {be.name}; "
           f"relative error <= {tol['float32']:g} in float32, {tol['bfloat16']:g} in bfloat16); "
           f"worst: " + ", ".join(
               f"{dt} {max(max(r['y'], r['dx'], r['dw']) for r in rows if r['dtype'] == dt):.2e}"
               for dt in tol)]
  lines += [f"- FAILED {r}" for r in bad]
  return dict(rows=rows, ok=not bad, markdown="\n".join(lines))


def part_exactness(small: bool) -> dict:
  """Global magnitude selection over 1e8 and 1e9 entries: exact counts, and a clean cut."""
  import jax
  import jax.numpy as jnp
  from jaxsparse.core import selection as topk

  sizes = [1 << 20, (1 << 24) + (1 << 20)] if small else [10 ** 8, 10 ** 9]
  rows = []
  for n in sizes:
    leaves = 4
    side = int((n // leaves) ** 0.5)
    shapes = [(side, side)] * (leaves - 1) + [(n - (leaves - 1) * side * side,)]
    total = sum(int(jnp.prod(jnp.array(s))) for s in shapes)

    @jax.jit
    def check(key, k):
      # Scores rounded to 1/64: heavy ties, so the tie-breaking pass runs at full scale.
      scores = [jnp.round(jax.random.normal(jax.random.fold_in(key, i), s) * 64) / 64
                for i, s in enumerate(shapes)]
      kept = topk.largest_k_masks(scores, k)
      count = sum(jnp.sum(m, dtype=jnp.int32) for m in kept)
      lo = jnp.min(jnp.stack([jnp.min(jnp.where(m, s, jnp.inf)) for s, m in zip(scores, kept)]))
      hi = jnp.max(jnp.stack([jnp.max(jnp.where(m, -jnp.inf, s)) for s, m in zip(scores, kept)]))
      return count, lo, hi

    k = int(total * 0.9) + 7
    t0 = time.perf_counter()
    count, lo, hi = jax.block_until_ready(check(jax.random.key(0), jnp.int32(k)))
    rows.append(dict(entries=total, k=k, kept=int(count), exact=int(count) == k,
                     min_kept=float(lo), max_dropped=float(hi), clean_cut=float(hi) <= float(lo),
                     seconds_with_compile=time.perf_counter() - t0))
  ok = all(r["exact"] and r["clean_cut"] for r in rows)
  md = "\n".join(f"- {r['entries']:,} entries, k = {r['k']:,}: kept {r['kept']:,} "
                 f"({'exact' if r['exact'] else 'WRONG'}), max dropped {r['max_dropped']:.4f} <= "
                 f"min kept {r['min_kept']:.4f}: {r['clean_cut']}" for r in rows)
  return dict(rows=rows, ok=ok, markdown=md)


def part_kernels(small: bool, tune: bool = False) -> dict:
  from experiments import bench_kernel
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "k.json")
    bench_kernel.main((["--small"] if small else []) + (["--tune"] if tune else ["--compare-order"])
                      + ["--skip-jsparse", "--json", path])
    with open(path) as f:
      out = json.load(f)
  md = ["| sparsity | block | case | implementation | dense ms | jaxsparse ms | ratio | ideal |",
        "|---:|---:|---|---|---:|---:|---:|---:|"]
  md += [f"| {r['sparsity']:.0%} | {r['block']} | {r['case']} | {r['impl']} | {r['dense_ms']:.3f} | "
         f"{r['ms']:.3f} | {r['ratio']:.2f}x | {r['ideal']:.1f}x |" for r in out["rows"]]
  return dict(rows=out["rows"], meta=out["meta"], ok=True, markdown="\n".join(md))


def part_torch_bsr(small: bool) -> dict:
  """PyTorch's Triton BSR matmul against torch's dense matmul, bench_kernel's shapes and masks."""
  try:
    import torch
    from torch.sparse._triton_ops import bsr_dense_mm
  except ImportError as e:
    return dict(rows=[], ok=True, skipped=f"torch not importable ({e})",
                markdown=f"skipped: torch not importable ({e})")
  if not torch.cuda.is_available():
    return dict(rows=[], ok=True, skipped="no CUDA device for torch",
                markdown="skipped: no CUDA device for torch")
  import statistics
  from experiments.bench_kernel import random_block_mask

  def median_ms(f, repeats=10, warmup=3):
    for _ in range(warmup):
      f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      f()
      end.record()
      torch.cuda.synchronize()
      ts.append(start.elapsed_time(end))
    return statistics.median(ts)

  m, k, n = (256, 512, 512) if small else (16384, 8192, 8192)
  gen = torch.Generator(device="cuda").manual_seed(0)
  x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
  w = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen)
  rows = []
  for s in (0.9, 0.5):
    for b in (64, 128):
      bm = torch.as_tensor(random_block_mask((k // b, n // b), s, seed=b), device="cuda")
      wm = w * bm.repeat_interleave(b, 0).repeat_interleave(b, 1)
      # torch's native op is sparse @ dense: Y^T = W^T X^T with W^T in BSR.
      wt, xt = wm.t().contiguous().to_sparse_bsr((b, b)), x.t().contiguous()
      td = median_ms(lambda: x @ w)
      ts = median_ms(lambda: bsr_dense_mm(wt, xt))
      ref = x.double() @ wm.double()
      err = ((bsr_dense_mm(wt, xt).t().double() - ref).norm() / ref.norm()).item()
      rows.append(dict(sparsity=s, block=b, dense_ms=td, ms=ts, ratio=td / ts, rel_err=err))
  md = ["| sparsity | block | torch dense ms | torch BSR ms | ratio | rel. error |",
        "|---:|---:|---:|---:|---:|---:|"]
  md += [f"| {r['sparsity']:.0%} | {r['block']} | {r['dense_ms']:.3f} | {r['ms']:.3f} | "
         f"{r['ratio']:.2f}x | {r['rel_err']:.1e} |" for r in rows]
  return dict(rows=rows, ok=True, torch=torch.__version__, markdown="\n".join(md))


def part_steps(small: bool, jaxpruner: str | None, save: Callable[[dict], None]) -> dict:
  import jax
  from experiments import bench_step
  on_gpu = jax.default_backend() == "gpu"
  # 10M first: the size the targets are set at.
  models = ["lenet300"] if small else ["mlp10m", "lenet300"] + (["mlp50m"] if on_gpu else [])
  rows = []
  for m in models:   # each model's row is saved as it comes, so a timeout keeps the others
    rows.append(bench_step.bench(m, 0.9, 128, 3 if small else 30, methods=bench_step.METHODS,
                                 use_bias=False, compile_times=True, jaxpruner_dir=jaxpruner))
    save(dict(rows=rows, ok=True, partial=True, markdown=bench_step.markdown(rows)))
  return dict(rows=rows, ok=True, markdown=bench_step.markdown(rows))


def part_mask_update(small: bool) -> dict:
  from experiments import bench_mask_update
  sizes = ["1e5"] if small else ["1e6", "1e7", "1e8"]
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "m.json")
    bench_mask_update.main(["--sizes", *sizes, "--repeats", "3" if small else "5", "--out", path])
    with open(path) as f:
      rows = json.load(f)
  md = ["| params | dense step ms | global magnitude ms | x dense | DSR realloc ms | x dense |",
        "|---:|---:|---:|---:|---:|---:|"]
  md += [f"| {r['params']:,} | {r['dense_step_ms']:.2f} | {r['global_magnitude_ms']:.2f} | "
         f"{r['global_vs_dense']:.2f} | {r['dsr_realloc_ms']:.2f} | {r['dsr_vs_dense']:.2f} |"
         for r in rows]
  return dict(rows=rows, ok=True, markdown="\n".join(md))


def part_lm_forward(small: bool, save: Callable[[dict], None] | None = None) -> dict:
  """A GPT with block-pruned MLP layers: forward on the block-sparse kernel against dense."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxsparse.nn import transformer as tr
  from jaxsparse.kernels import resolve_backend

  be = resolve_backend()
  if small:   # interpret mode on CPU: toy sizes
    size = dict(width=32, depth=1, num_heads=2, context=8)
    batch, dtype, cases, warmup, repeats = 2, jnp.float32, [(0.5, 16)], 1, 2
  else:
    size = dict(width=2048, depth=4, num_heads=16, context=1024)
    batch, dtype, warmup, repeats = 8, jnp.bfloat16, 3, 10
    cases = [(0.9, 128), (0.5, 128), (0.9, 64), (0.5, 64)]
  model = tr.GPT(num_classes=256, **size)
  t_len = size["context"]
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (batch, t_len)), jnp.int32)
  # GPT-2's init, drawn by numpy (model.init would compile the forward and the RNG): weights
  # and embeddings N(0, 0.02), norms' scales 1 and biases 0.
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens[:1])["params"]
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(
          (np.ones if path[-1].key == "scale" else np.zeros)(s.shape, np.float32) if s.ndim == 1
          else 0.02 * rng.standard_normal(s.shape, np.float32)), shapes)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))
  dense_flops = tr.lm_flops(model, params, t_len)
  rows = []
  for sparsity, b in cases:
    try:
      rows.append(_lm_case(model, size, params, tokens, forward, dense_flops.dense, sparsity, b,
                           dtype, warmup, repeats))
    except Exception as e:   # e.g. a kernel that does not compile: the other cases still run
      rows.append(dict(sparsity=sparsity, block=b, ok=False, error=f"{type(e).__name__}: {e}"))
    out = dict(rows=rows, ok=all(r["ok"] for r in rows), markdown=_lm_markdown(rows, size, batch,
                                                                               dtype, be.name))
    if save is not None:   # each case as it comes: a timeout keeps the finished ones
      save(dict(out, partial=True))
  return out


def _lm_case(model, size: dict, params, tokens, forward, dense_flops: int, sparsity: float,
             b: int, dtype: Any, warmup: int, repeats: int) -> dict:
  """One row of ``lm_forward``: the MLP kernels pruned to ``sparsity`` of their b x b blocks."""
  import jax
  import jax.numpy as jnp
  from jaxsparse.core import masks as masks_lib
  from jaxsparse.pruning import structured
  from jaxsparse.nn import transformer as tr
  from experiments import common

  mlp = lambda name, leaf: tr.block_filter(name, leaf) and "/mlp/" in name

  @jax.jit   # one compile instead of an eager op (and its compile) per leaf
  def prune(p):
    masks = structured.structured_masks(jax.tree.map(jnp.abs, p), structured.blocks((b, b)),
                                        sparsity, filter=mlp)
    return masks, masks_lib.apply_masks(p, masks)

  masks, pruned = prune(params)
  t_len = tokens.shape[1]
  fl = tr.lm_flops(model, pruned, t_len, masks)
  blocks = (model.width // b) * (model.mlp_ratio * model.width // b)   # fc1's = fc2's
  nnz = int(round((1 - sparsity) * blocks))   # exactly the kept blocks of each MLP kernel
  sparse_model = tr.GPT(num_classes=model.num_classes, **size, sparse_mlp=tr.SparseMLP(
      (b, b), nnz_max=nnz, mode="bsr"))
  sparse_forward = jax.jit(lambda p, m, x: sparse_model.apply({"params": p, "masks": m}, x))
  # Correctness first: both low-precision forwards against the float32 dense one.
  ref = forward(pruned, tokens)
  low = jax.jit(lambda p: jax.tree.map(lambda v: v.astype(dtype), p))(pruned)
  y_dense, y_sparse = forward(low, tokens), sparse_forward(low, masks, tokens)
  err_dense, err_sparse = _rel_err(y_dense, ref), _rel_err(y_sparse, ref)
  # The MLP layers really run on the kernel: one pallas_call per MLP layer.
  calls = str(jax.make_jaxpr(sparse_forward)(low, masks, tokens)).count("pallas_call")
  ok = bool(err_sparse <= max(2 * err_dense, 1e-4)) and calls == 2 * model.depth
  seconds = common.median_seconds({"dense": lambda: forward(low, tokens),
                                   "sparse": lambda: sparse_forward(low, masks, tokens)},
                                  repeats=repeats, warmup=warmup)
  ms = {k: v * 1e3 for k, v in seconds.items()}
  return dict(sparsity=sparsity, block=b, nnz_blocks=nnz, of_blocks=blocks,
              dense_ms=ms["dense"], sparse_ms=ms["sparse"], ratio=ms["dense"] / ms["sparse"],
              ideal=dense_flops / fl.sparse, err_dense=err_dense, err_sparse=err_sparse,
              pallas_calls=calls, ok=ok)


def _lm_markdown(rows: list[dict], size: dict, batch: int, dtype: Any, backend: str) -> str:
  import jax.numpy as jnp
  head = (f"GPT width {size['width']}, {size['depth']} blocks, {size['num_heads']} heads, "
          f"context {size['context']}, batch {batch}, {jnp.dtype(dtype).name}; MLP kernels "
          f"block-pruned, on the block-sparse kernel (backend {backend}); ratio = dense ms / "
          f"sparse ms; ideal = dense / sparse FLOPs (attention included)")
  md = [head, "", "| MLP sparsity | block | kept blocks | dense ms | sparse ms | ratio | ideal | "
        "rel. error dense / sparse |", "|---:|---:|---:|---:|---:|---:|---:|---|"]
  for r in rows:
    if "error" in r:
      md.append(f"| {r['sparsity']:.0%} | {r['block']} | FAILED: {r['error'][:200]} | | | | | |")
      continue
    md.append(f"| {r['sparsity']:.0%} | {r['block']} | {r['nnz_blocks']} of {r['of_blocks']} | "
              f"{r['dense_ms']:.3f} | {r['sparse_ms']:.3f} | {r['ratio']:.2f}x | "
              f"{r['ideal']:.2f}x | {r['err_dense']:.1e} / {r['err_sparse']:.1e}"
              f"{'' if r['ok'] else ' FAILED'} |")
  return "\n".join(md)


def _run_part(name: str, small: bool, jaxpruner: str | None, path: str) -> dict:
  import jax
  dev = jax.devices()[0]
  label = dict(device=dev.device_kind, platform=dev.platform, jax=jax.__version__)

  def save(result: dict) -> None:
    with open(path, "w") as f:
      json.dump({**result, **label}, f, indent=1)

  fns: dict[str, Callable[[], dict]] = dict(
      correctness=lambda: part_correctness(small), exactness=lambda: part_exactness(small),
      kernels=lambda: part_kernels(small), torch_bsr=lambda: part_torch_bsr(small),
      steps=lambda: part_steps(small, jaxpruner, save), mask_update=lambda: part_mask_update(small),
      lm_forward=lambda: part_lm_forward(small, save),
      kernels_tuned=lambda: part_kernels(small, tune=True))
  out = fns[name]()
  save(out)
  return out


# ----------------------------------------------------------------------- orchestration


def run_parts(parts: list[str], limits: dict[str, float], small: bool, jaxpruner: str | None,
              out_dir: str) -> dict:
  """Runs each part in a child process under its time limit; returns the merged report."""
  os.makedirs(out_dir, exist_ok=True)
  report: dict[str, Any] = {}
  for name in parts:
    path = os.path.join(out_dir, f"{name}.json")
    if os.path.exists(path):
      os.remove(path)
    cmd = [sys.executable, "-m", "experiments.gpu_check", "--run-part", name, "--part-out", path]
    cmd += (["--small"] if small else []) + (["--jaxpruner", jaxpruner] if jaxpruner else [])
    print(f"\n=== {name} (limit {limits[name]:.0f} s) ===", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, start_new_session=True)   # its own group: a timeout kills all
    try:
      rc = proc.wait(timeout=limits[name])
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      rc = None
    seconds = time.perf_counter() - t0
    if rc is None:
      note = f"TIMED OUT after {limits[name]:.0f} s"
      report[name] = dict(ok=False, error=f"timed out after {limits[name]:.0f} s", markdown=note)
      if os.path.exists(path):   # what the part saved before its limit
        with open(path) as f:
          report[name] = {**json.load(f), "ok": False, "error": report[name]["error"]}
        report[name]["markdown"] = f"{note}; saved before that:\n\n" + report[name]["markdown"]
    elif rc != 0 or not os.path.exists(path):
      report[name] = dict(ok=False, error=f"exit status {rc}", markdown=f"FAILED: exit status {rc}")
    else:
      with open(path) as f:
        report[name] = json.load(f)
    report[name]["seconds"] = seconds
  with open(os.path.join(out_dir, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out_dir, "report.md"), "w") as f:
    f.write(markdown(report))
  return report


def markdown(report: dict) -> str:
  labels = {(r.get("device"), r.get("jax")) for r in report.values() if "device" in r}
  out = ["# jaxsparse GPU check", ""]
  out += [f"device: {d}; jax {j}" for d, j in sorted(labels, key=str)] or ["device: unknown"]
  for name, r in report.items():
    status = "ok" if r.get("ok") else "FAILED"
    out += ["", f"## {name}: {status} ({r['seconds']:.0f} s)", "", r.get("markdown", "")]
  if "kernels" in report and report.get("torch_bsr", {}).get("rows"):
    torch_rows = {(t["sparsity"], t["block"]): t for t in report["torch_bsr"]["rows"]}
    out += ["", "## forward, side by side (ratio to each library's own dense matmul)", "",
            "| sparsity | block | jaxsparse | PyTorch Triton BSR |", "|---:|---:|---:|---:|"]
    for r in report["kernels"].get("rows", []):
      t = torch_rows.get((r["sparsity"], r["block"]))
      if r["case"] == "forward" and r["impl"] == "pallas_bsr" and t:
        out.append(f"| {r['sparsity']:.0%} | {r['block']} | {r['ratio']:.2f}x | {t['ratio']:.2f}x |")
  return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=PARTS,
                 help=f"default: {' '.join(DEFAULT_PARTS)}")
  p.add_argument("--limits", nargs="+", default=[], metavar="PART=SECONDS",
                 help="override a part's time limit, e.g. steps=120")
  p.add_argument("--small", action="store_true", help="toy sizes: a smoke test on any machine")
  p.add_argument("--jaxpruner", default=None, metavar="DIR",
                 help="a jaxpruner source checkout, for the side-by-side in 'steps'")
  p.add_argument("--out", default="results/gpu_check", help="output folder")
  p.add_argument("--run-part", choices=PARTS, help=argparse.SUPPRESS)
  p.add_argument("--part-out", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.jaxpruner and not os.path.isdir(args.jaxpruner):
    p.error(f"--jaxpruner: {args.jaxpruner!r} is not a directory")
  if args.run_part:
    print(_run_part(args.run_part, args.small, args.jaxpruner, args.part_out)["markdown"],
          flush=True)
    return 0
  limits = dict(LIMITS)
  for item in args.limits:
    name, _, sec = item.partition("=")
    if name not in PARTS or not sec.replace(".", "", 1).isdigit():
      p.error(f"--limits: expected PART=SECONDS with PART in {PARTS}, got {item!r}")
    limits[name] = float(sec)
  report = run_parts(args.parts, limits, args.small, args.jaxpruner, args.out)
  print("\n" + markdown(report))
  print(f"written: {os.path.join(args.out, 'report.md')} and report.json")
  return 0 if all(r.get("ok") for r in report.values()) else 1


if __name__ == "__main__":
  sys.exit(main())
