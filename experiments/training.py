"""A jitted training loop for flax.linen classifiers with any jaxsparse method.

One epoch is one jitted call that shuffles on device and ``lax.scan``s over the
batches; the dataset lives on the device for the whole run, so there is no
host round trip inside an epoch and no recompilation when a mask changes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import data
from jaxsparse.core import masks as masks_lib, registry, transform as core
from jaxsparse.nn import models
from jaxsparse.regularizers import distillation, penalties

# The library's registered methods (jaxsparse.core.registry), each with its run-scaled defaults.
METHODS = registry.names()
OPTIMIZERS = ("sgd", "nesterov", "adam", "adamw")
LR_SCHEDULES = ("cosine", "step")


def make_learning_rate(kind: str, learning_rate: float, total_steps: int) -> optax.Schedule:
  """``cosine``: cosine decay to 0; ``step``: divided by 5 at 25%, 50% and 75% (DSR's MNIST run)."""
  if kind not in LR_SCHEDULES:
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {kind!r}")
  if kind == "cosine":
    return optax.cosine_decay_schedule(learning_rate, total_steps)
  bounds = {int(total_steps * q): 0.2 for q in (0.25, 0.5, 0.75)}
  return optax.piecewise_constant_schedule(learning_rate, bounds)


def make_optimizer(name: str, learning_rate: float | optax.Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """The inner optax optimizer by name: sgd (with momentum), nesterov, adam, adamw."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if name in ("sgd", "nesterov"):
    tx = optax.sgd(learning_rate, momentum=momentum or None, nesterov=name == "nesterov")
    return optax.chain(optax.add_decayed_weights(weight_decay), tx) if weight_decay else tx
  if name == "adam":
    return optax.adam(learning_rate)
  return optax.adamw(learning_rate, weight_decay=weight_decay)


def make_method(name: str, inner: optax.GradientTransformation, sparsity: float, *,
                total_steps: int, steps_per_epoch: int, seed: int = 0, model: str | None = None,
                **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """A jaxsparse method by name with the defaults of its paper, scaled to the run.

  * ``dense``: no sparsity; ``static``: random ER mask (DSR's baseline);
  * ``set``: ER, drop_fraction = 0.3, rewiring once per epoch (Mocanu et al. 2018);
  * ``magnitude``: one-shot global magnitude pruning halfway, then fine-tuning;
  * ``gradual``: Zhu & Gupta from 10% to 60% of training, 100-step period;
  * ``random``: random pruning at step 0;
  * ``rigl``: ERK, dT = 100 steps, alpha = 0.3, T_end = 75% of training;
  * ``snfs``: drop fraction 0.5 cosine-decayed, updates once per epoch;
  * ``dsr``: H0 = 1e-3, delta = 0.1, Np = 600, period 100 steps doubled at
    25/50/75% of training, stop at 90% (the authors' MNIST schedule);
  * ``deepr``: ``inner`` chained with DeepR's L1 term (1e-5) and Langevin noise
    (``T`` annealed 1e-5 -> 1e-8 -> 1e-12 -> 1e-15 at 25/50/75%, ``eta`` from
    ``learning_rate``), then the sign constraint and rewiring.
  ``kwargs`` override the method's own keyword arguments (``deepr`` also takes
  ``l1``, ``temperature`` and ``learning_rate``); an argument the method does not
  take is a TypeError naming it and the closest one it takes. ``dense`` has none
  and ignores ``kwargs`` (a sweep passes the sparse methods' to its baseline).

  ``model``, a registry name, picks the sparse leaves when ``kwargs`` give no
  ``filter``: that model's default filter (:func:`jaxsparse.nn.models.default_sparse_filter`;
  for ``"gpt"`` the Dense kernels, so its embeddings and norms stay dense), else the
  methods' own (every leaf of rank >= 2). An explicit ``filter`` wins.
  """
  if name not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {name!r}")
  if not registry.get(name).hyperparameters:  # dense: kwargs meant for a sweep's sparse methods
    return registry.build(name, inner, sparsity, total_steps=total_steps,
                          steps_per_epoch=steps_per_epoch, seed=seed)
  _check_method_kwargs(name, kwargs)
  model_filter = None if model is None else models.default_sparse_filter(model)
  if model_filter is not None and kwargs.get("filter") is None:
    kwargs = {**kwargs, "filter": model_filter}
  return registry.build(name, inner, sparsity, total_steps=total_steps,
                        steps_per_epoch=steps_per_epoch, seed=seed, **kwargs)


def _check_method_kwargs(name: str, kwargs: Mapping[str, Any]) -> None:
  """Raises TypeError naming an argument that method ``name`` does not take (with the
  closest one it does), before anything is built. Deprecated names are still taken."""
  import difflib
  spec = registry.get(name)
  known = list(spec.keywords())
  for key in kwargs:
    if key not in known and key not in spec.renamed():
      close = difflib.get_close_matches(key, known, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else "."
      takes = f"it takes {', '.join(sorted(known))}" if known else "it takes none"
      raise TypeError(f"method_kwargs: method {name!r} takes no argument {key!r}{hint} ({takes})")


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: optax.OptState


def _has_bn(batch_stats: Any) -> bool:
  return bool(jax.tree.leaves(batch_stats))


def check_distillation(temperature: float, alpha: float) -> None:
  """The loss's own checks (ValueError naming ``temperature`` or ``alpha``), run before
  anything is built or traced rather than at the first step."""
  distillation.check_hyperparameters(temperature, alpha)


def make_train_epoch(model: nn.Module, tx: optax.GradientTransformation, batch_size: int, *,
                     return_losses: bool = False, steps_per_call: int | None = None,
                     teacher: Callable[[jax.Array], jax.Array] | None = None,
                     distill_temperature: float = 4.0, distill_alpha: float = 0.9
                     ) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple]:
  """``(state, x, y, key) -> (state, mean_loss)``: one shuffled epoch on device.

  ``steps_per_call=None`` (default) runs the whole epoch as one jitted
  ``lax.scan`` over the batches. An integer ``k`` runs it as jitted calls of
  ``k`` steps each, unrolled (no XLA loop; the last call takes the remainder
  and compiles once more). Use it for convolutional models on CPU, where XLA
  runs convolutions inside a loop body several times slower than outside one
  (jax-ml/jax#12868; LeNet-5-Caffe, batch 100, 2 cores: 330 ms a scanned step,
  57 ms unrolled); calls are dispatched asynchronously, so the host never
  waits between them. Both run the same step on the same batches.

  With ``return_losses=True`` it returns ``(state, mean_loss, losses)``, the
  last holding the loss of every step of the epoch (to find a NaN's step).

  ``teacher(x) -> logits`` (e.g. :func:`make_teacher`) turns the loss into
  :func:`jaxsparse.regularizers.distillation.distillation_loss` with
  ``distill_temperature`` and ``distill_alpha``: the teacher's logits are computed
  for each batch inside the jitted step, and no gradient reaches the teacher.
  """
  if teacher is not None:
    check_distillation(distill_temperature, distill_alpha)
  if steps_per_call is not None and (isinstance(steps_per_call, bool)
                                     or not isinstance(steps_per_call, int) or steps_per_call < 1):
    raise ValueError(f"steps_per_call must be None or an integer >= 1, got {steps_per_call!r}")

  def loss_fn(params, batch_stats, x, y):
    variables = {"params": params}
    if _has_bn(batch_stats):
      variables["batch_stats"] = batch_stats
      logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
      batch_stats = upd["batch_stats"]
    else:
      logits = model.apply(variables, x, train=True)
    if teacher is None:
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    else:
      loss = distillation.distillation_loss(
          logits, jax.lax.stop_gradient(teacher(x)), y, temperature=distill_temperature,
          alpha=distill_alpha).mean()
    return loss, batch_stats

  def train_step(state: TrainState, batch):
    x, y = batch
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, y)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), batch_stats, opt_state), loss

  def finish(state, losses):
    return (state, losses.mean(), losses) if return_losses else (state, losses.mean())

  if steps_per_call is None:
    @jax.jit
    def train_epoch(state: TrainState, x, y, key):
      xs, ys = data.epoch_batches(x, y, batch_size, key)
      return finish(*jax.lax.scan(train_step, state, (xs, ys)))

    return train_epoch

  shuffle = jax.jit(data.epoch_batches, static_argnums=2)

  @jax.jit
  def run_steps(state: TrainState, xs, ys):
    losses = []
    for i in range(xs.shape[0]):  # unrolled in Python: lax.scan(length=1) would still be a loop
      state, loss = train_step(state, (xs[i], ys[i]))
      losses.append(loss)
    return state, jnp.stack(losses)

  def train_epoch(state: TrainState, x, y, key):
    xs, ys = shuffle(x, y, batch_size, key)
    losses = []
    for start in range(0, xs.shape[0], steps_per_call):
      state, chunk = run_steps(state, xs[start:start + steps_per_call],
                               ys[start:start + steps_per_call])
      losses.append(chunk)
    return finish(state, jnp.concatenate(losses))

  return train_epoch


def make_teacher(model: nn.Module, variables: Mapping[str, Any]
                 ) -> Callable[[jax.Array], jax.Array]:
  """``x -> logits`` of a trained ``model`` in inference mode (batch norm's running
  statistics), for :func:`make_train_epoch`'s and :func:`train`'s ``teacher``. Its
  ``variables`` are frozen: they are no part of the student's state or gradients."""
  variables = jax.lax.stop_gradient(dict(variables))
  return lambda x: model.apply(variables, x, train=False)


def iterate_epochs(train_epoch: Callable[..., tuple], state: Any, x: jax.Array, y: jax.Array,
                   key: jax.Array, *, stop: int, start: int = 0
                   ) -> Iterator[tuple[int, Any, float, jax.Array, float]]:
  """The experiments' one epoch loop: yields ``(epoch, state, loss, losses, seconds)``
  after each of the epochs ``start .. stop - 1``.

  ``train_epoch(state, x, y, key) -> (state, mean_loss, losses)`` is e.g.
  :func:`make_train_epoch` with ``return_losses=True``; epoch ``e`` gets the key
  ``fold_in(key, e)`` (so a resumed run shuffles as an uninterrupted one), and
  ``seconds`` is timed until the mean loss is on the host. The caller checks the
  loss, evaluates or stops; the next epoch continues from the yielded state.
  """
  for epoch in range(start, stop):
    t0 = time.perf_counter()
    state, loss, losses = train_epoch(state, x, y, jax.random.fold_in(key, epoch))
    loss = float(loss)  # blocks until the epoch is done
    yield epoch, state, loss, losses, time.perf_counter() - t0


def make_evaluate(model: nn.Module, batch_size: int = 1000) -> Callable[..., jax.Array]:
  """``(params, batch_stats, x, y) -> accuracy`` over the whole set, jitted."""

  @jax.jit
  def correct(params, batch_stats, x, y):
    variables = {"params": params}
    if _has_bn(batch_stats):
      variables["batch_stats"] = batch_stats
    logits = model.apply(variables, x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(params, batch_stats, x, y):
    total = 0
    for i in range(0, len(x), batch_size):
      total += correct(params, batch_stats, x[i:i + batch_size], y[i:i + batch_size])
    return float(total) / len(x)

  return evaluate


def train(*, dataset: str = "digits", model: str = "lenet300", method: str = "set",
          sparsity: float = 0.9, epochs: int = 20, batch_size: int = 100,
          optimizer: str = "sgd", learning_rate: float = 0.05, momentum: float = 0.9,
          weight_decay: float = 0.0, l1: float = 0.0, lr_schedule: str = "cosine",
          seed: int = 0, data_dir: str | None = None,
          model_kwargs: Mapping[str, Any] | None = None,
          method_kwargs: Mapping[str, Any] | None = None, progress: bool = True,
          log: Callable[[str], None] | None = print, checkpoint_dir: str | None = None,
          resume: bool = False, stop_on_nan: bool = False, steps_per_call: int | None = None,
          on_epoch_end: Callable[[dict[str, Any], TrainState], None] | None = None,
          on_start: Callable[[], None] | None = None,
          teacher: Callable[[jax.Array], jax.Array] | None = None,
          distill_temperature: float = 4.0, distill_alpha: float = 0.9
          ) -> dict[str, Any]:
  """Trains ``model`` on ``dataset`` with ``method`` and returns a results dict.

  ``l1`` adds the L1 subgradient ``l1 * sign(w)`` to every weight's gradient
  (DSR's MNIST runs use 1e-4); ``lr_schedule`` is ``cosine`` or ``step``
  (see :func:`make_learning_rate`). The results hold the config, per-epoch test accuracy / loss / sparsity /
  seconds, final accuracy, per-layer kept counts and the mean seconds per epoch
  (the first epoch, which includes compilation, is reported separately).
  ``steps_per_call`` is :func:`make_train_epoch`'s (e.g. 5 for conv nets on CPU).
  The sparse leaves are ``model``'s default (:func:`make_method`'s ``model``) unless
  ``method_kwargs`` give a ``filter``.

  ``teacher(x) -> logits`` (e.g. :func:`make_teacher` of a trained model) trains the
  model by knowledge distillation (Hinton et al. 2015) with ``distill_temperature``
  and ``distill_alpha`` (:func:`make_train_epoch`); the config then records both.

  Reliability hooks (all off by default; note that ``stop_on_nan`` is off here
  while ``python -m experiments.run`` turns it on):

  * ``checkpoint_dir``: an orbax checkpoint (:mod:`experiments.checkpoint`) is
    written there after every epoch. A folder that already holds checkpoints
    is an error unless ``resume=True``, which restores the newest one (state,
    finished epochs, history) and trains the remaining epochs; the result is
    bit-identical to an uninterrupted run. A resume whose config changes a
    shape is refused (ValueError naming the leaves).
  * ``stop_on_nan``: a non-finite epoch loss raises ``FloatingPointError``
    naming the epoch and the first bad step; no checkpoint is written for
    that epoch, so the last good one is kept.
  * ``on_epoch_end(metrics, state)``: called after every epoch with that
    epoch's history entry (e.g. to log it to CSV).
  * ``on_start()``: called once everything is built and checked (dataset,
    model, method and its arguments, ``tx.init``) and before anything is
    written, e.g. to create a results folder only for a run that can start.

  The results also hold ``mask_updates_skipped``: mask updates skipped for
  non-finite inputs (each retried at the next finite step; see
  :mod:`jaxsparse.core.transform`), logged when non-zero.
  """
  if epochs <= 0:
    raise ValueError(f"epochs must be > 0, got {epochs}")
  config = dict(dataset=dataset, model=model, method=method, sparsity=sparsity, epochs=epochs,
                batch_size=batch_size, optimizer=optimizer, learning_rate=learning_rate,
                momentum=momentum, weight_decay=weight_decay, l1=l1, lr_schedule=lr_schedule,
                seed=seed, steps_per_call=steps_per_call,
                model_kwargs=dict(model_kwargs or {}), method_kwargs=dict(method_kwargs or {}))
  if teacher is not None:  # only then: earlier runs' configs and checkpoints stay as they were
    check_distillation(distill_temperature, distill_alpha)
    config.update(distill_temperature=distill_temperature, distill_alpha=distill_alpha)
  ds = data.load_dataset(dataset, data_dir=data_dir, seed=seed)
  net = models.create_model(model, ds.num_classes, **(model_kwargs or {}))
  variables = models.init_params(net, ds.input_shape, seed)
  params, batch_stats = variables["params"], variables.get("batch_stats", {})

  steps_per_epoch = len(ds.x_train) // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the {len(ds.x_train)} training examples")
  total_steps = steps_per_epoch * epochs
  lr = make_learning_rate(lr_schedule, learning_rate, total_steps)
  inner = make_optimizer(optimizer, lr, momentum=momentum, weight_decay=weight_decay)
  if l1:
    inner = optax.chain(penalties.add_l1(l1), inner)
  if method == "deepr":
    method_kwargs = {"learning_rate": lr, **(method_kwargs or {})}
  tx = make_method(method, inner, sparsity, total_steps=total_steps,
                   steps_per_epoch=steps_per_epoch, seed=seed, model=model,
                   **(method_kwargs or {}))
  opt_state = tx.init(params)
  params = masks_lib.apply_masks(params, core.get_masks(opt_state))
  state = TrainState(params, batch_stats, opt_state)
  if on_start is not None:
    on_start()

  history = []
  start = 0
  mngr = None
  if checkpoint_dir is not None:
    from experiments import checkpoint as checkpoint_lib  # orbax is only needed here
    mngr = checkpoint_lib.manager(checkpoint_dir)
    if mngr.latest_step() is not None:
      if not resume:
        raise ValueError(f"checkpoint_dir {checkpoint_dir!r} already holds checkpoints (epoch "
                         f"{mngr.latest_step()}); pass resume=True to continue that run, or "
                         "choose another folder")
      restored = checkpoint_lib.restore(mngr, state, config=config)
      state, start, history = restored.state, restored.epoch, restored.history
      if log is not None:
        log(f"resumed from {checkpoint_dir} after epoch {start}")
        changed = checkpoint_lib.config_changes(restored.config, config)
        if changed:
          log(f"warning: resuming with a changed config ({changed}); the result will differ "
              "from an uninterrupted run")
  elif resume:
    raise ValueError("resume=True needs a checkpoint_dir")

  train_epoch = make_train_epoch(net, tx, batch_size, return_losses=True,
                                 steps_per_call=steps_per_call, teacher=teacher,
                                 distill_temperature=distill_temperature,
                                 distill_alpha=distill_alpha)
  evaluate = make_evaluate(net)
  x_train, y_train = jax.device_put(ds.x_train), jax.device_put(ds.y_train)
  epoch_iter = iterate_epochs(train_epoch, state, x_train, y_train, jax.random.key(seed),
                              stop=epochs, start=start)
  if progress:
    try:  # tqdm is not part of jaxsparse's base install
      from tqdm.auto import tqdm
    except ImportError as e:
      raise ImportError("progress=True needs tqdm: pip install 'jaxsparse[experiments]' "
                        "(or pass progress=False)") from e
    epoch_iter = tqdm(epoch_iter, desc=f"{method} {model} {dataset}", unit="epoch",
                      initial=start, total=epochs)
  for epoch, new_state, loss, losses, seconds in epoch_iter:
    if stop_on_nan and not np.isfinite(loss):
      bad = int(np.flatnonzero(~np.isfinite(np.asarray(losses)))[0])
      kept = (f"; the last good checkpoint (after epoch {mngr.latest_step()}) is kept in "
              f"{checkpoint_dir}" if mngr is not None and mngr.latest_step() is not None else "")
      if mngr is not None:
        mngr.close()
      raise FloatingPointError(
          f"loss is {np.asarray(losses)[bad]} at epoch {epoch + 1}, step {bad + 1} of "
          f"{steps_per_epoch} (global step {epoch * steps_per_epoch + bad + 1}); training "
          f"stopped{kept}. Try a smaller learning_rate.")
    state = new_state
    masks = core.get_masks(state.opt_state)
    acc = evaluate(state.params, state.batch_stats, ds.x_test, ds.y_test)
    sp = masks_lib.sparsity(state.params, masks)
    history.append(dict(epoch=epoch + 1, loss=loss, test_accuracy=acc, sparsity=sp,
                        seconds=seconds))
    if progress:
      epoch_iter.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.4f}", sparsity=f"{sp:.3f}")
    if log is not None and not progress:
      log(f"epoch {epoch + 1:3d}  loss {loss:.4f}  test acc {acc:.4f}  sparsity {sp:.4f}  "
          f"{seconds:.2f}s")
    if on_epoch_end is not None:  # before the checkpoint, so that a kill cannot skip a log line
      on_epoch_end(history[-1], state)
    if mngr is not None:
      checkpoint_lib.save(mngr, epoch + 1, state, history=history, config=config)
  if mngr is not None:
    mngr.close()
  masks = core.get_masks(state.opt_state)
  layers = {c.name: dict(shape=list(c.shape), kept=c.kept, total=c.total, sparsity=c.sparsity,
                         sparse=c.sparse)
            for c in masks_lib.count_leaves(state.params, masks)}
  nonzero = sum(int(np.count_nonzero(np.asarray(p))) for p in jax.tree.leaves(state.params))
  times = [h["seconds"] for h in history]
  health = core.get_sparse_state(state.opt_state).health
  skipped = int(health.skipped) if health is not None else 0
  if skipped and log is not None:
    log(f"warning: {skipped} mask update(s) were skipped for non-finite weights or gradients "
        "(each is retried at the next finite step)")
  return dict(config=config, device=str(jax.devices()[0].platform), jax_version=jax.__version__,
              final_test_accuracy=history[-1]["test_accuracy"], final_sparsity=history[-1]["sparsity"],
              nonzero_params=nonzero, total_params=int(sum(p.size for p in jax.tree.leaves(state.params))),
              layers=layers, history=history, first_epoch_seconds=times[0],
              mask_updates_skipped=skipped,
              seconds_per_epoch=float(np.median(times[1:])) if len(times) > 1 else times[0],
              summary=masks_lib.summary(state.params, masks), state=state)
