"""Executes the Python code blocks of ``docs/scaling.md`` in order, in one namespace."""

import pathlib
import re

import numpy as np

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "scaling.md"


def test_scaling_doc_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 5
    ns = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), ns)
        if "fsdp_step" in block:  # the FSDP snippet kept each device's quarter of the trunk
            assert ns["params"]["trunk"].addressable_shards[0].data.shape == (2, 16)
    # the checkpoint snippets restored the live state
    for restored in (ns["params2"], ns["params3"]):
        np.testing.assert_array_equal(restored["trunk"], ns["params"]["trunk"])
    assert np.all(np.isfinite(ns["losses"]))
