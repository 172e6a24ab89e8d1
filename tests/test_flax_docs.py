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
    weights = namespace["weights"]
    assert list(weights) == ["digit", "big"]
    assert abs(sum(float(w) for w in weights.values()) - 1) < 1e-5  # MGDA: on the simplex
    tier2 = namespace["mtl"].task_weights(namespace["mtl_state"])
    assert abs(sum(float(w) for w in tier2.values()) - 1) < 1e-5
    assert np.all(np.isfinite(namespace["linen_losses"]))


def test_readme_flax_section_runs_and_trains():
    """The README's Flax block (it builds on the quick start, block 0) runs as written."""
    namespace: dict = {}
    for i, code in enumerate(python_blocks(ROOT / "README.md")[:2]):
        exec(compile(code, f"README block {i}", "exec"), namespace)
    losses = np.asarray(namespace["nnx_losses"])
    assert losses.shape == (namespace["K"],) and np.all(np.isfinite(losses))
    weights = np.asarray(namespace["mtl"].task_weights(namespace["optimizer"]))
    assert np.all(np.isfinite(weights)) and np.all(weights > 0)  # UPGrad: every task weighted
