"""Real data for the benchmarks: the bundled MNIST digits, from :mod:`mtl_optax.datasets`
(installable with the ``examples`` extra, so the notebooks use the same data without a
checkout). See that module for the fixed split and MultiMNIST."""

from mtl_optax.datasets import Splits, load_mnist, mnist_split, mnist_splits, multi_mnist

__all__ = ["Splits", "load_mnist", "mnist_split", "mnist_splits", "multi_mnist"]
