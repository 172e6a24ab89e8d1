"""Flooding on a small MNIST training set trained far past zero training error.

1,000 training digits (the first 100 per class of the train split), an MLP
(784 -> 256 -> 10), plain SGD (learning rate 0.1, batch 100) for 3,000 steps (300 epochs,
far beyond the point where training error reaches zero). Test accuracy and test
cross-entropy are measured on the test split every 100 steps (plotted) and at the end
(table). The row ``none`` is plain cross-entropy; every method below reduces to it at
level 0.

* ``flood`` -- ``|L - b| + b`` on the batch-mean loss (``mtl.flood``);
* ``iFlood`` -- the same per example, then averaged (``mtl.iflood``);
* ``flooding transform`` -- ``optax.chain(mtl.flooding(level=b), optax.sgd(lr))``, which
  flips the update's sign when the batch loss (``value=``) is below ``b``;
* ``gradient penalty`` -- ``L + c ||grad L||^2`` (``mtl.gradient_penalty``). Near the flood
  level, one descent step followed by one ascent step of rate ``lr`` is approximately a
  gradient step on ``(lr / 2) ||grad L||^2``, so flooding with ``lr = 0.1`` acts like
  ``c = 0.05`` once it is active. The grid ``c in {0.01, 0.02, 0.05, 0.1}`` brackets that
  value (it reuses the numbers of the ``b`` grid so both share a table; ``c`` is a
  coefficient, not a level).

    python -m benchmarks.flooding            # default size
    python -m benchmarks.flooding --smoke    # seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common

LEVELS = (0.01, 0.02, 0.05, 0.1)
METHODS = ("flood", "iFlood", "flooding transform", "gradient penalty")


def per_example_ce(params, x, y):
    return optax.losses.softmax_cross_entropy_with_integer_labels(common.mlp(params, x), y)


def mean_ce(params, x, y):
    return jnp.mean(per_example_ce(params, x, y))


def make_objective_and_optimizer(method: str | None, level: float, *, data, args):
    """``(objective(params, key) -> (scalar, {}), optimizer)`` for one configuration."""
    x_tr, y_tr = data
    optimizer = optax.sgd(args.lr)
    if method == "flooding transform":
        optimizer = optax.chain(mtl.flooding(level=level), optax.sgd(args.lr))
    if method == "gradient penalty":
        penalised = mtl.gradient_penalty(mean_ce, coefficient=level)

    def objective(params, key):
        xb, yb = common.sample_batch(key, (x_tr, y_tr), args.batch_size)
        if method == "flood":
            loss = mtl.flood(mean_ce(params, xb, yb), level=level)
        elif method == "iFlood":
            loss = jnp.mean(mtl.iflood(per_example_ce(params, xb, yb), level=level))
        elif method == "gradient penalty":
            loss = penalised(params, xb, yb)
        elif method in (None, "flooding transform"):
            loss = mean_ce(params, xb, yb)
        else:
            raise ValueError(f"unknown method {method!r}")
        return loss, {}

    return objective, optimizer


def run_one(method, level, seed, *, data, test, args):
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    params = common.init_mlp(k_init, [784, *args.hidden, common.NUM_CLASSES])
    objective, optimizer = make_objective_and_optimizer(method, level, data=data, args=args)
    logits_fn = jax.jit(lambda p, x: common.mlp(p, x))

    def evaluate(state):
        out = {}
        for split, (x, y) in (("train", data), ("test", test)):
            logits = logits_fn(state.params, x)
            out[f"{split}_acc"] = common.accuracy(logits, y)
            out[f"{split}_loss"] = common.mean_nll(logits, y)
        return out

    state, history = common.train(
        common.make_step(objective, optimizer),
        common.init_state(params, optimizer),
        k_train,
        steps=args.steps,
        chunk=args.eval_every,
        desc=f"{method or 'none'} {level} seed {seed}",
        progress=not args.no_progress,
        evaluate=evaluate,
    )
    return evaluate(state), history


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=3000)
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--train-size", type=common.count, default=1000)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256])
    parser.add_argument("--batch-size", type=common.count, default=100)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--eval-every", type=common.count, default=100)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.hidden, args.eval_every = 1, 200, [32], 50
        args.train_size, args.levels = 200, [0.05]
    clock = common.Stopwatch()

    x, y = common.mnist_split("train")
    per_class = args.train_size // common.NUM_CLASSES
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(common.NUM_CLASSES)])
    data = (jnp.asarray(x[keep]), jnp.asarray(y[keep]))
    test = tuple(jnp.asarray(a) for a in common.mnist_split("test"))

    configs = [(None, 0.0)] + [(m, b) for m in args.methods for b in args.levels]
    results: common.Results = {}
    curves: dict[tuple, list] = {}
    for method, level in configs:
        row = (
            "none (plain CE)"
            if method is None
            else (
                f"{method}, c = {level:g}"
                if method == "gradient penalty"
                else f"{method}, b = {level:g}"
            )
        )
        for seed in range(args.seeds):
            final, history = run_one(method, level, seed, data=data, test=test, args=args)
            common.add_result(results, row, final)
            curves.setdefault((method, level), []).append(history)

    table = common.markdown_table(
        results,
        {
            "test_acc": ("test acc. (%)", 100, 2),
            "test_loss": ("test loss", 1, 3),
            "train_loss": ("train loss", 1, 4),
            "train_acc": ("train acc. (%)", 100, 1),
        },
    )
    text = (
        common.header(
            f"Flooding on {len(keep):,} MNIST digits",
            args,
            clock(),
            f"{len(keep)} training digits, SGD lr {args.lr}, batch {args.batch_size}, "
            "values at the last step",
        )
        + "\n"
        + table
        + "\n"
    )
    print(text)

    fig, axes = common.figure(len(args.methods), nrows=2, width=4.2, height=3.2)
    base = curves[(None, 0.0)]
    for col, method in enumerate(args.methods):
        for row_i, key in enumerate(("test_loss", "test_acc")):
            ax = axes[row_i * len(args.methods) + col]
            steps = base[0]["eval_step"]
            ax.plot(steps, np.mean([h[key] for h in base], 0), color="k", label="none")
            for level in args.levels:
                runs = curves[(method, level)]
                name = "c" if method == "gradient penalty" else "b"
                ax.plot(steps, np.mean([h[key] for h in runs], 0), label=f"{name} = {level:g}")
            ax.set_xlabel("step")
            ax.set_ylabel(key.replace("_", " ") + " (mean over seeds)")
            if key == "test_loss":
                ax.set_title(method)
            ax.legend(fontsize=7)
    common.write_results(args.out, "flooding", text, fig, smoke=args.smoke)
    return {"results": results, "curves": curves, "table": table}


if __name__ == "__main__":
    main()
