"""Long-tailed MNIST: modified losses versus reweighting.

Train set: the fixed MNIST train split cut to an exponential profile
``n_c = n_max * rho^(-c / (C - 1))`` with imbalance ratio ``rho = 100`` (class 0 keeps all
its 360 training digits, class 9 keeps 4). Test set: the balanced test split (100 per
class). Metric: balanced accuracy (mean per-class recall) and the mean accuracy on the
three rarest classes (7, 8, 9) and the three most frequent ones (0, 1, 2).

Methods, all with the same MLP, optimizer, steps and uniform (instance-balanced) batches:

* ``CE`` -- plain softmax cross-entropy;
* ``CE + post-hoc LA`` -- the same CE models, logits adjusted at prediction by
  ``-tau log pi`` (tau = 1);
* ``LA loss`` -- logit-adjusted cross-entropy ``CE(logits + tau log pi)``, tau = 1;
* ``focal`` -- softmax focal loss, gamma = 2;
* ``CB CE`` -- class-balanced weights ``(1 - beta) / (1 - beta^n_c)`` (beta = 0.9999)
  times CE;
* ``LDAM`` -- label-distribution-aware margins ``∝ n_c^(-1/4)`` (max margin 0.5, scale
  30) on cosine logits (normalised features and class weights, as the LDAM authors
  use it), without their deferred re-weighting schedule.

Defaults are the papers' (nothing is tuned; the validation split is not used). For
reference, the logit-adjustment authors report CIFAR-10-LT (rho = 100) balanced accuracy
71.4 (CE) -> 77.9 (LA loss) with a ResNet-32.

    python -m benchmarks.imbalance            # default size (3 seeds)
    python -m benchmarks.imbalance --smoke    # seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from mtl_optax.datasets import long_tailed_indices

RATIO = 100.0
RARE = (7, 8, 9)
HEAD = (0, 1, 2)
METHODS = ("CE", "CE + post-hoc LA", "LA loss", "focal", "CB CE", "LDAM")


def make_loss(method: str, counts: jax.Array):
    """Per-example loss ``f(params, x, y)`` and test-time logits ``g(params, x)``."""
    priors = counts / counts.sum()

    def logits_fn(params, x):
        features = common.mlp(params[:-1], x, activate_last=True)
        if method == "LDAM":  # cosine head: normalised features and class weights
            return mtl.cosine_logits(features, params[-1]["w"])
        return features @ params[-1]["w"] + params[-1]["b"]

    if method == "CE":

        def loss(params, x, y):
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)
    elif method == "LA loss":

        def loss(params, x, y):
            return mtl.logit_adjusted_cross_entropy(
                logits_fn(params, x), y, class_priors=priors, tau=1.0
            )
    elif method == "focal":

        def loss(params, x, y):
            return mtl.softmax_focal_loss(logits_fn(params, x), y, gamma=2.0)
    elif method == "CB CE":
        weights = mtl.class_balanced_weights(counts, beta=0.9999)

        def loss(params, x, y):
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), y)
            return weights[y] * ce
    elif method == "LDAM":

        def loss(params, x, y):
            return mtl.ldam_loss(
                logits_fn(params, x), y, class_counts=counts, max_margin=0.5, scale=30.0
            )
    else:
        raise ValueError(f"unknown method {method!r}")
    return loss, logits_fn


def run_one(method, seed, *, data, counts, args):
    x_tr, y_tr, x_te, y_te = data
    key_init, key_train = jax.random.split(jax.random.PRNGKey(seed))
    params = common.init_mlp(key_init, [784, *args.hidden, common.NUM_CLASSES])
    loss, logits_fn = make_loss(method, counts)
    optimizer = optax.adam(args.lr)

    def objective(params, key):
        xb, yb = common.sample_batch(key, (x_tr, y_tr), args.batch_size)
        return jnp.mean(loss(params, xb, yb)), {}

    state, history = common.train(
        common.make_step(objective, optimizer),
        common.init_state(params, optimizer),
        key_train,
        steps=args.steps,
        desc=f"{method} seed {seed}",
        progress=not args.no_progress,
    )
    return logits_fn(state.params, x_te), history


def scores(logits, labels) -> dict[str, float]:
    per_class = common.per_class_accuracy(logits, labels)
    return {
        "bal_acc": float(per_class.mean()),
        "rare": float(per_class[list(RARE)].mean()),
        "head": float(per_class[list(HEAD)].mean()),
        **{f"class_{c}": float(a) for c, a in enumerate(per_class)},
    }


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=2000)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 256])
    parser.add_argument("--batch-size", type=common.count, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.hidden = 1, 150, [64]
    clock = common.Stopwatch()

    x, y = common.mnist_split("train")
    keep = long_tailed_indices(y)
    x_tr, y_tr = jnp.asarray(x[keep]), jnp.asarray(y[keep])
    counts = jnp.asarray(np.bincount(y[keep], minlength=common.NUM_CLASSES), jnp.float32)
    x_te, y_te = (jnp.asarray(a) for a in common.mnist_split("test"))
    data = (x_tr, y_tr, x_te, y_te)
    priors = counts / counts.sum()

    results: common.Results = {m: {} for m in METHODS}
    histories: dict[str, list] = {}
    for seed in range(args.seeds):
        for method in METHODS:
            if method == "CE + post-hoc LA":
                continue  # evaluated from the CE model below
            logits, history = run_one(method, seed, data=data, counts=counts, args=args)
            histories.setdefault(method, []).append(history["loss"])
            common.add_result(results, method, scores(logits, y_te))
            if method == "CE":
                adjusted = mtl.posthoc_logit_adjustment(logits, class_priors=priors, tau=1.0)
                common.add_result(results, "CE + post-hoc LA", scores(adjusted, y_te))

    table = common.markdown_table(
        results,
        {
            "bal_acc": ("balanced acc. (%)", 100, 1),
            "rare": ("rarest 3 classes (%)", 100, 1),
            "head": ("3 most frequent (%)", 100, 1),
        },
    )
    counts_np = np.asarray(counts, int)
    text = (
        common.header(
            "Long-tailed MNIST (imbalance ratio 100)",
            args,
            clock(),
            f"train counts per class {counts_np.tolist()}, balanced test set of {len(y_te)}",
        )
        + "\n"
        + table
        + "\n"
    )
    print(text)

    fig, (ax,) = common.figure(width=6.0)
    classes = np.arange(common.NUM_CLASSES)
    for i, method in enumerate(METHODS):
        acc = np.array([results[method][f"class_{c}"] for c in classes]) * 100
        ax.errorbar(
            classes + (i - 2.5) * 0.06,
            acc.mean(1),
            acc.std(1),
            marker="o",
            ms=3,
            capsize=2,
            label=method,
        )
    ax.set_xticks(classes, [f"{c}\n({n})" for c, n in zip(classes, counts_np, strict=True)])
    ax.set_xlabel("class (training examples)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Long-tailed MNIST, ratio 100")
    ax.legend(fontsize=7)
    common.write_results(args.out, "imbalance", text, fig, smoke=args.smoke)
    return {"results": results, "histories": histories, "table": table}


if __name__ == "__main__":
    main()
