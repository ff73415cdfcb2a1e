"""Executes every notebook in notebooks/ top to bottom (CI runs them; outputs are not committed)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# quickstart first: it warms the shared compilation cache with the SET/ER mask initializer.
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")),
                   key=lambda p: (not p.endswith("quickstart.ipynb"), p))
NAMES = [os.path.basename(p) for p in NOTEBOOKS]


def test_the_notebooks_are_there_and_committed_without_outputs():
  assert {"quickstart.ipynb", "dynamic_sparse_training.ipynb", "kernels.ipynb"} <= set(NAMES)
  for path in NOTEBOOKS:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
      if cell.cell_type == "code":
        assert not cell.outputs and cell.execution_count is None, f"{path}: outputs committed"


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """The kernels' environment: CPU, and the suite's persistent compilation cache (conftest.py;
  it starts empty, so this is honest CI). The DST notebook trains what
  tests/experiments/test_train.py trains, with the same settings, so its programs are read
  from the cache when that test ran first."""
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(tmp_path_factory.mktemp("jax_cache"))
  env = {"JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": cache,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # a kernel inherits the environment of the process that starts it
  yield
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.mark.e2e
@pytest.mark.parametrize("path", NOTEBOOKS, ids=NAMES)
def test_notebook_runs_top_to_bottom(path, kernel_env):
  nb = nbformat.read(path, as_version=4)
  # No per-cell time limit: under a loaded CI machine a slow cell is not a failure.
  client = NotebookClient(nb, timeout=None, kernel_name="python3",
                          resources={"metadata": {"path": ROOT}})
  client.execute()  # raises CellExecutionError with the failing cell's traceback
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if o.output_type == "error"]
  assert not errors
