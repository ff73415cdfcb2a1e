"""Named experiment configs: one frozen dataclass, :class:`Config`, and a registry, :data:`CONFIGS`.

Every experiment is a :class:`Config` (the one way; no ml_collections). Its
fields are exactly the arguments of :func:`experiments.training.train`; methods,
models and datasets are names looked up in ``experiments.training.METHODS``,
``jaxsparse.nn.models.MODELS`` and ``experiments.data.DATASETS``, checked when a
config is built. A config goes to and from a plain dict / JSON
(:meth:`Config.to_dict`, :meth:`Config.from_dict`, :meth:`Config.to_json`,
:meth:`Config.from_json`) and takes command-line overrides ``key=value``
(:func:`apply_overrides`): ``epochs=5``, ``method=rigl``,
``model_kwargs={"features": [512, 512]}`` or, for one entry of a dict field,
``method_kwargs.drop_fraction=0.5``. Values are parsed as JSON when they parse (else
taken as a string) and checked against the field's type.

To add an experiment, add an entry to :data:`CONFIGS` (derive from another with
``dataclasses.replace``) and run ``python -m experiments.run <name>``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from experiments import data, training
from jaxsparse.nn import models


def _known(kind: str, name: Any, known: Sequence[str]) -> None:
  if name not in known:
    raise ValueError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(known))}")


@dataclasses.dataclass(frozen=True)
class Config:
  """One experiment: the keyword arguments of :func:`experiments.training.train`.

  Raises (at construction):
    ValueError: for an unknown ``dataset``/``model``/``method``/``optimizer``/
      ``lr_schedule`` (the message lists the known ones) or an out-of-range
      number, naming the field.
  """

  dataset: str = "digits"
  model: str = "lenet300"
  method: str = "set"
  sparsity: float = 0.9
  epochs: int = 20
  batch_size: int = 100
  optimizer: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9
  weight_decay: float = 0.0
  l1: float = 0.0
  lr_schedule: str = "cosine"
  seed: int = 0
  data_dir: str | None = None
  steps_per_call: int | None = None
  model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  method_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _known("dataset", self.dataset, list(data.DATASETS))
    _known("model", self.model, list(models.MODELS))
    _known("method", self.method, training.METHODS)
    _known("optimizer", self.optimizer, training.OPTIMIZERS)
    _known("lr_schedule", self.lr_schedule, training.LR_SCHEDULES)
    if not 0.0 <= self.sparsity < 1.0:
      raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
    for name in ("epochs", "batch_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
    if self.steps_per_call is not None and self.steps_per_call < 1:
      raise ValueError(f"steps_per_call must be None or >= 1, got {self.steps_per_call!r}")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
    # Frozen all the way down: copy the dicts so that callers' dicts are not shared.
    object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))
    object.__setattr__(self, "method_kwargs", dict(self.method_kwargs))

  def to_dict(self) -> dict[str, Any]:
    """A JSON-compatible dict of every field (dict fields copied)."""
    return {f.name: (dict(v) if isinstance(v, Mapping) else v)
            for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Config:
    """The config of ``d`` (missing keys take the defaults); unknown keys are an error."""
    for key in d:
      check_key(key)
    return cls(**{k: coerce(k, v) for k, v in d.items()})

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> Config:
    return cls.from_dict(json.loads(text))

  def train_kwargs(self) -> dict[str, Any]:
    """The keyword arguments for :func:`experiments.training.train`."""
    return self.to_dict()


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def check_key(key: str) -> None:
  """Raises KeyError naming ``key`` and the closest valid config key when ``key`` is not a field."""
  if key not in FIELDS:
    close = difflib.get_close_matches(key, list(FIELDS), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown config key {key!r}{hint} Valid keys: {', '.join(FIELDS)}")


def coerce(key: str, value: Any) -> Any:
  """``value`` checked against the type of field ``key`` (ints are accepted for floats).

  Raises:
    TypeError: naming ``key``, its type and the bad value.
  """
  check_key(key)
  hint = _HINTS[key]
  allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
  for t in allowed:
    origin = typing.get_origin(t) or t
    if t is type(None) and value is None:
      return None
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if origin is int and isinstance(value, int) and not isinstance(value, bool):
      return value
    if origin is str and isinstance(value, str):
      return value
    if origin is Mapping and isinstance(value, Mapping):
      return dict(value)
  raise TypeError(f"config key {key!r} must be of type {_type_name(hint)}, got {value!r} "
                  f"({type(value).__name__})")


def _type_name(hint: Any) -> str:
  return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def parse_value(text: str) -> Any:
  """A command-line value: JSON when it parses (``5``, ``0.1``, ``null``, ``{"a": 1}``), else the string."""
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
  """``config`` with ``key=value`` overrides applied (``dict_field.entry=value`` sets one entry).

  Raises:
    ValueError: for an override without ``=``.
    KeyError: for an unknown key (naming the closest valid one).
    TypeError: for a value of the wrong type.
  """
  changes: dict[str, Any] = {}
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise ValueError(f"override {item!r} is not of the form key=value")
    value = parse_value(text)
    if "." in key:
      field, entry = key.split(".", 1)
      check_key(field)
      if field not in _dict_fields():
        raise KeyError(f"override {item!r}: only {', '.join(_dict_fields())} take field.entry keys")
      changes[field] = {**changes.get(field, getattr(config, field)), entry: value}
    else:
      changes[key] = coerce(key, value)
  return dataclasses.replace(config, **changes)


def _dict_fields() -> list[str]:
  return [n for n, f in FIELDS.items() if f.default_factory is dict]


_DIGITS = Config(dataset="digits", model="lenet300", epochs=20, batch_size=100)
_FASHION = Config(dataset="fashion_mnist", model="lenet300", epochs=30, batch_size=32)
# The usual CIFAR ResNet recipe (He et al. 2016; Zagoruyko & Komodakis 2016; RigL's WRN runs):
# SGD with momentum 0.9, lr 0.1 cosine-decayed, batch 128, weight decay 5e-4.
_RESNET = dict(optimizer="sgd", learning_rate=0.1, momentum=0.9, lr_schedule="cosine",
               batch_size=128, weight_decay=5e-4)
_FASHION_RESNET = dataclasses.replace(_FASHION, epochs=30, **_RESNET)
_CIFAR10_RESNET = Config(dataset="cifar10", epochs=200, **_RESNET)  # TFDS: needs internet once

CONFIGS: dict[str, Config] = {
    # Seconds on a laptop CPU: LeNet-300-100 on the bundled 8x8 digits.
    **{f"digits_{m}": dataclasses.replace(_DIGITS, method=m) for m in training.METHODS},
    "digits_lenet5_rigl": dataclasses.replace(_DIGITS, model="lenet5", method="rigl"),
    "smoke": dataclasses.replace(_DIGITS, epochs=2),
    # The README's main job (experiments/train.py's defaults on Fashion-MNIST).
    **{f"fashion_mnist_{m}": dataclasses.replace(_FASHION, method=m)
       for m in ("dense", "static", "set", "rigl", "snfs", "dsr", "magnitude")},
    "fashion_mnist_lenet5_set": dataclasses.replace(_FASHION, model="lenet5", method="set"),
    # DSR's MNIST setup (Mostafa & Wang 2019): no biases, BatchNorm, L1 1e-4, step schedule.
    "fashion_mnist_dsr_paper": dataclasses.replace(
        _FASHION, method="dsr", batch_size=100, learning_rate=0.1, l1=1e-4, lr_schedule="step",
        epochs=100, model_kwargs={"use_bias": False, "batch_norm": True}),
    # CIFAR ResNets (jaxsparse.nn.models.CifarResNet, WideResNet) at 90% sparsity; the fmnist_*
    # ones run offline (local Fashion-MNIST), the cifar10_* ones download CIFAR-10 via TFDS.
    "fmnist_resnet20_set": dataclasses.replace(_FASHION_RESNET, model="resnet20", method="set"),
    "fmnist_wrn16_4_rigl": dataclasses.replace(
        _FASHION_RESNET, model="wrn", method="rigl", model_kwargs={"depth": 16, "widen_factor": 4}),
    "cifar10_resnet20_set": dataclasses.replace(_CIFAR10_RESNET, model="resnet20", method="set"),
    "cifar10_wrn16_4_rigl": dataclasses.replace(
        _CIFAR10_RESNET, model="wrn", method="rigl", model_kwargs={"depth": 16, "widen_factor": 4}),
}
"""Config name -> :class:`Config`."""


def get_config(name: str) -> Config:
  """The config registered as ``name``.

  Raises:
    KeyError: for an unknown name, listing the known ones (closest first).
  """
  if name not in CONFIGS:
    close = difflib.get_close_matches(name, list(CONFIGS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"unknown config {name!r}.{hint} Known configs: {', '.join(sorted(CONFIGS))}")
  return CONFIGS[name]
