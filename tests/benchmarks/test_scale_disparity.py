"""The scale-disparity benchmark runs its smoke configuration end to end and really trains.

Checked: the total loss went down and both digit accuracies beat chance for a fixed weighting,
a learned one (tier 1) and a tier-3 one; no tuned number is asserted.
"""

from __future__ import annotations

import numpy as np

from benchmarks import common, scale_disparity

METHODS = ["equal weights", "FAMO", "gradient-normalized"]


def test_scale_disparity_smoke_trains(tmp_path):
    out = scale_disparity.main(
        ["--smoke", "--no-progress", "--out", str(tmp_path), "--methods", *METHODS]
    )
    assert (tmp_path / "scale_disparity.md").exists()
    assert (tmp_path / "scale_disparity.png").exists()
    for method in METHODS:
        (run,) = out["histories"][method]
        assert run["loss"].shape == (100,)
        assert common.decreased(run["loss"]), method
        weights = np.stack([run[f"w_{t}"] for t in scale_disparity.TASKS], -1)
        assert weights.shape == (100, 3) and np.all(np.isfinite(weights)), method
    for row, values in out["results"].items():
        assert values["acc_left"][0] > 0.1 and values["acc_right"][0] > 0.1, row  # chance 0.1
        assert np.isfinite(values["rmse_sum"][0]), row
