"""Step time of each tier against the plain summed-loss step.

Model: a shared ReLU MLP trunk 784 -> 512 -> 512 and K linear 10-way heads (stored
stacked, one (K, 512, 10) weight), batch 256 of random inputs and labels, Adam(1e-3).
For each K, every step below is one jitted call (gradients, weights, Adam update,
``apply_updates``) waited for with ``block_until_ready``; the table gives the median over
``--steps`` calls after two warm-up calls and its ratio to the plain step measured in the
same run. The calls are interleaved (each round calls every step once, then the PyTorch
process's steps once), so a change in machine load hits all of them alike
(``benchmarks/timing.py``):

* ``plain`` -- ``jax.grad`` of the summed task losses (what one would write without this
  library; the K heads as one einsum over the stacked head weights);
* ``tier 1 (split)`` -- ``split_value_and_grad`` with ``mean_weighting()`` (one backward
  pass);
* ``tier 2 MGDA (split)`` -- ``split_value_and_grad`` with ``mgda()``: Gram of
  ``∂L_i/∂z`` at the 512-d trunk output, all K feature gradients from one backward pass
  through the heads, then one encoder backward pass;
* ``tier 3 MGDA (split)`` -- ``split_value_and_jacobian`` (K encoder backward passes, head
  gradients from the same heads pass) then ``optax.chain(aggregate(mgda()), adam)``, no
  mask;
* ``tier 3 MGDA (bounded)`` -- ``split_value_and_grad(gram="parameters", chunk_size=c)``:
  the same weights and update without holding the K x encoder Jacobian;
* ``K encoder backwards`` -- the compute floor of exact tier 3 through the split: one
  forward pass and K encoder backward passes of random feature cotangents, nothing else;
* ``tier 3 MGDA (strategy)`` -- ``value_and_jacobian(strategy=...)`` then
  ``optax.chain(aggregate(mgda(), shared=trunk), adam)``, for ``vmap``, ``map`` and
  ``chunked`` (``chunk_size = ceil(K / 4)``, at least 2);
* ``torchjd MGDA`` (when an interpreter with torch and torchjd is found, ``--torch-python``)
  -- the same model in PyTorch, in a process of its own (trunk ``nn.Sequential``, K
  ``nn.Linear`` heads, same sizes, ``torch.set_num_threads`` set to the cores JAX uses):
  ``mtl_backward(losses, features=z)`` then ``jac_to_grad(trunk.parameters(), MGDA())`` and
  ``torch.optim.Adam``; its ratio is to our tier-3 MGDA through the split (the same
  computation: K encoder backward passes), printed only when the sanity line holds (torch's
  plain step, also timed, alone vs interleaved within 1.5×, load at most 1.5× the cores).

Every step through the split gives the heads as ``mtl.stacked_heads`` (:data:`HEADS`): one
head function vmapped over the stacked head parameters, the same model and arithmetic as
the plain step's einsum. That is the idiomatic form for K heads of one shape (a Python list
of K head functions works too, but traces K heads and runs K small matrix products where
the stacked form runs one).

A memory table (``--memory-tasks``, default K = 10 64 256) gives, for the plain step and
the two exact tier-3 modes through the split, the peak memory of the compiled step (XLA's
memory analysis of the executable: arguments + outputs + temporaries - aliased) and its
step time, with the ratios the targets refer to.

A third table times the weighting solve alone on a K = 64 random Gram (``A Aᵀ``,
``A`` 64 x 2000 Gaussian): ``mgda()`` and ``primary_auxiliary(primary=0)``, jitted, median
µs per call including dispatch, cold (empty warm-start state) and warm-started from the
previous solution.

    python -m benchmarks.speed                 # K = 2 10 40, < 5 min on 2 CPU cores
    python -m benchmarks.speed --num-tasks 10  # one K
    python -m benchmarks.speed --smoke         # seconds, K = 2, tiny sizes
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from benchmarks.multimnist import encode, shared_mask  # same trunk/heads layout
from benchmarks.timing import (
    TORCH_PLAIN,
    TorchProcess,
    find_torch_python,
    interleaved_medians,
    machine_load,
    median_seconds,
    num_cores,
    timed_rounds,
)

STRATEGIES = ("vmap", "map", "chunked")
# What value_and_jacobian's default strategy "auto" picks on this backend.
DEFAULT_STRATEGY = "map" if jax.default_backend() == "cpu" else "vmap"


def chunk_size_for(num_tasks: int) -> int:
    return max(2, math.ceil(num_tasks / 4))


# --------------------------------------------------------------------------- model
def init_params(key: jax.Array, num_tasks: int, sizes: Sequence[int]) -> dict[str, Any]:
    k_trunk, k_heads = jax.random.split(key)
    width = sizes[-1]
    return {
        "trunk": common.init_mlp(k_trunk, sizes),
        "heads": {
            "w": jax.random.normal(k_heads, (num_tasks, width, 10)) * jnp.sqrt(1.0 / width),
            "b": jnp.zeros((num_tasks, 10)),
        },
    }


def heads(params, z, batch) -> jax.Array:
    """(K,) mean cross-entropy of each head."""
    _, y = batch  # (B, K) int labels
    logits = jnp.einsum("bd,kdc->kbc", z, params["heads"]["w"]) + params["heads"]["b"][:, None]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y.T).mean(axis=1)


def head(head_params, z, batch, task) -> jax.Array:
    """Mean cross-entropy of head ``task`` (``head_params``: its slice, w (512, 10), b (10,))."""
    _, y = batch
    logits = z @ head_params["w"] + head_params["b"]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y[:, task]).mean()


HEADS = mtl.stacked_heads(head, head_params=lambda params: params["heads"])
"""The K heads for the split: ``head`` vmapped over the task axis of ``params["heads"]``."""


def task_losses(params, batch) -> jax.Array:
    return heads(params, encode(params, batch), batch)


def bounded_chunk(num_tasks: int) -> int:
    """Gram columns per batch in the bounded-memory mode: at most 4 gradients alive.

    (At K = 256 on this model: peak 195 MB with 4, 255 MB with 16, 54 MB plain.)"""
    return min(num_tasks, 4)


# --------------------------------------------------------------------------- steps
def make_steps(
    num_tasks: int, params, lr: float, strategies: Sequence[str] = STRATEGIES
) -> dict[str, tuple[Callable, Any]]:
    """Name -> (jitted ``step(state, batch) -> state``, initial state)."""
    adam = optax.adam(lr)
    steps: dict[str, tuple[Callable, Any]] = {}

    steps["plain"] = (plain_step(adam), (params, adam.init(params)))

    for name, (fn, make_state) in split_steps(num_tasks, adam).items():
        steps[name] = (fn, make_state(params))
    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=num_tasks, shared=shared_mask(params)), adam)
    for strategy in strategies:
        chunk = chunk_size_for(num_tasks) if strategy == "chunked" else None
        jac_fn = mtl.value_and_jacobian(task_losses, strategy=strategy, chunk_size=chunk)

        def tier3(state, batch, jac_fn=jac_fn):
            params, opt_state = state
            losses, task_grads = jac_fn(params, batch)
            updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
            return optax.apply_updates(params, updates), opt_state

        steps[f"tier 3 MGDA ({strategy})"] = (tier3, (params, opt.init(params)))
    steps["K encoder backwards"] = (encoder_floor(num_tasks), params)
    return {name: (jax.jit(fn), state) for name, (fn, state) in steps.items()}


def split_steps(num_tasks: int, adam) -> dict[str, tuple[Callable, Callable]]:
    """The steps through the encoder/heads split: name -> (step, state factory)."""
    out: dict[str, tuple[Callable, Any]] = {}
    grad_fns = {
        "tier 1 (split)": mtl.split_value_and_grad(encode, HEADS, mtl.mean_weighting()),
        "tier 2 MGDA (split)": mtl.split_value_and_grad(encode, HEADS, mtl.mgda()),
        "tier 3 MGDA (bounded)": mtl.split_value_and_grad(
            encode, HEADS, mtl.mgda(), gram="parameters", chunk_size=bounded_chunk(num_tasks)
        ),
    }
    for name, grad_fn in grad_fns.items():

        def weighted(state, batch, grad_fn=grad_fn):
            params, opt_state, wstate = state
            _, grads, wstate = grad_fn(params, batch, wstate)
            updates, opt_state = adam.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, wstate

        out[name] = (weighted, lambda p, grad_fn=grad_fn: (p, adam.init(p), grad_fn.init(p)))
    jac = mtl.split_value_and_jacobian(encode, HEADS)
    opt = optax.chain(mtl.aggregate(mtl.mgda(), tasks=num_tasks), adam)

    def tier3(state, batch):
        params, opt_state = state
        losses, task_grads = jac(params, batch)
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    out["tier 3 MGDA (split)"] = (tier3, lambda p: (p, opt.init(p)))
    return out


def encoder_floor(num_tasks: int) -> Callable:
    """One forward and K encoder backward passes (fixed random cotangents): the floor."""

    def step(params, batch):
        z, vjp = jax.vjp(lambda p: encode(p, batch), params)
        cotangents = jax.random.normal(jax.random.PRNGKey(0), (num_tasks, *z.shape), z.dtype)
        grads = jax.lax.map(lambda c: vjp(c)[0], cotangents)
        return jax.tree_util.tree_map(lambda p, g: p - 1e-9 * g.sum(0), params, grads)

    return step


def peak_bytes(step: Callable, state, batch) -> int:
    """Peak memory of the compiled step: arguments + outputs + temporaries - aliased."""
    stats = step.lower(state, batch).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


MEMORY_STEPS = ("plain", "tier 3 MGDA (split)", "tier 3 MGDA (bounded)")
# The steps of about one training step, timed again in rounds without the others.
LIGHT_STEPS = ("plain", "tier 1 (split)", "tier 2 MGDA (split)")


def memory_rows(
    tasks: Sequence[int], sizes: Sequence[int], batch_size: int, calls: int
) -> dict[int, dict[str, tuple[float, float]]]:
    """K -> name -> (peak MB, median step seconds) for MEMORY_STEPS, timed interleaved."""
    rows = {}
    for num_tasks in tasks:
        params, batch = problem(num_tasks, sizes, batch_size)
        adam = optax.adam(1e-3)
        steps = {"plain": (plain_step(adam), (params, adam.init(params)))}
        for name, (fn, make_state) in split_steps(num_tasks, adam).items():
            if name in MEMORY_STEPS:
                steps[name] = (fn, make_state(params))
        jitted = {name: (jax.jit(fn), state) for name, (fn, state) in steps.items()}
        memory = {
            name: peak_bytes(fn, state, batch) / 2**20 for name, (fn, state) in jitted.items()
        }
        times = interleaved_medians(
            {name: jax_call(fn, state, batch) for name, (fn, state) in jitted.items()}, calls=calls
        )
        rows[num_tasks] = {name: (memory[name], times[name]) for name in MEMORY_STEPS}
        for name in MEMORY_STEPS:
            print(
                f"K={num_tasks:>3} {name:<24} {memory[name]:9.1f} MB {1e3 * times[name]:9.2f} ms",
                flush=True,
            )
    return rows


def problem(num_tasks: int, sizes: Sequence[int], batch_size: int):
    """Random inputs and labels, initial params (seeded by K)."""
    key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(num_tasks), 3)
    x = jax.random.uniform(key_x, (batch_size, sizes[0]))
    y = jax.random.randint(key_y, (batch_size, num_tasks), 0, 10)
    return init_params(key_p, num_tasks, sizes), (x, y)


def plain_step(adam) -> Callable:
    def plain(state, batch):
        params, opt_state = state
        grads = jax.grad(lambda p: jnp.sum(task_losses(p, batch)))(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return plain


def jax_call(step: Callable, state, batch) -> Callable[[], None]:
    """Zero-argument call running one jitted step on carried state, waiting for it."""
    box = [state]

    def call():
        box[0] = jax.block_until_ready(step(box[0], batch))

    return call


# --------------------------------------------------------------------------- solves
def time_solves(num_tasks: int, *, calls: int) -> dict[str, tuple[float, float]]:
    """Median µs of the jitted weighting solve on a random Gram: (cold, warm-started)."""
    a = jax.random.normal(jax.random.PRNGKey(1), (num_tasks, 2000))
    gram = jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)
    out, n = {}, calls
    for name, weighting in (
        ("MGDA", mtl.mgda()),
        ("primary/auxiliary", mtl.primary_auxiliary(primary=0)),
    ):
        solve = jax.jit(lambda g, s, w=weighting: w.update(g, None, s))
        cold = weighting.init(num_tasks)
        _, warm = jax.block_until_ready(solve(gram, cold))
        out[name] = tuple(
            1e6 * median_seconds(lambda s=s, f=solve: jax.block_until_ready(f(gram, s)), calls=n)
            for s in (cold, warm)
        )
    return out


# --------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-tasks", type=common.count, nargs="+", default=[2, 10, 40])
    parser.add_argument(
        "--steps", type=common.count, default=20, help="timed calls per step (>= 20)"
    )
    parser.add_argument("--batch-size", type=common.count, default=256)
    parser.add_argument("--width", type=common.count, default=512, help="trunk width")
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=list(STRATEGIES),
        choices=STRATEGIES,
        help="tier-3 Jacobian strategies to time",
    )
    parser.add_argument("--memory-tasks", type=common.count, nargs="+", default=[10, 64, 256])
    parser.add_argument(
        "--memory-steps", type=common.count, default=5, help="timed calls, memory table"
    )
    parser.add_argument("--solve-tasks", type=common.count, default=64)
    parser.add_argument("--solve-calls", type=common.count, default=200)
    parser.add_argument("--no-torch", action="store_true", help="skip torchjd even if installed")
    parser.add_argument("--torch-python", default=None, help="interpreter with torch, torchjd")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for speed_<backend>.md ('': none; default results, none with --smoke)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes, K = 2, few steps, no torch (tests)"
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_tasks, args.steps, args.batch_size, args.width = [2], 3, 32, 32
        args.memory_tasks, args.memory_steps = [3], 2
        args.solve_tasks, args.solve_calls, args.no_torch = 8, 5, True
        args.strategies = [DEFAULT_STRATEGY]
    return args


def _cell(seconds: float | None, reference: float | None) -> str:
    if seconds is None:
        return "–"
    text = f"{1e3 * seconds:.2f}"
    return text + (f" ({seconds / reference:.2f}×)" if reference else "")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the tables (markdown) and the measured rows."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    clock = common.Stopwatch()
    load_before = machine_load()[1]
    sizes = (784, args.width, args.width)
    torch_python = None if args.no_torch else find_torch_python(args.torch_python)
    use_torch = torch_python is not None
    strategies = [s for s in STRATEGIES if s in args.strategies]
    if use_torch and DEFAULT_STRATEGY not in strategies:
        strategies.insert(0, DEFAULT_STRATEGY)  # torchjd's ratio refers to it
    names = [
        "plain",
        "tier 1 (split)",
        "tier 2 MGDA (split)",
        *(f"tier 3 MGDA ({s})" for s in strategies),
        "tier 3 MGDA (split)",
        "tier 3 MGDA (bounded)",
        "K encoder backwards",
    ]
    rows: dict[int, dict[str, float]] = {}
    notes: list[str] = []
    withheld: dict[int, str | None] = {}  # K -> why no torchjd ratio (None: printed)
    torch_version = None
    light: dict[int, dict[str, float]] = {}  # K -> the light steps timed in rounds of their own
    for num_tasks in args.num_tasks:
        params, (x, y) = problem(num_tasks, sizes, args.batch_size)
        calls = {
            name: jax_call(step, state, (x, y))
            for name, (step, state) in make_steps(num_tasks, params, 1e-3, strategies).items()
        }
        torch = None
        if use_torch:  # the same model in PyTorch, in its own process (benchmarks/timing.py)
            arrays = dict(sizes=sizes, aggregator="MGDA", lr=1e-3, x=np.asarray(x), y=np.asarray(y))
            torch = TorchProcess(torch_python, "multitask", arrays)
            torch_version = torch.version
        row, sanity, withheld[num_tasks] = timed_rounds(
            calls, calls=args.steps, torch=torch, jax_backend=jax.default_backend()
        )
        light[num_tasks] = interleaved_medians(
            {name: calls[name] for name in LIGHT_STEPS}, calls=args.steps
        )
        if sanity is not None:
            reason = withheld[num_tasks]
            notes.append(f"K = {num_tasks}: {sanity}" + (f" No ratio: {reason}." if reason else ""))
        for name, seconds in row.items():
            print(f"K={num_tasks:>3} {name:<24} {1e3 * seconds:9.2f} ms", flush=True)
        rows[num_tasks] = row

    headers = ["K", *names, "fastest tier-3 strategy"]
    if use_torch:
        headers += ["torch plain", "torchjd MGDA (× ours, split)"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for num_tasks, row in rows.items():
        plain = row["plain"]
        cells = [str(num_tasks)]
        cells += [_cell(row[n], None if n == "plain" else plain) for n in names]
        fastest = min(strategies, key=lambda s: row[f"tier 3 MGDA ({s})"])
        cells.append(fastest + (f" (chunk {chunk_size_for(num_tasks)})" * (fastest == "chunked")))
        if use_torch:
            cells.append(_cell(row[TORCH_PLAIN], None))
            reference = None if withheld[num_tasks] else row["tier 3 MGDA (split)"]
            cells.append(_cell(row["torchjd MGDA step"], reference))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    light_lines = ["| K | " + " | ".join(LIGHT_STEPS) + " |", "|" + "---|" * (1 + len(LIGHT_STEPS))]
    for num_tasks, row in light.items():
        cells = [_cell(row[n], None if n == "plain" else row["plain"]) for n in LIGHT_STEPS]
        light_lines.append(f"| {num_tasks} | " + " | ".join(cells) + " |")
    light_table = "\n".join(light_lines)

    memory = memory_rows(args.memory_tasks, sizes, args.batch_size, args.memory_steps)
    memory_lines = [
        "| K | plain: MB, ms | tier 3 split: MB, ms | tier 3 bounded: MB, ms "
        "| bounded / plain memory | bounded / split time |",
        "|---|---|---|---|---|---|",
    ]
    for num_tasks, row in memory.items():
        cells = [str(num_tasks)]
        cells += [f"{mb:.1f}, {1e3 * sec:.1f}" for mb, sec in (row[n] for n in MEMORY_STEPS)]
        (plain_mb, _), (_, split_s), (bounded_mb, bounded_s) = (row[n] for n in MEMORY_STEPS)
        cells += [f"{bounded_mb / plain_mb:.2f}×", f"{bounded_s / split_s:.2f}×"]
        memory_lines.append("| " + " | ".join(cells) + " |")
    memory_table = "\n".join(memory_lines)

    solves = time_solves(args.solve_tasks, calls=args.solve_calls)
    solve_lines = [
        f"| solve (K = {args.solve_tasks}) | cold start (µs) | warm start (µs) |",
        "|---|---|---|",
    ]
    for name, (cold, warm) in solves.items():
        solve_lines.append(f"| {name} | {cold:.0f} | {warm:.0f} |")
    solve_table = "\n".join(solve_lines)

    seconds = clock()
    torch_note = (
        "torchjd: not run (optional; an interpreter with torch and torchjd, `--torch-python`)."
        if not use_torch
        else f"PyTorch {torch_version} with {num_cores()} threads, in its own process, its "
        "rounds interleaved with the JAX rounds; the torchjd ratio is printed only when the "
        "sanity line below holds."
    )
    text = (
        f"# Step time per tier ({jax.default_backend()})\n\n"
        f"Trunk {' → '.join(map(str, sizes))} (ReLU), K linear 10-way heads, batch "
        f"{args.batch_size}, Adam. Median of {args.steps} jitted steps after 2 warm-up "
        "calls, interleaved across methods (ms; in parentheses the ratio to the plain step "
        "of the same run; for torchjd, the "
        "ratio to our tier-3 MGDA through the split). chunked: chunk size "
        f"ceil(K/4), at least 2. {common.jax_device()}, "
        f"{num_cores()} cores. {torch_note} Wall time {seconds:.0f} s; machine {load_before} "
        f"at the start, {machine_load()[1]} at the end (other jobs share the cores when the "
        "load exceeds them: absolute times inflate, ratios within a row stay comparable)."
        f"\n\nRun with `python -m benchmarks.speed {' '.join(argv)}`.\n\n"
        + table
        + "".join(f"\n\n* {note}" for note in notes)
        + "\n\nThe steps of about one backward pass, timed again in rounds of their own (no "
        "tier-3 step of 10-100× their time and no PyTorch share between two of their calls, "
        "as in a training loop that runs one step over and over; same medians and ratios):"
        "\n\n"
        + light_table
        + "\n\nPeak memory of the compiled step (XLA memory analysis: arguments + outputs + "
        "temporaries - aliased) and median step time over "
        f"{args.memory_steps} calls; bounded mode with chunk min(K, 4).\n\n"
        + memory_table
        + "\n\nWeighting solve alone, jitted, median of "
        f"{args.solve_calls} calls including dispatch; Gram `A Aᵀ`, A {args.solve_tasks} x "
        "2000 Gaussian.\n\n" + solve_table + "\n"
    )
    print(table)
    print()
    print(light_table)
    print()
    print(memory_table)
    print()
    print(solve_table)
    name = f"speed_{jax.default_backend()}"  # speed_cpu.md, speed_gpu.md, ...
    for path in common.write_results(args.out, name, text, smoke=args.smoke):
        print(f"wrote {path}")
    return {
        "table": table,
        "light_table": light_table,
        "memory_table": memory_table,
        "solve_table": solve_table,
        "rows": rows,
        "memory": memory,
    }


if __name__ == "__main__":
    main()
