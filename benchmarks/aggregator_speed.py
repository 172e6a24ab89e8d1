"""Aggregator speed: every weighting's solve alone, and a full tier-3 UPGrad step vs torchjd.

Two tables, measured in one run:

* solve time of each weighting on a (K, K) Gram (``A Aᵀ``, A K x 2000 Gaussian), jitted,
  median of ``--solve-calls`` calls after warm-up (µs), for K in ``--num-tasks`` (default
  2, 10, 64). Stateful weightings are timed from their initial state.
* the full training step at K = ``--step-tasks`` (10) with ``--step-method`` (upgrad or
  mgda): the model of ``benchmarks/speed.py`` (trunk 784 → 512 → 512 ReLU, K linear 10-way
  heads, batch 256, Adam), ``split_value_and_jacobian`` (its stacked heads) + ``aggregate``
  in JAX beside torchjd's ``mtl_backward`` + ``jac_to_grad(trunk, UPGrad())`` on the
  same PyTorch model, and the same method's solve alone on the largest K's matrix beside
  torchjd's aggregator on that matrix. PyTorch runs in a process of its own, its rounds
  interleaved with the JAX rounds, and a ratio ours / torchjd is printed only when the
  sanity line holds (``benchmarks/timing.py``); without an interpreter that has torch and
  torchjd (``--torch-python``) the table says "torchjd not run".

    python -m benchmarks.aggregator_speed [--methods nash_mtl,pcgrad] [--smoke]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mtl_optax as mtl
from benchmarks import common
from benchmarks.speed import HEADS, encode, init_params, jax_call
from benchmarks.timing import (
    TorchProcess,
    find_torch_python,
    median_seconds,
    num_cores,
    timed_rounds,
)

# name -> keyword arguments of mtl.<name>(...) (a callable of K where they depend on it)
METHODS: dict[str, Any] = {
    "mgda": {},
    "upgrad": {},
    "dualproj": {},
    "cagrad": {},
    "pcgrad": {"key": jax.random.PRNGKey(0)},
    "gradvac": {"key": jax.random.PRNGKey(0)},
    "imtl_g": {},
    "aligned_mtl": {},
    "config": {},
    "nash_mtl": {},
    "fairgrad": {},
    "krum": lambda k: {"n_byzantine": (k - 3) // 2},
    "sdmgrad": {"single_batch": True},
    "modo": {"single_batch": True},
    "gradient_normalized": {},
}


def build(name: str, num_tasks: int) -> mtl.Weighting | None:
    """``mtl.<name>(**kwargs)``, or None when K does not fit the method (Krum: K < 3)."""
    factory = getattr(mtl, name)
    kwargs = METHODS.get(name, {})
    kwargs = kwargs(num_tasks) if callable(kwargs) else kwargs
    if name == "krum" and num_tasks < 3:
        return None
    return factory(**kwargs)


def solve_matrix(num_tasks: int) -> jax.Array:
    """The (K, 2000) Gaussian Jacobian whose Gram every solve is timed on."""
    return jax.random.normal(jax.random.PRNGKey(1), (num_tasks, 2000))


def jitted_solve(weighting: mtl.Weighting, num_tasks: int):
    """A zero-argument call of the jitted ``update`` on the random Gram (initial state)."""
    a = solve_matrix(num_tasks)
    gram = jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)
    losses = jnp.ones(num_tasks)
    state = weighting.init(num_tasks)
    solve = jax.jit(lambda g, s: weighting.update(g, losses, s)[0])
    return lambda: jax.block_until_ready(solve(gram, state))


def time_solve(weighting: mtl.Weighting, num_tasks: int, *, calls: int) -> float:
    """Median µs of one jitted ``update`` on a random Gram (initial state)."""
    return 1e6 * median_seconds(jitted_solve(weighting, num_tasks), calls=calls)


def tier3_step(weighting: mtl.Weighting, num_tasks: int, params):
    """Exact tier 3 through the encoder/heads split (per-task gradients of the trunk only,
    as torchjd's ``mtl_backward`` computes them)."""
    opt = optax.chain(mtl.aggregate(weighting, tasks=num_tasks), optax.adam(1e-3))
    jac_fn = mtl.split_value_and_jacobian(encode, HEADS)

    def step(state, batch):
        params, opt_state = state
        losses, task_grads = jac_fn(params, batch)
        updates, opt_state = opt.update(task_grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step), (params, opt.init(params))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    parser.add_argument("--num-tasks", type=common.count, nargs="+", default=[2, 10, 64])
    parser.add_argument("--solve-calls", type=common.count, default=100)
    parser.add_argument("--step-tasks", type=common.count, default=10)
    parser.add_argument("--step-method", default="upgrad", choices=("upgrad", "mgda"))
    parser.add_argument("--steps", type=common.count, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=common.count, default=256)
    parser.add_argument("--width", type=common.count, default=512)
    parser.add_argument("--no-torch", action="store_true", help="skip torchjd even if installed")
    parser.add_argument("--torch-python", default=None, help="interpreter with torch, torchjd")
    parser.add_argument("--out", default=None, help="folder for aggregator_speed_<backend>.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few calls, no torch")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_tasks, args.solve_calls, args.steps = [2, 4], 3, 3
        args.step_tasks, args.batch_size, args.width, args.no_torch = 3, 16, 16, True
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"solve_table", "step_table", "solves", "steps"}``."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    names = [n for n in args.methods.split(",") if n]
    solves: dict[str, dict[int, float | None]] = {}
    for name in names:
        solves[name] = {}
        for k in args.num_tasks:
            weighting = build(name, k)
            solves[name][k] = (
                None if weighting is None else time_solve(weighting, k, calls=args.solve_calls)
            )
    header = "| method | " + " | ".join(f"K = {k} (µs)" for k in args.num_tasks) + " |"
    lines = [header, "|" + "---|" * (len(args.num_tasks) + 1)]
    for name, row in solves.items():
        cells = ["n/a" if row[k] is None else f"{row[k]:.0f}" for k in args.num_tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    solve_table = "\n".join(lines)
    torch_python = None if args.no_torch else find_torch_python(args.torch_python)
    largest = max(args.num_tasks)

    method = args.step_method
    k = args.step_tasks
    torch_name = {"upgrad": "UPGrad", "mgda": "MGDA"}[method]
    sizes = (784, args.width, args.width)
    key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(k), 3)
    x = jax.random.uniform(key_x, (args.batch_size, 784))
    y = jax.random.randint(key_y, (args.batch_size, k), 0, 10)
    step, state = tier3_step(build(method, k), k, init_params(key_p, k, sizes))
    calls = {
        "ours": jax_call(step, state, (x, y)),
        "ours solve": jitted_solve(build(method, largest), largest),
    }
    torch, notes = None, []

    if torch_python is not None:
        arrays = dict(sizes=sizes, aggregator=torch_name, lr=1e-3, x=np.asarray(x), y=np.asarray(y))
        arrays["solve_matrix"] = np.asarray(solve_matrix(largest))
        torch = TorchProcess(torch_python, "multitask", arrays)
        # each library's solve in consecutive calls, in its own process, before the rounds
        consecutive = {
            "torchjd": torch.alone(args.solve_calls, f"torchjd {torch_name} solve"),
            "ours": median_seconds(calls["ours solve"], calls=args.solve_calls),
        }
    steps, sanity, withheld = timed_rounds(
        calls, calls=args.steps, torch=torch, jax_backend=jax.default_backend()
    )
    if torch is None:
        withheld = "torchjd not run"
    else:
        steps["torchjd"] = steps.pop(f"torchjd {torch_name} step")
        steps["torchjd solve"] = steps.pop(f"torchjd {torch_name} solve")
        notes.append(sanity + (f" No cross-library ratio: {withheld}." if withheld else ""))

        def solves(ours, theirs):
            return f"torchjd {1e6 * theirs:.0f} µs, ours {1e6 * ours:.0f} µs" + (
                "" if withheld else f" (ours / torchjd {ours / theirs:.3f}×)"
            )

        in_a_row = solves(consecutive["ours"], consecutive["torchjd"])
        in_rounds = solves(steps["ours solve"], steps["torchjd solve"])
        notes.append(
            f"{method} solve alone on the K = {largest} matrix (torchjd's {torch_name} "
            f"aggregator, Gram included; our jitted weighting on the Gram): in "
            f"{args.solve_calls} consecutive calls {in_a_row}; in the interleaved rounds, right "
            f"after each library's step {in_rounds}."
        )
    ours = f"{1e3 * steps['ours']:.2f}"
    theirs = withheld if torch is None else f"{1e3 * steps['torchjd']:.2f}"
    ratio = "–" if withheld else f"{steps['ours'] / steps['torchjd']:.2f}×"
    step_table = (
        f"| K | method | ours (ms) | torchjd {torch_name} (ms) | ours / torchjd |\n"
        "|---|---|---|---|---|\n"
        f"| {k} | {method} | {ours} | {theirs} | {ratio} |"
    )
    step_table += "".join(f"\n\n* {note}" for note in notes)
    text = (
        f"# Aggregator speed ({jax.default_backend()})\n\n"
        f"Weighting solve alone: jitted `update` on `A Aᵀ` (A K x 2000 Gaussian), initial "
        f"state, median of {args.solve_calls} calls after warm-up (µs).\n\n{solve_table}\n\n"
        f"Full tier-3 step, trunk {' → '.join(map(str, sizes))} ReLU, K = {k} linear 10-way "
        f"heads, batch {args.batch_size}, Adam; median of {args.steps} steps after 2 warm-up "
        f"rounds, interleaved with PyTorch's (its own process). {common.jax_device()}, "
        f"{num_cores()} cores. "
        f"Wall time {clock():.0f} s.\n\n{step_table}\n"
    )
    print(solve_table)
    print()
    print(step_table)
    name = f"aggregator_speed_{jax.default_backend()}"
    for path in common.write_results(args.out, name, text, smoke=args.smoke):
        print(f"wrote {path}")
    return {"solve_table": solve_table, "step_table": step_table, "solves": solves, "steps": steps}


if __name__ == "__main__":
    main()
