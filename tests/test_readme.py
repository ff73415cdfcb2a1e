"""The README's usage example runs as written and trains a 90%-sparse network."""
import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
  text = README.read_text()
  code = re.search(r"## Usage with optax\n\n```python\n(.*?)```", text, re.S).group(1)
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
