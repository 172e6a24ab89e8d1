"""Each loss benchmark runs its --smoke configuration end to end and really trains.

These check that training happened (the loss went down, accuracy beats chance), never a
tuned number: the smoke configurations are far too small for that.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import common

SMOKE = ["--smoke", "--out", "", "--no-progress"]


def test_table_formatting():
    results: common.Results = {}
    common.add_result(results, "a", {"x": 0.5, "y": 1.0})
    common.add_result(results, "a", {"x": 0.7, "y": 3.0})
    table = common.markdown_table(results, {"x": ("X (%)", 100, 1), "y": ("Y", 1, 2)})
    assert table.splitlines()[2] == "| a | 60.0 ± 14.1 | 2.00 ± 1.41 |"
    assert common.decreased(np.linspace(1.0, 0.0, 50))
    assert not common.decreased(np.linspace(0.0, 1.0, 50))


def test_imbalance_smoke():
    from benchmarks import imbalance

    out = imbalance.main(SMOKE)
    for method, losses in out["histories"].items():
        assert common.decreased(losses[0]), method
    for method, values in out["results"].items():
        assert values["bal_acc"][0] > 0.2, method  # chance is 0.1


def test_contrastive_smoke():
    from benchmarks import contrastive

    out = contrastive.main(SMOKE)
    for row, runs in out["curves"].items():
        assert common.decreased(runs[0]), row
    for row, values in out["results"].items():
        assert values["probe"][0] > 0.3, row  # chance is 0.1
        assert 0.0 <= values["underflow"][0] <= 1.0


def test_retrieval_smoke():
    from benchmarks import retrieval

    out = retrieval.main(SMOKE)
    for method, runs in out["histories"].items():
        assert common.decreased(runs[0]["loss"]), method
    for method, values in out["results"].items():
        # chance Recall@1 with 5 equally frequent unseen classes is about 0.2
        assert values["recall_at_1"][0] > 0.3, method


def test_retrieval_metrics_oracle():
    from benchmarks import retrieval

    z = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    perfect = retrieval.retrieval_metrics(z, np.array([0, 0, 1, 1]))
    assert perfect == {"recall_at_1": 1.0, "map": 1.0}
    worst = retrieval.retrieval_metrics(z, np.array([0, 1, 0, 1]))
    assert worst["recall_at_1"] == 0.0
    # the one relevant item is ranked 3rd for queries 0 and 2, 2nd for queries 1 and 3
    assert worst["map"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3 + 1 / 2) / 4)


def test_rdrop_smoke():
    from benchmarks import rdrop

    out = rdrop.main(SMOKE)
    for setting, runs in out["curves"].items():
        for name, histories in runs.items():
            assert common.decreased(histories[0]["loss"]), (setting, name)
    for setting, res in out["results"].items():
        for name, values in res.items():
            assert values["test_acc"][0] > 0.3, (setting, name)


def test_flooding_smoke():
    from benchmarks import flooding

    out = flooding.main(SMOKE)
    for config, histories in out["curves"].items():
        assert common.decreased(histories[0]["train_loss"], 0.3), config
    for row, values in out["results"].items():
        assert values["test_acc"][0] > 0.3, row
