"""Smoke run of benchmarks/aggregator_speed.py: tables are produced, missing methods named."""

from benchmarks import aggregator_speed


def test_aggregator_speed_smoke():
    out = aggregator_speed.main(["--smoke", "--methods", "mgda,nash_mtl,krum,no_such_method"])
    assert out["solves"]["mgda"][2] > 0 and out["solves"]["nash_mtl"][4] > 0
    assert out["solves"]["krum"][2] is None  # K = 2 < n_byzantine + 3
    assert "not in this build" in out["solve_table"]
    assert out["steps"]["ours"] > 0 and "torchjd not installed" in out["step_table"]
