"""Smoke run of benchmarks/aggregator_speed.py: both tables are produced."""

from benchmarks import aggregator_speed


def test_aggregator_speed_smoke():
    out = aggregator_speed.main(["--smoke", "--methods", "mgda,upgrad,nash_mtl,krum"])
    assert out["solves"]["upgrad"][2] > 0 and out["solves"]["nash_mtl"][4] > 0
    assert out["solves"]["krum"][2] is None  # K = 2 < n_byzantine + 3
    assert "n/a" in out["solve_table"]
    assert out["steps"]["ours"] > 0 and "torchjd not run" in out["step_table"]
