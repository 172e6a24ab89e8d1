"""The three problems of the multi-task leaderboard: data, shared encoder, task heads, metrics.

Each :class:`Problem` is a real data set with a fixed train / validation / test split, a
model written as a shared ``encoder(params, batch) -> z`` and per-task heads
``head_i(params, z, batch) -> scalar`` (or one head vmapped over stacked parameters), and
``predict(params, x)`` (one output per task) with ``score(outputs, y)`` (the metrics). The
leaderboard trains every method on exactly these pieces; only the update direction differs.
Predictions and scores are separate so that the single-task baselines are scored as one
model: task k's output from the model trained on task k.

* **Yeast** (:func:`yeast`) -- 14 binary tasks (gene functional categories), 2,417 genes x
  103 features (``river``'s copy of MULAN's set, MULAN's train/test split; 300 train genes
  held out for validation). Encoder: ReLU MLP 103 -> 128 -> 64; heads: one logistic unit per
  task (stacked parameters ``(14, 64)``), mean binary cross-entropy. Metrics: per-task
  accuracy (the Δm metric), per-task F1 of the positive class and its mean over tasks
  (macro-F1), Hamming loss (the fraction of wrong labels, ``1 -`` mean accuracy).
* **MultiMNIST-LeNet** (:func:`multimnist_lenet`) -- two tasks (the top-left and the
  bottom-right digit of two overlaid real MNIST digits on a 36 x 36 canvas resized to 28 x
  28, :func:`benchmarks.data.multi_mnist`; train / validation / test pairs built from
  disjoint digit splits). The model of Sener & Koltun (2018): LeNet encoder conv 5x5 (10) ->
  max-pool 2 -> ReLU -> conv 5x5 (20) -> max-pool 2 -> ReLU -> dense 320 -> 50 -> ReLU,
  heads dense 50 -> 50 -> ReLU -> 10. Metric: per-task accuracy.
* **Scale disparity** (:func:`scale_disparity`) -- the three tasks of
  :mod:`benchmarks.scale_disparity` (left digit, right digit, the sum of the two digits
  regressed with the squared error times 1000, so its loss starts about 10⁵ times above the
  others) on its ReLU MLP 784 -> 256 -> 128 with linear heads. Metrics: the two accuracies
  and the RMSE of the predicted sum (lower is better).

Every random choice is fixed (data seeds, split seeds); ``init_params(seed)`` draws the
He-normal initial weights (zero biases) with NumPy's generator for that seed (no XLA
compilation of random-number kernels, which costs more CPU time than a smoke run trains).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common, multimnist
from benchmarks import scale_disparity as scale_disparity_benchmark
from benchmarks.data import load_yeast, mnist_splits, multi_mnist, yeast_splits

Batch = tuple[jax.Array, jax.Array]


class Split(NamedTuple):
    x: jax.Array
    y: jax.Array


class Metric(NamedTuple):
    """A per-task metric entering Δm: its key in ``evaluate``'s output and its direction."""

    key: str
    higher_is_better: bool


class Problem(NamedTuple):
    """One data set with its model, as every method of the leaderboard sees it.

    ``heads`` is a sequence of per-task losses ``head_i(params, z, batch) -> scalar``, or
    ``None`` when the heads are stacked: then ``stacked_head(head_params_i, z, batch, i)``
    is one head applied to the slice ``i`` of ``params["heads"]`` (leading task axis).
    ``task_losses(params, batch) -> (K,)`` is the same computation in one function (what
    the single-task baselines and the checks differentiate). ``predict(params, x)`` returns
    a list of K per-task outputs and ``score(outputs, y)`` the metrics (a flat dict of
    floats). ``metrics`` are the K per-task metrics of Δm (one per task, in task order);
    ``columns`` are the summary columns of the table (key -> header, scale, digits).
    ``prior_losses`` are what :func:`mtl_optax.prior_loss_weighting` divides by.
    """

    name: str
    tasks: tuple[str, ...]
    init_params: Callable[[int], Any]
    encoder: Callable[[Any, Batch], jax.Array]
    heads: Sequence[Callable[[Any, jax.Array, Batch], jax.Array]] | None
    stacked_head: Callable[[Any, jax.Array, Batch, jax.Array], jax.Array] | None
    task_losses: Callable[[Any, Batch], jax.Array]
    train: Split
    val: Split
    test: Split
    predict: Callable[[Any, jax.Array], list[jax.Array]]
    score: Callable[[Sequence[jax.Array], jax.Array], dict[str, float]]
    metrics: tuple[Metric, ...]
    columns: dict[str, tuple[str, float, int]]
    prior_losses: tuple[float, ...]  # each task's loss of the best constant predictor (train)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def evaluate(self, params, split: Split) -> dict[str, float]:
        return self.score(self.predict(params, split.x), split.y)


def _dense(rng: np.random.Generator, n_in: int, n_out: int) -> dict[str, np.ndarray]:
    """He-normal weights ``(n_in, n_out)`` (std ``sqrt(2 / n_in)``), zero biases."""
    w = rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)
    return {"w": w.astype(np.float32), "b": np.zeros(n_out, np.float32)}


def _mlp(rng: np.random.Generator, sizes: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Dense layers ``sizes[0] -> ... -> sizes[-1]`` in the layout of ``common.mlp``."""
    return [_dense(rng, m, n) for m, n in zip(sizes[:-1], sizes[1:])]


def _device(tree):
    return jax.tree_util.tree_map(jnp.asarray, tree)


def _split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(jnp.asarray(x), jnp.asarray(y))


def in_chunks(outputs: Callable, size: int = 1000) -> Callable:
    """``predict(params, x)`` from a per-chunk ``outputs``: jitted, ``size`` rows at a time
    (flat evaluation memory; one compilation per distinct chunk length)."""
    outputs = jax.jit(outputs)

    def predict(params, x):
        x = np.asarray(x)  # host slices: no per-offset compilation
        parts = [outputs(params, x[i : i + size]) for i in range(0, x.shape[0], size)]
        return [jnp.concatenate(task) for task in zip(*parts)]

    return predict


# --------------------------------------------------------------------------- Yeast
YEAST_HIDDEN = (128, 64)


def yeast() -> Problem:
    """Yeast: 14 binary tasks on an MLP encoder with stacked logistic heads (module doc)."""
    x, y = load_yeast()
    splits = yeast_splits()
    mean, std = x[splits.train].mean(0), x[splits.train].std(0)
    x = (x - mean) / std  # standardised with the train genes' statistics only
    k = y.shape[1]
    sizes = (x.shape[1], *YEAST_HIDDEN)

    def init_params(seed):
        rng = np.random.default_rng(seed)
        encoder = _mlp(rng, sizes)
        heads = _dense(rng, sizes[-1], k)  # a logistic unit per task: (K, 64) stacked
        return _device({"encoder": encoder, "heads": {"w": heads["w"].T, "b": heads["b"]}})

    def encoder(params, batch):
        return common.mlp(params["encoder"], batch[0], activate_last=True)

    def stacked_head(head_params, z, batch, task):
        logits = z @ head_params["w"] + head_params["b"]
        labels = batch[1][:, task].astype(logits.dtype)
        return optax.losses.sigmoid_binary_cross_entropy(logits, labels).mean()

    def all_logits(params, z):
        return z @ params["heads"]["w"].T + params["heads"]["b"]

    def task_losses(params, batch):
        logits = all_logits(params, encoder(params, batch))
        labels = batch[1].astype(logits.dtype)
        return optax.losses.sigmoid_binary_cross_entropy(logits, labels).mean(0)

    @jax.jit
    def predict(params, x):
        return list(all_logits(params, encoder(params, (x, None))).T)

    def score(outputs, y):
        return multilabel_metrics(np.stack(outputs, -1) > 0, np.asarray(y))

    tasks = tuple(f"Class{i + 1}" for i in range(k))
    return Problem(
        name="Yeast",
        tasks=tasks,
        init_params=init_params,
        encoder=encoder,
        heads=None,
        stacked_head=stacked_head,
        task_losses=task_losses,
        train=_split(x[splits.train], y[splits.train]),
        val=_split(x[splits.val], y[splits.val]),
        test=_split(x[splits.test], y[splits.test]),
        predict=predict,
        score=score,
        metrics=tuple(Metric(f"acc/{t}", True) for t in tasks),
        columns={
            "acc_mean": ("mean acc. (%)", 100, 2),
            "macro_f1": ("macro-F1 (%)", 100, 2),
            "hamming": ("Hamming loss (%)", 100, 2),
        },
        prior_losses=tuple(mtl.cross_entropy_prior_loss(c, 2) for c in y[splits.train].T),
    )


def multilabel_metrics(pred: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Per-label accuracy and F1, macro-F1 and Hamming loss of boolean predictions (N, K).

    F1 of label k is ``2 TP / (2 TP + FP + FN)`` (0 when the label is never predicted and
    never present, as scikit-learn's ``zero_division=0``); macro-F1 is its mean over
    labels; Hamming loss is the fraction of wrong (example, label) pairs.
    """
    pred, labels = np.asarray(pred, bool), np.asarray(labels, bool)
    tp = np.sum(pred & labels, 0)
    fp = np.sum(pred & ~labels, 0)
    fn = np.sum(~pred & labels, 0)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    acc = np.mean(pred == labels, 0)
    out = {f"acc/Class{i + 1}": float(a) for i, a in enumerate(acc)}
    out.update({f"f1/Class{i + 1}": float(f) for i, f in enumerate(f1)})
    out["acc_mean"] = float(acc.mean())
    out["macro_f1"] = float(f1.mean())
    out["hamming"] = float(np.mean(pred != labels))
    return out


# --------------------------------------------------------------------------- MultiMNIST-LeNet
DIGITS = ("left", "right")


def _conv(x, layer):
    """'VALID' 2-d convolution of NHWC images with an HWIO kernel, plus bias.

    Written as image patches times the flattened kernel (im2col): the backward pass is then
    two matrix products and the slices' transposes, faster on CPU than XLA's convolution
    gradients (35 ms against 51 ms for a LeNet gradient at batch 64), and ``vmap`` over
    seeds gives batched matrix products rather than grouped convolutions.
    """
    w = layer["w"]
    size = w.shape[0]
    n, h, width, _ = x.shape
    oh, ow = h - size + 1, width - size + 1
    patches = jnp.concatenate(
        [x[:, i : i + oh, j : j + ow, :] for i in range(size) for j in range(size)], axis=-1
    )  # (N, oh, ow, size * size * C_in), ordered as the HWIO kernel's first three axes
    return patches @ w.reshape(-1, w.shape[-1]) + layer["b"]


def _max_pool(x):
    """2 x 2 max-pooling with stride 2 of NHWC images (even height and width)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def init_lenet(seed: int, num_tasks: int = 2) -> dict[str, Any]:
    """He-initialised LeNet encoder and ``num_tasks`` heads 50 -> 50 -> 10 (zero biases)."""
    rng = np.random.default_rng(seed)

    def conv_layer(size, c_in, c_out):  # HWIO kernel = a dense layer on the patches
        layer = _dense(rng, size * size * c_in, c_out)
        return {"w": layer["w"].reshape(size, size, c_in, c_out), "b": layer["b"]}

    encoder = {"conv1": conv_layer(5, 1, 10), "conv2": conv_layer(5, 10, 20)}
    encoder["dense"] = _dense(rng, 320, 50)
    return _device(
        {"encoder": encoder, "heads": [_mlp(rng, (50, 50, 10)) for _ in range(num_tasks)]}
    )


def lenet_encoder(params, batch) -> jax.Array:
    """(B, 28, 28) images -> (B, 50) features (module doc)."""
    p = params["encoder"]
    h = batch[0][..., None]
    h = jax.nn.relu(_max_pool(_conv(h, p["conv1"])))
    h = jax.nn.relu(_max_pool(_conv(h, p["conv2"])))
    h = h.reshape(h.shape[0], -1)
    return jax.nn.relu(h @ p["dense"]["w"] + p["dense"]["b"])


def _digit_head(task: int):
    def head(params, z, batch):
        logits = common.mlp(params["heads"][task], z)
        return optax.losses.softmax_cross_entropy_with_integer_labels(
            logits, batch[1][:, task]
        ).mean()

    head.__name__ = f"{DIGITS[task]}_digit"
    return head


def multimnist_lenet(*, train_pairs: int, val_pairs: int, test_pairs: int) -> Problem:
    """MultiMNIST with the LeNet encoder of Sener & Koltun (2018) (module doc)."""
    splits = mnist_splits()
    # one seed per split; the digits of the three splits are disjoint
    sets = [
        multi_mnist(idx, num_pairs=n, seed=seed)
        for idx, n, seed in (
            (splits.train, train_pairs, 0),
            (splits.val, val_pairs, 1),
            (splits.test, test_pairs, 2),
        )
    ]
    heads = [_digit_head(t) for t in range(2)]

    def task_losses(params, batch):
        z = lenet_encoder(params, batch)
        return jnp.stack([head(params, z, batch) for head in heads])

    def outputs(params, x):
        z = lenet_encoder(params, (x, None))
        return [common.mlp(head, z) for head in params["heads"]]

    def score(outputs, y):
        return {
            f"acc/{name}": common.accuracy(outputs[t], y[:, t]) for t, name in enumerate(DIGITS)
        }

    return Problem(
        name="MultiMNIST-LeNet",
        tasks=DIGITS,
        init_params=init_lenet,
        encoder=lenet_encoder,
        heads=heads,
        stacked_head=None,
        task_losses=task_losses,
        train=_split(*sets[0]),
        val=_split(*sets[1]),
        test=_split(*sets[2]),
        predict=in_chunks(outputs),
        score=score,
        metrics=tuple(Metric(f"acc/{name}", True) for name in DIGITS),
        columns={f"acc/{name}": (f"{name} acc. (%)", 100, 2) for name in DIGITS},
        prior_losses=tuple(mtl.cross_entropy_prior_loss(c, 10) for c in sets[0][1].T),
    )


# --------------------------------------------------------------------------- scale disparity
def _scale_head(task: int, scale: float):
    ce = optax.losses.softmax_cross_entropy_with_integer_labels

    def head(params, z, batch):
        out = z @ params["heads"][task]["w"] + params["heads"][task]["b"]
        y = batch[1]
        if task < 2:
            return ce(out, y[:, task]).mean()
        total = (y[:, 0] + y[:, 1]).astype(out.dtype)
        return scale * jnp.mean((out[:, 0] - total) ** 2)

    head.__name__ = scale_disparity_benchmark.TASKS[task]
    return head


def scale_disparity(
    *, train_pairs: int, val_pairs: int, test_pairs: int, scale: float = 1000.0
) -> Problem:
    """The 3-task scale-disparity MultiMNIST (``sum`` loss times ``scale``; module doc)."""
    splits = mnist_splits()
    flat = lambda x: x.reshape(len(x), -1)
    sets = [
        multi_mnist(idx, num_pairs=n, seed=seed)
        for idx, n, seed in (
            (splits.train, train_pairs, 0),
            (splits.val, val_pairs, 1),
            (splits.test, test_pairs, 2),
        )
    ]
    heads = [_scale_head(t, scale) for t in range(3)]

    def init_params(seed):  # the layout of scale_disparity.init_params
        rng = np.random.default_rng(seed)
        trunk = _mlp(rng, multimnist.TRUNK)
        return _device(
            {"trunk": trunk, "heads": [_dense(rng, multimnist.TRUNK[-1], n) for n in (10, 10, 1)]}
        )

    def encoder(params, batch):
        return multimnist.encode(params, batch)

    def task_losses(params, batch):
        z = encoder(params, batch)
        return jnp.stack([head(params, z, batch) for head in heads])

    def outputs(params, x):
        return scale_disparity_benchmark.outputs(params, encoder(params, (x, None)))

    def score(outputs, y):
        left, right, total = outputs
        truth = (y[:, 0] + y[:, 1]).astype(total.dtype)
        return {
            "acc/left": common.accuracy(left, y[:, 0]),
            "acc/right": common.accuracy(right, y[:, 1]),
            "rmse_sum": float(jnp.sqrt(jnp.mean((total - truth) ** 2))),
        }

    return Problem(
        name="Scale disparity",
        tasks=scale_disparity_benchmark.TASKS,
        init_params=init_params,
        encoder=encoder,
        heads=heads,
        stacked_head=None,
        task_losses=task_losses,
        train=_split(flat(sets[0][0]), sets[0][1]),
        val=_split(flat(sets[1][0]), sets[1][1]),
        test=_split(flat(sets[2][0]), sets[2][1]),
        predict=in_chunks(outputs),
        score=score,
        metrics=(Metric("acc/left", True), Metric("acc/right", True), Metric("rmse_sum", False)),
        columns={
            "acc/left": ("left acc. (%)", 100, 2),
            "acc/right": ("right acc. (%)", 100, 2),
            "rmse_sum": ("sum RMSE (digits)", 1, 3),
        },
        prior_losses=(
            mtl.cross_entropy_prior_loss(sets[0][1][:, 0], 10),
            mtl.cross_entropy_prior_loss(sets[0][1][:, 1], 10),
            scale * mtl.squared_error_prior_loss(sets[0][1].sum(1)),
        ),
    )
