"""Shared pieces of the loss benchmarks (imbalance, contrastive, retrieval, rdrop, flooding).

* data: the fixed MNIST splits of :mod:`benchmarks.data` as flat float32 arrays;
* model: a plain-JAX multi-layer perceptron with optional dropout;
* training: :func:`train` runs a pure ``step(state, key)`` in jit-compiled ``lax.scan``
  chunks (one dispatch per chunk, not per step) behind a ``tqdm`` progress bar;
* metrics: accuracy, balanced accuracy, per-class accuracy, mean negative log-likelihood;
* reporting: mean ± std markdown tables over seeds and writing ``<name>.md`` /
  ``<name>.png`` into ``benchmarks/results/``;
* command line: :func:`base_parser` gives every script ``--seeds --steps --out --smoke``;
  :func:`count` is the type of every count flag (a positive int, else a usage error).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.data import mnist_split  # noqa: F401 (re-exported for the benchmarks)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10


# --------------------------------------------------------------------------- command line
def jax_device() -> str:
    """``JAX <version> on <backend> (<device kind>)``: the device line of a timing table."""
    return f"JAX {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind})"


def count(text: str) -> int:
    """argparse type of the count flags (steps, seeds, sizes, tasks): a positive int."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_count(text: str) -> int:
    """argparse type of a count that may be 0 (warm-up steps)."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return value


def base_parser(description: str, *, steps: int, seeds: int = 3) -> argparse.ArgumentParser:
    """Parser with the flags every loss benchmark shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=count, default=seeds, help="number of seeds (0..n-1)")
    parser.add_argument("--steps", type=count, default=steps, help="optimizer steps per run")
    parser.add_argument(
        "--out",
        type=str,
        default=None,
        help="folder for the markdown table and the PNG plot ('' writes nothing; default "
        "benchmarks/results, or nothing with --smoke so tiny runs never replace results)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny configuration that runs in seconds (tests)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


# --------------------------------------------------------------------------- data
def sample_batch(key: jax.Array, arrays: Sequence[jax.Array], batch_size: int):
    """Uniform random minibatch (with replacement) of equally long arrays."""
    idx = jax.random.randint(key, (batch_size,), 0, arrays[0].shape[0])
    return tuple(a[idx] for a in arrays)


# --------------------------------------------------------------------------- model
Params = list[dict[str, jax.Array]]


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
    """He-initialised dense layers ``sizes[0] -> ... -> sizes[-1]`` (zero biases)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m),
            "b": jnp.zeros((n,)),
        }
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(
    params: Params,
    x: jax.Array,
    *,
    key: jax.Array | None = None,
    dropout: float = 0.0,
    activate_last: bool = False,
) -> jax.Array:
    """ReLU MLP; inverted dropout on every hidden activation when ``key`` is given.

    The last layer is linear unless ``activate_last`` (then it gets ReLU and dropout too,
    for use as a feature extractor in front of a separate head).
    """
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if activate_last or i < len(params) - 1:
            x = jax.nn.relu(x)
            if key is not None and dropout > 0.0:
                key, sub = jax.random.split(key)
                keep = jax.random.bernoulli(sub, 1.0 - dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - dropout), 0.0)
    return x


def batched_apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, size: int = 1000):
    """``fn`` over ``x`` in slices of ``size`` rows (keeps evaluation memory flat)."""
    return jnp.concatenate([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])


# --------------------------------------------------------------------------- training
class TrainState(NamedTuple):
    params: Any
    opt_state: Any


def init_state(params: Any, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params, optimizer.init(params))


def make_step(
    loss_fn: Callable[[Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]],
    optimizer: optax.GradientTransformation,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Turn ``loss_fn(params, key) -> (scalar, metrics)`` into a pure training step.

    ``loss_fn`` draws its own minibatch from ``key``. The objective value is also given to
    the optimizer as ``value=`` (used by value-aware transforms, e.g. flooding; ignored
    by the rest). ``metrics`` gets ``"loss"`` (the objective) unless it sets it itself.
    """

    def step(state: TrainState, key: jax.Array):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": loss, **metrics}

    return step


def train(
    step: Callable[[Any, jax.Array], tuple[Any, dict[str, jax.Array]]],
    state: Any,
    key: jax.Array,
    *,
    steps: int,
    chunk: int = 100,
    desc: str = "",
    progress: bool = True,
    evaluate: Callable[[Any], Mapping[str, float]] | None = None,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Run ``steps`` pure steps in jitted ``lax.scan`` chunks of ``chunk`` steps.

    Returns the final state and a history: every per-step metric of ``step`` as an array
    of length ``steps``, plus, when ``evaluate(state)`` is given, its values after every
    chunk (arrays of length ``ceil(steps / chunk)``) and their step numbers in
    ``"eval_step"``.
    """
    from tqdm.auto import tqdm

    @jax.jit
    def run_chunk(state, keys):
        return jax.lax.scan(step, state, keys)

    history: dict[str, list] = {}
    done = 0
    with tqdm(total=steps, desc=desc, disable=not progress, leave=False) as bar:
        while done < steps:
            n = min(chunk, steps - done)
            key, sub = jax.random.split(key)
            state, metrics = run_chunk(state, jax.random.split(sub, n))
            for name, values in metrics.items():
                history.setdefault(name, []).append(np.asarray(values))
            done += n
            if evaluate is not None:
                history.setdefault("eval_step", []).append(np.asarray([done]))
                for name, value in evaluate(state).items():
                    history.setdefault(name, []).append(np.asarray([value]))
            bar.update(n)
            if "loss" in metrics:
                bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")
    return state, {name: np.concatenate(v) for name, v in history.items()}


def decreased(values: np.ndarray, fraction: float = 0.1) -> bool:
    """Whether the mean of the last ``fraction`` of ``values`` is below that of the first."""
    n = max(1, int(len(values) * fraction))
    return bool(np.mean(values[-n:]) < np.mean(values[:n]))


# --------------------------------------------------------------------------- metrics
def accuracy(logits: jax.Array, labels: jax.Array) -> float:
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def per_class_accuracy(
    logits: jax.Array, labels: jax.Array, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    pred = np.asarray(jnp.argmax(logits, -1))
    labels = np.asarray(labels)
    return np.array([np.mean(pred[labels == c] == c) for c in range(num_classes)])


def balanced_accuracy(logits: jax.Array, labels: jax.Array, num_classes: int = NUM_CLASSES):
    """Mean over classes of the per-class recall."""
    return float(np.mean(per_class_accuracy(logits, labels, num_classes)))


def mean_nll(logits: jax.Array, labels: jax.Array) -> float:
    return float(jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)))


# --------------------------------------------------------------------------- reporting
Results = dict[str, dict[str, list[float]]]  # row -> column -> one value per seed


def add_result(results: Results, row: str, values: Mapping[str, float]) -> None:
    for column, value in values.items():
        results.setdefault(row, {}).setdefault(column, []).append(float(value))


def mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    arr = np.asarray(values, dtype=np.float64) * scale
    std = arr.std(ddof=1) if arr.size > 1 else 0.0
    return f"{arr.mean():.{digits}f} ± {std:.{digits}f}"


def markdown_table(
    results: Results,
    columns: Mapping[str, tuple[str, float, int]],
    *,
    first: str = "method",
) -> str:
    """Markdown table of mean ± std (sample std over seeds).

    ``columns`` maps a result key to ``(header, scale, digits)``, e.g.
    ``{"bal_acc": ("balanced acc. (%)", 100, 1)}``.
    """
    headers = [first] + [h for h, _, _ in columns.values()]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row, values in results.items():
        cells = [row] + [
            mean_std(values[key], scale, digits) if key in values else "–"
            for key, (_, scale, digits) in columns.items()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(out: str | Path | None, name: str, text: str, fig=None, *, smoke=False):
    """Write ``text`` to ``out/name.md`` and ``fig`` to ``out/name.png``.

    ``out=None`` means ``benchmarks/results`` for a full run and nothing for a smoke run;
    ``out=""`` writes nothing. Returns the paths written.
    """
    if out is None:
        out = "" if smoke else RESULTS_DIR
    if not out:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.md"]
    written[0].write_text(text.rstrip() + "\n")
    if fig is not None:
        fig.savefig(out / f"{name}.png", dpi=120, bbox_inches="tight")
        written.append(out / f"{name}.png")
    return written


def figure(ncols: int = 1, *, nrows: int = 1, width: float = 5.0, height: float = 3.6):
    """A matplotlib figure on the non-interactive backend and its axes, flattened row-major."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes.ravel()


class Stopwatch:
    """Wall-clock seconds since construction (for the run-time line of every table)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.start


def header(title: str, args: argparse.Namespace, seconds: float, extra: str = "") -> str:
    """First lines of a results file: title, configuration and measured wall time."""
    line = (
        f"# {title}\n\n{args.seeds} seeds, {args.steps} steps per run"
        f"{', ' + extra if extra else ''}; wall time {seconds:.0f} s "
        f"(JAX {jax.__version__}, {jax.default_backend()})."
    )
    return line + "\n"
