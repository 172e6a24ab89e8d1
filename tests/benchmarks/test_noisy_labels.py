"""The noisy-label benchmark runs a tiny configuration end to end and really trains.

It checks that training happened (the primary loss went down, test accuracy beats chance)
and the data construction (noise rate, disjoint clean set), never a tuned number.
"""

from __future__ import annotations

import numpy as np

from benchmarks import common, noisy_labels

CHANCE = 0.1
# one tier-1 method and two tier-3 ones; the others share these code paths
METHODS = ["summed", "UPGrad", "primary/auxiliary"]


def test_symmetric_noise_rate_and_never_same_class():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 20_000)
    noisy = noisy_labels.symmetric_noise(labels, 0.6, rng)
    flipped = noisy != labels
    assert abs(flipped.mean() - 0.6) < 0.02  # binomial std ≈ 0.0035
    # the replacement class is uniform over the nine others
    counts = np.bincount((noisy[flipped] - labels[flipped]) % 10, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 0.8 * counts[1:].mean()


def test_clean_split_is_balanced_and_disjoint_from_noisy_set():
    _, y = common.mnist_split("train")
    clean = noisy_labels.clean_split(y)
    assert clean.sum() == 200
    assert np.all(np.bincount(y[clean], minlength=10) == 20)
    data = noisy_labels.load_data(0.4, 1)
    assert data.x_noisy.shape[0] + data.x_clean.shape[0] == len(y)


def test_smoke_trains():
    out = noisy_labels.main(
        ["--smoke", "--out", "", "--no-progress", "--seeds", "1", "--methods", *METHODS]
    )
    for method in METHODS:
        history = out["histories"][0.4, method]
        assert common.decreased(history["loss_noisy"][:, 0]), method
        assert out["results"][method]["acc_0.4"][0] > 2 * CHANCE, (method, out["results"])
