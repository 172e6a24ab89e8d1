"""The Flax guide (docs/flax.md) runs as written and trains."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_flax_guide_runs_and_trains():
    namespace: dict = {}
    for i, code in enumerate(python_blocks(ROOT / "docs" / "flax.md")):
        exec(compile(code, f"docs/flax.md block {i}", "exec"), namespace)
    assert np.all(np.isfinite(namespace["losses"]))
    weights = np.asarray(namespace["weights"])
    assert weights.shape == (2,) and abs(weights.sum() - 1) < 1e-5  # MGDA: on the simplex
    assert abs(float(np.sum(namespace["home"].weights[...])) - 1) < 1e-5
    assert np.all(np.isfinite(namespace["linen_losses"]))
