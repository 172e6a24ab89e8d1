"""R-Drop on MNIST: supervised and semi-supervised.

An MLP (784 -> 256 -> 256 -> 10) with dropout 0.3 on both hidden layers. R-Drop runs two
dropout passes of every batch (``mtl.two_pass_vmap``: the model vmapped over two dropout
keys) and minimises ``-log P1(y) - log P2(y) + alpha * 1/2 [KL(P2||P1) + KL(P1||P2)]``
(``mtl.rdrop_loss``). Evaluation is deterministic (dropout off) on the test split:
accuracy and mean negative log-likelihood (NLL).

* supervised, all 3,600 training digits: ``CE`` (one dropout pass), ``CE, 2 passes``
  (alpha = 0: the same two passes without the KL term, to separate the effect of the
  consistency term from that of seeing two dropout samples), ``R-Drop`` with alpha 1 and 4;
* semi-supervised, 500 labelled digits (50 per class) and the other 3,100 training digits
  unlabelled: ``CE`` and ``R-Drop alpha=4`` on the labelled digits only, and ``R-Drop
  alpha=4 + unlabelled`` which adds ``alpha * mtl.rdrop_consistency`` (the KL term only) on
  an unlabelled batch.

    python -m benchmarks.rdrop            # default size
    python -m benchmarks.rdrop --smoke    # seconds
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common

SUPERVISED = {
    "CE": None,
    "CE, 2 passes (alpha=0)": 0.0,
    "R-Drop alpha=1": 1.0,
    "R-Drop alpha=4": 4.0,
}
SEMI = {"CE": None, "R-Drop alpha=4": 4.0, "R-Drop alpha=4 + unlabelled": 4.0}


def make_objective(alpha, *, labelled, unlabelled, args):
    """Mean training objective ``f(params, key)`` drawing its own batches."""
    x_l, y_l = labelled

    def apply(params, key, x):
        return common.mlp(params, x, key=key, dropout=args.dropout)

    def objective(params, key):
        k_batch, k_drop, k_unl, k_drop_u = jax.random.split(key, 4)
        xb, yb = common.sample_batch(k_batch, (x_l, y_l), args.batch_size)
        if alpha is None:  # plain CE, one dropout pass
            logits = apply(params, k_drop, xb)
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, yb)
            return jnp.mean(ce), {}
        logits = mtl.two_pass_vmap(lambda k, x: apply(params, k, x), k_drop, xb)
        loss = jnp.mean(mtl.rdrop_loss(logits[0], logits[1], yb, alpha=alpha))
        if unlabelled is not None:
            (xu,) = common.sample_batch(k_unl, (unlabelled,), args.batch_size)
            logits_u = mtl.two_pass_vmap(lambda k, x: apply(params, k, x), k_drop_u, xu)
            loss = loss + alpha * jnp.mean(mtl.rdrop_consistency(logits_u[0], logits_u[1]))
        return loss, {}

    return objective


def run_one(name, alpha, seed, *, labelled, unlabelled, test, args):
    x_te, y_te = test
    k_init, k_train = jax.random.split(jax.random.PRNGKey(seed))
    params = common.init_mlp(k_init, [784, *args.hidden, common.NUM_CLASSES])
    optimizer = optax.adam(args.lr)
    objective = make_objective(alpha, labelled=labelled, unlabelled=unlabelled, args=args)
    predict = jax.jit(lambda p: common.mlp(p, x_te))

    def evaluate(state):
        logits = predict(state.params)
        return {
            "test_acc": common.accuracy(logits, y_te),
            "test_nll": common.mean_nll(logits, y_te),
        }

    state, history = common.train(
        common.make_step(objective, optimizer),
        common.init_state(params, optimizer),
        k_train,
        steps=args.steps,
        chunk=args.eval_every,
        desc=f"{name} seed {seed}",
        progress=not args.no_progress,
        evaluate=evaluate,
    )
    return evaluate(state), history


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=2000)
    parser.add_argument("--hidden", type=common.count, nargs="+", default=[256, 256])
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--labelled", type=common.count, default=500, help="labelled digits (semi)")
    parser.add_argument("--batch-size", type=common.count, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=common.count, default=100)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.hidden, args.eval_every = 1, 150, [64], 50
    clock = common.Stopwatch()

    x, y = common.mnist_split("train")
    test = tuple(jnp.asarray(a) for a in common.mnist_split("test"))
    per_class = args.labelled // common.NUM_CLASSES
    lab = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(common.NUM_CLASSES)])
    unl = np.setdiff1d(np.arange(len(y)), lab)
    full = (jnp.asarray(x), jnp.asarray(y))
    few = (jnp.asarray(x[lab]), jnp.asarray(y[lab]))

    settings = {
        f"all {len(y)} labelled": (SUPERVISED, full, None),
        f"{len(lab)} labelled + {len(unl)} unlabelled": (SEMI, few, jnp.asarray(x[unl])),
    }
    results: dict[str, common.Results] = {}
    curves: dict[str, dict[str, list]] = {}
    for setting, (methods, labelled, unlabelled) in settings.items():
        results[setting], curves[setting] = {}, {}
        for seed in range(args.seeds):
            for name, alpha in methods.items():
                use_unl = unlabelled if name.endswith("unlabelled") else None
                final, history = run_one(
                    name, alpha, seed, labelled=labelled, unlabelled=use_unl, test=test, args=args
                )
                common.add_result(results[setting], name, final)
                curves[setting].setdefault(name, []).append(history)

    columns = {"test_acc": ("test acc. (%)", 100, 2), "test_nll": ("test NLL", 1, 3)}
    text = common.header("R-Drop on MNIST (MLP, dropout 0.3)", args, clock(), f"Adam lr {args.lr}")
    for setting, res in results.items():
        text += f"\n**{setting}**\n\n" + common.markdown_table(res, columns) + "\n"
    print(text)

    fig, axes = common.figure(2)
    for ax, (setting, runs) in zip(axes, curves.items(), strict=True):
        for name, histories in runs.items():
            nll = np.stack([h["test_nll"] for h in histories]).mean(0)
            ax.plot(histories[0]["eval_step"], nll, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("test NLL (mean over seeds)")
        ax.set_title(setting)
        ax.legend(fontsize=8)
    common.write_results(args.out, "rdrop", text, fig, smoke=args.smoke)
    return {"results": results, "curves": curves, "text": text}


if __name__ == "__main__":
    main()
