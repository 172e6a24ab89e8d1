"""Instance-wise risk minimisation (IWRM): every example's loss an objective, on the digits.

Jacobian descent over the per-example losses of a minibatch (K = batch size objectives;
Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024, sec. 5 and
torchjd's IWRM example), with ``mtl.instance_wise_value_and_grad``: each step takes the
B x B Gram of the per-example gradients from the structured Gram engine (one forward and
one backward pass), weights from a Gram weighting (``mtl.upgrad()`` / ``mtl.mgda()``), the
update ``Σ_b w_b g_b`` from the same stored activations and cotangents, then SGD or Adam;
versus the ordinary mean-loss step with the same optimiser.

Data: the fixed MNIST train split of the bundled digits (3,600), and its long-tailed cut
of ``benchmarks.imbalance`` (ratio 100: class 0 keeps 360 digits, class 9 keeps 4); the
balanced test split (1,000; accuracy is also the balanced accuracy there). Model: ReLU MLP
784 → 256 → 256 → 10, batch 64 drawn uniformly with replacement, softmax cross-entropy.
Learning rates are the common defaults, not tuned, and equal across aggregations (SGD 0.1,
Adam 1e-3); UPGrad's and MGDA's weights are scaled like the mean (equal, aligned gradients
give w = 1/K), so the step sizes are comparable.

Reported: mean ± std over seeds of the final training loss (mean per-example loss of the
last 10% of the steps' batches), the final test accuracy, the mean accuracy on the three
rarest classes (long-tailed data) and the seconds per run; curves of the training loss
and of the test accuracy (every ``--eval-every`` steps).

    python -m benchmarks.iwrm             # 3 seeds x 5 methods x 2 datasets
    python -m benchmarks.iwrm --smoke     # seconds
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from benchmarks.imbalance import RARE, long_tailed_indices

# method -> (aggregation: None = mean loss, or a Gram weighting factory; optimiser)
METHODS: dict[str, tuple[Callable | None, str]] = {
    "SGD, mean loss": (None, "sgd"),
    "SGD, UPGrad (IWRM)": (mtl.upgrad, "sgd"),
    "SGD, MGDA (IWRM)": (mtl.mgda, "sgd"),
    "Adam, mean loss": (None, "adam"),
    "Adam, UPGrad (IWRM)": (mtl.upgrad, "adam"),
}
LEARNING_RATES = {"sgd": 0.1, "adam": 1e-3}
DATASETS = ("digits", "long-tailed digits")


def per_example_loss(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(common.mlp(params, x), y)


def make_step(method: str, data, batch_size: int):
    """A pure ``step(state, key) -> (state, metrics)`` and the initial-state factory."""
    make_weighting, opt_name = METHODS[method]
    optimizer = getattr(optax, opt_name)(LEARNING_RATES[opt_name])
    x_tr, y_tr = data

    if make_weighting is None:

        def step(state, key):
            params, opt_state, wstate = state
            batch = common.sample_batch(key, (x_tr, y_tr), batch_size)
            loss, grads = jax.value_and_grad(lambda p: per_example_loss(p, batch).mean())(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, wstate), {"loss": loss}

        return step, lambda params: (params, optimizer.init(params), ())

    grad_fn = mtl.instance_wise_value_and_grad(
        per_example_loss, make_weighting(), batch_size=batch_size
    )

    def step(state, key):
        params, opt_state, wstate = state
        batch = common.sample_batch(key, (x_tr, y_tr), batch_size)
        losses, grads, wstate = grad_fn(params, batch, wstate)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics = {"loss": losses.mean(), "weight_sum": mtl.task_weights(wstate).sum()}
        return (optax.apply_updates(params, updates), opt_state, wstate), metrics

    return step, lambda params: (params, optimizer.init(params), grad_fn.init(params))


def run_one(method, seed, *, train, test, args):
    x_te, y_te = test
    step, init = make_step(method, train, args.batch_size)
    key_init, key_train = jax.random.split(jax.random.PRNGKey(seed))
    params = common.init_mlp(key_init, [784, *args.hidden, common.NUM_CLASSES])

    def evaluate(state):
        logits = common.mlp(state[0], x_te)
        return {"test_acc": common.accuracy(logits, y_te)}

    start = time.perf_counter()
    state, history = common.train(
        step,
        init(params),
        key_train,
        steps=args.steps,
        chunk=args.eval_every,
        desc=f"{method} seed {seed}",
        progress=not args.no_progress,
        evaluate=evaluate,
    )
    seconds = time.perf_counter() - start
    per_class = common.per_class_accuracy(common.mlp(state[0], x_te), y_te)
    tail = max(1, args.steps // 10)
    scores = {
        "train_loss": float(np.mean(history["loss"][-tail:])),
        "test_acc": float(per_class.mean()),
        "rare": float(per_class[list(RARE)].mean()),
        "seconds": seconds,
    }
    return scores, history


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=1500)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 256])
    parser.add_argument("--batch-size", type=common.count, default=64)
    parser.add_argument("--eval-every", type=common.count, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    args = parser.parse_args(argv)
    if args.smoke:  # one mean-loss and one IWRM method (MGDA: the cheaper solve to compile)
        args.seeds, args.steps, args.hidden = 1, 30, [16]
        args.batch_size, args.eval_every = 8, 15
        args.methods = ["SGD, mean loss", "SGD, MGDA (IWRM)"]
        args.datasets = ["long-tailed digits"]
    clock = common.Stopwatch()

    x, y = common.mnist_split("train")
    keep = long_tailed_indices(y)
    datasets = {
        "digits": (jnp.asarray(x), jnp.asarray(y)),
        "long-tailed digits": (jnp.asarray(x[keep]), jnp.asarray(y[keep])),
    }
    test = tuple(jnp.asarray(a) for a in common.mnist_split("test"))

    results: dict[str, common.Results] = {d: {} for d in args.datasets}
    histories: dict[str, dict[str, list]] = {d: {} for d in args.datasets}
    for dataset in args.datasets:
        for seed in range(args.seeds):
            for method in args.methods:
                scores, history = run_one(
                    method, seed, train=datasets[dataset], test=test, args=args
                )
                common.add_result(results[dataset], method, scores)
                histories[dataset].setdefault(method, []).append(history)

    columns = {
        "train_loss": ("final training loss", 1, 3),
        "test_acc": ("test accuracy (%)", 100, 1),
        "rare": ("rarest 3 classes (%)", 100, 1),
        "seconds": ("seconds per run", 1, 1),
    }
    tables = []
    for dataset in args.datasets:
        n = len(datasets[dataset][1])
        tables.append(
            f"### {dataset} ({n} training digits)\n\n"
            + common.markdown_table(results[dataset], columns)
        )
    text = (
        common.header(
            "Instance-wise risk minimisation on the digits",
            args,
            clock(),
            f"MLP {' → '.join(map(str, [784, *args.hidden, 10]))}, batch {args.batch_size}",
        )
        + "\n"
        + "\n\n".join(tables)
        + "\n"
    )
    print(text)

    fig, axes = common.figure(2, nrows=len(args.datasets), width=5.5)
    for row, dataset in enumerate(args.datasets):
        ax_loss, ax_acc = axes[2 * row], axes[2 * row + 1]
        for method, runs in histories[dataset].items():
            loss = np.stack([smooth(h["loss"], max(1, args.steps // 50)) for h in runs])
            steps = np.arange(1, loss.shape[1] + 1)
            band(ax_loss, steps, loss, method)
            acc = 100 * np.stack([h["test_acc"] for h in runs])
            band(ax_acc, runs[0]["eval_step"], acc, method)
        ax_loss.set_yscale("log")
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("training loss (batch mean, smoothed)")
        ax_loss.set_title(dataset)
        ax_acc.set_xlabel("step")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_title(dataset)
        ax_acc.legend(fontsize=7)
    fig.tight_layout()
    written = common.write_results(args.out, "iwrm", text, fig, smoke=args.smoke)
    for path in written:
        print(f"wrote {path}")
    return {"text": text, "results": results, "histories": histories}


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Trailing moving average (the first entries average what exists so far)."""
    csum = np.cumsum(np.asarray(values, np.float64))
    out = csum.copy()
    out[width:] = csum[width:] - csum[:-width]
    return out / np.minimum(np.arange(1, len(values) + 1), width)


def band(ax, x, runs: np.ndarray, label: str) -> None:
    mean, std = runs.mean(0), runs.std(0)
    (line,) = ax.plot(x, mean, label=label, lw=1.2)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)


if __name__ == "__main__":
    main()
