"""Accelerator guards that run on the CPU: programs lowered for CUDA and inspected.

The block-sparse kernels' backward pass once failed on an H200 with "Failed to parse
Triton module: 'scf.for' op failed to verify", although every CPU test passed (they run
the kernels in interpret mode). Lowering for CUDA needs no GPU, and the Triton module it
embeds can be verified here exactly as the GPU compiler's first stage does.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from jaxsparse.analysis import lowering
from jaxsparse.kernels import bsr_from_dense, bsr_matmul, bsr_with_data


def _kernel_vjp_module(dtype, block):
  k, n = 2 * block[0], 3 * block[1]
  bm = np.array([[True, False, True], [False, True, True]])
  a = bsr_from_dense(jnp.ones((k, n), dtype), bm, block, nnz_max=5)   # nnz_max > nnz

  def step(x, data):
    f = lambda x, d: bsr_matmul(x, bsr_with_data(a, d), backend="triton")
    y, vjp = jax.vjp(f, x, data)
    return y, vjp(y)

  return lowering.lower(step, jax.ShapeDtypeStruct((200, k), dtype),
                        jax.ShapeDtypeStruct(a.data.shape, dtype), platform="cuda")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("block", [(16, 16), (32, 64), (128, 128)])
def test_triton_kernels_verify(dtype, block):
  """Forward, dX and dW: each embedded Triton module parses and passes the MLIR verifier."""
  names = lowering.verify_triton_kernels(_kernel_vjp_module(dtype, block))
  assert names == ["bsr_matmul_fwd", "bsr_matmul_dx", "bsr_matmul_dw"]


def test_verifier_rejects_the_loop_that_failed_on_the_gpu():
  """The guard can fail: the old dW kernel's loop, from a Python 0 to a bound built with
  ``jnp.where`` from the program id (its bounds lower to different integer types)."""
  def kernel(n_ref, x_ref, o_ref):
    steps = jnp.where(pl.program_id(0) < n_ref[0], 4, 0)
    body = lambda m, acc: acc + x_ref[pl.ds(pl.multiple_of(m * 16, 16), 16), :]
    o_ref[...] = lax.fori_loop(0, steps, body, jnp.zeros(o_ref.shape, jnp.float32))

  def f(n, x):
    return pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((16, 16), jnp.float32), grid=(2,),
        in_specs=[pl.BlockSpec((1,), lambda i: (0,)), pl.BlockSpec((64, 16), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((16, 16), lambda i: (0, 0)),
        compiler_params=pltriton.CompilerParams(), name="bad_loop")(n, x)

  module = lowering.lower(f, jax.ShapeDtypeStruct((1,), jnp.int32),
                          jax.ShapeDtypeStruct((64, 16), jnp.float32), platform="cuda")
  assert [k.name for k in lowering.triton_kernels(module)] == ["bad_loop"]
  with pytest.raises(RuntimeError, match=r"(?s)bad_loop.*scf\.for"):
    lowering.verify_triton_kernels(module)


def test_verify_refuses_a_module_without_triton_kernels():
  module = lowering.lower(lambda x: x @ x, jnp.ones((4, 4)), platform="cuda")
  with pytest.raises(ValueError, match="no Triton kernel"):
    lowering.verify_triton_kernels(module)
  with pytest.raises(ValueError, match="platform"):
    lowering.lower(lambda x: x, jnp.ones(2), platform="gpu")


# ------------------------------------------------- exact selections: no integer matmul

def _train_step_trace(tx):
  """The jitted train step of an MLP on digits (with biases: dense leaves too), traced."""
  from tests.helpers import make_step, mlp_params
  params = mlp_params(jax.random.key(0))
  opt_state = tx.init(params)
  spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), t)
  return make_step(tx).trace(spec(params), spec(opt_state), jax.ShapeDtypeStruct((32, 64), jnp.float32),
                             jax.ShapeDtypeStruct((32,), jnp.int32))


def _methods():
  import optax
  import jaxsparse as js
  sgd = optax.sgd(0.1, momentum=0.9)
  return {
      "set": js.sparse_evolutionary_training(sgd, 0.9, update_period=10),
      "rigl": js.rigl(sgd, 0.9, update_stop=100, update_period=10),
      "dsr": js.dsr(sgd, 0.9, update_period=10),
      "deep_r": js.deep_r(sgd, 0.9),
      "global_gradual": js.gradual_pruning(sgd, 0.9, update_period=10, scope="global"),
      "global_magnitude": js.magnitude_pruning(sgd, 0.9, prune_step=5, scope="global"),
  }


@pytest.mark.parametrize("method", list(_methods()))
def test_update_steps_hold_no_integer_matmul_on_gpu_or_tpu(method):
  """XLA runs an integer dot on GPU/TPU floating-point units, exact only below 2**24 (an
  H200 miscounted global magnitude pruning at 100M weights): lowered for CUDA and for TPU,
  the train steps of the mask-updating methods hold none. On CPU they may (faster there)."""
  traced = _train_step_trace(_methods()[method])
  for platform in ("cuda", "tpu"):
    module = lowering.lower(traced, platform=platform)
    assert lowering.integer_dots(module) == [], platform
    assert lowering.host_transfers(module) == [], platform   # no host round trip in a step
    assert lowering.op_counts(module)["stablehlo.dot_general"] > 0   # the model's matmuls


def test_host_transfers_finds_callbacks():
  def f(x):
    jax.debug.print("x = {}", x)
    return jax.pure_callback(lambda a: a, jax.ShapeDtypeStruct((4,), jnp.float32), x) + 1

  # (callbacks lower only for a platform whose client exists: the CPU here)
  found = lowering.host_transfers(lowering.lower(f, jnp.ones(4), platform="cpu"))
  assert len(found) == 2 and all("callback" in f for f in found)
  assert lowering.host_transfers(lowering.lower(lambda x: x + 1, jnp.ones(4),
                                                platform="cuda")) == []


def test_integer_dots_finds_them():
  module = lowering.lower(lambda a: a @ a, jnp.ones((4, 4), jnp.int32), platform="cuda")
  assert len(lowering.integer_dots(module)) == 1
  assert lowering.integer_dots(lowering.lower(lambda a: a @ a, jnp.ones((4, 4)),
                                              platform="cuda")) == []


def test_tuned_launch_configs_verify_too():
  """A non-default config per kernel (8 warps, 4 stages, other row tiles) still verifies."""
  from jaxsparse.kernels import BsrMatmulConfig, KernelConfig
  block = (64, 64)
  a = bsr_from_dense(jnp.ones((128, 128), jnp.bfloat16), np.array([[1, 0], [1, 1]], bool), block)
  config = BsrMatmulConfig(KernelConfig(64, 8, 4), KernelConfig(128, 4, 2, rows_outer=False),
                           KernelConfig(32, 8, 3))

  def step(x, data):
    f = lambda x, d: bsr_matmul(x, bsr_with_data(a, d), backend="triton", config=config)
    y, vjp = jax.vjp(f, x, data)
    return y, vjp(y)

  module = lowering.lower(step, jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
                          jax.ShapeDtypeStruct(a.data.shape, jnp.bfloat16), platform="cuda")
  assert lowering.verify_triton_kernels(module) == ["bsr_matmul_fwd", "bsr_matmul_dx",
                                                    "bsr_matmul_dw"]


def test_new_in_step_layers_hold_no_integer_matmul_on_gpu_or_tpu():
  """The mixture of experts (sorted dispatch, capacity slots) and targeted dropout run inside
  every train step: lowered for CUDA and TPU, their forward and backward hold no integer dot
  and no host transfer."""
  import optax
  import jaxsparse as js

  net = js.MoE(num_experts=4, k=2, hidden_features=8, features=6)
  x = jnp.ones((16, 5), jnp.float32)
  variables = net.init({"params": jax.random.key(0), "gating": jax.random.key(1)}, x)

  def moe_loss(params, x, key):
    y, cols = net.apply({"params": params}, x, rngs={"gating": key},
                        mutable=["losses", "intermediates"])
    return (y ** 2).mean() + js.total_aux_loss(cols["losses"])

  params = {"w": jnp.ones((12, 6)), "b": jnp.ones((6,))}

  def dropout_loss(params, key):
    dropped = js.targeted_dropout(params, key, 0.5, 0.5)
    dropped = js.drop_connect(dropped, jax.random.fold_in(key, 1), 0.2)
    return optax.l2_loss(dropped["w"]).sum()

  for fn, args in ((jax.grad(moe_loss), (variables["params"], x, jax.random.key(2))),
                   (jax.grad(dropout_loss), (params, jax.random.key(3)))):
    for platform in ("cuda", "tpu"):
      module = lowering.lower(fn, *args, platform=platform)
      assert lowering.integer_dots(module) == [], platform
      assert lowering.host_transfers(module) == [], platform


# ------------------------------------------- program size: no constant as large as a layer

def test_train_steps_hold_no_model_sized_constant():
  """Every registered method's train step builds its index arrays in the program: lowered for
  CPU and for CUDA, it holds no constant array of 1024 entries or more. SET's once held its
  layers' segment ids and offsets as constants (the train step of a 10M-parameter MLP was 214
  MB of StableHLO, and XLA:CPU spent about 3 s of its 4.8-5.6 s compiling them)."""
  import optax
  from jaxsparse.core import registry
  from tests.helpers import make_step, mlp_params
  params = mlp_params(jax.random.key(0), sizes=(64, 256, 256, 10))
  spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), t)
  names = registry.names()
  assert {"set", "rigl", "dsr", "snfs", "deepr", "gradual"} <= set(names)
  for name in names:
    tx = registry.build(name, optax.sgd(0.1, momentum=0.9), 0.9, total_steps=200,
                        steps_per_epoch=10)
    traced = make_step(tx).trace(spec(params), jax.eval_shape(tx.init, params),
                                 jax.ShapeDtypeStruct((32, 64), jnp.float32),
                                 jax.ShapeDtypeStruct((32,), jnp.int32))
    for platform in ("cpu", "cuda"):
      assert lowering.large_constants(lowering.lower(traced, platform=platform)) == [], (
          name, platform)


def test_set_draws_its_regrowth_values_and_positions_in_one_hash():
  """SET's update draws its random positions' bits and its regrowth values' in one threefry
  hash (``topk.random_bits_each``), and the positions' rare exact fallback hashes its bits in
  blocks of that hash's length: lowered for CUDA, its train step holds two hash bodies (the
  step's key, and these draws), not four. Each is ~220 ops there; SET's 10M-parameter MLP
  step went from 2,792 to 2,557 ops with one hash for the draws, and to ~2,360 with the
  fallback's blocks."""
  import optax
  from tests.helpers import make_step, mlp_params
  import jaxsparse as js
  params = mlp_params(jax.random.key(0), sizes=(64, 256, 256, 10))
  spec = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.asarray(a).dtype), t)
  for regrowth, hashes in (("init", 2), ("zero", 2)):
    tx = js.sparse_evolutionary_training(optax.sgd(0.1, momentum=0.9), 0.9, regrowth=regrowth)
    traced = make_step(tx).trace(spec(params), jax.eval_shape(tx.init, params),
                                 jax.ShapeDtypeStruct((32, 64), jnp.float32),
                                 jax.ShapeDtypeStruct((32,), jnp.int32))
    text = str(lowering.lower(traced, platform="cuda"))
    assert text.count("func.func private @threefry2x32") == hashes, regrowth


def test_large_constants_finds_them():
  table = np.arange(2048, dtype=np.int32)
  module = lowering.lower(lambda x: x + table + jnp.full(4096, 2, jnp.int32)[:2048],
                          jnp.ones(2048, jnp.int32), platform="cuda")
  found = lowering.large_constants(module)
  assert [(c.type, c.elements) for c in found] == [("tensor<2048xi32>", 2048)]   # not the splat
  assert lowering.large_constants(module, min_elements=4096) == []
  for bad in (0, 2.5, "1024"):
    with pytest.raises(ValueError, match="min_elements must be a positive int"):
      lowering.large_constants(module, min_elements=bad)
