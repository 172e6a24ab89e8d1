"""The main job and the speed script run end to end on tiny configurations.

These check that training happens (accuracy above chance on both tasks, loss going down)
and that the speed table has rows; they assert no tuned accuracy and no timing.
"""

from __future__ import annotations

import numpy as np

from benchmarks import multimnist, speed

CHANCE = 0.1
# tier 1 (split_value_and_grad), tier 3 (aggregate), a stacked aggregator through aggregate
METHODS = ("equal weights", "MGDA", "DB-MTL")
TINY = [
    "--steps", "100", "--seeds", "1", "--train-pairs", "1000", "--test-pairs", "300",
    "--warmup", "2", "--no-progress",
    "--methods", *METHODS,
]  # fmt: skip


def test_multimnist_tiny_config_trains(tmp_path):
    out = multimnist.main([*TINY, "--out", str(tmp_path)])
    assert (tmp_path / "multimnist.md").exists() and (tmp_path / "multimnist.png").exists()
    for method in METHODS:
        values = out["results"][method]
        assert values["acc_left"][0] > CHANCE, (method, values)
        assert values["acc_right"][0] > CHANCE, (method, values)
        losses = out["histories"][method][0]["loss"]
        assert losses.shape == (100,)
        assert np.mean(losses[-10:]) < np.mean(losses[:10]), method
        assert out["ms_step"][method] > 0
        assert method in out["table"]
    weights = out["histories"]
    assert np.allclose(weights["equal weights"][0]["w_left"], 0.5)  # mean weighting: 1/K
    assert np.all(np.isfinite(weights["MGDA"][0]["w_right"]))
    assert np.all(np.isnan(weights["DB-MTL"][0]["w_left"]))  # no task weights: NaN


def test_speed_smoke_has_rows():
    out = speed.main(["--smoke", "--out", ""])
    rows = [line for line in out["table"].splitlines()[2:] if line.startswith("|")]
    assert len(rows) == 1 and rows[0].startswith("| 2 |")
    assert len(out["solve_table"].splitlines()) == 4
