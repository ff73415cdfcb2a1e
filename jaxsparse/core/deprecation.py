"""Renamed keyword arguments that keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def renamed_kwargs(**renames: str) -> Callable[[F], F]:
  """Decorator: each keyword ``old=new`` of ``renames`` is still accepted as ``old`` and
  passed on as ``new``, with a DeprecationWarning naming ``new``.

  The wrapper keeps the function's signature (``inspect.signature`` shows the new names
  only) and lists the renames in its ``renamed_kwargs`` attribute, so that a caller that
  checks keywords by name (``experiments.training.make_method``) accepts the old ones too.
  """
  def wrap(fn: F) -> F:
    name = getattr(fn, "__qualname__", getattr(fn, "__name__", repr(fn)))

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      for old, new in renames.items():
        if old in kwargs:
          if new in kwargs:
            raise TypeError(f"{name}() got both {old!r} and {new!r}; {old!r} is the deprecated "
                            f"name of {new!r}, pass only {new!r}")
          warnings.warn(f"{name}(): {old!r} is deprecated; use {new!r}", DeprecationWarning,
                        stacklevel=2)
          kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    wrapper.renamed_kwargs = {**getattr(fn, "renamed_kwargs", {}), **renames}
    return wrapper  # type: ignore[return-value]
  return wrap
