"""Training methods by name, each with the defaults of its paper scaled to a run.

Every method module registers its methods beside their definitions (:func:`register`), so
that a runner builds any of them from a name and the length of the run (:func:`build`)
without a list of special cases.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple

import optax

Defaults = Callable[[int, int, int], dict[str, Any]]


class MethodSpec(NamedTuple):
  """A registered method.

  Attributes:
    name: its name, e.g. ``"rigl"``.
    factory: ``(inner, sparsity, **kwargs) -> GradientTransformation``; a method without
      hyperparameters (``dense``) is ``(inner) -> GradientTransformation``.
    defaults: ``(total_steps, steps_per_epoch, seed) -> kwargs``: the paper's
      hyperparameters scaled to the run; explicit keyword arguments override them.
    hyperparameters: False for a method that takes neither a sparsity nor keyword
      arguments (``dense``): :func:`build` ignores the ones it is given.
  """
  name: str
  factory: Callable[..., optax.GradientTransformation]
  defaults: Defaults
  hyperparameters: bool = True

  def keywords(self) -> tuple[str, ...]:
    """The keyword-only arguments of ``factory``, by their current names."""
    params = inspect.signature(self.factory).parameters
    return tuple(k for k, v in params.items() if v.kind == v.KEYWORD_ONLY)

  def renamed(self) -> Mapping[str, str]:
    """Deprecated keyword names ``factory`` still takes, to their current names."""
    return getattr(self.factory, "renamed_kwargs", {})


_METHODS: dict[str, MethodSpec] = {}


def _no_defaults(total_steps: int, steps_per_epoch: int, seed: int) -> dict[str, Any]:
  del total_steps, steps_per_epoch, seed
  return {}


def register(name: str, factory: Callable[..., optax.GradientTransformation],
             defaults: Defaults | None = None, *, hyperparameters: bool = True) -> MethodSpec:
  """Registers ``factory`` as method ``name`` with its run-scaled ``defaults`` (see
  :class:`MethodSpec`); registering the same factory again is a no-op (a module reload)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"name must be a non-empty string, got {name!r}")
  if not callable(factory):
    raise TypeError(f"factory must be callable, got {factory!r}")
  if defaults is not None and not callable(defaults):
    raise TypeError(f"defaults must be a callable (total_steps, steps_per_epoch, seed) -> "
                    f"kwargs, got {defaults!r}")
  old = _METHODS.get(name)
  if old is not None and _origin(old.factory) != _origin(factory):
    raise ValueError(f"name: method {name!r} is already registered (to {old.factory!r})")
  spec = MethodSpec(name, factory, defaults or _no_defaults, hyperparameters)
  _METHODS[name] = spec
  return spec


def _origin(fn: Callable) -> tuple:
  return getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)


def names() -> tuple[str, ...]:
  """The registered method names, in registration order."""
  return tuple(_METHODS)


def get(name: str) -> MethodSpec:
  """The :class:`MethodSpec` of ``name``; ValueError naming the known ones otherwise."""
  if name not in _METHODS:
    raise ValueError(f"method must be one of {names()}, got {name!r}")
  return _METHODS[name]


def build(name: str, inner: optax.GradientTransformation, sparsity: float, *, total_steps: int,
          steps_per_epoch: int, seed: int = 0, **kwargs: Any) -> optax.GradientTransformation:
  """Method ``name`` around ``inner`` at ``sparsity``: its defaults for a run of
  ``total_steps`` steps (``steps_per_epoch`` to an epoch), overridden by ``kwargs``."""
  spec = get(name)
  if not spec.hyperparameters:
    return spec.factory(inner)
  return spec.factory(inner, sparsity,
                      **{**spec.defaults(total_steps, steps_per_epoch, seed), **kwargs})


def run_period(total_steps: int, period: int = 100) -> int:
  """``period`` steps, but at most a 20th of the run (and at least 1), so that a short run
  still gets about 20 mask updates."""
  return max(1, min(period, total_steps // 20))
