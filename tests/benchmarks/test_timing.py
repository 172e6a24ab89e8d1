"""benchmarks/timing.py: the sanity rule that withholds cross-library ratios, and the
interleaving of the JAX and PyTorch rounds (with a stand-in for the PyTorch process)."""

import pytest

from benchmarks import timing


@pytest.mark.parametrize(
    "interleaved, alone, load_per_core, backend, reason",
    [
        (0.010, 0.009, 0.5, "cpu", None),  # 1.11x, idle: the ratio may be printed
        (0.010, 0.0067, 0.5, "cpu", None),  # 1.49x: still within 1.5x
        (0.713, 0.010, 0.5, "cpu", "off by more than 1.5"),  # torch slowed by contention
        (0.004, 0.010, 0.5, "cpu", "off by more than 1.5"),  # or faster than alone: unstable
        (0.010, 0.010, 6.0, "cpu", "load average exceeds"),  # busy machine, alike both ways
        (0.010, 0.010, 0.5, "gpu", "accelerator"),  # not the same kind of device
    ],
)
def test_cross_library_verdict(interleaved, alone, load_per_core, backend, reason):
    load = load_per_core * timing.num_cores()
    line, withheld = timing.cross_library_verdict(interleaved, alone, load, jax_backend=backend)
    assert line.startswith("Sanity: PyTorch's plain step interleaved")
    assert f"({interleaved / alone:.2f}×)" in line
    if reason is None:
        assert withheld is None
    else:
        assert reason in withheld


class FakeTorch:
    """Answers ``round`` like the worker: one timing per PyTorch function."""

    def __init__(self):
        self.rounds, self.closed = 0, False

    def alone(self, calls):
        return 0.004  # the interleaved median below: a sane pair

    def close(self):
        self.closed = True

    def ask(self, command):
        assert command == "round"
        self.rounds += 1
        return {timing.TORCH_PLAIN: 0.001 * self.rounds, "torchjd step": 0.5}


def test_interleaved_medians_alternates_jax_and_torch_rounds():
    order = []
    torch = FakeTorch()
    fns = {"a": lambda: order.append(("a", torch.rounds)), "b": lambda: order.append("b")}
    out = timing.interleaved_medians(fns, calls=3, warmup=2, torch=torch)
    assert torch.rounds == 5  # warm-up rounds included
    # every JAX round runs before the PyTorch round of the same index
    assert [entry for entry in order if entry != "b"] == [("a", r) for r in range(5)]
    # medians over the timed rounds only (3, 4, 5 ms)
    assert out[timing.TORCH_PLAIN] == pytest.approx(0.004)
    assert out["torchjd step"] == 0.5 and set(out) == {"a", "b", timing.TORCH_PLAIN, "torchjd step"}


def test_timed_rounds_judges_the_rounds_and_closes_the_worker(monkeypatch):
    monkeypatch.setattr(timing, "machine_load", lambda: (0.0, "idle"))
    torch = FakeTorch()
    medians, sanity, withheld = timing.timed_rounds({"a": lambda: None}, calls=3, torch=torch)
    assert torch.closed and withheld is None and "(1.00×)" in sanity
    assert medians[timing.TORCH_PLAIN] == pytest.approx(0.004)
    medians, sanity, withheld = timing.timed_rounds({"a": lambda: None}, calls=3)
    assert set(medians) == {"a"} and sanity is None and withheld is None
