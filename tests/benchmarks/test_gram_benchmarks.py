"""Smoke runs of benchmarks/gram_speed.py and benchmarks/iwrm.py (tiny sizes, seconds).

The JAX side always runs; PyTorch is never a test dependency, so the speed benchmark's
smoke configuration skips it and says so. No timing is asserted (only that it was taken).
"""

from __future__ import annotations

import math

from benchmarks import common, gram_speed, iwrm


def test_gram_speed_smoke():
    out = gram_speed.main(["--smoke", "--out", ""])
    assert set(out["results"]) == {"cnn"}
    for model in out["results"]:
        medians, memory = out["results"][model]["medians"], out["results"][model]["memory"]
        for row in gram_speed.JAX_ROWS:
            assert medians[row] > 0 and memory[row] > 0, (model, row)
        assert not any(row in medians for row in gram_speed.TORCH_ROWS)
    assert "PyTorch not run" in out["text"]
    task_gram = out["task_gram"]
    assert list(task_gram) == list(gram_speed.SMOKE_TASK_SHAPES)
    for shape, r in task_gram.items():
        for row in gram_speed.TASK_ROWS:
            assert r["medians"][row] > 0 and r["memory"][row] > 0, (shape, row)
    # gram="auto" as its cost model says: the ghost term pays at a small batch of wide layers
    assert task_gram["small batch, wide layers"]["auto"] == "structured"
    assert task_gram["large batch, narrow layers"]["auto"] == "columns"
    assert "structured / columns" in out["text"]


def test_iwrm_smoke():
    out = iwrm.main(["--smoke", "--out", "", "--no-progress"])
    assert set(out["histories"]) == {"long-tailed digits"}
    for dataset in out["histories"]:
        for method, runs in out["histories"][dataset].items():
            assert all(math.isfinite(v) for v in runs[0]["loss"]), (dataset, method)
            assert common.decreased(runs[0]["loss"], 0.25), (dataset, method)
        assert set(out["results"][dataset]) == {"SGD, mean loss", "SGD, MGDA (IWRM)"}
        for method, values in out["results"][dataset].items():
            assert 0.0 <= values["test_acc"][0] <= 1.0, (dataset, method)
