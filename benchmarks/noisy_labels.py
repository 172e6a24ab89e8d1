"""Noisy labels with a small clean auxiliary: does the primary/auxiliary projection use it?

Two tasks share one model (every parameter is shared; both tasks are the same 10-way
digit classification, on different data):

* task 0, the **primary**: cross-entropy on the MNIST train digits with *symmetric label
  noise* -- each label is replaced, with probability ``p`` (40 % and 60 %), by one of the
  nine other classes drawn uniformly (so the true class stays the most frequent label of
  each digit type: 1 − p against p/9);
* task 1, the **auxiliary**: cross-entropy on 200 clean digits (20 per class, taken out of
  the train split before the noise is drawn, so the two sets are disjoint).

Methods (same initialisation, minibatch order, optimizer and steps for all):

* ``primary only`` -- ``constant_weighting([1, 0])``, tier 1 (the clean digits unused);
* ``summed`` -- ``sum_weighting()``: ``L_0 + L_1``, tier 1;
* ``MGDA`` -- ``mgda()`` on the per-task gradients of all parameters, tier 3;
* ``UPGrad`` -- ``upgrad()``: the mean of each gradient projected onto the dual cone of
  both (non-conflicting, like MGDA, without collapsing onto the smaller gradient), tier 3;
* ``primary/auxiliary`` -- ``primary_auxiliary(primary=0)``: the update closest to the
  noisy-label gradient along which the clean loss does not increase (to first order), tier 3;
* ``auxiliary only`` -- ``constant_weighting([0, 1])``: a reference row, the 200 clean
  digits alone.

The two tasks see disjoint samples, so the feature-level Gram (tier 2) would be diagonal and
is not used; the Gram methods take the full per-task gradients. Nothing is tuned (Adam 1e-3,
a fixed number of steps, no early stopping, the validation split unused); the metric is the
accuracy on the clean test split after the last step. The three seeds of a method run
together under ``jax.vmap`` (each with its own initialisation, noise draw and minibatches).
The plot ``noisy_labels.png`` shows, per noise level, the test accuracy (every ``--chunk``
steps; drawn only, nothing is selected on it), the clean-task loss and the weight on the
clean task over training, as seed means.

    python -m benchmarks.noisy_labels                      # default size, 3 seeds
    python -m benchmarks.noisy_labels --methods summed "primary/auxiliary"
    python -m benchmarks.noisy_labels --smoke              # seconds
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from mtl_optax.datasets import symmetric_label_noise as symmetric_noise

NOISE_LEVELS = (0.4, 0.6)
CLEAN_PER_CLASS = 20  # 200 clean auxiliary digits
TASK_NAMES = ("noisy", "clean")
# method -> (tier, constructor of its weighting)
METHODS: dict[str, tuple[str, Callable[[], mtl.Weighting]]] = {
    "primary only": ("1", lambda: mtl.constant_weighting([1.0, 0.0])),
    "summed": ("1", mtl.sum_weighting),
    "MGDA": ("3", mtl.mgda),
    "UPGrad": ("3", mtl.upgrad),
    "primary/auxiliary": ("3", lambda: mtl.primary_auxiliary(primary=0)),
    "auxiliary only": ("1", lambda: mtl.constant_weighting([0.0, 1.0])),
}


# --------------------------------------------------------------------------- data
def clean_split(labels: np.ndarray, per_class: int = CLEAN_PER_CLASS) -> np.ndarray:
    """Boolean mask of the clean auxiliary digits: the first ``per_class`` of each class."""
    mask = np.zeros(len(labels), bool)
    for c in range(common.NUM_CLASSES):
        mask[np.flatnonzero(labels == c)[:per_class]] = True
    return mask


class Data(NamedTuple):
    x_noisy: jax.Array  # (N, 784)
    y_noisy: jax.Array  # (S, N) noisy labels, one draw per seed
    x_clean: jax.Array  # (200, 784)
    y_clean: jax.Array  # (200,)
    x_test: jax.Array
    y_test: jax.Array


def load_data(noise: float, seeds: int, *, max_noisy: int | None = None) -> Data:
    """Noisy primary set (one noise draw per seed), clean auxiliary set, clean test set."""
    x, y = common.mnist_split("train")
    clean = clean_split(y)
    keep = np.flatnonzero(~clean)
    if max_noisy is not None:  # a class-balanced subset (the split is ordered by class)
        keep = np.sort(np.random.default_rng(0).permutation(keep)[:max_noisy])
    x_noisy, y_true = x[keep], y[keep]
    y_noisy = np.stack(
        [
            symmetric_noise(y_true, noise, np.random.default_rng([seed, round(noise * 100)]))
            for seed in range(seeds)
        ]
    )
    x_test, y_test = common.mnist_split("test")
    return Data(*(jnp.asarray(a) for a in (x_noisy, y_noisy, x[clean], y[clean], x_test, y_test)))


# --------------------------------------------------------------------------- model and steps
def logits_fn(params, x: jax.Array) -> jax.Array:
    return common.mlp(params, x)


def make_step(method: str, *, batch_size: int, lr: float) -> tuple[Callable, Callable[[Any], Any]]:
    """``step(state, key, data) -> (state, metrics)`` for one seed, and ``init(params)``.

    ``data`` is ``(x_noisy, y_noisy, x_clean, y_clean)`` with this seed's noisy labels. Every
    parameter is shared by the two tasks (``shared=True``). Tier-1 methods take one backward
    pass of ``Σ w_i L_i`` (:func:`mtl_optax.value_and_grad`); tier-3 methods the two
    per-task gradients (:func:`mtl_optax.value_and_jacobian` + :func:`mtl_optax.aggregate`).
    """
    tier, make_weighting = METHODS[method]
    weighting = make_weighting()
    adam = optax.adam(lr)

    def sample(key, data):
        x_noisy, y_noisy, x_clean, y_clean = data
        k_noisy, k_clean = jax.random.split(key)
        return (
            common.sample_batch(k_noisy, (x_noisy, y_noisy), batch_size),
            common.sample_batch(k_clean, (x_clean, y_clean), batch_size),
        )

    def task_losses(params, batches) -> dict[str, jax.Array]:
        """Mean cross-entropy of each task on its own batch, keyed by task name."""
        ce = optax.losses.softmax_cross_entropy_with_integer_labels
        return {
            name: ce(logits_fn(params, x), y).mean() for name, (x, y) in zip(TASK_NAMES, batches)
        }

    if tier == "1":
        grad_fn = mtl.value_and_grad(task_losses, weighting, tasks=TASK_NAMES, shared=True)

        def step(state, key, data):
            params, opt_state, wstate = state
            losses, grads, wstate = grad_fn(params, sample(key, data), wstate)
            updates, opt_state = adam.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, wstate), _metrics(losses, mtl.task_weights(wstate))

        return step, lambda p: (p, adam.init(p), grad_fn.init(p))

    opt = optax.chain(mtl.aggregate(weighting, tasks=TASK_NAMES, shared=True), adam)
    jac_fn = mtl.value_and_jacobian(task_losses)

    def step(state, key, data):
        params, opt_state = state
        losses, task_grads = jac_fn(params, sample(key, data))
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), _metrics(losses, mtl.task_weights(opt_state))

    return step, lambda p: (p, opt.init(p))


def _metrics(losses: jax.Array, weights: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {"loss": losses[0]}  # the primary objective: the noisy-label loss
    for t, name in enumerate(TASK_NAMES):
        out[f"loss_{name}"] = losses[t]
        out[f"w_{name}"] = weights[name]
    return out


def run_method(method: str, data: Data, args, *, progress: bool) -> dict[str, Any]:
    """Train every seed of ``method`` at once (vmapped over seeds); histories and accuracies."""
    seeds = data.y_noisy.shape[0]
    step, init = make_step(method, batch_size=args.batch_size, lr=args.lr)
    sizes = (784, *args.hidden, common.NUM_CLASSES)
    params = jax.vmap(lambda k: common.init_mlp(k, sizes))(
        jnp.stack([jax.random.PRNGKey(s) for s in range(seeds)])
    )
    per_seed = (data.y_noisy,)

    def batched_step(state, key):
        keys = jax.random.split(key, seeds)
        state, metrics = jax.vmap(
            lambda s, k, y_noisy: step(s, k, (data.x_noisy, y_noisy, data.x_clean, data.y_clean))
        )(state, keys, *per_seed)
        return state, {**metrics, "loss": metrics["loss"].mean()}  # seed mean for the bar

    @jax.jit
    def test_accuracy(params) -> jax.Array:  # (seeds,)
        logits = jax.vmap(lambda p: logits_fn(p, data.x_test))(params)
        return jnp.mean(jnp.argmax(logits, -1) == data.y_test, axis=-1)

    state, history = common.train(
        batched_step,
        jax.vmap(init)(params),
        jax.random.PRNGKey(1000),  # same minibatch order for every method
        steps=args.steps,
        chunk=args.chunk,
        desc=method,
        progress=progress,
        # for the plot only (seed mean); the table reports the last step, nothing is selected
        evaluate=lambda state: {"test_acc": float(test_accuracy(state[0]).mean())},
    )
    return {"history": history, "test_acc": np.asarray(test_accuracy(state[0]))}


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=1500)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 128])
    parser.add_argument("--batch-size", type=common.count, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--chunk",
        type=common.count,
        default=100,
        help="steps per jitted scan (and per plotted test point)",
    )
    parser.add_argument("--noise", type=float, nargs="+", default=list(NOISE_LEVELS))
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        choices=list(METHODS),
        metavar="METHOD",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps = min(args.seeds, 2), min(args.steps, 200)
        args.hidden, args.noise = [64], [0.4]
    args.max_noisy = 1000 if args.smoke else None
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"table", "results", "histories"}`` (for tests)."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    results: common.Results = {}
    histories: dict[tuple[float, str], dict[str, np.ndarray]] = {}
    for noise in args.noise:
        data = load_data(noise, args.seeds, max_noisy=args.max_noisy)
        for method in args.methods:
            out = run_method(method, data, args, progress=not args.no_progress)
            histories[noise, method] = out["history"]
            for acc in out["test_acc"]:
                common.add_result(results, method, {f"acc_{noise:g}": acc})

    columns = {f"acc_{n:g}": (f"test acc., {n:.0%} noise (%)", 100, 1) for n in args.noise}
    tiers = {m: METHODS[m][0] for m in args.methods}
    table = common.markdown_table(
        {f"{m} (tier {tiers[m]})": v for m, v in results.items()}, columns
    )
    n_noisy = data.x_noisy.shape[0]
    text = (
        common.header(
            "Noisy-label primary task with a clean auxiliary",
            args,
            clock(),
            f"{n_noisy} noisy + {data.x_clean.shape[0]} clean training digits, "
            f"{data.x_test.shape[0]} test digits, MLP {[784, *args.hidden, 10]}, "
            f"Adam lr {args.lr}, batch {args.batch_size} per task",
        )
        + "\nTest accuracy after the last step, mean ± std over seeds.\n\n"
        + table
        + "\n"
    )
    print(text)
    fig = plot(histories, args)
    for path in common.write_results(args.out, "noisy_labels", text, fig, smoke=args.smoke):
        print(f"wrote {path}")
    return {"table": table, "results": results, "histories": histories}


def plot(histories: dict[tuple[float, str], dict[str, np.ndarray]], args):
    """Per noise level, over training (seed means): test accuracy, the clean-task loss and
    the weight on the clean task."""
    n = len(args.noise)
    fig, axes = common.figure(n, nrows=3, width=5.0, height=3.0)
    window = max(1, args.steps // 50)
    smooth = lambda v: np.convolve(v, np.ones(window) / window, mode="valid")
    for col, noise in enumerate(args.noise):
        acc, loss, weight = axes[col], axes[n + col], axes[2 * n + col]
        for method in args.methods:
            history = histories[noise, method]
            acc.plot(history["eval_step"], 100 * history["test_acc"], label=method)
            loss.plot(smooth(history["loss_clean"].mean(1)), label=method)
            weight.plot(smooth(history["w_clean"].mean(1)), label=method)
        acc.set(title=f"{noise:.0%} label noise", ylabel="test accuracy (%)")
        loss.set(ylabel="clean auxiliary loss", yscale="log")
        weight.set(xlabel="step", ylabel="weight on the clean task")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    main()
