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
from jaxsparse import data
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
  out = subprocess.run([sys.executable, "-I", "-c", BASE_INSTALL % (EXTRAS,)], env=env,
                       capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stdout + out.stderr
  n = int(out.stdout.split("imported")[-1])
  assert n >= 25, out.stdout                     # every module, kernels' included
