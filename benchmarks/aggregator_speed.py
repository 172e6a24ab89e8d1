"""Aggregator speed: every weighting's solve alone, and a full tier-3 UPGrad step vs torchjd.

Two tables, measured in one run:

* solve time of each weighting on a (K, K) Gram (``A Aᵀ``, A K x 2000 Gaussian), jitted,
  median of ``--solve-calls`` calls after warm-up (µs), for K in ``--num-tasks`` (default
  2, 10, 64). Stateful weightings are timed from their initial state.
* the full training step at K = ``--step-tasks`` (10) with ``--step-method`` (upgrad or
  mgda): the model of ``benchmarks/speed.py`` (trunk 784 → 512 → 512 ReLU, K linear 10-way
  heads, batch 256, Adam), ``split_value_and_jacobian`` (its stacked heads) + ``aggregate``
  in JAX beside torchjd's ``mtl_backward`` + ``jac_to_grad(trunk, UPGrad())`` on the
  identical PyTorch model, with the ratio ours / torchjd (medians, same run). The
  torch part runs only when torch and torchjd are importable; otherwise the table says
  "torchjd not installed".

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
from benchmarks.speed import (
    HEADS,
    _num_cores,
    encode,
    init_params,
    interleaved_medians,
    jax_call,
    median_seconds,
    torch_available,
    torch_calls,
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


def time_solve(weighting: mtl.Weighting, num_tasks: int, *, calls: int) -> float:
    """Median µs of one jitted ``update`` on a random Gram (initial state)."""
    a = solve_matrix(num_tasks)
    gram = jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)
    losses = jnp.ones(num_tasks)
    state = weighting.init(num_tasks)
    solve = jax.jit(lambda g, s: weighting.update(g, losses, s)[0])
    return 1e6 * median_seconds(lambda: jax.block_until_ready(solve(gram, state)), calls=calls)


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


def torchjd_upgrad_solve(matrix: np.ndarray, *, calls: int) -> float:
    """Median µs of torchjd's ``UPGrad()`` aggregator on the (K, n) matrix (quadprog)."""
    import torch
    from torchjd.aggregation import UPGrad

    torch.set_num_threads(_num_cores())
    aggregator, jac = UPGrad(), torch.from_numpy(np.array(matrix, np.float32))
    return 1e6 * median_seconds(lambda: aggregator(jac), calls=calls)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names")
    parser.add_argument("--num-tasks", type=int, nargs="+", default=[2, 10, 64])
    parser.add_argument("--solve-calls", type=int, default=100)
    parser.add_argument("--step-tasks", type=int, default=10)
    parser.add_argument("--step-method", default="upgrad", choices=("upgrad", "mgda"))
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--no-torch", action="store_true", help="skip torchjd even if installed")
    parser.add_argument("--out", default=None, help="folder for aggregator_speed.md")
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
    use_torch = not args.no_torch and torch_available()
    largest = max(args.num_tasks)
    if use_torch and "upgrad" in names:
        theirs = torchjd_upgrad_solve(np.asarray(solve_matrix(largest)), calls=args.solve_calls)
        ours = solves["upgrad"][largest]
        solve_table += (
            f"\n\ntorchjd UPGrad aggregator on the same matrix, K = {largest}: {theirs:.0f} µs "
            f"(ours {ours:.0f} µs: {theirs / ours:.1f}× faster)."
        )

    method = args.step_method
    k = args.step_tasks
    sizes = (784, args.width, args.width)
    key_x, key_y, key_p = jax.random.split(jax.random.PRNGKey(k), 3)
    x = jax.random.uniform(key_x, (args.batch_size, 784))
    y = jax.random.randint(key_y, (args.batch_size, k), 0, 10)
    step, state = tier3_step(build(method, k), k, init_params(key_p, k, sizes))
    steps = interleaved_medians({"ours": jax_call(step, state, (x, y))}, calls=args.steps)
    torch_name = {"upgrad": "UPGrad", "mgda": "MGDA"}[method]
    if use_torch:
        torch_fn = torch_calls(
            k, sizes, np.asarray(x), np.asarray(y), lr=1e-3, aggregator=torch_name
        )[f"torchjd {torch_name}"]
        steps.update(interleaved_medians({"torchjd": torch_fn}, calls=args.steps))
    ours = f"{1e3 * steps['ours']:.2f}"
    if use_torch:
        theirs = f"{1e3 * steps['torchjd']:.2f}"
        ratio = f"{steps['ours'] / steps['torchjd']:.2f}×"
    else:
        theirs, ratio = "torchjd not installed", "–"
    step_table = (
        f"| K | method | ours (ms) | torchjd {torch_name} (ms) | ours / torchjd |\n"
        "|---|---|---|---|---|\n"
        f"| {k} | {method} | {ours} | {theirs} | {ratio} |"
    )
    text = (
        "# Aggregator speed (CPU)\n\n"
        f"Weighting solve alone: jitted `update` on `A Aᵀ` (A K x 2000 Gaussian), initial "
        f"state, median of {args.solve_calls} calls after warm-up (µs).\n\n{solve_table}\n\n"
        f"Full tier-3 step, trunk {' → '.join(map(str, sizes))} ReLU, K = {k} linear 10-way "
        f"heads, batch {args.batch_size}, Adam; median of {args.steps} steps after 2 warm-up "
        f"calls. JAX {jax.__version__} on {jax.default_backend()}, {_num_cores()} cores. "
        f"Wall time {clock():.0f} s.\n\n{step_table}\n"
    )
    print(solve_table)
    print()
    print(step_table)
    for path in common.write_results(args.out, "aggregator_speed", text, smoke=args.smoke):
        print(f"wrote {path}")
    return {"solve_table": solve_table, "step_table": step_table, "solves": solves, "steps": steps}


if __name__ == "__main__":
    main()
