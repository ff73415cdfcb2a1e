"""jaxsparse on a device mesh: same masks and params on 1 and 8 devices, shardings kept.

The multi-device checks need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
before JAX starts, but conftest.py has already started JAX in this process, so
they run in subprocesses that execute this file as a script (``python
tests/core/test_sharding.py CASE``), batched into few processes to keep the suite
fast. A subprocess that fails fails its test, with its output.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:  # when run as a script
  sys.path.insert(0, ROOT)

import jaxsparse as js  # noqa: E402
from jaxsparse.core import selection as topk, sharding  # noqa: E402

SIZES = (64, 128, 16)  # two sparse kernels: compile time grows with the sparse leaves
STEPS = 100
BATCH = 64
MESHES = ((8,), (4, 2), (2, 4))
METHODS = ("set", "rigl", "dsr", "gradual_global")


# ---------------------------------------------------------------------------- worker side

def make_tx(method: str) -> optax.GradientTransformation:
  inner = optax.sgd(0.05, momentum=0.9)
  if method == "set":
    return js.sparse_evolutionary_training(inner, 0.8, drop_fraction=0.3, update_period=10, seed=1)
  if method == "rigl":
    return js.rigl(inner, 0.8, update_stop=80, update_period=10, seed=2)
  if method == "dsr":
    return js.dsr(inner, 0.8, target_pruned=300, update_period=10, seed=3)
  if method == "gradual_global":
    return js.gradual_pruning(inner, 0.8, begin_step=10, num_updates=6, update_period=10,
                              scope="global")
  raise ValueError(method)


def mlp_params(key: jax.Array) -> dict:
  ps = {}
  for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    ps[f"fc{i + 1}"] = {"kernel": jax.random.normal(k1, (a, b)) * np.sqrt(2.0 / a),
                        "bias": 0.1 * jax.random.normal(k2, (b,))}
  return ps


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  for i in range(len(SIZES) - 1):
    p = params[f"fc{i + 1}"]
    x = x @ p["kernel"] + p["bias"]
    if i < len(SIZES) - 2:
      x = jax.nn.relu(x)
  return optax.softmax_cross_entropy_with_integer_labels(x, y).mean()


def data() -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits
  d = load_digits()
  idx = np.random.default_rng(0).integers(0, len(d.target), (STEPS, BATCH))
  return (d.data[idx] / 16.0).astype(np.float32), d.target[idx].astype(np.int32)


def train(tx, params, opt_state, xs, ys):
  def body(carry, xy):
    p, s = carry
    u, s = tx.update(jax.grad(loss_fn)(p, *xy), s, p)
    return (optax.apply_updates(p, u), s), None
  return jax.lax.scan(body, (params, opt_state), (xs, ys))[0]


def make_mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
  names = ("data", "model")[:len(shape)]
  return sharding.make_mesh(shape, names, devices=jax.devices()[:int(np.prod(shape))])


def run(method: str, mesh: jax.sharding.Mesh, layout: str, step=None, init_state=None):
  """100 steps (one jitted scan) with params, state and batch placed for ``layout``.

  ``out_shardings`` are left to XLA's propagation, to check that the outputs
  keep their layout by themselves. The state comes from a sharded, jitted
  ``tx.init`` unless ``init_state`` (then placed with ``device_put``) is given.
  Returns ``(params, opt_state), param shardings, step, initial state``.
  """
  tx = make_tx(method)
  params = mlp_params(jax.random.key(0))
  p_sh = sharding.param_shardings(params, mesh, layout)
  s_sh = sharding.state_shardings(p_sh, jax.eval_shape(tx.init, params))
  if layout != "tensor_parallel":
    b_sh = sharding.batch_sharding(mesh)          # batch over all devices
  elif len(mesh.axis_names) > 1:
    b_sh = sharding.batch_sharding(mesh, "data")  # TP over "model", batch over "data"
  else:
    b_sh = sharding.replicated(mesh)              # TP over the only axis
  xs_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *b_sh.spec))
  params = sharding.shard(params, p_sh)
  if init_state is None:
    opt_state = jax.jit(tx.init, out_shardings=s_sh)(params)
  else:
    opt_state = jax.device_put(init_state, s_sh)
  assert not same_sharding(opt_state, s_sh)
  init = opt_state
  xs, ys = data()
  xs, ys = jax.device_put(xs, xs_sh), jax.device_put(ys, xs_sh)
  # One jit object per method: its trace is reused for every mesh and layout (committed
  # inputs carry the shardings), only XLA compiles again.
  step = jax.jit(lambda p, s, x, y: train(tx, p, s, x, y)) if step is None else step
  return step(params, opt_state, xs, ys), p_sh, step, init


def same_sharding(tree, shardings, masks=None) -> list[str]:
  """Leaves of ``tree`` whose sharding differs from ``shardings``; with ``masks``, only the
  sparse leaves (XLA may re-layout dense leaves of the model itself, such as the biases
  of column-parallel kernels; pin them with ``out_shardings``)."""
  bad = []
  sparse = [True] * len(jax.tree.leaves(tree)) if masks is None else \
      [np.ndim(m) > 0 for m in jax.tree.leaves(masks)]
  for path, x, s, sp in zip(js.core.masks.leaf_names(tree), jax.tree.leaves(tree),
                            jax.tree.leaves(shardings), sparse):
    if sp and not x.sharding.is_equivalent_to(s, x.ndim):
      bad.append(f"{path}: got {x.sharding}, expected {s.spec}")
  return bad


FULL = os.environ.get("JAXSPARSE_FULL_MESH_TESTS", "") == "1"


def configs(method: str) -> list[tuple[tuple[int, ...], str]]:
  """(mesh shape, layout) pairs run for ``method``.

  Every pair of MESHES x LAYOUTS costs one XLA compilation of the 100-step
  program (several seconds on 2 CPU cores), so by default each method runs
  three pairs, rotated so that each method sees every mesh and every layout
  and SET, RigL and DSR together cover all nine pairs.
  ``JAXSPARSE_FULL_MESH_TESTS=1`` runs all nine pairs for every method.
  """
  if FULL:
    return [(m, layout) for m in MESHES for layout in sharding.LAYOUTS]
  i = METHODS.index(method)
  return [(m, sharding.LAYOUTS[(i + j) % 3]) for j, m in enumerate(MESHES)]


def case_equivalence(methods: list[str]) -> None:
  """Each method: a 1-device reference vs every 8-device mesh and layout."""
  assert len(jax.devices()) == 8, jax.devices()
  for method in methods:
    t0 = time.time()
    (p_ref, s_ref), _, step, init_ref = run(method, make_mesh((1,)), "data_parallel")
    m_ref = js.get_masks(s_ref)
    # The initial (random) state, drawn under jit straight into a sharded layout, is the same
    # (SET and DSR: uniform and ER random masks; RigL's ERK masks take the same path).
    if method not in ("set", "dsr"):
      init_8 = init_ref
    else:
      init_8 = jax.jit(make_tx(method).init, out_shardings=sharding.state_shardings(
          sharding.param_shardings(p_ref, make_mesh((4, 2)), "tensor_parallel"),
          jax.eval_shape(make_tx(method).init, p_ref)))(mlp_params(jax.random.key(0)))
    # Masks, counters and keys bit for bit; float statistics of the params (SET's regrowth
    # scale) are reductions whose summation order depends on the sharding: a few ulp.
    for a, b in zip(jax.tree.leaves(init_8), jax.tree.leaves(init_ref)):
      if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        a, b = jax.random.key_data(a), jax.random.key_data(b)
      if jnp.issubdtype(a.dtype, jnp.floating):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0,
                                   err_msg=f"{method} init")
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{method} init")
    assert js.sparsity(p_ref, m_ref) > 0.5, (method, js.sparsity(p_ref, m_ref))
    for shape, layout in configs(method):
      t1 = time.time()
      (p, s), p_sh, _, _ = run(method, make_mesh(shape), layout, step, init_ref)
      tag = f"{method} mesh={shape} layout={layout}"
      for a, b in zip(jax.tree.leaves(js.get_masks(s)), jax.tree.leaves(m_ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=tag)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5,
                                   err_msg=tag)
      # Sparse params keep their input sharding; masks and state follow the output params.
      out_p_sh = jax.tree.map(lambda x: x.sharding, p)
      bad = (same_sharding(p, p_sh, m_ref)
             + same_sharding(s, sharding.state_shardings(out_p_sh, s)))
      assert not bad, f"{tag}: outputs lost their sharding:\n" + "\n".join(bad)
      print(f"  {tag}: {time.time() - t1:.1f}s", flush=True)
    print(f"{method}: ok in {time.time() - t0:.1f}s", flush=True)


def case_topk() -> None:
  """O(n) selection on sharded inputs == lax.top_k (ties: lower flat index), with many equal
  values; the multi-array selection == lax.top_k on the concatenation (ties: earlier array)."""
  mesh = make_mesh((4, 2))
  P = jax.sharding.PartitionSpec
  put = lambda x, spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
  rng = np.random.default_rng(0)
  inputs = [rng.normal(size=(64, 96)).astype(np.float32),
            rng.integers(0, 3, (64, 96)).astype(np.float32),          # 3 distinct values
            np.zeros((64, 96), np.float32),                           # all equal
            np.where(rng.random((64, 96)) < 0.5, -0.0, 0.0).astype(np.float32)]
  sel = jax.jit(topk.largest_k_mask)                                  # traced k: one compile
  sel_many = jax.jit(topk.largest_k_masks)
  ref = jax.jit(topk.top_k_mask, static_argnums=1)
  for x in inputs:
    valid = rng.random(x.shape) < 0.8
    xs, vs = put(x, P("data", "model")), put(valid, P("data", "model"))
    parts = [put(x[:32], P("data")), put(x[32:], P(None, "model"))]
    vparts = [put(valid[:32], P("data")), put(valid[32:], P(None, "model"))]
    for k in (0, 1, 17, 1000, 4000, int(valid.sum()), x.size):
      want = np.asarray(ref(jnp.asarray(x), k, jnp.asarray(valid)))
      got = sel(xs, jnp.int32(k), vs)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k}")
      assert int(got.sum()) == min(k, int(valid.sum()))
      assert got.sharding.is_equivalent_to(xs.sharding, 2), got.sharding
      got = sel_many(parts, jnp.int32(k), vparts)
      np.testing.assert_array_equal(np.concatenate([np.asarray(g) for g in got]), want)
      assert all(g.sharding.is_equivalent_to(p.sharding, 2) for g, p in zip(got, parts))
  print("topk: ok", flush=True)


def case_bad() -> None:
  """Shardings that do not divide a leaf, on a real (4, 2) mesh."""
  mesh = make_mesh((4, 2))
  P = jax.sharding.PartitionSpec
  odd = {"w": jnp.zeros((6, 5))}
  for spec, msg in ((P("data"), "dim 0 (size 6) is not divisible into 4 parts"),
                    (P(None, "model"), "dim 1 (size 5) is not divisible into 2 parts"),
                    (P(("data", "model")), "dim 0 (size 6) is not divisible into 8 parts")):
    try:
      sharding.shard(odd, {"w": jax.sharding.NamedSharding(mesh, spec)})
    except ValueError as e:
      assert "leaf 'w' of shape (6, 5)" in str(e) and msg in str(e), str(e)
    else:
      raise AssertionError(f"no error for {spec}")
  # The layouts leave a leaf replicated where no dim divides (never a ragged split).
  sh = sharding.param_shardings(odd, mesh, "fsdp")
  assert sh["w"].spec == P(), sh
  assert sharding.param_shardings(odd, mesh, "fsdp", axis="model")["w"].spec == P("model", None)
  assert sharding.param_shardings(odd, mesh, "tensor_parallel")["w"].spec == P()
  print("bad: ok", flush=True)


CASES = {"equivalence": case_equivalence, "topk": case_topk, "bad": case_bad}


# ---------------------------------------------------------------------------- pytest side

def _start_worker(*args: str) -> subprocess.Popen:
  from tests.helpers import eight_cpu_devices_env
  env = eight_cpu_devices_env(PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.e2e
def test_8_devices_same_masks_and_params_and_shardings_kept():
  """SET, RigL, DSR, global gradual pruning: 1 device vs meshes (8,), (4, 2), (2, 4) in each
  layout; O(n) selection on sharded inputs vs lax.top_k; non-dividing shardings.
  Three worker processes (XLA compilation dominates the time)."""
  jobs = [("equivalence", "set", "gradual_global"), ("equivalence", "rigl", "bad"),
          ("equivalence", "dsr", "topk")]
  procs = [_start_worker(*job) for job in jobs]
  outs = []
  for job, proc in zip(jobs, procs):
    try:
      out, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      proc.kill()
      out, _ = proc.communicate()
    outs.append(out)
    assert proc.returncode == 0, f"worker {job} failed (rc={proc.returncode}):\n{out[-8000:]}"
  out = "".join(outs)
  for name in METHODS + ("topk", "bad"):
    assert f"{name}: ok" in out, out


def _mesh1() -> jax.sharding.Mesh:
  return sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def test_layouts_on_one_device():
  params = mlp_params(jax.random.key(0))
  mesh = _mesh1()
  for layout in sharding.LAYOUTS:
    sh = sharding.param_shardings(params, mesh, layout)
    sharding.check_sharding(params, sh)
  tp = sharding.param_shardings(params, mesh, "tensor_parallel")
  assert tp["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "data")
  assert tp["fc1"]["bias"].spec == jax.sharding.PartitionSpec()
  fsdp = sharding.param_shardings(params, mesh, "fsdp")
  assert fsdp["fc1"]["kernel"].spec == jax.sharding.PartitionSpec(None, "data")  # the larger dim
  assert fsdp["fc2"]["kernel"].spec == jax.sharding.PartitionSpec("data", None)


def test_state_shardings_follow_params():
  params = mlp_params(jax.random.key(0))
  mesh = _mesh1()
  p_sh = sharding.param_shardings(params, mesh, "tensor_parallel")
  rep = jax.sharding.PartitionSpec()
  tx = js.rigl(optax.adam(1e-3), 0.8, update_stop=10, update_period=5)
  s_sh = sharding.state_shardings(p_sh, jax.eval_shape(tx.init, params))
  st = js.get_sparse_state(s_sh)
  assert st.masks["fc1"]["kernel"].spec == p_sh["fc1"]["kernel"].spec
  assert st.masks["fc1"]["bias"].spec == rep                      # dense leaf: scalar mask
  assert st.count.spec == rep and st.key.spec == rep
  adam = st.inner_state[0]
  assert adam.mu["fc2"]["kernel"].spec == p_sh["fc2"]["kernel"].spec
  assert adam.nu["fc1"]["kernel"].spec == p_sh["fc1"]["kernel"].spec
  # SNFS keeps one momentum per sparse leaf in aux: it follows its param.
  tx = js.snfs(optax.sgd(0.1), 0.8, total_steps=10, update_period=5)
  aux = js.get_sparse_state(sharding.state_shardings(p_sh, jax.eval_shape(tx.init, params))).aux
  assert [s.spec for s in aux.momenta] == [p_sh[f"fc{i}"]["kernel"].spec for i in (1, 2)]
  # SET's active flat indices (length nnz) are replicated.
  tx = js.sparse_evolutionary_training(optax.sgd(0.1), 0.8)
  aux = js.get_sparse_state(sharding.state_shardings(p_sh, jax.eval_shape(tx.init, params))).aux
  assert all(s.spec == rep for s in jax.tree.leaves(aux))
  # shard_like places a real state.
  tx = js.magnitude_pruning(optax.sgd(0.1), 0.5)  # a cheap init: all-True masks
  state = sharding.shard_like(p_sh, tx.init(params))
  assert js.get_masks(state)["fc1"]["kernel"].sharding.spec == p_sh["fc1"]["kernel"].spec


def test_bad_input():
  params = mlp_params(jax.random.key(0))
  mesh = _mesh1()
  with pytest.raises(ValueError, match="axis: mesh axis 'model' does not exist"):
    sharding.param_shardings(params, mesh, "fsdp", axis="model")
  with pytest.raises(ValueError, match="axis: mesh axis 'model' does not exist"):
    sharding.batch_sharding(mesh, "model")
  with pytest.raises(ValueError, match="layout must be one of"):
    sharding.param_shardings(params, mesh, "pipeline")
  explicit = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                           devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="mesh: axes .'data',. are not AxisType.Auto"):
    sharding.param_shardings(params, explicit, "fsdp")
  # JAX itself refuses a NamedSharding naming an axis its mesh lacks.
  with pytest.raises(ValueError, match="nope"):
    jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "nope"))
  odd = {"w": jnp.zeros((3, 5))}
  too_many = {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "data"))}
  with pytest.raises(ValueError, match="leaf 'w' of shape .3, 5. has spec"):
    sharding.check_sharding(odd, too_many)
  with pytest.raises(ValueError, match="structure does not match"):
    sharding.check_sharding(params, {"fc1": p for p in [sharding.replicated(mesh)]})
  with pytest.raises(ValueError, match=r"k must be in \[0, 10\]"):
    topk.smallest_k_mask(jnp.arange(10.0), 11)
  with pytest.raises(ValueError, match=r"k must be in \[0, 10\]"):
    topk.largest_k_mask(jnp.arange(10.0), -1)
  with pytest.raises(ValueError, match="k must be a static int"):
    topk.top_k_mask(jnp.arange(10.0), 11)


if __name__ == "__main__":
  args = sys.argv[1:]
  while args:
    name = args.pop(0)
    if name == "equivalence":
      methods = []
      while args and args[0] in METHODS:
        methods.append(args.pop(0))
      case_equivalence(methods)
    else:
      CASES[name]()
