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
  # Every public function and class is in __all__.
  public = {n for n in dir(jaxsparse) if not n.startswith("_")
            and not isinstance(getattr(jaxsparse, n), types.ModuleType)}
  assert public == set(jaxsparse.__all__)


# Packages of the extras (experiments, test, notebooks), none of them in the base install.
EXTRAS = ("sklearn", "tqdm", "matplotlib", "orbax", "tensorboardX", "tensorflow",
          "tensorflow_datasets", "hypothesis", "pytest", "nbclient", "nbformat", "torch")

BASE_INSTALL = """
import importlib, importlib.abc, pkgutil, sys
EXTRAS = %r

class NoExtras(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in EXTRAS:
      raise ImportError(f"{name} is not in the base install")

sys.meta_path.insert(0, NoExtras())
import jaxsparse
names = sorted(m.name for m in pkgutil.walk_packages(jaxsparse.__path__, "jaxsparse."))
for name in names:
  importlib.import_module(name)
assert not [m for m in sys.modules if m.split(".")[0] in EXTRAS], "an extra was imported"
sys.path.insert(0, %r)   # the repository root: the experiments package is not installed
from experiments import data
try:
  data.load_dataset("digits")
except ImportError as e:
  assert "scikit-learn" in str(e) and "jaxsparse[experiments]" in str(e), e
else:
  raise AssertionError("digits loaded without scikit-learn")
print("imported", len(names))
"""


def test_every_library_module_imports_without_the_extras():
  """The base install (jax, jaxlib, flax, optax, chex, numpy) imports every jaxsparse module:
  an isolated interpreter in which every package of the extras fails to import."""
  import os
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-I", "-c", BASE_INSTALL % (EXTRAS, root)], env=env,
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stdout + out.stderr
  n = int(out.stdout.split("imported")[-1])
  assert n >= 34, out.stdout                     # every subpackage and module

def test_deprecated_names_warn_and_still_work():
  """0.1's flat module names, British `regularisers` and `js.set` work for one release, with a
  DeprecationWarning that names the replacement."""
  import pytest
  from jaxsparse.core import masks
  from jaxsparse.methods import sparse_evolutionary
  from jaxsparse.regularizers import penalties
  for old, new in [("masks", masks), ("regularisers", penalties),
                   ("sparse_evolutionary", sparse_evolutionary)]:
    with pytest.warns(DeprecationWarning, match=new.__name__.replace(".", r"\.")):
      assert getattr(jaxsparse, old) is new
  # The message names the old name and the new one (it once named the new one twice).
  with pytest.warns(DeprecationWarning,
                    match=r"^jaxsparse\.set is deprecated .*; use jaxsparse\.sparse_evolutionary_training$"):
    from jaxsparse import set as set_method   # noqa: A004
  assert set_method is jaxsparse.sparse_evolutionary_training
  with pytest.warns(DeprecationWarning, match="jaxsparse.methods.dst"):
    assert jaxsparse.dst.rigl is jaxsparse.rigl
  for name in jaxsparse._DEPRECATED_MODULES:        # every old name resolves to a module
    with pytest.warns(DeprecationWarning):
      assert isinstance(getattr(jaxsparse, name), types.ModuleType)
  with pytest.warns(DeprecationWarning, match="RegularizerState"):
    assert penalties.RegulariserState is penalties.RegularizerState
  with pytest.raises(AttributeError, match="experiments.training"):
    jaxsparse.training                               # application code left the library
  with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
    jaxsparse.nonexistent
