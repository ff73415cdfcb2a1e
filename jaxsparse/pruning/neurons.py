"""Neuron and channel pruning: data-free merging, activity, output sensitivity, correlation.

Every criterion here removes whole neurons of Dense layers (output columns of an
``(in, out)`` kernel) or whole channels of conv kernels ``(kh, kw, in, out)``, and
builds its masks through :mod:`jaxsparse.pruning.structured`: the
:func:`~jaxsparse.pruning.structured.filters` structure, then
:func:`~jaxsparse.pruning.structured.propagate_channels` along the network's
:class:`~jaxsparse.pruning.structured.ChannelLink` s (e.g.
:func:`~jaxsparse.pruning.structured.mlp_links`), which also removes the neuron's
bias and the next layer's weights that read it. A neuron can be pruned only if it is
the producer of a link: its consumer must be known to remove what reads it, and the
output layer, whose neurons are the classes, is never removed by default (as in
:func:`~jaxsparse.pruning.structured.filter_l1_masks`). Train the result with
``jaxsparse.keep_masks(inner, masks)``.

Criteria give one score per neuron, **higher = keep** (the convention of
:mod:`jaxsparse.pruning.criteria`), as ``{producer kernel name: (C,) array}``;
:func:`neuron_masks` turns them into masks.

* Merge-and-scale (Srinivas & Babu 2015, "Data-free parameter pruning for deep neural
  networks", sec. 3): data-free. Removing neuron j into a neuron i with a nearly equal
  incoming weight vector (bias included) and adding j's outgoing weights to i's costs the
  saliency ``s_ij = <a_j^2> ||W_i - W_j||^2`` (``<a_j^2>``: the mean of the squares of
  j's outgoing weights); the lowest-saliency pair is merged, greedily, until the target
  count is removed. :func:`merge_and_scale` returns new params and masks.
* Activity (Hu et al. 2016, "Network Trimming", eq. 1): APoZ, the average percentage of
  zeros of a neuron's ReLU output over calibration data (prune the highest), and the
  mean absolute activation (prune the lowest). :func:`activation_stats` measures the
  activations where the next layer reads them (with ``flax.linen.intercept_methods``,
  as :func:`jaxsparse.regularizers.ephemeral.activation_sparsity` does), or
  :func:`stats_from_activations` takes activations you computed.
* Output sensitivity (Tartaglione et al. 2018, eq. 2): the sensitivity
  ``S(w) = sum_k alpha_k |dy_k/dw|`` of :func:`jaxsparse.regularizers.penalties.output_sensitivity`
  (the sensitivity regulariser's), summed over each neuron's incoming weights; prune the
  least sensitive.
* Correlation: Pearson correlation of the neurons' activations over calibration data;
  greedily remove the neuron most correlated with another kept one
  (:func:`correlation_scores` defines the rule). :func:`least_squares_compensation` then
  folds the removed neurons into the kept ones (any criterion's mask), by a least-squares
  fit of their activations on the kept ones' over the calibration data.

An activation "sample" is one example at one spatial position: a conv channel's
activations ``(N, H, W, C)`` give ``N * H * W`` samples of each channel, and a Dense
layer reading flattened NHWC features (row ``r`` is channel ``r % C``, the link
convention) gives ``N * H * W`` too.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxsparse.core import distributions as dist
from jaxsparse.core import masks as masks_lib
from jaxsparse.core import transform as core
from jaxsparse.pruning import structured
from jaxsparse.pruning.structured import ChannelLink
from jaxsparse.regularizers import penalties

NeuronScores = Mapping[str, Any]
"""``{producer kernel name: (C,) scores}``, higher = keep."""


# ------------------------------------------------------------------ links and checks


def _check_links(params: Any, links: Sequence[ChannelLink] | ChannelLink,
                 output_layer: str | None = "last") -> list[ChannelLink]:
  """The links as a list; raises naming ``links`` for a missing leaf, a mismatched consumer
  or a producer that is the output layer (unless ``output_layer=None``)."""
  if isinstance(links, ChannelLink):
    links = [links]
  if isinstance(links, (str, bytes)) or not isinstance(links, Sequence) or not links or \
      not all(isinstance(l, ChannelLink) for l in links):
    raise TypeError("links must be a non-empty sequence of structured.ChannelLink "
                    f"(e.g. structured.mlp_links(3)), got {links!r}")
  if output_layer is not None and not isinstance(output_layer, str):
    raise TypeError(f"output_layer must be 'last', a leaf name or None, got {output_layer!r}")
  names = masks_lib.leaf_names(params)
  shapes = dict(zip(names, (jnp.shape(l) for l in jax.tree.leaves(params))))
  out = structured.output_kernel(params) if output_layer == "last" else output_layer
  if output_layer not in (None, "last") and out not in shapes:
    raise ValueError(f"output_layer: '{out}' is not a leaf of params; leaves are {names}")
  for link in links:
    for leaf in (link.producer, link.consumer, *link.per_channel):
      if leaf not in shapes:
        raise ValueError(f"links: leaf '{leaf}' is not in params; leaves are {names}")
    if link.producer == out:
      raise ValueError(f"links: '{link.producer}' is the output layer (its neurons are the "
                       "network's outputs); pass output_layer=None to prune it anyway")
    p, c = shapes[link.producer], shapes[link.consumer]
    if len(p) < 2 or len(c) < 2 or c[-2] % p[-1]:
      raise ValueError(f"links: consumer '{link.consumer}' of shape {c} has an input axis (-2) "
                       f"that is not a multiple of the channels of '{link.producer}' {p}")
  return list(links)


def _check_scores(params: Any, scores: NeuronScores, links: list[ChannelLink]) -> dict:
  if not isinstance(scores, Mapping) or not scores:
    raise TypeError("scores must be a non-empty dict {producer kernel name: (C,) scores}, "
                    f"got {type(scores).__name__}")
  producers = [l.producer for l in links]
  leaves = dict(zip(masks_lib.leaf_names(params), jax.tree.leaves(params)))
  out = {}
  for name, s in scores.items():
    if name not in producers:
      raise ValueError(f"scores: '{name}' is not the producer of any link; producers are "
                       f"{producers}")
    c = jnp.shape(leaves[name])[-1]
    s = np.asarray(s, np.float32)
    if s.shape != (c,):
      raise ValueError(f"scores['{name}'] has shape {s.shape}, expected ({c},): one score per "
                       "output neuron / channel of the kernel")
    out[name] = s
  return out


def neuron_masks(params: Any, scores: NeuronScores, sparsity: float,
                 links: Sequence[ChannelLink] | ChannelLink, *, scope: str = "local",
                 output_layer: str | None = "last") -> Any:
  """Masks keeping the highest-scoring neurons of each scored layer, propagated along ``links``.

  ``scope="local"``: each layer in ``scores`` keeps ``round((1 - sparsity) * C)`` of its
  ``C`` neurons; ``"global"``: one threshold over all of them (only for scores that are
  comparable across layers). The neuron masks go through
  :func:`~jaxsparse.pruning.structured.structured_masks` with the ``filters()`` structure,
  then :func:`~jaxsparse.pruning.structured.propagate_channels`; layers not in ``scores``
  stay dense except for the rows that read removed neurons.
  """
  links = _check_links(params, links, output_layer)
  scores = _check_scores(params, scores, links)
  dist.check_sparsity(sparsity)
  filt = structured.filters()

  def tree_score(name, leaf):
    shape = jnp.shape(leaf)
    if name not in scores:
      return np.zeros(shape, np.float32)
    # Divided by the fan-in, the structure's pooled sum is the neuron's score again.
    return np.broadcast_to(np.asarray(scores[name]) / (np.prod(shape) // shape[-1]), shape)

  names, leaves, treedef = masks_lib.flatten_named(params)
  tree = jax.tree.unflatten(treedef, [tree_score(n, l) for n, l in zip(names, leaves)])
  masks = structured.structured_masks(tree, filt, sparsity, scope=scope,
                                      filter=lambda name, leaf: name in scores)
  return structured.propagate_channels(params, masks, links)


# ------------------------------------------------------------------ merge-and-scale


def _channels(x: np.ndarray, c: int) -> np.ndarray:
  """``(..., k * c)`` -> ``(samples, c)``: the last axis is NHWC-flattened channels (r % c)."""
  return x.reshape(-1, x.shape[-1] // c, c).reshape(-1, c)


def _sq_distances(w_in: np.ndarray) -> np.ndarray:
  sq = np.sum(w_in * w_in, axis=1)
  return np.maximum(sq[:, None] + sq[None, :] - 2.0 * w_in @ w_in.T, 0.0)


def merge_saliency(w_in: Any, w_out: Any) -> np.ndarray:
  """Srinivas & Babu (2015), sec. 3.2: ``s[i, j] = <a_j^2> ||W_i - W_j||^2``, the cost of
  removing neuron j into neuron i.

  ``w_in``: ``(C, d)``, row j the incoming weights of neuron j (bias included);
  ``w_out``: ``(C, m)``, row j its outgoing weights ``a_j``; ``<a_j^2>`` is the mean of
  their squares. The diagonal is ``inf`` (a neuron is not merged into itself).
  """
  w_in, w_out = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
  if w_in.ndim != 2 or w_out.ndim != 2 or w_in.shape[0] != w_out.shape[0]:
    raise ValueError(f"w_in and w_out must be (C, d) and (C, m) with the same C, got "
                     f"{w_in.shape} and {w_out.shape}")
  s = _sq_distances(w_in) * np.mean(w_out * w_out, axis=1)[None, :]
  np.fill_diagonal(s, np.inf)
  return s


def _greedy_merge(w_in: np.ndarray, w_out: np.ndarray, n_remove: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The paper's sec. 3.3 loop: merge the minimum-saliency pair (ties: first in row-major
  order), ``a_i += a_j``, drop j's row and column. Only ``<a_i^2>`` changes (column i of
  the saliency matrix); the incoming weights, hence the distances, stay."""
  w_out = w_out.copy()
  d2 = _sq_distances(w_in)
  a2 = np.mean(w_out * w_out, axis=1)
  alive = np.ones(w_in.shape[0], bool)
  off_diagonal = ~np.eye(w_in.shape[0], dtype=bool)
  for _ in range(n_remove):
    s = np.where(alive[:, None] & alive[None, :] & off_diagonal, d2 * a2[None, :], np.inf)
    i, j = np.unravel_index(np.argmin(s), s.shape)
    w_out[i] += w_out[j]
    w_out[j] = 0.0
    a2[i] = np.mean(w_out[i] * w_out[i])
    alive[j] = False
  return alive, w_out


def merge_and_scale(params: Any, sparsity: float, links: Sequence[ChannelLink] | ChannelLink,
                    *, output_layer: str | None = "last") -> tuple[Any, Any]:
  """Data-free neuron pruning by merging (Srinivas & Babu 2015, sec. 3): ``(params, masks)``.

  For each link, in order (so a consumer's merged weights are the next link's incoming
  weights), removes ``C - round((1 - sparsity) * C)`` neurons of the producer one at a time:
  the pair ``(i, j)`` of live neurons with the least saliency :func:`merge_saliency`
  (incoming vector: the filter ``kernel[..., j]`` and the link's per-channel leaves, e.g.
  the bias, at j) is merged by adding j's outgoing weights (the consumer's input rows of
  channel j, at every flattened position) to i's. If ``W_i == W_j`` the next layer's input
  is unchanged. Exact only when each channel's activation depends on nothing but these
  incoming parameters (no BatchNorm statistics in between). The returned params have the
  merged outgoing weights and every removed weight zeroed; masks as :func:`neuron_masks`.
  """
  links = _check_links(params, links, output_layer)
  s = dist.check_sparsity(sparsity)
  names, leaves, treedef = masks_lib.flatten_named(params)
  index = {n: i for i, n in enumerate(names)}
  leaves = list(leaves)
  keep = {}
  for link in links:
    kernel = np.asarray(leaves[index[link.producer]], np.float64)
    c = kernel.shape[-1]
    k = int(round((1.0 - s) * c))
    if k == 0:
      raise ValueError(f"sparsity={sparsity} would remove every neuron of '{link.producer}' "
                       f"({c} neurons); lower the sparsity")
    w_in = np.concatenate([kernel.reshape(-1, c).T] + [
        np.asarray(leaves[index[n]], np.float64).reshape(c, 1) for n in link.per_channel], 1)
    consumer = leaves[index[link.consumer]]
    shape = jnp.shape(consumer)
    lead, p = int(np.prod(shape[:-2])), shape[-2] // c
    cons = np.asarray(consumer, np.float64).reshape(lead, p, c, shape[-1])
    w_out = cons.transpose(2, 0, 1, 3).reshape(c, -1)
    alive, w_out = _greedy_merge(w_in, w_out, c - k)
    cons = w_out.reshape(c, lead, p, shape[-1]).transpose(1, 2, 0, 3).reshape(shape)
    leaves[index[link.consumer]] = jnp.asarray(cons, jnp.result_type(consumer))
    keep[link.producer] = alive
  params = jax.tree.unflatten(treedef, leaves)
  masks = core.masks_from_fn(params, keep, lambda n, leaf, i: np.broadcast_to(keep[n], leaf.shape))
  masks = structured.propagate_channels(params, masks, links)
  return masks_lib.apply_masks(params, masks), masks


# ------------------------------------------------------------------ activation statistics


class ActivationStats(NamedTuple):
  """Sums over calibration samples of one layer's activations (host float64).

  Attributes:
    count: the number of samples (examples x positions).
    zeros: ``(C,)`` how many samples were exactly zero.
    abs_sum: ``(C,)`` sum of ``|a|``.
    total: ``(C,)`` sum of ``a``.
    outer: ``(C, C)`` sum of ``a a^T`` (for the correlation).
  """
  count: float
  zeros: np.ndarray
  abs_sum: np.ndarray
  total: np.ndarray
  outer: np.ndarray


def _batch_sums(a: jax.Array) -> tuple:
  a = a.astype(jnp.float32)
  return (jnp.float32(a.shape[0]), jnp.sum(a == 0, axis=0, dtype=jnp.float32),
          jnp.sum(jnp.abs(a), axis=0), jnp.sum(a, axis=0), a.T @ a)


def _add(stats: ActivationStats | None, sums: tuple) -> ActivationStats:
  sums = ActivationStats(*(np.asarray(x, np.float64) for x in sums))
  if stats is None:
    return ActivationStats(float(sums.count), *sums[1:])
  return ActivationStats(*(a + b for a, b in zip(stats, sums)))


def stats_from_activations(activations: Mapping[str, Any]) -> dict[str, ActivationStats]:
  """Statistics of activations you computed: ``{producer kernel name: (..., C) array}``.

  The last axis holds the ``C`` neurons/channels; every other axis indexes samples.
  """
  if not isinstance(activations, Mapping) or not activations:
    raise TypeError("activations must be a non-empty dict {producer kernel name: (..., C) "
                    f"array}}, got {type(activations).__name__}")
  out = {}
  for name, a in activations.items():
    if np.ndim(a) < 2 or np.size(a) == 0 or not jnp.issubdtype(jnp.result_type(a), jnp.floating):
      raise ValueError(f"activations['{name}'] must be a non-empty float array (samples..., C), "
                       f"got shape {np.shape(a)} dtype {jnp.result_type(a)}")
    a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
    out[name] = ActivationStats(float(a.shape[0]), np.sum(a == 0, axis=0, dtype=np.float64),
                                np.abs(a).sum(0), a.sum(0), a.T @ a)
  return out


def activation_stats(model: nn.Module, variables: Any, x: Any,
                     links: Sequence[ChannelLink] | ChannelLink, *, batch_size: int = 1000,
                     **apply_kwargs: Any) -> dict[str, ActivationStats]:
  """Each link producer's activations over the calibration inputs ``x``, as its consumer reads them.

  The consumer's input (found with ``flax.linen.intercept_methods``; the consumer's module
  is its kernel's path, e.g. ``"fc2"`` for ``"fc2/kernel"``) is what the network passes on:
  after the ReLU (and pooling, BatchNorm, flatten) that follow the producer, so with a
  ReLU these are the ReLU outputs of Hu et al. 2016. ``x`` is a batch of model inputs
  (leading example axis), fed ``batch_size`` examples at a time; ``apply_kwargs`` go to
  ``model.apply`` (e.g. ``train=False``).
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or \
      batch_size <= 0:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  params = variables.get("params", variables) if isinstance(variables, Mapping) else variables
  links = _check_links(params, links, output_layer=None)
  if not hasattr(x, "shape") or jnp.ndim(x) < 1 or len(x) == 0:
    raise ValueError(f"x: the calibration batch must be a non-empty array with a leading "
                     f"example axis, got {getattr(x, 'shape', type(x).__name__)}")
  shapes = dict(zip(masks_lib.leaf_names(params), (jnp.shape(l) for l in jax.tree.leaves(params))))
  wanted = {l.consumer.rsplit("/", 1)[0]: l for l in links}

  def sums(variables, xb):
    found = {}

    def interceptor(next_fun, args, kwargs, context):
      path = "/".join(str(p) for p in context.module.path)
      if context.method_name == "__call__" and path in wanted and path not in found and args:
        link = wanted[path]
        found[path] = _batch_sums(_channels(args[0], shapes[link.producer][-1]))
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
      model.apply(variables, xb, **apply_kwargs)
    return found

  try:
    found = jax.eval_shape(sums, variables, x[:1])
  except (TypeError, ValueError, flax.errors.FlaxError) as e:
    raise ValueError(f"x: the calibration batch of shape {tuple(x.shape)} does not fit the "
                     f"model: {e}") from e
  missing = [p for p in wanted if p not in found]
  if missing:
    raise ValueError(f"links: no module at path '{missing[0]}' (the consumer "
                     f"'{wanted[missing[0]].consumer}') was called by the model")
  step = jax.jit(sums)
  stats: dict[str, ActivationStats | None] = {l.producer: None for l in links}
  for i in range(0, len(x), batch_size):
    for path, s in step(variables, x[i:i + batch_size]).items():
      stats[wanted[path].producer] = _add(stats[wanted[path].producer], s)
  return stats


# ------------------------------------------------------------------ activity criteria


def apoz(stats: ActivationStats) -> np.ndarray:
  """Hu et al. 2016, eq. 1: the fraction of a neuron's samples that are exactly zero."""
  return stats.zeros / stats.count


def apoz_scores(stats: Mapping[str, ActivationStats]) -> dict[str, np.ndarray]:
  """APoZ as keep scores: ``-APoZ`` (the neurons most often zero are pruned first)."""
  return {name: -apoz(s) for name, s in stats.items()}


def activation_magnitude_scores(stats: Mapping[str, ActivationStats]) -> dict[str, np.ndarray]:
  """Mean ``|a|`` over the calibration samples as keep scores (the weakest are pruned first)."""
  return {name: s.abs_sum / s.count for name, s in stats.items()}


def _constant(stats: ActivationStats, eps: float) -> tuple[np.ndarray, np.ndarray]:
  """``(cov, constant)``: the covariance; which neurons have variance ``<= eps`` x the largest."""
  mean = stats.total / stats.count
  cov = stats.outer / stats.count - np.outer(mean, mean)
  var = np.maximum(np.diag(cov), 0.0)
  return cov, var <= eps * max(float(var.max()), eps)


def activation_correlation(stats: ActivationStats, eps: float = 1e-12) -> np.ndarray:
  """Pearson correlation ``(C, C)`` of the neurons' activations over the samples.

  A neuron whose activation is constant (variance ``<= eps`` times the largest, e.g. a dead
  ReLU) has no defined correlation: its row and column are 0 (1 on the diagonal).
  """
  cov, const = _constant(stats, eps)
  sd = np.sqrt(np.where(const, 1.0, np.diag(cov)))
  r = np.clip(cov / np.outer(sd, sd), -1.0, 1.0)
  r[const, :] = 0.0
  r[:, const] = 0.0
  np.fill_diagonal(r, 1.0)
  return r


def correlation_order(r: Any, constant: Any = None) -> np.ndarray:
  """The removal order of :func:`correlation_scores`: entry j is the step at which neuron j
  is removed (the last survivor gets ``C - 1``). ``constant`` (bool ``(C,)``) neurons go
  first, in index order; then the greedy rule on ``|r|``."""
  r = np.abs(np.asarray(r, np.float64)).copy()
  c = r.shape[0]
  np.fill_diagonal(r, -np.inf)
  order = np.full(c, c - 1, np.int64)
  alive = np.ones(c, bool)
  first = [] if constant is None else list(np.flatnonzero(constant))
  for t in range(c - 1):
    if first:
      j = int(first.pop(0))
    else:
      worst = np.where(alive, np.max(np.where(alive[None, :], r, -np.inf), axis=1), -np.inf)
      j = int(np.argmax(worst))
    order[j] = t
    alive[j] = False
  return order


def correlation_scores(stats: Mapping[str, ActivationStats],
                       eps: float = 1e-12) -> dict[str, np.ndarray]:
  """Correlation pruning's keep scores: the step of each neuron's removal by this rule.

  Rule: first remove the neurons whose activation is constant over the calibration samples
  (a dead ReLU; the next layer's bias can hold a constant), in index order; then, among
  the kept neurons, remove the one with the highest ``|r|`` (Pearson, over the calibration
  samples, :func:`activation_correlation`) to any other kept neuron (ties: the lower
  index), and repeat. Pruning ``n`` neurons with these scores and ``scope="local"``
  removes exactly the first ``n`` the rule removes. The scores are ranks: use them per layer.
  """
  return {name: correlation_order(activation_correlation(s, eps),
                                  _constant(s, eps)[1]).astype(np.float32)
          for name, s in stats.items()}


def least_squares_compensation(params: Any, masks: Any, stats: Mapping[str, ActivationStats],
                               links: Sequence[ChannelLink] | ChannelLink, *,
                               ridge: float = 1e-6) -> Any:
  """Folds removed neurons into the kept ones by least squares: new params for ``masks``.

  For each link with removed neurons R and kept neurons K (from the producer's mask), the
  activations ``h_R ~= B^T h_K + c`` are fitted over the calibration samples from
  ``stats`` (``B = (S_KK + ridge * mean(diag S_KK) I)^-1 S_KR``, ``S`` the covariance,
  ``c = mu_R - B^T mu_K``); the consumer's weights become ``a_K + B a_R`` and its bias (the
  leaf next to its kernel, if any) takes ``sum c_r a_r``, so its input changes only by the
  fit's residual. As merge-and-scale does for equal neurons, with the data's linear
  dependencies. For a conv consumer the bias term is exact away from SAME-padding borders.
  Returns params with the removed weights zeroed (apply with the same ``masks``).
  """
  links = _check_links(params, links, output_layer=None)
  masks_lib.check_masks(params, masks)
  if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not ridge >= 0:
    raise ValueError(f"ridge must be a number >= 0, got {ridge!r}")
  names, leaves, treedef = masks_lib.flatten_named(params)
  index = {n: i for i, n in enumerate(names)}
  leaves, mask_leaves = list(leaves), jax.tree.leaves(masks)
  for link in links:
    if link.producer not in stats:
      raise ValueError(f"stats: no statistics for '{link.producer}'; have {sorted(stats)}")
    ip = index[link.producer]
    gone = np.asarray(structured.removed_channels(jnp.broadcast_to(
        jnp.asarray(mask_leaves[ip], bool), jnp.shape(leaves[ip]))))
    c = gone.shape[0]
    st = stats[link.producer]
    if st.total.shape != (c,):
      raise ValueError(f"stats['{link.producer}'] has {st.total.shape[0]} channels, the kernel {c}")
    if not gone.any():
      continue
    mu = st.total / st.count
    cov = st.outer / st.count - np.outer(mu, mu)
    kk = cov[np.ix_(~gone, ~gone)]
    reg = ridge * max(float(np.mean(np.diag(kk))), 1e-12)
    b = np.linalg.solve(kk + reg * np.eye(kk.shape[0]), cov[np.ix_(~gone, gone)])  # (K, R)
    icpt = mu[gone] - b.T @ mu[~gone]                                                # (R,)
    consumer = leaves[index[link.consumer]]
    shape = jnp.shape(consumer)
    a = np.asarray(consumer, np.float64).reshape(int(np.prod(shape[:-2])), shape[-2] // c, c,
                                                   shape[-1])
    a_r = a[:, :, gone, :]
    a[:, :, ~gone, :] += np.einsum("kr,lpro->lpko", b, a_r)
    a[:, :, gone, :] = 0.0
    leaves[index[link.consumer]] = jnp.asarray(a.reshape(shape), jnp.result_type(consumer))
    bias = link.consumer.rsplit("/", 1)[0] + "/bias"
    if bias in index:
      shift = np.einsum("r,lpro->o", icpt, a_r)
      leaves[index[bias]] = jnp.asarray(np.asarray(leaves[index[bias]], np.float64) + shift,
                                        jnp.result_type(leaves[index[bias]]))
  return masks_lib.apply_masks(jax.tree.unflatten(treedef, leaves), masks)


# ------------------------------------------------------------------ output sensitivity


def sensitivity_scores(params: Any, output_fn: Callable[[Any, Any], jax.Array], inputs: Any,
                       links: Sequence[ChannelLink] | ChannelLink, *,
                       alpha: jax.Array | None = None,
                       output_layer: str | None = "last") -> dict[str, jax.Array]:
  """Output sensitivity per neuron: Tartaglione et al. 2018's ``S(w) = sum_k alpha_k |dy_k/dw|``
  (eq. 2, :func:`jaxsparse.regularizers.penalties.output_sensitivity`), summed over each
  producer neuron's incoming weights (the ``filters()`` structure's pool). ``output_fn(params,
  inputs)`` is the network output ``y`` (e.g. softmax probabilities), ``inputs`` a calibration
  batch."""
  links = _check_links(params, links, output_layer)
  if not callable(output_fn):
    raise TypeError(f"output_fn must be a callable (params, inputs) -> outputs, got {output_fn!r}")
  if not jax.tree.leaves(inputs):
    raise ValueError(f"inputs: the sensitivity needs a calibration batch, got {inputs!r}")
  try:
    jax.eval_shape(output_fn, params, inputs)
  except (TypeError, ValueError, flax.errors.FlaxError) as e:
    raise ValueError(f"inputs: the calibration batch does not fit output_fn: {e}") from e
  producers = [l.producer for l in links]
  pool = structured.filters().pool

  @jax.jit
  def scores(params, inputs, alpha):
    sens = penalties.output_sensitivity(output_fn, params, inputs, alpha)
    by_name = dict(zip(masks_lib.leaf_names(sens), jax.tree.leaves(sens)))
    return {name: pool(by_name[name]) for name in producers}

  return scores(params, inputs, alpha)


__all__ = [
    "neuron_masks", "merge_saliency", "merge_and_scale", "ActivationStats",
    "stats_from_activations", "activation_stats", "apoz", "apoz_scores",
    "activation_magnitude_scores", "activation_correlation", "correlation_order",
    "correlation_scores", "least_squares_compensation", "sensitivity_scores",
]
