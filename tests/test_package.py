"""The top-level namespace: what ``from jaxsparse import *`` binds."""
import builtins
import types

import jaxsparse


def test_star_import_binds_the_public_api_and_no_builtin():
  ns: dict = {}
  exec("from jaxsparse import *", ns)
  bound = {n for n in ns if n != "__builtins__"}
  assert bound == set(jaxsparse.__all__)
  assert not {n for n in bound if hasattr(builtins, n)}        # `set`, `filter`, ... untouched
  assert not [n for n in bound if isinstance(ns[n], types.ModuleType)]
  # Every public function and class is in __all__, except SET's `set` (reached as js.set).
  public = {n for n in dir(jaxsparse) if not n.startswith("_")
            and not isinstance(getattr(jaxsparse, n), types.ModuleType)}
  assert public - set(jaxsparse.__all__) == {"set"}
  assert callable(jaxsparse.set)
