"""The GPT LM, the standard-library corpus, FLOPs, and one-shot pruning of a trained tiny LM."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxsparse as js
from experiments import text, training
from jaxsparse.nn import models
from jaxsparse.pruning import oneshot
from jaxsparse.nn import transformer as tr


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


def test_runner_keeps_the_gpt_embeddings_and_norms_dense():
  """training.make_method (what training.train builds) takes the model's default sparse leaves."""
  model = models.create_model("gpt", 256, context=8, width=16, depth=1, num_heads=2)
  params = _init(model, 8)
  kernels = set(js.select_leaves(params, filter=tr.sparse_filter))
  assert models.default_sparse_filter("gpt") is tr.sparse_filter
  assert models.default_sparse_filter("lenet300") is None   # the methods' rank >= 2 default
  for method in ("magnitude", "gradual", "random"):   # masks built at init, no selection
    tx = training.make_method(method, optax.sgd(0.1), 0.5, total_steps=20, steps_per_epoch=5,
                              model="gpt")
    masks = js.get_masks(tx.init(params))
    shaped = {n for n, m in zip(js.core.masks.leaf_names(masks), jax.tree.leaves(masks)) if np.ndim(m)}
    assert shaped == kernels, (method, shaped ^ kernels)
    assert np.ndim(masks["embed"]["embedding"]) == 0 and np.ndim(masks["pos_embed"]) == 0
  # An explicit filter wins over the model's.
  only_fc1 = lambda name, leaf: name.endswith("mlp/fc1/kernel")
  tx = training.make_method("magnitude", optax.sgd(0.1), 0.5, total_steps=20,
                            steps_per_epoch=5, model="gpt", filter=only_fc1)
  masks = js.get_masks(tx.init(params))
  assert [n for n, m in zip(js.core.masks.leaf_names(masks), jax.tree.leaves(masks))
          if np.ndim(m)] == ["blocks_0/mlp/fc1/kernel"]
  with pytest.raises(ValueError, match="Unknown model name 'gtp'"):
    training.make_method("magnitude", optax.sgd(0.1), 0.5, total_steps=20, steps_per_epoch=5,
                         model="gtp")


def test_nnx_twin_has_the_linen_leaves_logits_and_trains_sparse():
  from flax import nnx
  kw = dict(context=8, width=16, depth=1, num_heads=2)
  # Random params of the linen GPT's shapes (no init to compile), norms' scales included.
  shapes = jax.eval_shape(lambda: _init(tr.GPT(**kw), 8))
  rng = np.random.default_rng(3)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.2, s.shape), jnp.float32), shapes)
  # Built abstractly (the constructor runs on shapes; no eager initializers), then the linen
  # params are copied in.
  model = nnx.eval_shape(lambda: models.create_nnx_model("gpt", (8,), 256, seed=1, width=16,
                                                         depth=1, num_heads=2))
  assert isinstance(model, tr.GPTNNX) and model.context == 8
  state = nnx.state(model, nnx.Param)
  assert jax.tree.map(jnp.shape, nnx.to_pure_dict(state)) == jax.tree.map(jnp.shape, params)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, size=(3, 8)))
  logits = nnx.jit(lambda m, t: m(t))
  np.testing.assert_allclose(logits(model, tokens),
                             jax.jit(tr.GPT(**kw).apply)({"params": params}, tokens),
                             rtol=1e-5, atol=1e-6)
  tied = nnx.eval_shape(lambda: tr.GPTNNX(tie_embeddings=True, **kw, rngs=nnx.Rngs(0)))
  assert "head" not in nnx.to_pure_dict(nnx.state(tied, nnx.Param))

  # A jaxsparse method through nnx.Optimizer, its masks made by sparse_filter on the nnx
  # state (1:4 by magnitude: no selection to compile): the Dense kernels are the sparse leaves.
  windows = jnp.asarray(text.sample_windows(text.load_corpus("stdlib_small").train, 8, 8,
                                            np.random.default_rng(0)))
  masks = js.nm_masks(jax.tree.map(jnp.abs, nnx.state(model, nnx.Param)), 1, 4,
                      filter=tr.sparse_filter)
  opt = nnx.Optimizer(model, js.keep_masks(optax.adam(3e-3), masks), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, windows):
    def loss(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(windows[:, :-1]),
                                                             windows[:, 1:]).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  losses = [float(step(model, opt, windows)) for _ in range(4)]
  assert losses[-1] < losses[0], losses
  masks = js.get_masks(opt.opt_state)
  names = js.core.masks.leaf_names(masks)
  shaped = {n for n, m in zip(names, jax.tree.leaves(masks)) if np.ndim(m)}
  assert shaped == set(js.select_leaves(params, filter=tr.sparse_filter))
  assert "embed/embedding" in names and "blocks_0/ln2/scale" in names   # dense leaves
  trained = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  for name in shaped:   # 3 of every 4 weights removed, and exactly zero
    mask = np.asarray(oneshot._get_leaf(masks, name)[...])
    kernel = np.asarray(oneshot._get_leaf(trained, name))
    assert mask.shape == kernel.shape and mask.mean() == 0.25, (name, mask.mean())
    assert not np.any(kernel[~mask]) and np.all(kernel[mask] != 0), name
  embedding = trained["embed"]["embedding"]   # trained (the rows of the tokens seen), dense
  assert np.any(embedding != params["embed"]["embedding"]) and np.all(embedding != 0)


def test_sparse_mlp_has_the_same_params_and_is_not_calibrated():
  """GPT(sparse_mlp=...) runs fc1/fc2 as SparseDense with the same leaves (numerics: the
  ``lm_forward`` part of experiments.gpu_check, tested in test_gpu_check.py)."""
  kw = dict(context=8, width=64, depth=1, num_heads=2)
  sparse = tr.GPT(**kw, sparse_mlp=tr.SparseMLP((32, 32), nnz_max=4, mode="bsr"))
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(lambda: _init(m, 8)))
  assert shapes(sparse) == shapes(tr.GPT(**kw))
  with pytest.raises(ValueError, match="^model: .*sparse_mlp"):
    tr.stages(sparse)
  with pytest.raises(TypeError, match="^sparse_mlp must be"):
    jax.eval_shape(lambda: _init(tr.GPT(**kw, sparse_mlp=(32, 32)), 8))


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


def _output_errors(model, params, tokens, nm):
  """Wanda's and magnitude's N:M masks of every block kernel, from the dense model's inputs
  on ``tokens``: the summed relative squared error of the layers' outputs, ``sum_l ||X_l
  (W_l - W_l * mask)||^2 / ||X_l W_l||^2``, for (Wanda, magnitude)."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      found["/".join(context.module.path) + "/kernel"] = args[0].reshape(-1, args[0].shape[-1])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply({"params": params}, tokens)
  errors = jnp.zeros(2)
  for name, x in found.items():
    if name == "head/kernel":
      continue
    kernel = oneshot._get_leaf(params, name)
    scale = jnp.sum(jnp.square(x @ kernel))
    errors += jnp.stack([jnp.sum(jnp.square(x @ jnp.where(keep, 0.0, kernel))) / scale
                         for keep in (oneshot.wanda_mask(kernel, x, nm=nm),
                                      oneshot.magnitude_mask(kernel, nm=nm))])
  return errors


@pytest.mark.e2e
def test_tiny_lm_trains_below_unigram_then_prunes():
  """On the embedded default corpus: train, then one-shot prune without fine-tuning.

  Bounds: trained < 0.7 x unigram (seed 0: 12.7 against 21.9), Wanda 50% < 1.5 x dense
  (1.04x), every pruned model within 2x of dense.

  Not asserted: magnitude 2:4 worse than Wanda 2:4 in perplexity. At this size it is not
  so. This setup, seeds 0-4 (init and training windows; calibration windows seed + 100),
  perplexity of magnitude 2:4 / Wanda 2:4 - 1: -2.5%, -1.5%, +0.5%, -1.2%, -9.8% (Wanda
  worse in four; the calibration windows of this test, seed 0: magnitude 13.30, Wanda
  13.60). Wider, longer, LLaMA-like (AdamW b2 0.95, weight decay 0.1, clipping,
  RMSNorm) or better-calibrated (4096 tokens) variants stay within about +-2% of zero, with
  either sign, over five seeds each (width 128, 2 blocks, 400 steps: -0.5% to +0.7%); the
  README lists them. Wanda's edge comes from outlier input features (100x the median norm in
  LLMs); here the layers' input-feature norms span 1.5-5x. Asserted instead is Wanda's
  premise: its 2:4 masks keep the layers' outputs on the calibration tokens closer to dense
  (summed relative squared error 0.80-0.90 of magnitude's in seeds 0-4).
  """
  c = text.load_corpus("stdlib_small")
  unigram = text.unigram_perplexity(c.train, c.validation)
  t = 32
  model = tr.GPT(context=t, width=64, depth=1, num_heads=4)
  params = _init(model, t)
  steps = 250
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 25, steps, 1e-3))
  params, _ = text.train_lm(model, params, tx, c.train, steps=steps, batch_size=32, seq_len=t)
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
  # Wanda's premise (one compile for the whole check).
  errors = jax.jit(_output_errors, static_argnums=(0, 3))(model, params, calib, (2, 4))
  assert errors[0] < errors[1], errors
