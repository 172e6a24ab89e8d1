"""Every benchmark's count flags (steps, seeds, sizes, rounds, tasks) reject what is not a
positive integer with a usage error naming the flag, before any work starts."""

import importlib

import pytest

# module -> a count flag it has (the loss benchmarks share --steps / --seeds)
FLAGS = {
    "aggregator_speed": "--solve-calls",
    "contrastive": "--steps",
    "flooding": "--batch-size",
    "gram_speed": "--tasks",
    "imbalance": "--seeds",
    "iwrm": "--eval-every",
    "leaderboard": "--seeds",
    "multimnist": "--train-pairs",
    "noisy_labels": "--chunk",
    "rdrop": "--labelled",
    "retrieval": "--dim",
    "scale_disparity": "--window",
    "speed": "--num-tasks",
}


@pytest.mark.parametrize("module", list(FLAGS))
@pytest.mark.parametrize("value", ["0", "-3", "1.5", "True", "many"])
def test_a_count_flag_rejects_what_is_not_a_positive_int(module, value, capsys):
    benchmark = importlib.import_module(f"benchmarks.{module}")
    entry = getattr(benchmark, "parse_args", None) or benchmark.main
    with pytest.raises(SystemExit) as exit_info:
        entry([FLAGS[module], value])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {FLAGS[module]}: '{value}' is not a positive integer" in error


def test_warmup_steps_may_be_zero_but_not_negative(capsys):
    from benchmarks import multimnist

    assert multimnist.parse_args(["--warmup", "0"]).warmup == 0
    with pytest.raises(SystemExit):
        multimnist.parse_args(["--warmup", "-1"])
    assert "argument --warmup: '-1' is not an integer >= 0" in capsys.readouterr().err
