"""The GPT LM, the standard-library corpus, FLOPs, and one-shot pruning of a trained tiny LM."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from jaxsparse import models, oneshot, text
from jaxsparse import transformer as tr


def _init(model, t, seed=0):
  return jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, t), jnp.int32))["params"]


def test_gpt_registered_dense_kernels_sparse_stages_compose():
  model = models.create_model("gpt", 256, context=8, width=16, depth=2, num_heads=2)
  assert isinstance(model, tr.GPT)
  params = _init(model, 8)
  sparse = js.select_leaves(params, filter=tr.sparse_filter)
  kernels = {f"blocks_{b}/{l}/kernel" for b in range(2) for l in (
      "attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")} | {"head/kernel"}
  assert set(sparse) == kernels  # embeddings, position embeddings, LayerNorms stay dense
  assert sparse["blocks_0/mlp/fc1/kernel"] == (16, 64)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(3, 8)))

  @jax.jit
  def staged(params, tokens):
    h = tokens
    for stage in tr.stages(model):
      h = stage.apply(params if stage.scope is None else params[stage.scope], h)
    return model.apply({"params": params}, h, method=tr.GPT.logits)

  apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
  np.testing.assert_allclose(staged(params, tokens), apply(params, tokens), rtol=1e-5, atol=1e-6)
  # Causal: the logits at position t do not depend on tokens after t.
  changed = tokens.at[:, 5:].set(7)
  np.testing.assert_allclose(apply(params, changed)[:, :5], apply(params, tokens)[:, :5],
                             rtol=1e-5, atol=1e-6)


def test_lm_flops_and_masks():
  model = tr.GPT(context=8, width=16, depth=2, num_heads=2, mlp_ratio=4)
  params = _init(model, 8)
  fl = tr.lm_flops(model, params, 8)
  per_block = 2 * 8 * (4 * 16 * 16 + 2 * 16 * 64)      # 2 FLOPs per MAC, 8 positions
  assert fl.dense_layers == 2 * per_block + 2 * 8 * 16 * 256
  assert fl.attention == 2 * 2 * 2 * 8 * 8 * 16          # 2 blocks, QK^T and AV
  masks = js.nm_masks(jax.tree.map(jnp.abs, params), 2, 4, filter=tr.block_filter)
  half = tr.lm_flops(model, params, 8, masks)
  assert half.sparse_layers == fl.dense_layers - per_block  # half of each block kernel removed
  assert half.attention == fl.attention


def test_stdlib_corpus_fixed_split():
  c = text.load_corpus("stdlib_small")
  assert c.train.dtype == np.uint8 and c.train.size == text.SMALL_TRAIN_BYTES
  assert c.validation.size == text.SMALL_VALIDATION_BYTES
  files = text.stdlib_files()
  assert files == sorted(files) and not any("site-packages" in f for f in files)
  train_files = [f for f in files if not text.is_validation(f)]
  val_files = [f for f in files if text.is_validation(f)]
  assert len(val_files) > 10 and len(train_files) > 10 * len(val_files)
  root = pathlib.Path(c.root)
  first = np.frombuffer((root / val_files[0]).read_bytes(), np.uint8)
  np.testing.assert_array_equal(c.validation[:min(first.size, 1000)], first[:1000])
  first = np.frombuffer((root / train_files[0]).read_bytes(), np.uint8)
  np.testing.assert_array_equal(c.train[:min(first.size, 1000)], first[:1000])
  assert text.load_corpus("stdlib_small").digest == c.digest
  w = text.eval_windows(c.validation, 32, 10)
  assert w.shape == (10, 33) and (w[1, 0] == c.validation[32])
  a = text.sample_windows(c.train, 4, 16, np.random.default_rng(0))
  np.testing.assert_array_equal(a, text.sample_windows(c.train, 4, 16, np.random.default_rng(0)))
  assert 10 < text.unigram_perplexity(c.train, c.validation) < 256
  with pytest.raises(ValueError, match="^name: unknown corpus 'wikitext'"):
    text.load_corpus("wikitext")


def _dense_inputs(model, params, tokens):
  """Each Dense layer's inputs on ``tokens`` in the dense model, by kernel name."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      found["/".join(context.module.path) + "/kernel"] = args[0].reshape(-1, args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, tokens)
  return found


def test_tiny_lm_trains_below_unigram_then_prunes():
  """On the embedded default corpus: train, then one-shot prune without fine-tuning.

  Bounds: trained < 0.7 x unigram (seed 0: 11.8 against 21.9), Wanda 50% < 1.5 x dense
  (1.03x), every pruned model within 2x of dense. Magnitude
  2:4 against Wanda 2:4 in perplexity is a coin toss at this size (width 64, seeds 0-2 of a
  400-step run: Wanda -1% to +5%; seed 0 here: magnitude 12.45, Wanda 12.70), so it is not
  asserted; asserted instead is Wanda's premise, that its 2:4 masks keep the layers' outputs
  on the calibration tokens closer to dense (seeds 0-2: 9-15% less summed relative error;
  not on every layer: attn/out can go either way). At width 128 trained longer, Wanda beats
  magnitude in perplexity at 50%, 2:4 and 4:8 (the README's table).
  """
  c = text.load_corpus("stdlib_small")
  unigram = text.unigram_perplexity(c.train, c.validation)
  t = 32
  model = tr.GPT(context=t, width=64, depth=1, num_heads=4)
  params = _init(model, t)
  steps = 250
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 25, steps, 1e-3))
  params, _ = tr.train_lm(model, params, tx, c.train, steps=steps, batch_size=32, seq_len=t)
  val = text.eval_windows(c.validation, t, 256)
  dense = tr.perplexity(model, params, val, 256)
  assert dense < 0.7 * unigram, (dense, unigram)
  calib = text.sample_windows(c.train, 32, t, np.random.default_rng(1))[:, :-1]
  ppl = {}
  for method, target in [("wanda", dict(sparsity=0.5)), ("magnitude", dict(nm=(2, 4))),
                         ("wanda", dict(nm=(2, 4)))]:
    res = oneshot.prune(tr.stages(model), params, calib, method, **target)
    ppl[method, str(target)] = tr.perplexity(model, res.params, val, 256)
  assert ppl["wanda", "{'sparsity': 0.5}"] < 1.5 * dense, (dense, ppl)
  assert all(dense < p < 2 * dense for p in ppl.values()), (dense, ppl)
  # Wanda's premise: its 2:4 masks change the layers' outputs on the calibration tokens
  # less than magnitude's (relative squared error, summed over the pruned layers).
  errors = np.zeros(2)
  for name, x in _dense_inputs(model, params, calib).items():
    if name == "head/kernel":
      continue
    kernel = params
    for key in name.split("/"):
      kernel = kernel[key]
    scale = float(jnp.sum(jnp.square(x @ kernel)))
    errors += [float(jnp.sum(jnp.square(x @ jnp.where(keep, 0.0, kernel)))) / scale
               for keep in (oneshot.wanda_mask(kernel, x, nm=(2, 4)),
                            oneshot.magnitude_mask(kernel, nm=(2, 4)))]
  assert errors[0] < errors[1], errors
