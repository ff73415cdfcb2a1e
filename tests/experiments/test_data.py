"""Tests of experiments.data: real digits and Fashion-MNIST, hand-written IDX files, TFDS mocks."""
import gzip
import os
import struct
import sys
import types

import jax
import numpy as np
import pytest

from experiments import data

FMNIST_DIR = data.FASHION_MNIST_DIR


def _fmnist_present():
  return data.find_idx_files(FMNIST_DIR) is not None


needs_fmnist = pytest.mark.skipif(
    not _fmnist_present(),
    reason=f"Fashion-MNIST IDX files not in {FMNIST_DIR} "
           "(apt-get install -y dataset-fashion-mnist)")


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
  """Hand-rolled IDX encoder (independent of the code under test)."""
  dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
  header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
  return header + np.asarray(array).astype(dtype).tobytes()


def _write(path, payload: bytes, compress: bool):
  if compress:
    path = str(path) + ".gz"
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)
  return path


def _tiny_mnist_dir(tmp_path, compress: bool, n_train=5, n_test=3):
  """Writes a 4-file MNIST-layout dataset of 4x3 images; returns the raw uint8 arrays."""
  rng = np.random.default_rng(42)
  arrays = {
      "x_train": rng.integers(0, 256, (n_train, 4, 3), dtype=np.uint8),
      "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
      "x_test": rng.integers(0, 256, (n_test, 4, 3), dtype=np.uint8),
      "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  arrays["x_train"][0, 0, 0], arrays["x_train"][0, 0, 1] = 0, 255  # Both ends of the range.
  for key, base in data.FASHION_MNIST_FILES.items():
    _write(tmp_path / base, _idx_bytes(arrays[key]), compress)
  return arrays


@pytest.fixture
def no_tfds(monkeypatch):
  """Makes `import tensorflow_datasets` fail, whatever is installed."""
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


# ------------------------------------------------------------------ digits


def test_digits_shapes_dtypes_range():
  ds = data.load_dataset("digits")
  assert ds.name == "digits" and ds.num_classes == 10 and ds.input_shape == (8, 8, 1)
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.y_train.shape == (1437,) and ds.y_test.shape == (360,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  x = np.concatenate([ds.x_train, ds.x_test])
  assert x.min() == 0.0 and x.max() == 1.0
  # Pixels were integers 0..16 divided by 16.
  np.testing.assert_array_equal(x * 16, np.round(x * 16))
  assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == set(range(10))


def test_digits_is_a_partition_of_sklearn_digits():
  from sklearn.datasets import load_digits
  ref = load_digits()
  ds = data.load_dataset("digits", seed=3)
  ref_rows = {(r.tobytes(), int(t)) for r, t in zip((ref.images / 16).astype(np.float32), ref.target)}
  got = [(x[..., 0].tobytes(), int(y)) for x, y in zip(np.concatenate([ds.x_train, ds.x_test]),
                                                        np.concatenate([ds.y_train, ds.y_test]))]
  assert len(got) == 1797 and set(got) == ref_rows


def test_digits_split_deterministic_by_seed():
  a, b, c = (data.load_dataset("digits", seed=s) for s in (0, 0, 1))
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.y_test, c.y_test)


def test_digits_split_is_stratified():
  ds = data.load_dataset("digits", seed=7)
  y_all = np.concatenate([ds.y_train, ds.y_test])
  expected = np.bincount(y_all) * 360 / 1797
  assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - expected) <= 1)


def test_digits_rejects_tfds_source():
  with pytest.raises(ValueError, match="source"):
    data.load_dataset("digits", source="tfds")


def test_unknown_name_and_bad_source():
  with pytest.raises(ValueError, match=r"known names.*digits.*fashion_mnist"):
    data.load_dataset("mnist3d")
  with pytest.raises(ValueError, match="source"):
    data.load_dataset("digits", source="internet")
  assert set(data.DATASETS) == {"digits", "fashion_mnist", "cifar10", "cifar100"}


# ------------------------------------------------------------------ real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
  if not _fmnist_present():
    pytest.skip(f"Fashion-MNIST IDX files not in {FMNIST_DIR} "
                "(apt-get install -y dataset-fashion-mnist)")
  return data.load_dataset("fashion_mnist", source="local")


def test_fashion_mnist_real_files(fmnist):
  assert fmnist.x_train.shape == (60000, 28, 28, 1) and fmnist.x_test.shape == (10000, 28, 28, 1)
  assert fmnist.input_shape == (28, 28, 1) and fmnist.num_classes == 10
  assert fmnist.x_train.dtype == np.float32 and fmnist.y_train.dtype == np.int32
  assert fmnist.x_train.min() == 0.0 and fmnist.x_train.max() == 1.0
  assert fmnist.y_train.min() == 0 and fmnist.y_train.max() == 9
  # Fashion-MNIST is exactly balanced: 6000 train and 1000 test images per class.
  np.testing.assert_array_equal(np.bincount(fmnist.y_train), np.full(10, 6000))
  np.testing.assert_array_equal(np.bincount(fmnist.y_test), np.full(10, 1000))


@needs_fmnist
def test_fashion_mnist_default_dir_matches_explicit_data_dir(fmnist):
  ds = data.load_dataset("fashion_mnist", data_dir=FMNIST_DIR)
  np.testing.assert_array_equal(ds.y_test, fmnist.y_test)
  np.testing.assert_array_equal(ds.x_test, fmnist.x_test)


# ------------------------------------------------------------------ IDX parsing


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_idx_dataset_round_trip(tmp_path, compress):
  raw = _tiny_mnist_dir(tmp_path, compress)
  ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), source="local")
  assert ds.x_train.shape == (5, 4, 3, 1) and ds.x_test.shape == (3, 4, 3, 1)
  assert ds.input_shape == (4, 3, 1)
  np.testing.assert_array_equal(ds.x_train[..., 0], raw["x_train"].astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.x_test[..., 0], raw["x_test"].astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.y_train, raw["y_train"])
  np.testing.assert_array_equal(ds.y_test, raw["y_test"])
  assert ds.x_train[0, 0, 0, 0] == 0.0 and ds.x_train[0, 0, 1, 0] == 1.0


@pytest.mark.parametrize("type_code", [0x08, 0x0B, 0x0C, 0x0D])
def test_read_idx_dtypes_and_byte_order(tmp_path, type_code):
  array = np.arange(-6, 18).reshape(2, 3, 4) * (300 if type_code in (0x0B, 0x0C) else 1)
  if type_code == 0x08:
    array = np.abs(array)
  path = _write(tmp_path / "a.idx", _idx_bytes(array, type_code), compress=False)
  out = data.read_idx(path)
  assert out.shape == (2, 3, 4) and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


def test_gzip_detected_by_content_not_name(tmp_path):
  path = tmp_path / "labels-no-suffix"
  path.write_bytes(gzip.compress(_idx_bytes(np.array([3, 1, 4], np.uint8))))
  np.testing.assert_array_equal(data.read_idx(path, magic=data.IDX_LABELS_MAGIC), [3, 1, 4])


def test_bad_magic_names_the_file(tmp_path):
  _tiny_mnist_dir(tmp_path, compress=True)
  labels = tmp_path / (data.FASHION_MNIST_FILES["y_test"] + ".gz")
  # An images file where labels are expected: magic 0x803 instead of 0x801.
  labels.write_bytes(gzip.compress(_idx_bytes(np.zeros((3, 2, 2), np.uint8))))
  with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*0x00000803.*0x00000801"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path), source="local")


def test_garbage_header_names_the_file(tmp_path):
  path = tmp_path / "junk.idx"
  path.write_bytes(b"\x12\x34\x56\x78" + bytes(20))
  with pytest.raises(ValueError, match=r"junk\.idx.*magic"):
    data.read_idx(path)


@pytest.mark.parametrize("delta", [-1, 1], ids=["truncated", "trailing"])
def test_wrong_size_names_the_file(tmp_path, delta):
  payload = _idx_bytes(np.zeros((2, 3, 3), np.uint8))
  payload = payload[:-1] if delta < 0 else payload + b"\x00"
  path = _write(tmp_path / "sized.idx", payload, compress=False)
  with pytest.raises(ValueError, match=r"sized\.idx.*\(2, 3, 3\)"):
    data.read_idx(path)


def test_image_label_count_mismatch(tmp_path):
  _tiny_mnist_dir(tmp_path, compress=False)
  _write(tmp_path / data.FASHION_MNIST_FILES["y_train"], _idx_bytes(np.zeros(4, np.uint8)), False)
  with pytest.raises(ValueError, match="5 images but 4 labels"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path), source="local")


# ------------------------------------------------------------------ missing data


def _assert_helpful(message: str, directory: str):
  assert "dataset-fashion-mnist" in message
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert "data_dir" in message and directory in message
  assert "TFDS" in message and "pip install tensorflow-datasets" in message


@pytest.mark.parametrize("source", ["auto", "local"])
def test_missing_data_error_is_helpful(tmp_path, no_tfds, source):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError) as info:
    data.load_dataset("fashion_mnist", data_dir=missing, source=source)
  _assert_helpful(str(info.value), missing)


def test_incomplete_dir_is_missing(tmp_path, no_tfds):
  _tiny_mnist_dir(tmp_path, compress=False)
  os.remove(tmp_path / data.FASHION_MNIST_FILES["x_test"])
  with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path))


def test_tfds_load_failure_becomes_helpful_error(tmp_path, monkeypatch):
  fake = types.ModuleType("tensorflow_datasets")

  def load(*args, **kwargs):
    raise ConnectionError("no route to host")

  fake.load = load
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  with pytest.raises(FileNotFoundError, match="no route to host") as info:
    data.load_dataset("fashion_mnist", data_dir=str(tmp_path), source="auto")
  _assert_helpful(str(info.value), str(tmp_path))
  assert isinstance(info.value.__cause__, ConnectionError)


def test_local_files_win_over_tfds_in_auto_mode(tmp_path, monkeypatch):
  fake = types.ModuleType("tensorflow_datasets")
  fake.load = lambda *a, **k: pytest.fail("TFDS must not be used when local files exist")
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  _tiny_mnist_dir(tmp_path, compress=True)
  assert data.load_dataset("fashion_mnist", data_dir=str(tmp_path)).x_train.shape[0] == 5


# ------------------------------------------------------------------ TFDS (mocked)


@pytest.mark.parametrize("source", ["tfds", "auto"])
def test_tfds_path_with_mock_data(tmp_path, source):
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow", reason="TFDS's mock_data needs TensorFlow (tensorflow-cpu)")
  with tfds.testing.mock_data(num_examples=17):
    # data_dir is an empty directory, so "auto" has to fall back to TFDS.
    ds = data.load_dataset("fashion_mnist", data_dir=str(tmp_path), source=source)
  assert ds.x_train.shape == (17, 28, 28, 1) and ds.x_test.shape == (17, 28, 28, 1)
  assert ds.y_train.shape == (17,) and ds.y_test.shape == (17,)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert ds.x_train.std() > 0.1  # Random uint8 pixels, scaled.
  np.testing.assert_array_equal(ds.x_train * 255, np.round(ds.x_train * 255))
  assert 0 <= ds.y_train.min() and ds.y_train.max() <= 9
  assert ds.input_shape == (28, 28, 1) and ds.num_classes == 10


# ------------------------------------------------------------------ batching


def test_iterate_batches_covers_epoch_once():
  x = np.arange(10)[:, None] * np.ones((1, 3))
  y = np.arange(10)
  batches = list(data.iterate_batches(x, y, 3, rng=np.random.default_rng(0)))
  assert [b[0].shape for b in batches] == [(3, 3)] * 3
  seen = np.concatenate([b[1] for b in batches])
  assert len(set(seen)) == 9 and not np.array_equal(seen, np.arange(9))  # Shuffled, no repeats.
  for xb, yb in batches:
    np.testing.assert_array_equal(xb[:, 0], yb)  # x and y stay paired.
  full = list(data.iterate_batches(x, y, 3, rng=None, drop_remainder=False))
  np.testing.assert_array_equal(np.concatenate([b[1] for b in full]), y)
  assert [len(b[1]) for b in full] == [3, 3, 3, 1]


def test_iterate_batches_seeded_reproducible():
  x, y = np.arange(20), np.arange(20)
  a = [b[1] for b in data.iterate_batches(x, y, 4, rng=np.random.default_rng(5))]
  b = [b[1] for b in data.iterate_batches(x, y, 4, rng=np.random.default_rng(5))]
  np.testing.assert_array_equal(np.stack(a), np.stack(b))


@pytest.mark.parametrize("bad", [0, -2, 2.5, True])
def test_bad_batch_size_named(bad):
  with pytest.raises(ValueError, match="batch_size"):
    data.iterate_batches(np.zeros(4), np.zeros(4), bad)  # Raises before iteration.
  with pytest.raises(ValueError, match="batch_size"):
    data.epoch_batches(np.zeros(4), np.zeros(4), bad, 0)


def test_epoch_batches_too_large_and_length_mismatch():
  with pytest.raises(ValueError, match="batch_size"):
    data.epoch_batches(np.zeros(4), np.zeros(4), 5, 0)
  with pytest.raises(ValueError, match="same length"):
    data.epoch_batches(np.zeros(4), np.zeros(3), 2, 0)


@pytest.mark.parametrize("key_or_seed", [None, 3, "jax"])
def test_epoch_batches_shapes_and_pairing(key_or_seed):
  if key_or_seed == "jax":
    key_or_seed = jax.random.key(3)
  x = np.arange(23, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
  y = np.arange(23, dtype=np.int32)
  xb, yb = data.epoch_batches(x, y, 5, key_or_seed)
  assert xb.shape == (4, 5, 2, 2) and yb.shape == (4, 5)
  np.testing.assert_array_equal(np.asarray(xb)[:, :, 0, 0], np.asarray(yb))
  flat = np.asarray(yb).ravel()
  assert len(set(flat.tolist())) == 20
  if key_or_seed is None:
    np.testing.assert_array_equal(flat, np.arange(20))
  else:
    assert not np.array_equal(flat, np.arange(20))


def test_epoch_batches_jits_with_a_key():
  x, y = np.arange(12, dtype=np.float32), np.arange(12)
  fn = jax.jit(lambda k: data.epoch_batches(x, y, 4, k))
  xb, yb = fn(jax.random.key(0))
  assert xb.shape == (3, 4)
  np.testing.assert_array_equal(np.sort(np.asarray(yb).ravel()), np.arange(12))
