"""One-shot pruning of a small byte-level GPT trained here on Python's standard-library sources.

Trains the dense LM, then prunes it with magnitude, Wanda, SparseGPT and OWL + Wanda at
50% unstructured, 2:4 and 4:8 (no fine-tuning; calibration on random training windows),
plus one short masked fine-tune (``js.keep_masks``) after Wanda 2:4, and reports validation
perplexity, FLOPs and storage::

  python -m experiments.llm_prune                       # the README's table (about 12 min on 2 CPU cores)
  python -m experiments.llm_prune --corpus stdlib_small --steps 300   # a quick first run

Writes ``table.md`` and ``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxsparse as js
from experiments import text
from jaxsparse.pruning import oneshot
from jaxsparse.nn import transformer as tr

TARGETS = (("50%", dict(sparsity=0.5)), ("2:4", dict(nm=(2, 4))), ("4:8", dict(nm=(4, 8))))
METHODS = (("magnitude", "magnitude", None), ("Wanda", "wanda", None),
           ("SparseGPT", "sparsegpt", None), ("OWL + Wanda", "wanda", "owl"))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--corpus", default="stdlib", choices=sorted(text.CORPORA))
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--depth", type=int, default=2)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--context", type=int, default=64)
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--calib", type=int, default=64, help="calibration sequences")
  p.add_argument("--eval-windows", type=int, default=1024, help="validation windows")
  p.add_argument("--finetune-steps", type=int, default=150)
  p.add_argument("--finetune-lr", type=float, default=3e-4)
  p.add_argument("--owl-m", type=float, default=5.0)
  p.add_argument("--owl-lam", type=float, default=0.08)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="results/llm_prune")
  p.add_argument("--time-widths", default="",
                 help="only time SparseGPT and Wanda on one (d, d) layer per width, e.g. "
                      "128,256,512,1024 (calibration: 8192 tokens), and exit")
  return p.parse_args(argv)


def time_widths(widths: list[int], tokens: int = 8192, repeats: int = 2) -> list[dict]:
  """Seconds (after compiling) of the per-layer work on one (d, d) layer: X^T X, SparseGPT
  at 50% and at 2:4 from it, and Wanda's mask."""
  rows = []
  for d in widths:
    rng = np.random.default_rng(d)
    x = jnp.asarray(rng.normal(size=(tokens, d)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(d, d)) / np.sqrt(d), jnp.float32)
    timings = {}
    for name, fn in [
        ("stats", lambda: oneshot.input_stats(x)),
        ("sparsegpt_50", lambda: oneshot.sparsegpt(kernel, stats, sparsity=0.5)),
        ("sparsegpt_2_4", lambda: oneshot.sparsegpt(kernel, stats, nm=(2, 4))),
        ("wanda_50", lambda: oneshot.wanda_mask(kernel, stats, sparsity=0.5))]:
      if name == "stats":
        stats = jax.block_until_ready(fn())
      jax.block_until_ready(fn())  # compile
      t = time.time()
      for _ in range(repeats):
        jax.block_until_ready(fn())
      timings[name] = (time.time() - t) / repeats
    rows.append({"width": d, **timings})
    print(f"d={d}: " + ", ".join(f"{k} {v:.3f} s" for k, v in timings.items()), flush=True)
  return rows


def _optimizer(lr: float, steps: int) -> optax.GradientTransformation:
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps, lr / 10)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if args.time_widths:
    rows = time_widths([int(w) for w in args.time_widths.split(",")])
    (out / "time_widths.json").write_text(json.dumps(rows, indent=2) + "\n")
    return {"time_widths": rows}
  corpus = text.load_corpus(args.corpus)
  print(corpus)
  model = tr.GPT(num_classes=text.VOCAB_SIZE, context=args.context, width=args.width,
                 depth=args.depth, num_heads=args.heads)
  params = jax.jit(model.init)(jax.random.key(args.seed),
                               jnp.zeros((1, args.context), jnp.int32))["params"]
  val = text.eval_windows(corpus.validation, args.context, args.eval_windows)
  ppl = lambda p: tr.perplexity(model, p, val, 128)

  t0 = time.time()
  with tqdm(total=args.steps, desc="train dense LM") as bar:
    def tick(i, loss):
      bar.update()
      if i % 50 == 0:
        bar.set_postfix(loss=f"{float(loss):.3f}")
    params, _ = text.train_lm(model, params, _optimizer(args.lr, args.steps), corpus.train,
                            steps=args.steps, batch_size=args.batch_size, seq_len=args.context,
                            seed=args.seed, callback=tick)
  train_s = time.time() - t0
  calib = text.sample_windows(corpus.train, args.calib, args.context,
                              np.random.default_rng(args.seed + 1))[:, :-1]
  stages = tr.stages(model)
  rows: dict[str, dict[str, float]] = {}
  seconds: dict[str, float] = {}
  results = {"dense": ppl(params), "unigram": text.unigram_perplexity(corpus.train,
                                                                      corpus.validation)}
  kept, owl_info = {}, {}
  runs = [(label, method, owl, tname, target) for label, method, owl in METHODS
          for tname, target in TARGETS]
  wanda24 = None
  for label, method, owl, tname, target in tqdm(runs, desc="one-shot pruning"):
    t = time.time()
    res = oneshot.prune(stages, params, calib, method,
                        owl=oneshot.OWL(args.owl_m, args.owl_lam) if owl else None, **target)
    jax.block_until_ready(res.params)
    seconds[f"{label} {tname}"] = time.time() - t
    rows.setdefault(label, {})[tname] = ppl(res.params)
    kept[f"{label} {tname}"] = js.sparsity(res.params, res.masks)
    if owl:
      owl_info[tname] = {"outlier_ratios": res.outlier_ratios,
                         "block_targets": {n.split("/")[0]: t for n, t in res.targets.items()}}
    if label == "Wanda" and tname == "2:4":
      wanda24 = res

  # A short masked fine-tune of the Wanda 2:4 model: the mask stays fixed (keep_masks).
  t = time.time()
  tx = js.keep_masks(_optimizer(args.finetune_lr, args.finetune_steps), wanda24.masks)
  with tqdm(total=args.finetune_steps, desc="masked fine-tune") as bar:
    tuned, _ = text.train_lm(model, wanda24.params, tx, corpus.train, steps=args.finetune_steps,
                           batch_size=args.batch_size, seq_len=args.context,
                           seed=args.seed + 2, callback=lambda i, loss: bar.update())
  seconds["fine-tune"] = time.time() - t
  tuned_ppl = ppl(tuned)
  tuned_sparsity = js.sparsity(tuned, wanda24.masks)  # the removed weights stay zero

  # FLOPs per token and storage of the 2:4 and 50% models.
  fl_dense = tr.lm_flops(model, params, args.context)
  fl_24 = tr.lm_flops(model, wanda24.params, args.context, wanda24.masks)
  store_dense = sum(s.dense for s in js.storage_sizes(params, wanda24.masks)) / 8
  store_24 = sum(s.sizes()[s.best] for s in js.storage_sizes(wanda24.params, wanda24.masks)) / 8
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  n_block = sum(int(np.prod(np.shape(m))) for m in jax.tree.leaves(wanda24.masks) if np.ndim(m))

  lines = [f"| method | {' | '.join(t for t, _ in TARGETS)} |",
           "|---|" + "---|" * len(TARGETS),
           f"| dense | {results['dense']:.3f} | | |"]
  for label, _, _ in METHODS:
    lines.append(f"| {label} | " + " | ".join(f"{rows[label][t]:.3f}" for t, _ in TARGETS) + " |")
  lines.append(f"| Wanda 2:4 + masked fine-tune ({args.finetune_steps} steps) | | {tuned_ppl:.3f} | |")
  table = "\n".join(lines)
  summary = {
      "args": vars(args), "corpus": repr(corpus), "unigram_perplexity": results["unigram"],
      "dense_perplexity": results["dense"], "perplexity": rows,
      "finetuned_wanda_2_4": tuned_ppl, "finetune_sparsity": tuned_sparsity,
      "sparsity_of_pruned_kernels": kept, "owl": owl_info,
      "seconds": seconds, "train_seconds": train_s,
      "params": n_params, "pruned_kernel_weights": n_block,
      "flops_per_token": {"dense": fl_dense.dense / args.context,
                          "wanda_2_4": fl_24.sparse / args.context,
                          "attention": fl_dense.attention / args.context},
      "storage_bytes": {"dense": store_dense, "wanda_2_4_best_format": store_24},
      "validation_tokens": int(val.shape[0] * (val.shape[1] - 1)),
  }
  (out / "table.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(f"\nvalidation perplexity ({summary['validation_tokens']:,} bytes; unigram "
        f"{results['unigram']:.2f}); seed {args.seed}\n")
  print(table)
  print(f"\nFLOPs/token: dense {fl_dense.dense / args.context:,.0f}, 2:4 "
        f"{fl_24.sparse / args.context:,.0f} (attention {fl_dense.attention / args.context:,.0f}"
        f" of each)")
  print(f"storage: dense {store_dense:,.0f} B, 2:4 best per leaf {store_24:,.0f} B")
  print(f"seconds: train {train_s:.0f}; " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
  return summary


if __name__ == "__main__":
  main()
