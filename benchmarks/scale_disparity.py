"""Scale disparity: three MultiMNIST tasks whose losses differ by orders of magnitude.

Data: MultiMNIST (:func:`benchmarks.data.multi_mnist`, two overlaid real MNIST digits;
train pairs from train digits, test pairs from test digits). Three tasks share one model:

* ``left`` -- classify the top-left digit (cross-entropy, about 2.3 at the start);
* ``right`` -- classify the bottom-right digit (cross-entropy);
* ``sum`` -- regress the sum of the two digits (0..18) with the squared error multiplied
  by ``--scale`` (default 1000): its loss starts around 10⁵, five orders of magnitude
  above the classification losses.

Model: the main job's ReLU MLP trunk 784 -> 256 -> 128, two linear 10-way heads and one
linear scalar head; Adam (learning rate 1e-3), batch 256. Every method gets the same
initialisation, minibatch order and number of steps; only the task weights differ. Every
loss-based (tier-1) weighting of the library is trained, with its default
hyper-parameters, except for the window lengths that the sources count in epochs (DWA's
averaging window and STCH's warm-up, ``--window`` steps, about half an epoch here), plus
GradNorm (reads ``diag(G)``), gradient-normalized ``Σ g_i/‖g_i‖`` and MGDA, which need
per-task gradients and run in tier 3 on the trunk parameters. The model is written as the
encoder/heads split (the main job's ``encode`` and :func:`make_heads`, one head per task
keyed by name); the heads follow the library's head rule: head ``i`` gets ``w_i ∇L_i``
from a loss weighting and from GradNorm, its own ``∇L_i`` from gradient-normalized and
MGDA. Nothing is tuned; the test pairs are only used for the final evaluation.

Reported: test accuracy of both digits and the test RMSE of the predicted sum (in digits,
unscaled), mean ± std over seeds; the plot shows each method's weights over training,
normalised to sum 1 (mean over seeds, log scale).

    python -m benchmarks.scale_disparity            # default size
    python -m benchmarks.scale_disparity --smoke    # seconds
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common, multimnist

TASKS = ("left", "right", "sum")
NUM_TASKS = len(TASKS)


def weightings(args, data: multimnist.Data) -> dict[str, tuple[str, Callable[[int], Any]]]:
    """Method name -> (tier, ``factory(seed) -> Weighting``); only RLW's key uses the seed."""
    labels = np.asarray(data.y_train)
    targets = labels.sum(axis=1).astype(np.float64)
    prior = [
        mtl.cross_entropy_prior_loss(labels[:, 0], 10),
        mtl.cross_entropy_prior_loss(labels[:, 1], 10),
        args.scale * mtl.squared_error_prior_loss(targets),
    ]
    return {
        "equal weights": ("1", lambda seed: mtl.mean_weighting()),
        "initial loss": ("1", lambda seed: mtl.initial_loss_weighting()),
        "prior loss": ("1", lambda seed: mtl.prior_loss_weighting(prior)),
        "real-time 1/L": ("1", lambda seed: mtl.real_time_weighting()),
        "geometric mean (GLS)": ("1", lambda seed: mtl.geometric_mean()),
        "generalized mean γ=-1": ("1", lambda seed: mtl.generalized_mean(gamma=-1.0)),
        "uncertainty (UW)": ("1", lambda seed: mtl.uncertainty_weighting()),
        "IMTL-L": ("1", lambda seed: mtl.imtl_l()),
        "DWA": ("1", lambda seed: mtl.dwa(window=args.window)),
        "RLW": ("1", lambda seed: mtl.random_weighting(key=jax.random.PRNGKey(seed))),
        "FAMO": ("1", lambda seed: mtl.famo()),
        "STCH": ("1", lambda seed: mtl.stch(warmup=0, nadir_steps=args.window)),
        "GradNorm": ("3", lambda seed: mtl.gradnorm()),
        "gradient-normalized": ("3", lambda seed: mtl.gradient_normalized()),
        "MGDA": ("3", lambda seed: mtl.mgda()),
    }


# --------------------------------------------------------------------------- model
def init_params(key: jax.Array) -> dict[str, Any]:
    k_trunk, *k_heads = jax.random.split(key, 1 + NUM_TASKS)
    sizes = (10, 10, 1)
    return {
        "trunk": common.init_mlp(k_trunk, multimnist.TRUNK),
        "heads": [common.init_mlp(k, (multimnist.TRUNK[-1], n))[0] for k, n in zip(k_heads, sizes)],
    }


def outputs(params, z) -> list[jax.Array]:
    """Left logits (B, 10), right logits (B, 10), predicted sum (B,)."""
    left, right, total = (z @ h["w"] + h["b"] for h in params["heads"])
    return [left, right, total[:, 0]]


def make_heads(scale: float) -> dict[str, Callable]:
    """The three heads for the split, keyed by task name: two mean cross-entropies and
    ``scale`` × the mean squared error of the predicted sum."""
    ce = optax.losses.softmax_cross_entropy_with_integer_labels

    def digit(task: int) -> Callable:
        def head(params, z, batch) -> jax.Array:
            _, y = batch
            return ce(outputs(params, z)[task], y[:, task]).mean()

        return head

    def total(params, z, batch) -> jax.Array:
        _, y = batch
        predicted = outputs(params, z)[2]
        return scale * jnp.mean((predicted - (y[:, 0] + y[:, 1]).astype(predicted.dtype)) ** 2)

    return {"left": digit(0), "right": digit(1), "sum": total}


# --------------------------------------------------------------------------- training
def make_step(tier: str, weighting: mtl.Weighting, heads: dict[str, Callable], data, args):
    """Pure ``step(state, key) -> (state, metrics)`` of one run, and ``init(params, seed_w)``.

    ``init`` makes the method's state with ``seed_w``, a weighting from the same constructor
    as ``weighting`` (RLW: the seed's own key, which lives in the state)."""
    adam = optax.adam(args.lr)

    def sample(key):
        return common.sample_batch(key, (data.x_train, data.y_train), args.batch_size)

    def metrics(losses, weights):
        out = {"loss": jnp.sum(losses)}
        for t, name in enumerate(TASKS):
            out[f"loss_{name}"], out[f"w_{name}"] = losses[t], weights[name]
        return out

    if tier == "1":

        def grad_fn(weighting):
            return mtl.split_value_and_grad(multimnist.encode, heads, weighting)

        tier1 = grad_fn(weighting)

        def step(state, key):
            params, opt_state, wstate = state
            losses, grads, wstate = tier1(params, sample(key), wstate)
            updates, opt_state = adam.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, wstate), metrics(losses, mtl.task_weights(wstate))

        return step, lambda p, seed_w: (p, adam.init(p), grad_fn(seed_w).init(p))

    def optimizer(weighting):
        return optax.chain(mtl.aggregate(weighting, tasks=TASKS), adam)

    opt = optimizer(weighting)
    jac_fn = mtl.split_value_and_jacobian(multimnist.encode, heads)

    def step(state, key):
        params, opt_state = state
        losses, task_grads = jac_fn(params, sample(key))
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), metrics(losses, mtl.task_weights(opt_state))

    return step, lambda p, seed_w: (p, optimizer(seed_w).init(p))


def over_seeds(step):
    """Every seed's run in one step: ``vmap`` over the stacked states, a key per seed."""

    def batched(states, key):
        keys = jax.random.split(key, jax.tree_util.tree_leaves(states)[0].shape[0])
        states, metrics = jax.vmap(step)(states, keys)
        return states, {
            **metrics,
            "loss": jnp.mean(metrics["loss"]),
            "loss_per_seed": metrics["loss"],
        }

    return batched


def evaluate(params, data) -> dict[str, float]:
    z = common.batched_apply(lambda x: multimnist.encode(params, (x, None)), data.x_test)
    left, right, total = outputs(params, z)
    truth = (data.y_test[:, 0] + data.y_test[:, 1]).astype(total.dtype)
    return {
        "acc_left": common.accuracy(left, data.y_test[:, 0]),
        "acc_right": common.accuracy(right, data.y_test[:, 1]),
        "rmse_sum": float(jnp.sqrt(jnp.mean((total - truth) ** 2))),
    }


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None):
    parser = multimnist.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1000.0, help="factor on the sum's loss")
    parser.add_argument("--window", type=common.count, default=40, help="DWA window / STCH warm-up")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds = min(args.steps, 100), 1
        args.train_pairs, args.test_pairs, args.window = 2_000, 500, 10
    return args


COLUMNS = {
    "acc_left": ("left acc. (%)", 100, 1),
    "acc_right": ("right acc. (%)", 100, 1),
    "rmse_sum": ("sum RMSE (digits)", 1, 2),
}


def plot(histories, methods, steps):
    fig, axes = common.figure(5, nrows=(len(methods) + 4) // 5, width=3.4, height=2.6)
    for ax, method in zip(axes, methods):
        runs = histories[method]
        weights = np.stack([np.stack([h[f"w_{t}"] for t in TASKS], -1) for h in runs])
        share = np.abs(weights) / np.sum(np.abs(weights), axis=-1, keepdims=True)
        for t, name in enumerate(TASKS):
            ax.plot(np.arange(1, steps + 1), share.mean(0)[:, t], label=name, lw=1)
        ax.set_yscale("log")
        ax.set_ylim(1e-9, 1.5)
        ax.set_title(method, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(methods) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.suptitle("task weights over training (share of the total, mean over seeds)")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"table", "results", "histories"}`` (for tests)."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    data = multimnist.load_data(train_pairs=args.train_pairs, test_pairs=args.test_pairs)
    methods = weightings(args, data)
    names = args.methods or list(methods)
    unknown = [m for m in names if m not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(methods)}")
    results: common.Results = {}
    histories: dict[str, list[dict[str, np.ndarray]]] = {}
    seeds = range(args.seeds)
    for method in names:
        tier, factory = methods[method]
        weighting = factory(0)
        step, init = make_step(tier, weighting, make_heads(args.scale), data, args)
        # one compiled program trains all seeds side by side (vmap), each with its own
        # initialisation and minibatch order; RLW also gets its own key per seed
        states = [
            init(init_params(jax.random.fold_in(jax.random.PRNGKey(s), 0)), factory(s))
            for s in seeds
        ]
        states = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *states)
        states, history = common.train(
            over_seeds(step),
            states,
            jax.random.PRNGKey(1),
            steps=args.steps,
            desc=method,
            progress=not args.no_progress,
        )
        for s in seeds:
            run = {k: v[:, s] for k, v in history.items() if np.ndim(v) == 2}
            run["loss"] = run.pop("loss_per_seed")
            histories.setdefault(method, []).append(run)
            params = jax.tree_util.tree_map(lambda x, s=s: x[s], states[0])
            common.add_result(results, f"{method} (tier {tier})", evaluate(params, data))

    table = common.markdown_table(results, COLUMNS)
    seconds = clock()
    extra = (
        f"{args.train_pairs} train / {args.test_pairs} test pairs, batch {args.batch_size}, "
        f"Adam lr {args.lr}, sum loss × {args.scale:g}, DWA window / STCH warm-up "
        f"{args.window} steps"
    )
    text = (
        common.header(
            f"Scale disparity on MultiMNIST (left, right, {args.scale:g} × sum)",
            args,
            seconds,
            extra,
        )
        + "\nTest accuracy (%) and RMSE of the predicted digit sum, mean ± std over seeds.\n\n"
        + table
        + "\n\n![weights](scale_disparity.png)\n"
    )
    print(table)
    fig = plot(histories, names, args.steps)
    for path in common.write_results(args.out, "scale_disparity", text, fig, smoke=args.smoke):
        print(f"wrote {path}")
    return {"table": table, "results": results, "histories": histories}


if __name__ == "__main__":
    main()
