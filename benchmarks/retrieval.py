"""Retrieval on unseen classes: cross-entropy versus margin softmax losses.

An MLP embedding (784 -> 256 -> 256 -> 64) is trained to classify the MNIST train digits
0-4 only; retrieval is evaluated on the test digits 5-9, which training never sees.
Queries and gallery are the 500 test digits 5-9 (each query against the other 499),
ranked by cosine similarity of the embeddings. Metrics: Recall@1 (the nearest neighbour
has the query's class) and mean average precision (mAP) over the full ranking; as a
sanity column, Recall@1 on the (seen) test digits 0-4.

Losses, all with the same model, optimizer and steps:

* ``CE`` -- softmax cross-entropy on an ordinary linear classifier ``W z + b``;
* ``CosFace`` (AM-Softmax) -- ``CE(s (cos - m onehot))``, s = 30, m = 0.35;
* ``ArcFace`` -- target logit ``cos(theta_y + m)``, s = 64, m = 0.5;
* ``chord margin`` -- the triangle-inequality loss
  ``log(1 + sum_{j != y} exp(s (d(z, c_y) + m - d(z, c_j))))`` with the chord metric
  ``d = sqrt(2 - 2 cos)``, s = 30, fixed m (default 0.5, not tuned);
* ``chord margin, adaptive`` -- the same with ``m`` re-estimated on every batch as twice
  the mean within-class chord distance to the class centre (``mtl.estimate_margin``,
  gradient stopped).

The margin losses use cosine logits (normalised embeddings and class weights).

    python -m benchmarks.retrieval            # default size
    python -m benchmarks.retrieval --smoke    # seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common

SEEN = 5  # train on digits 0..4, retrieve 5..9
METHODS = ("CE", "CosFace", "ArcFace", "chord margin", "chord margin, adaptive")


def retrieval_metrics(embeddings: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Recall@1 and mAP with cosine similarity, every item querying all the others."""
    z = np.asarray(embeddings, np.float64)
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :-1]  # drop the query itself (ranked last)
    relevant = labels[order] == labels[:, None]
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision = np.cumsum(relevant, axis=1) / ranks
    ap = (precision * relevant).sum(1) / np.maximum(relevant.sum(1), 1)
    return {"recall_at_1": float(relevant[:, 0].mean()), "map": float(ap.mean())}


def make_loss(method: str, args):
    """Per-example loss ``f(params, x, y) -> (losses, margin)``."""

    def loss(params, x, y):
        z = common.mlp(params["net"], x)
        if method == "CE":
            logits = z @ params["classes"] + params["bias"]
            return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y), 0.0
        cos = mtl.cosine_logits(z, params["classes"])
        if method == "CosFace":
            return mtl.cosface_loss(cos, y, scale=30.0, margin=0.35), 0.35
        if method == "ArcFace":
            return mtl.arcface_loss(cos, y, scale=64.0, margin=0.5), 0.5
        if method == "chord margin":
            margin = args.margin
        elif method == "chord margin, adaptive":
            margin = jax.lax.stop_gradient(
                mtl.estimate_margin(z, y, num_classes=SEEN, metric="chord")
            )
        else:
            raise ValueError(f"unknown method {method!r}")
        losses = mtl.metric_margin_loss(cos, y, metric="chord", scale=30.0, margin=margin)
        return losses, margin

    return loss


def run_one(method, seed, *, data, args):
    x_tr, y_tr = data
    k_net, k_cls, k_train = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {
        "net": common.init_mlp(k_net, [784, *args.hidden, args.dim]),
        "classes": jax.random.normal(k_cls, (args.dim, SEEN)) / jnp.sqrt(args.dim),
        "bias": jnp.zeros((SEEN,)),
    }
    loss = make_loss(method, args)
    optimizer = optax.adam(args.lr)

    def objective(params, key):
        xb, yb = common.sample_batch(key, (x_tr, y_tr), args.batch_size)
        losses, margin = loss(params, xb, yb)
        return jnp.mean(losses), {"margin": jnp.asarray(margin, jnp.float32)}

    state, history = common.train(
        common.make_step(objective, optimizer),
        common.init_state(params, optimizer),
        k_train,
        steps=args.steps,
        desc=f"{method} seed {seed}",
        progress=not args.no_progress,
    )
    return state.params, history


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=1500)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 256])
    parser.add_argument("--dim", type=common.count, default=64, help="embedding dimension")
    parser.add_argument("--margin", type=float, default=0.5, help="fixed chord margin")
    parser.add_argument("--batch-size", type=common.count, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.hidden, args.dim = 1, 150, [64], 16
    clock = common.Stopwatch()

    x, y = common.mnist_split("train")
    x_tr, y_tr = jnp.asarray(x[y < SEEN]), jnp.asarray(y[y < SEEN])
    x_te, y_te = common.mnist_split("test")
    unseen, seen = y_te >= SEEN, y_te < SEEN

    results: common.Results = {}
    histories: dict[str, list] = {}
    for seed in range(args.seeds):
        for method in METHODS:
            params, history = run_one(method, seed, data=(x_tr, y_tr), args=args)
            histories.setdefault(method, []).append(history)
            z = np.asarray(common.mlp(params["net"], jnp.asarray(x_te)))
            metrics = retrieval_metrics(z[unseen], y_te[unseen])
            metrics["seen_recall_at_1"] = retrieval_metrics(z[seen], y_te[seen])["recall_at_1"]
            metrics["final_margin"] = float(history["margin"][-100:].mean())
            common.add_result(results, method, metrics)

    table = common.markdown_table(
        results,
        {
            "recall_at_1": ("unseen 5-9: Recall@1 (%)", 100, 1),
            "map": ("unseen 5-9: mAP (%)", 100, 1),
            "seen_recall_at_1": ("seen 0-4: Recall@1 (%)", 100, 1),
            "final_margin": ("margin m (last 100 steps)", 1, 2),
        },
    )
    text = (
        common.header(
            "Retrieval on unseen MNIST classes (train 0-4, retrieve 5-9)",
            args,
            clock(),
            f"{len(y_tr)} training digits, {int(unseen.sum())} unseen test digits, cosine "
            f"similarity, {args.dim}-d embeddings",
        )
        + "\n"
        + table
        + "\n"
    )
    print(text)

    fig, axes = common.figure(2)
    pos = np.arange(len(METHODS))
    for ax, key, title in zip(
        axes,
        ("recall_at_1", "map"),
        ("Recall@1, unseen digits 5-9", "mAP, unseen digits 5-9"),
        strict=True,
    ):
        vals = np.array([results[m][key] for m in METHODS]) * 100
        ax.bar(pos, vals.mean(1), yerr=vals.std(1), capsize=3, color="tab:blue")
        ax.set_xticks(pos, [m.replace(", ", "\n") for m in METHODS], fontsize=8)
        ax.set_ylim(max(0.0, vals.min() - 10), min(100.0, vals.max() + 5))
        ax.set_ylabel("%")
        ax.set_title(title)
    common.write_results(args.out, "retrieval", text, fig, smoke=args.smoke)
    return {"results": results, "histories": histories, "table": table}


if __name__ == "__main__":
    main()
