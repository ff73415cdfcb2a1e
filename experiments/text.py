"""A real text corpus that is always present offline: Python's standard-library sources.

The corpus is every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``
(``site-packages``, ``dist-packages`` and ``__pycache__`` left out), read as
bytes in sorted relative-path order and tokenized at byte level (vocabulary
256, no tokenizer to ship). The split is by file and fixed: a file goes to
validation when ``zlib.crc32(relative path) % 20 == 0`` (about 5% of the bytes;
the assignment of a file never depends on which other files exist). On
CPython 3.11.7 this is 1790 files, 31.5 MB; 100 files (1.5 MB) are validation.
Other Python versions have other files: :attr:`TextCorpus.digest` identifies
the exact text.

Corpora by name (:data:`CORPORA`):

* ``"stdlib"``: the whole corpus.
* ``"stdlib_small"``: the embedded default for tests and a first run, the first
  :data:`SMALL_TRAIN_BYTES` bytes of the training stream and the first
  :data:`SMALL_VALIDATION_BYTES` of the validation stream (a deterministic slice:
  ``__future__.py``, ``_collections_abc.py``, ... in path order).

Perplexity is ``exp`` of the mean next-byte cross-entropy over validation
windows (:func:`eval_windows`); :func:`unigram_perplexity` is the baseline a
model has to beat.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import sysconfig
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsparse.nn import transformer as tr

VOCAB_SIZE = 256
"""Byte-level tokens."""

VALIDATION_MODULUS = 20
"""A file is in validation when ``crc32(relative path) % VALIDATION_MODULUS == 0``."""

SMALL_TRAIN_BYTES = 393_216
SMALL_VALIDATION_BYTES = 65_536

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_MIN_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class TextCorpus:
  """Byte tokens of a fixed train/validation split.

  Attributes:
    name: the registry name (a key of :data:`CORPORA`).
    train: uint8 tokens of the training files, concatenated.
    validation: uint8 tokens of the validation files, concatenated.
    train_files: number of files (whole or in part) in ``train``.
    validation_files: number of files in ``validation``.
    root: the directory the files were read from.
    digest: sha256 (first 16 hex digits) of ``train`` then ``validation``.
  """

  name: str
  train: np.ndarray
  validation: np.ndarray
  train_files: int
  validation_files: int
  root: str
  digest: str
  vocab_size: int = VOCAB_SIZE

  def __repr__(self) -> str:
    return (f"TextCorpus(name={self.name!r}, train={self.train.size:,} bytes / "
            f"{self.train_files} files, validation={self.validation.size:,} bytes / "
            f"{self.validation_files} files, digest={self.digest})")


def stdlib_root() -> pathlib.Path:
  """The standard library's directory of the running Python."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | pathlib.Path | None = None) -> list[str]:
  """Relative paths of the corpus files under ``root`` (default :func:`stdlib_root`), sorted."""
  root = stdlib_root() if root is None else pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"root: {str(root)!r} is not a directory")
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]  # never walk site-packages
    rel = pathlib.Path(folder).relative_to(root)
    found += [(rel / f).as_posix() for f in files if f.endswith(".py")]
  return sorted(found)


def is_validation(path: str) -> bool:
  """The fixed split: ``crc32(path) % VALIDATION_MODULUS == 0`` (path relative, '/'-separated)."""
  return zlib.crc32(path.encode()) % VALIDATION_MODULUS == 0


def _read(root: pathlib.Path, paths: list[str], limit: int | None) -> tuple[np.ndarray, int]:
  """The concatenated bytes of ``paths`` (stopping once ``limit`` bytes are read), and the file count."""
  chunks, total, used = [], 0, 0
  for p in paths:
    if limit is not None and total >= limit:
      break
    data = (root / p).read_bytes()
    chunks.append(data)
    total += len(data)
    used += 1
  tokens = np.frombuffer(b"".join(chunks), np.uint8)
  return (tokens if limit is None else tokens[:limit]).copy(), used


def _load(name: str, root, train_limit: int | None, validation_limit: int | None) -> TextCorpus:
  root = stdlib_root() if root is None else pathlib.Path(root)
  files = stdlib_files(root)
  train_paths = [p for p in files if not is_validation(p)]
  val_paths = [p for p in files if is_validation(p)]
  train, n_train = _read(root, train_paths, train_limit)
  validation, n_val = _read(root, val_paths, validation_limit)
  need = _MIN_BYTES if train_limit is None else train_limit
  if train.size < need or validation.size < min(need // 20, validation_limit or need):
    raise FileNotFoundError(
        f"corpus {name!r}: found only {train.size:,} training and {validation.size:,} validation "
        f"bytes of *.py files under {str(root)!r}; this Python's standard library seems to ship "
        "without its sources (install the distribution's python3 stdlib package, e.g. Debian's "
        "libpython3.X-stdlib, or pass root= a directory of .py files)")
  digest = hashlib.sha256(train.tobytes() + validation.tobytes()).hexdigest()[:16]
  return TextCorpus(name, train, validation, n_train, n_val, str(root), digest)


CORPORA = {
    "stdlib": lambda root: _load("stdlib", root, None, None),
    "stdlib_small": lambda root: _load("stdlib_small", root, SMALL_TRAIN_BYTES,
                                       SMALL_VALIDATION_BYTES),
}
"""Corpus name -> loader ``(root) -> TextCorpus``."""


def load_corpus(name: str = "stdlib_small", *, root: str | pathlib.Path | None = None
                ) -> TextCorpus:
  """A corpus from :data:`CORPORA`; ``root`` replaces the standard library's directory."""
  if name not in CORPORA:
    raise ValueError(f"name: unknown corpus {name!r}; known names: {sorted(CORPORA)}")
  return CORPORA[name](root)


def _check_seq_len(tokens: np.ndarray, seq_len: int) -> None:
  if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
    raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
  if tokens.size < seq_len + 1:
    raise ValueError(f"seq_len={seq_len}: the tokens ({tokens.size}) hold no window of "
                     f"seq_len + 1 bytes")


def sample_windows(tokens: np.ndarray, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> np.ndarray:
  """``batch_size`` random windows of ``seq_len + 1`` tokens (inputs ``[:, :-1]``, targets ``[:, 1:]``)."""
  _check_seq_len(tokens, seq_len)
  starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None) -> np.ndarray:
  """Consecutive non-overlapping windows of ``seq_len + 1`` tokens (the first ``max_windows``).

  Windows share no predicted token, so each validation byte after a window's first
  is predicted once, from up to ``seq_len`` bytes of context.
  """
  _check_seq_len(tokens, seq_len)
  n = (tokens.size - 1) // seq_len
  if max_windows is not None:
    n = min(n, int(max_windows))
  starts = np.arange(n) * seq_len
  return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def unigram_perplexity(train: np.ndarray, validation: np.ndarray) -> float:
  """Perplexity on ``validation`` of the training bytes' frequencies (add-one smoothed)."""
  counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
  logp = np.log(counts / counts.sum())
  return float(math.exp(-logp[validation].mean()))


def train_lm(model: tr.GPT, params: Any, tx: Any, tokens: np.ndarray, *, steps: int,
             batch_size: int, seq_len: int, seed: int = 0, opt_state: Any = None,
             callback: Callable[[int, float], None] | None = None) -> tuple[Any, Any]:
  """``steps`` steps of ``tx`` (any optax transformation, e.g. ``js.keep_masks(adam)``) on random
  windows of ``tokens`` drawn with ``numpy.random.default_rng(seed)``; returns (params, opt_state).

  ``callback(step, loss)`` is called after every step (e.g. a progress bar).
  """
  opt_state = tx.init(params) if opt_state is None else opt_state

  @jax.jit
  def step(params, opt_state, windows):
    loss, grads = jax.value_and_grad(lambda p: tr.lm_loss(model, p, windows))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    batch = jnp.asarray(sample_windows(tokens, batch_size, seq_len, rng))
    params, opt_state, loss = step(params, opt_state, batch)
    if callback is not None:
      callback(i, loss)
  return params, opt_state
