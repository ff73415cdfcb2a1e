"""The README's examples run as written: the optax usage example trains a 90%-sparse
network, the flax.nnx example trains with RigL, and the inference recipe reproduces the
masked model's outputs from the exported sparse kernels."""
import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def block(heading: str) -> str:
  """The first python code block after ``heading``."""
  return re.search(re.escape(heading) + r"\n.*?```python\n(.*?)```", README.read_text(),
                   re.S).group(1)


@pytest.mark.e2e
def test_readme_example_runs(capsys):
  code = block("## Usage with optax")
  assert len(code.strip().splitlines()) <= 22
  scope: dict = {}
  exec(compile(code, "README.md", "exec"), scope)
  import jaxsparse as js
  masks = js.get_masks(scope["opt_state"])
  assert abs(js.sparsity(scope["params"], masks) - 0.9) < 1e-4
  net, params, ds = scope["net"], scope["params"], scope["ds"]
  acc = np.mean(np.argmax(net.apply({"params": params}, ds.x_test), -1) == ds.y_test)
  assert acc >= 0.9, acc
  assert "total (sparse leaves)" in capsys.readouterr().out
  # The inference recipe, on the trained model: the same logits from the exported kernels.
  exec(compile(block("### Inference with exported sparse weights"), "README.md", "exec"), scope)
  dense = net.apply({"params": params}, ds.x_test)
  np.testing.assert_allclose(np.asarray(scope["logits"]), np.asarray(dense), rtol=1e-4, atol=1e-4)
  assert type(scope["exported"]["fc1"]["kernel"]).__name__ == "BCOO"


@pytest.mark.e2e
def test_readme_nnx_example_runs(capsys):
  from flax import nnx
  scope: dict = {}
  exec(compile(block("### With flax.nnx"), "README.md", "exec"), scope)
  import jaxsparse as js
  model, ds = scope["model"], scope["ds"]
  state = nnx.state(model, nnx.Param)
  masks = js.get_masks(scope["opt"].opt_state)
  assert abs(js.sparsity(state, masks) - 0.9) < 1e-3
  acc = np.mean(np.argmax(np.asarray(model(ds.x_test)), -1) == ds.y_test)
  assert acc >= 0.85, acc
  assert "total (sparse leaves)" in capsys.readouterr().out
