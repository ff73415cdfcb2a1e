"""Cost of a mask update at scale: global magnitude top-k and DSR's reallocation.

For MLPs of about 1M, 10M and 100M parameters, in one process, times (after a
warm-up, with ``block_until_ready``, median of ``--repeats`` interleaved runs):

* ``global magnitude``: one global magnitude mask update, the kernel of
  ``gradual_pruning(scope="global")`` (``magnitude.prune_to_fraction``): keep the
  ``k`` largest ``|w|`` over all sparse leaves at once with the O(n) radix
  selection (:func:`jaxsparse.core.selection.largest_k_masks`);
* ``DSR realloc``: the extra cost of a DSR reallocation step: ``tx.update`` of
  :func:`jaxsparse.methods.dst.dynamic_sparse` with DSR's rules (global threshold drop,
  regrowth apportioned over layers, random growth) on a step that reallocates,
  minus the same call on a step that does not;
* ``dense step``: one jitted dense training step (forward, backward, SGD with
  momentum) of the same model on a batch of ``--batch-size``.

It reports ns per parameter (about constant when the cost grows linearly) and
the ratio to the dense step::

  python -m experiments.bench_mask_update [--sizes 1e6 1e7 1e8] [--repeats 5] [--out f.json]

The 100M case needs about 4 GB of RAM and minutes on a small CPU; leave it out
of ``--sizes`` (the default is 1M and 10M) when that is prohibitive.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import optax

from jaxsparse.core import distributions as dist
from jaxsparse.methods import dst, static
from jaxsparse.pruning import magnitude

from experiments import common

LAYERS = 4


def mlp_params(n_params: int, key: jax.Array) -> dict:
  """``LAYERS`` square kernels of width ``w`` (a multiple of 8) with ``LAYERS * w^2 ~ n``, and biases."""
  w = max(8, int(round(math.sqrt(n_params / LAYERS) / 8)) * 8)
  return {f"fc{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (w, w)) / math.sqrt(w),
                     "bias": jnp.zeros((w,))} for i in range(LAYERS)}


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  for i in range(LAYERS):
    x = x @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"]
    x = jax.nn.relu(x) if i < LAYERS - 1 else x
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def bench(n_target: int, sparsity: float, batch_size: int, repeats: int) -> dict:
  key = jax.random.key(0)
  params = mlp_params(n_target, key)
  n = sum(p.size for p in jax.tree.leaves(params))
  w = params["fc0"]["kernel"].shape[0]
  x = jax.random.normal(key, (batch_size, w))
  y = jax.random.randint(key, (batch_size,), 0, 10)
  grads = jax.jit(jax.grad(loss_fn))(params, x, y)

  # Dense step.
  inner = optax.sgd(0.01, momentum=0.9)

  @jax.jit
  def dense_step(p, s):
    u, s = inner.update(jax.grad(loss_fn)(p, x, y), s, p)
    return optax.apply_updates(p, u), s
  dense_state = inner.init(params)

  # Global magnitude update: from a random mask at half the final density lost,
  # keep the final count, globally.
  counts = dist.kept_counts(params, sparsity)
  half = {k: (v + params_size(params, k)) // 2 for k, v in counts.items()}
  masks = jax.jit(lambda p: static.random_masks(p, half, jax.random.key(1)))(params)
  sparse_params = jax.tree.map(lambda p, m: p * m, params, masks)
  glob = jax.jit(lambda p, m: magnitude.prune_to_fraction(
      jax.tree.map(jnp.abs, p), m, counts, jnp.float32(1.0), "global", p))

  # DSR: the same transform with every step / no step a reallocation step.
  def dsr_tx(on: bool):
    return dst.dynamic_sparse(
        optax.sgd(0.01, momentum=0.9), sparsity,
        drop=dst.drop_threshold(max(1, n // 1000)), grow=dst.grow_random(),
        redistribute=dst.by_nonzeros(), is_update_step=lambda step: jnp.bool_(on),
        regrown="exclude", distribution="uniform")
  tx_on, tx_off = dsr_tx(True), dsr_tx(False)
  state = jax.jit(tx_on.init)(params)
  dsr_on = jax.jit(tx_on.update)
  dsr_off = jax.jit(tx_off.update)

  t = common.median_seconds({"dense": lambda: dense_step(params, dense_state),
                             "global": lambda: glob(sparse_params, masks),
                             "dsr_on": lambda: dsr_on(grads, state, sparse_params),
                             "dsr_off": lambda: dsr_off(grads, state, sparse_params)},
                            repeats=repeats)
  kept = sum(int(jnp.sum(m)) for m in jax.tree.leaves(glob(sparse_params, masks)) if jnp.ndim(m))
  assert kept == sum(counts.values()), (kept, sum(counts.values()))
  realloc = max(t["dsr_on"] - t["dsr_off"], 0.0)
  return dict(params=int(n), width=int(w), batch_size=batch_size, sparsity=sparsity,
              dense_step_ms=t["dense"] * 1e3, global_magnitude_ms=t["global"] * 1e3,
              dsr_update_step_ms=t["dsr_on"] * 1e3, dsr_plain_step_ms=t["dsr_off"] * 1e3,
              dsr_realloc_ms=realloc * 1e3,
              global_ns_per_param=t["global"] / n * 1e9, dsr_ns_per_param=realloc / n * 1e9,
              global_vs_dense=t["global"] / t["dense"], dsr_vs_dense=realloc / t["dense"],
              backend=jax.default_backend(), devices=jax.device_count(), jax_version=jax.__version__)


def params_size(params: dict, name: str) -> int:
  layer, leaf = name.split("/")
  return int(params[layer][leaf].size)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7],
                 help="target parameter counts (add 1e8 for the 100M case: ~4 GB RAM)")
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None, help="write the rows as JSON here")
  args = p.parse_args(argv)
  rows = []
  for size in args.sizes:
    rows.append(bench(int(size), args.sparsity, args.batch_size, args.repeats))
    r = rows[-1]
    print(f"{r['params']:>12,} params: dense step {r['dense_step_ms']:9.2f} ms | global magnitude "
          f"{r['global_magnitude_ms']:9.2f} ms ({r['global_ns_per_param']:.2f} ns/param, "
          f"{r['global_vs_dense']:.2f}x dense) | DSR realloc {r['dsr_realloc_ms']:9.2f} ms "
          f"({r['dsr_ns_per_param']:.2f} ns/param, {r['dsr_vs_dense']:.2f}x dense)", flush=True)
  print("\n" + common.markdown_table(
      ["params", "dense step (ms)", "global magnitude (ms)", "ns/param", "x dense",
       "DSR realloc (ms)", "ns/param", "x dense"],
      [[f"{r['params']:,}", f"{r['dense_step_ms']:.1f}", f"{r['global_magnitude_ms']:.1f}",
        f"{r['global_ns_per_param']:.2f}", f"{r['global_vs_dense']:.2f}",
        f"{r['dsr_realloc_ms']:.1f}", f"{r['dsr_ns_per_param']:.2f}", f"{r['dsr_vs_dense']:.2f}"]
       for r in rows]))
  print(f"backend {rows[0]['backend']} ({rows[0]['devices']} device(s)), jax {rows[0]['jax_version']}, "
        f"batch {args.batch_size}, sparsity {args.sparsity}, median of {args.repeats}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=2)
  return rows


if __name__ == "__main__":
  main()
