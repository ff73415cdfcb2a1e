"""Small image-classification datasets as numpy arrays, and batch iterators.

Every dataset comes back as a :class:`Dataset`: float32 images in ``[0, 1]``
of shape ``(N, H, W, C)`` (NHWC; ``C`` = 1 for grayscale, 3 for CIFAR) and
int32 labels. Datasets are looked up by name in :data:`DATASETS`:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images), split
  1437/360 with a stratified, seeded split. Needs no file and no network.
* ``"fashion_mnist"``: the 70000 28x28 Fashion-MNIST images, read from the
  four IDX files (gzip or not) in ``data_dir`` or, by default, in
  ``/usr/share/datasets/fashion-mnist/`` (Debian package
  ``dataset-fashion-mnist``); or from TensorFlow Datasets when online.
* ``"cifar10"`` / ``"cifar100"``: CIFAR-10 / CIFAR-100 (fine labels), 50000
  train and 10000 test 32x32x3 images, through TensorFlow Datasets only
  (``tfds.load``; the first use downloads them and needs internet, later runs
  read TFDS's cache; ``data_dir`` is TFDS's data folder).

Example::

  ds = load_dataset("digits", seed=0)
  rng = np.random.default_rng(0)
  for xb, yb in iterate_batches(ds.x_train, ds.y_train, 128, rng=rng):
    ...
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

SOURCES = ("auto", "local", "tfds")
"""Valid ``source`` values: ``"local"`` files only, ``"tfds"`` only, or ``"auto"`` (local, then TFDS)."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where the Debian package ``dataset-fashion-mnist`` installs the IDX files."""

FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
"""Base names of the four Fashion-MNIST IDX files (each may also end in ``.gz``)."""

IDX_LABELS_MAGIC = 0x00000801
IDX_IMAGES_MAGIC = 0x00000803

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class Dataset:
  """A train/test split of an image-classification dataset.

  Attributes:
    name: the registry name (a key of :data:`DATASETS`).
    x_train: float32 images in [0, 1], shape ``(N_train, H, W, C)``.
    y_train: int32 labels in ``[0, num_classes)``, shape ``(N_train,)``.
    x_test: float32 images, shape ``(N_test, H, W, C)``.
    y_test: int32 labels, shape ``(N_test,)``.
    num_classes: number of classes.
    input_shape: shape of one image, ``(H, W, C)``.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  input_shape: tuple[int, ...]

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def _make_dataset(name: str, x_train, y_train, x_test, y_test, num_classes: int) -> Dataset:
  """Casts to the canonical dtypes/layout (float32 NHWC in [0, 1], int32) and builds a Dataset."""

  def images(x):
    x = np.asarray(x, np.float32)
    return x[..., None] if x.ndim == 3 else x

  x_train, x_test = images(x_train), images(x_test)
  return Dataset(
      name=name,
      x_train=x_train,
      y_train=np.asarray(y_train, np.int32),
      x_test=x_test,
      y_test=np.asarray(y_test, np.int32),
      num_classes=num_classes,
      input_shape=tuple(x_train.shape[1:]),
  )


# ------------------------------------------------------------------ IDX files


def read_idx(path: str | os.PathLike, *, magic: int | None = None) -> np.ndarray:
  """Reads one IDX file (the MNIST format), gzip-compressed or not.

  The format: two zero bytes, a type code byte, a rank byte, ``rank``
  big-endian uint32 dimensions, then the row-major data.

  Args:
    path: the file; compression is detected from its first bytes, not its name.
    magic: when given, the exact magic number required, e.g.
      :data:`IDX_IMAGES_MAGIC` (0x00000803) or :data:`IDX_LABELS_MAGIC` (0x00000801).

  Returns:
    The array, in native byte order.

  Raises:
    ValueError: naming ``path`` when the header is invalid or the data size
      does not match the header's dimensions.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      raw = gzip.decompress(raw)
    except (OSError, EOFError) as err:
      raise ValueError(f"IDX file {path!r}: corrupt gzip data ({err}).") from err
  if len(raw) < 4:
    raise ValueError(f"IDX file {path!r}: too short ({len(raw)} bytes) to hold a header.")
  found = int.from_bytes(raw[:4], "big")
  if magic is not None and found != magic:
    raise ValueError(f"IDX file {path!r}: bad magic number 0x{found:08X}; expected 0x{magic:08X}.")
  type_code, ndim = raw[2], raw[3]
  if raw[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
    raise ValueError(f"IDX file {path!r}: bad magic number 0x{found:08X} (expected 0x0000TTNN "
                     "with a known type code TT and rank NN, e.g. 0x00000803 for images).")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"IDX file {path!r}: truncated header ({len(raw)} bytes, need {header}).")
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(f"IDX file {path!r}: header says shape {dims} ({expected} data bytes) but "
                     f"the file has {len(raw) - header} data bytes.")
  data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


def find_idx_files(directory: str | os.PathLike) -> dict[str, str] | None:
  """Paths of the four Fashion-MNIST IDX files in ``directory``, or None if any is missing.

  For each base name in :data:`FASHION_MNIST_FILES` the uncompressed file is
  preferred, then the ``.gz`` one.
  """
  directory = os.fspath(directory)
  found = {}
  for key, base in FASHION_MNIST_FILES.items():
    for candidate in (base, base + ".gz"):
      path = os.path.join(directory, candidate)
      if os.path.isfile(path):
        found[key] = path
        break
    else:
      return None
  return found


def load_idx_dataset(directory: str | os.PathLike, *, name: str = "fashion_mnist",
                     num_classes: int = 10) -> Dataset:
  """Loads an MNIST-layout dataset from the four IDX files in ``directory``.

  Raises:
    FileNotFoundError: when a file is missing.
    ValueError: naming the file when its magic number or size is wrong, or
      when the image and label counts disagree.
  """
  paths = find_idx_files(directory)
  if paths is None:
    raise FileNotFoundError(f"{os.fspath(directory)!r} lacks some of the IDX files "
                            f"{sorted(FASHION_MNIST_FILES.values())} (each may end in .gz).")
  arrays = {}
  for key, path in paths.items():
    magic = IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC
    arrays[key] = read_idx(path, magic=magic)
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if len(x) != len(y):
      raise ValueError(f"IDX files {paths[f'x_{split}']!r} and {paths[f'y_{split}']!r}: "
                       f"{len(x)} images but {len(y)} labels.")
  return _make_dataset(
      name,
      arrays["x_train"] / np.float32(255.0),
      arrays["y_train"],
      arrays["x_test"] / np.float32(255.0),
      arrays["y_test"],
      num_classes,
  )


# ------------------------------------------------------------------ TFDS


def _tfds_split_to_numpy(tfds: Any, ds: Any) -> tuple[np.ndarray, np.ndarray]:
  """One ``as_supervised`` TFDS split as a pair of numpy arrays.

  Batches the whole split by its known cardinality rather than with
  ``tfds.load(..., batch_size=-1)``: the latter batches by the split size in
  the dataset's metadata and, where that is absent (as under
  ``tfds.testing.mock_data``), by ``sys.maxsize``, which aborts the process in
  TensorFlow 2.21.
  """
  n = int(ds.cardinality())
  if n > 0:
    x, y = tfds.as_numpy(ds.batch(n).get_single_element())
    return np.asarray(x), np.asarray(y)
  pairs = list(tfds.as_numpy(ds))
  if not pairs:
    raise ValueError("TFDS returned an empty split.")
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def load_tfds_dataset(tfds_name: str, *, name: str, num_classes: int,
                      data_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads an image dataset's train and test splits with TensorFlow Datasets.

  ``tensorflow_datasets`` (and TensorFlow) are imported here, so the rest of
  jaxsparse never needs them. The first call downloads the data (internet).
  ``data_dir`` is TFDS's own ``data_dir`` (the folder holding ``<tfds_name>/``);
  None = TFDS's default (``~/tensorflow_datasets`` or ``$TFDS_DATA_DIR``).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
  splits = {}
  for split in ("train", "test"):
    ds = tfds.load(tfds_name, split=split, as_supervised=True, **kwargs)
    splits[split] = _tfds_split_to_numpy(tfds, ds)
  (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
  return _make_dataset(name, x_train / np.float32(255.0), y_train, x_test / np.float32(255.0),
                       y_test, num_classes)


# ------------------------------------------------------------------ loaders


def _fashion_mnist_missing_message(directory: str, tfds_error: BaseException | None) -> str:
  tfds_note = f" TFDS fallback failed: {type(tfds_error).__name__}: {tfds_error}" if tfds_error else ""
  names = ", ".join(f"{b}[.gz]" for b in FASHION_MNIST_FILES.values())
  return (
      f"Fashion-MNIST not found: the directory {directory!r} lacks some of {names}.{tfds_note}\n"
      "Get it one of these ways:\n"
      "  * Debian/Ubuntu: apt-get install -y dataset-fashion-mnist "
      f"(installs the IDX files into {FASHION_MNIST_DIR}/);\n"
      "  * pass data_dir=<a directory holding the four IDX files, gzip or uncompressed>;\n"
      "  * TFDS: pip install tensorflow-datasets tensorflow-cpu, then source='tfds' or 'auto' "
      "(downloads on first use: needs internet).")


def load_digits(*, data_dir: str | None = None, source: str = "auto", seed: int = 0) -> Dataset:
  """scikit-learn's bundled 8x8 digits: 1437 train / 360 test, stratified by class.

  Pixel values 0..16 are divided by 16. ``seed`` is the split's
  ``random_state``; ``data_dir`` is unused (the data ships with scikit-learn).
  """
  del data_dir  # Bundled with scikit-learn.
  if source == "tfds":
    raise ValueError("source='tfds' is not available for 'digits' (it ships with scikit-learn); "
                     "use source='auto' or 'local'.")
  try:  # scikit-learn is not part of jaxsparse's base install
    from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
    from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("the 'digits' dataset needs scikit-learn: "
                      "pip install 'jaxsparse[experiments]'") from e

  digits = sk_load_digits()
  x = digits.images.astype(np.float32) / np.float32(16.0)
  y = digits.target
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=360, random_state=seed, stratify=y)
  return _make_dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


def load_fashion_mnist(*, data_dir: str | None = None, source: str = "auto",
                       seed: int = 0) -> Dataset:
  """Fashion-MNIST, 60000 train / 10000 test, 28x28x1 (the fixed official split).

  Args:
    data_dir: directory with the four IDX files; default :data:`FASHION_MNIST_DIR`.
    source: ``"local"`` (IDX files only), ``"tfds"`` (TensorFlow Datasets only)
      or ``"auto"`` (IDX files when present, else TFDS).
    seed: unused (the split is fixed); accepted for a uniform loader signature.

  Raises:
    FileNotFoundError: when no source has the data; the message says how to
      get it (Debian package, ``data_dir``, TFDS).
  """
  del seed  # The official split is fixed.
  directory = os.fspath(data_dir) if data_dir is not None else FASHION_MNIST_DIR
  if source in ("auto", "local") and find_idx_files(directory) is not None:
    return load_idx_dataset(directory, name="fashion_mnist", num_classes=10)
  if source == "local":
    raise FileNotFoundError(_fashion_mnist_missing_message(directory, None))
  try:
    return load_tfds_dataset("fashion_mnist", name="fashion_mnist", num_classes=10)
  except Exception as err:  # pylint: disable=broad-except  # ImportError, download errors, ...
    raise FileNotFoundError(_fashion_mnist_missing_message(directory, err)) from err


CIFAR = {"cifar10": ("CIFAR-10", 10), "cifar100": ("CIFAR-100", 100)}
"""TFDS name -> (display name, number of classes) of the CIFAR datasets (TFDS only)."""


def _tfds_only_missing_message(tfds_name: str, data_dir: str | None, error: BaseException) -> str:
  title = CIFAR[tfds_name][0]
  if isinstance(error, ImportError):
    cause = "and TensorFlow Datasets is not installed"
  else:
    where = (f"in data_dir={data_dir!r} (it must hold {tfds_name}/<version>/ as TFDS prepares it)"
             if data_dir is not None else
             "in TFDS's data folder (~/tensorflow_datasets or $TFDS_DATA_DIR)")
    cause = f"which found no prepared copy {where} and could not download it"
  return (
      f"{title} could not be loaded: jaxsparse reads it through TensorFlow Datasets only, {cause} "
      f"({type(error).__name__}: {error}).\n"
      "TFDS downloads the data on first use, which needs internet access. "
      "Get it one of these ways:\n"
      "  * pip install tensorflow-datasets tensorflow-cpu, then load it once on a machine with "
      f"internet (TFDS keeps it in ~/tensorflow_datasets/{tfds_name}/ for later, offline runs);\n"
      f"  * offline: copy a prepared tensorflow_datasets/{tfds_name}/ folder from a machine that "
      f"has one and pass data_dir=<the folder holding {tfds_name}/>;\n"
      "  * or train on a dataset that needs no download: 'digits' (bundled with scikit-learn) or "
      "'fashion_mnist' (apt-get install -y dataset-fashion-mnist).")


def _load_cifar(tfds_name: str, data_dir: str | None, source: str) -> Dataset:
  if source == "local":
    raise ValueError(f"source='local' is not available for {tfds_name!r} (it is loaded through "
                     "TFDS only); use source='auto' or 'tfds'.")
  data_dir = os.fspath(data_dir) if data_dir is not None else None
  try:
    return load_tfds_dataset(tfds_name, name=tfds_name, num_classes=CIFAR[tfds_name][1],
                             data_dir=data_dir)
  except Exception as err:  # pylint: disable=broad-except  # ImportError, download errors, ...
    raise FileNotFoundError(_tfds_only_missing_message(tfds_name, data_dir, err)) from err


def load_cifar10(*, data_dir: str | None = None, source: str = "auto", seed: int = 0) -> Dataset:
  """CIFAR-10 through TFDS: 50000 train / 10000 test, 32x32x3, 10 classes (fixed split).

  Args:
    data_dir: TFDS's data folder (holding ``cifar10/``); None = TFDS's default.
    source: ``"tfds"`` or ``"auto"`` (the same here); ``"local"`` is an error.
    seed: unused (the split is fixed).

  Raises:
    FileNotFoundError: when TFDS (or its download) fails; the message says how to
      get the data. Offline, TFDS retries the download for a few minutes first.
    ValueError: for ``source="local"``.
  """
  del seed  # The official split is fixed.
  return _load_cifar("cifar10", data_dir, source)


def load_cifar100(*, data_dir: str | None = None, source: str = "auto", seed: int = 0) -> Dataset:
  """CIFAR-100 (fine labels) through TFDS: 50000 / 10000, 32x32x3, 100 classes.

  Arguments and errors as :func:`load_cifar10`.
  """
  del seed  # The official split is fixed.
  return _load_cifar("cifar100", data_dir, source)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}
"""Dataset name -> loader ``(*, data_dir, source, seed) -> Dataset``."""


def load_dataset(name: str, *, data_dir: str | None = None, source: str = "auto",
                 seed: int = 0) -> Dataset:
  """Loads the dataset registered as ``name`` in :data:`DATASETS`.

  Args:
    name: ``"digits"``, ``"fashion_mnist"``, ``"cifar10"`` or ``"cifar100"``
      (see :data:`DATASETS`).
    data_dir: where to look for local files (dataset-specific; see the loaders).
    source: one of :data:`SOURCES`.
    seed: seed of the train/test split where the dataset has no fixed split.

  Raises:
    ValueError: for an unknown ``name`` or ``source``.
    FileNotFoundError: when the data cannot be found (message says how to get it).
  """
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset name {name!r}; known names: {sorted(DATASETS)}.")
  if source not in SOURCES:
    raise ValueError(f"Invalid source {source!r}; expected one of {list(SOURCES)}.")
  return DATASETS[name](data_dir=data_dir, source=source, seed=seed)


# ------------------------------------------------------------------ batching


def _check_batch_args(x, y, batch_size: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
  if len(x) != len(y):
    raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}.")
  return int(batch_size)


def iterate_batches(x: np.ndarray, y: np.ndarray, batch_size: int, *,
                    rng: np.random.Generator | None = None,
                    drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of ``(x_batch, y_batch)`` numpy batches.

  Args:
    x, y: arrays with the same leading dimension.
    batch_size: examples per batch (> 0).
    rng: when given, the epoch is shuffled with ``rng.permutation``; when
      None, batches come in order.
    drop_remainder: drop the last batch if it is smaller than ``batch_size``
      (keeps shapes static for ``jax.jit``).
  """
  batch_size = _check_batch_args(x, y, batch_size)  # Eagerly, not at the first next().
  n = len(x)
  order = rng.permutation(n) if rng is not None else np.arange(n)
  stop = n - n % batch_size if drop_remainder else n
  return ((x[order[i:i + batch_size]], y[order[i:i + batch_size]])
          for i in range(0, stop, batch_size))


def epoch_batches(x, y, batch_size: int,
                  key_or_seed: jax.Array | int | None = None) -> tuple[Any, Any]:
  """One epoch as stacked arrays of shape ``(num_batches, batch_size, ...)``, for ``lax.scan``.

  The remainder (``len(x) % batch_size`` examples) is dropped.

  Args:
    x, y: arrays with the same leading dimension.
    batch_size: examples per batch (> 0, at most ``len(x)``).
    key_or_seed: ``None`` for no shuffling; an int seeds a numpy shuffle and
      numpy arrays come back; a ``jax.random`` key shuffles with
      ``jax.random.permutation`` and jax arrays come back (jit-able with a
      static ``batch_size``).
  """
  batch_size = _check_batch_args(x, y, batch_size)
  n = x.shape[0]
  num_batches = n // batch_size
  if num_batches == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the {n} examples.")
  used = num_batches * batch_size
  if key_or_seed is None or isinstance(key_or_seed, (int, np.integer)):
    if key_or_seed is None:
      idx = np.arange(used)
    else:
      idx = np.random.default_rng(int(key_or_seed)).permutation(n)[:used]
    x, y = np.asarray(x)[idx], np.asarray(y)[idx]
  else:
    idx = jax.random.permutation(key_or_seed, n)[:used]
    x, y = jnp.take(jnp.asarray(x), idx, axis=0), jnp.take(jnp.asarray(y), idx, axis=0)
  return (x.reshape((num_batches, batch_size) + x.shape[1:]),
          y.reshape((num_batches, batch_size) + y.shape[1:]))
