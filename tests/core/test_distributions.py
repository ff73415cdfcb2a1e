"""Layer densities: exact kept counts, ERK's dense fallback, leaf selection errors."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from jaxsparse.core import distributions as dist

shapes = st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64)), min_size=1, max_size=5)


def make_params(shape_list):
  return {f"layer{i}": {"kernel": np.zeros(s, np.float32), "bias": np.zeros(s[-1], np.float32)}
          for i, s in enumerate(shape_list)}


@given(shapes, st.floats(0.0, 0.99), st.sampled_from(["uniform", "er", "erk"]))
def test_total_kept_is_exact(shape_list, sparsity, distribution):
  params = make_params(shape_list)
  counts = dist.kept_counts(params, sparsity, distribution=distribution)
  sizes = {f"layer{i}/kernel": int(np.prod(s)) for i, s in enumerate(shape_list)}
  assert set(counts) == set(sizes)
  assert sum(counts.values()) == round((1 - sparsity) * sum(sizes.values()))
  dens = dist.densities({k: s for k, s in zip(sizes, shape_list)}, sparsity, distribution)
  for k, c in counts.items():
    assert 0 <= c <= sizes[k]
    assert abs(c - dens[k] * sizes[k]) <= 1.0 + 1e-6


def test_erk_dense_fallback_and_resolve():
  # A tiny output layer would get density > 1: it becomes dense and eps is re-solved.
  shapes = {"a": (784, 300), "b": (300, 100), "c": (100, 10)}
  dens = dist.densities(shapes, 0.9, "erk")
  assert dens["c"] == 1.0
  sizes = {k: np.prod(s) for k, s in shapes.items()}
  eps = (0.1 * sum(sizes.values()) - sizes["c"]) / sum(sum(s) / np.prod(s) * sizes[k]
                                                       for k, s in shapes.items() if k != "c")
  assert dens["a"] == pytest.approx(eps * (784 + 300) / (784 * 300))
  assert dens["b"] == pytest.approx(eps * 400 / 30000)
  assert sum(dens[k] * sizes[k] for k in shapes) == pytest.approx(0.1 * sum(sizes.values()))


def test_erk_uses_all_dims_er_only_last_two():
  shapes = {"conv": (3, 3, 16, 32), "fc": (512, 10)}
  erk = dist.densities(shapes, 0.5, "erk")
  er = dist.densities(shapes, 0.5, "er")
  assert erk["conv"] / erk["fc"] == pytest.approx(((3 + 3 + 16 + 32) / (9 * 16 * 32)) / (522 / 5120))
  assert er["conv"] / er["fc"] == pytest.approx(((16 + 32) / (16 * 32)) / (522 / 5120))


def test_uniform_and_overrides():
  params = make_params([(10, 10), (10, 20)])
  counts = dist.kept_counts(params, 0.5, overrides={"layer1": 0.9})
  assert counts == {"layer0/kernel": 50, "layer1/kernel": 20}


def test_keep_dense_and_custom_filter():
  params = make_params([(10, 10), (10, 20), (20, 5)])
  counts = dist.kept_counts(params, 0.5, keep_dense=["layer0", "layer2/kernel"])
  assert list(counts) == ["layer1/kernel"]
  counts = dist.kept_counts(params, 0.5, filter=lambda name, leaf: name.endswith("bias"))
  assert list(counts) == ["layer0/bias", "layer1/bias", "layer2/bias"]


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(bad):
  with pytest.raises(ValueError, match="sparsity"):
    dist.kept_counts(make_params([(4, 4)]), bad)


def test_filter_selecting_nothing():
  with pytest.raises(ValueError, match="filter: selected no leaf"):
    dist.kept_counts(make_params([(4, 4)]), 0.5, filter=lambda n, l: False)


def test_unknown_override_and_keep_dense():
  with pytest.raises(ValueError, match="overrides: 'nope'"):
    dist.kept_counts(make_params([(4, 4)]), 0.5, overrides={"nope": 0.5})
  with pytest.raises(ValueError, match="keep_dense: 'nope'"):
    dist.kept_counts(make_params([(4, 4)]), 0.5, keep_dense=["nope"])


def test_non_float_leaf_selected():
  params = {"w": np.zeros((4, 4), np.int32)}
  with pytest.raises(ValueError, match="filter: selected leaf 'w' has dtype int32"):
    dist.kept_counts(params, 0.5)


def test_bad_distribution_name():
  with pytest.raises(ValueError, match="distribution"):
    dist.kept_counts(make_params([(4, 4)]), 0.5, distribution="erdos")
