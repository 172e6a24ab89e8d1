"""Speed and memory of the structured Gram of per-example gradients, side by side.

Models (identical in JAX and PyTorch, same initial values and batch): the speed
benchmark's MLP 784 → 512 → 512 → 10 (ReLU) and a LeNet-5-size CNN (conv 5x5 1 → 6, max-pool
2, conv 5x5 6 → 16, max-pool 2, dense 256 → 120 → 84 → 10, ReLU), batch 256 of random
inputs and labels, per-example softmax cross-entropy. Rows, each one jitted call waited
for with ``block_until_ready``:

* ``plain step`` -- ``jax.grad`` of the mean loss and an SGD update (what one would write
  without Gram-based aggregation: the reference for time and memory);
* ``Gram (ours)`` -- ``mtl.value_and_gram``: losses and the B x B Gram of the per-example
  gradients from one forward and one backward pass (ghost terms / per-example gradients per
  layer, whichever is cheaper);
* ``Gram (vmap(grad))`` -- the per-example gradients materialised with ``jax.vmap(jax.grad)``
  and multiplied out (``mtl.task_gram``);
* ``IWRM step (ours)`` -- the whole instance-wise step: the Gram, weights from it,
  ``combine(w) = Σ_b w_b g_b`` from the same stored activations and cotangents, SGD update.
  The weights here are the mean (``mtl.mean_weighting()``, w = 1/B) so that the row
  measures the engine, not a solver: UPGrad's K = 256 solve alone takes seconds on CPU
  (``benchmarks/aggregator_speed.py`` times the solves);
* PyTorch, in its own process (``--torch-python``, a virtualenv with torch and torchjd; no
  JAX there): the same plain step, ``torchjd.autogram.Engine(model, batch_dim=0)``'s
  ``compute_gramian`` (torchjd's Gram) and its IWRM step (``compute_gramian``, the same
  mean weights, then ``losses.backward(weights)`` as in torchjd's documented recipe: a
  second backward pass).

A second table times the multi-task K x K task Gram (``--tasks`` K = 4 linear heads on an
MLP 784 → width → width, per-task mean squared error, MGDA): one whole
``mtl.value_and_grad`` step with ``gram="columns"`` (K backward and K forward-mode passes)
against ``gram="structured"`` (the engine's task Gram and ``combine(w)``), at a small batch
with wide layers (8, width 1024) and a large batch with narrow layers (1024, width 32),
with the path ``gram="auto"`` takes on each.

Timing (``benchmarks/timing.py``, shared by every speed benchmark): after 2 warm-up rounds,
``--calls`` rounds call every JAX function once and then ask the PyTorch process for one
call of each of its functions, so load changes hit both alike; the table gives medians and
ratios within this one run, and a sanity line (PyTorch's plain step timed alone against its
interleaved median, the machine load) decides whether a cross-library ratio is printed. Peak
memory (JAX) is XLA's memory analysis of the compiled function (arguments + outputs +
temporaries - aliased), as in ``benchmarks/speed.py``. The PyTorch Gram is also compared
with ours on the same parameters and batch (it must agree: same model).

    python -m benchmarks.gram_speed --torch-python .venv-ref/bin/python
    python -m benchmarks.gram_speed --smoke        # seconds: the CNN, tiny sizes, no torch
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common, timing

MODELS = ("mlp", "cnn")
LR = 0.01
JAX_ROWS = ("plain step", "Gram (ours)", "Gram (vmap(grad))", "IWRM step (ours)")
TORCH_ROWS = ("torch plain step", "torchjd Gram", "torchjd IWRM step")  # timing.py's "gram"
TASK_ROWS = ("columns", "structured")  # value_and_grad(gram=...) of the task-Gram table
TASK_SHAPES = {"small batch, wide layers": (8, 1024), "large batch, narrow layers": (1024, 32)}
SMOKE_TASK_SHAPES = {"small batch, wide layers": (2, 64), "large batch, narrow layers": (64, 4)}


# --------------------------------------------------------------------------- shared setup
def init_params(model: str, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """He-initialised NumPy parameters (JAX layout: dense (in, out), conv HWIO)."""
    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    if model == "mlp":
        sizes = (784, width, width, 10)
        out = {}
        for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
            out[f"w{i}"], out[f"b{i}"] = he((m, n), m), np.zeros(n, np.float32)
        return out
    out = {
        "c0": he((5, 5, 1, 6), 25),
        "cb0": np.zeros(6, np.float32),
        "c1": he((5, 5, 6, 16), 150),
        "cb1": np.zeros(16, np.float32),
    }
    for i, (m, n) in enumerate(((256, 120), (120, 84), (84, 10))):
        out[f"w{i}"], out[f"b{i}"] = he((m, n), m), np.zeros(n, np.float32)
    return out


def make_batch(model: str, batch_size: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch_size, 784) if model == "mlp" else (batch_size, 28, 28, 1)
    return rng.random(shape, dtype=np.float32), rng.integers(0, 10, batch_size).astype(np.int32)


# --------------------------------------------------------------------------- JAX side
def jax_functions(model: str, params_np, batch_np):
    """Name -> (compiled function, its arguments)."""
    import jax
    import jax.numpy as jnp
    import optax

    import mtl_optax as mtl
    from mtl_optax.structured_gram import value_gram_and_combine

    def forward(p, x):
        if model == "cnn":
            for i in range(2):
                x = jax.lax.conv_general_dilated(
                    x, p[f"c{i}"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
                x = jax.nn.relu(x + p[f"cb{i}"])
                x = jax.lax.reduce_window(
                    x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID"
                )
            x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)  # PyTorch's flatten order
        n = len([k for k in p if k.startswith("w")])
        for i in range(n):
            x = x @ p[f"w{i}"] + p[f"b{i}"]
            if i < n - 1:
                x = jax.nn.relu(x)
        return x

    def losses_fn(p, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(forward(p, x), y)

    sgd = lambda p, g: jax.tree_util.tree_map(lambda a, b: a - LR * b, p, g)  # noqa: E731
    weighting = mtl.mean_weighting()
    engine = value_gram_and_combine(losses_fn)

    def plain(p, batch):
        return sgd(p, jax.grad(lambda q: jnp.mean(losses_fn(q, batch)))(p))

    def gram(p, batch):
        return mtl.value_and_gram(losses_fn)(p, batch)

    def vmap_gram(p, batch):
        def one(x, y):
            return jax.grad(lambda q: losses_fn(q, (x[None], y[None]))[0])(p)

        grads = jax.vmap(one)(*batch)
        return losses_fn(p, batch), mtl.task_gram(grads)

    def iwrm(p, state, batch):
        losses, g, combine = engine(p, batch)
        weights, state = weighting.update(g, losses, state)
        return sgd(p, combine(weights)), state, g  # the Gram is an output: it is computed

    params = {k: jnp.asarray(v) for k, v in params_np.items()}
    batch = tuple(jnp.asarray(a) for a in batch_np)
    state = weighting.init(batch_np[1].shape[0])
    fns = {
        "plain step": (plain, (params, batch)),
        "Gram (ours)": (gram, (params, batch)),
        "Gram (vmap(grad))": (vmap_gram, (params, batch)),
        "IWRM step (ours)": (iwrm, (params, state, batch)),
    }
    # compiled once: the executables are timed and their memory analysed
    return {name: (jax.jit(f).lower(*a).compile(), a) for name, (f, a) in fns.items()}


def peak_mb(compiled) -> float:
    stats = compiled.memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )
    return total / 2**20


def task_gram_functions(batch_size: int, width: int, tasks: int):
    """``gram`` -> (compiled ``value_and_grad`` MGDA step, its arguments), and the path
    ``gram="auto"`` takes (its program is that path's)."""
    import jax
    import jax.numpy as jnp

    import mtl_optax as mtl

    rng = np.random.default_rng(2)
    params_np = init_params("mlp", width)
    params = {k: jnp.asarray(v) for k, v in params_np.items() if k not in ("w2", "b2")}
    params["heads"] = jnp.asarray(rng.standard_normal((width, tasks)) / np.sqrt(width))
    x = jnp.asarray(rng.random((batch_size, 784), dtype=np.float32))
    y = jnp.asarray(rng.standard_normal((batch_size, tasks)).astype(np.float32))
    shared = {k: k != "heads" for k in params}

    def task_losses(p, batch):
        h = jax.nn.relu(batch[0] @ p["w0"] + p["b0"])
        h = jax.nn.relu(h @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["heads"] - batch[1]) ** 2, axis=0)

    programs, fns = {}, {}
    for gram in (*TASK_ROWS, "auto"):
        grad_fn = mtl.value_and_grad(task_losses, mtl.mgda(), tasks=tasks, shared=shared, gram=gram)
        args = (params, (x, y), grad_fn.init(params))
        programs[gram] = str(jax.make_jaxpr(grad_fn)(*args))
        if gram in TASK_ROWS:
            fns[gram] = (jax.jit(grad_fn).lower(*args).compile(), args)
    auto = next((g for g in TASK_ROWS if programs[g] == programs["auto"]), "neither")
    return fns, auto


def run_task_gram(args) -> dict[str, Any]:
    """Medians, peak memory and auto's choice per shape of the task-Gram table."""
    import jax

    out = {}
    shapes = SMOKE_TASK_SHAPES if args.smoke else TASK_SHAPES
    for shape, (batch_size, width) in shapes.items():
        fns, auto = task_gram_functions(batch_size, width, args.tasks)
        calls = {
            name: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a)))
            for name, (fn, a) in fns.items()
        }
        medians, _, _ = timing.timed_rounds(calls, calls=args.calls)
        memory = {name: peak_mb(fn) for name, (fn, _) in fns.items()}
        out[shape] = {
            "batch": batch_size,
            "width": width,
            "medians": medians,
            "memory": memory,
            "auto": auto,
        }
    return out


def task_table(results: dict[str, Any], args) -> str:
    lines = [
        f"### K × K task Gram, K = {args.tasks}: value_and_grad(gram=...) MGDA step",
        "",
        "| shape | batch | width | columns (ms) | structured (ms) | structured / columns "
        "| peak MB columns / structured | auto takes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for shape, r in results.items():
        med, mem = r["medians"], r["memory"]
        lines.append(
            f"| {shape} | {r['batch']} | {r['width']} | {1e3 * med['columns']:.2f} | "
            f"{1e3 * med['structured']:.2f} | {med['structured'] / med['columns']:.2f} | "
            f"{mem['columns']:.1f} / {mem['structured']:.1f} | {r['auto']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- benchmark
def run_model(model: str, args, torch_python: str | None) -> dict[str, Any]:
    import jax

    params_np = init_params(model, args.width)
    batch_np = make_batch(model, args.batch_size)
    fns = jax_functions(model, params_np, batch_np)
    memory = {name: peak_mb(fn) for name, (fn, _) in fns.items()}
    torch_proc = gram_check = None
    if torch_python is not None:
        arrays = dict(model=model, lr=LR, x=batch_np[0], y=batch_np[1], **params_np)
        torch_proc = timing.TorchProcess(torch_python, "gram", arrays)
        theirs_path = str(torch_proc.npz.with_suffix(".gram.npy"))
        torch_proc.ask(f"gram {theirs_path}")
        ours = np.asarray(fns["Gram (ours)"][0](*fns["Gram (ours)"][1])[1])
        theirs = np.load(theirs_path)
        gram_check = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(ours)))
    calls = {
        name: (lambda fn=fn, a=a: jax.block_until_ready(fn(*a))) for name, (fn, a) in fns.items()
    }
    medians, sanity, withheld = timing.timed_rounds(
        calls, calls=args.calls, torch=torch_proc, jax_backend=jax.default_backend()
    )
    return {
        "medians": medians,
        "memory": memory,
        "sanity": sanity,
        "withheld": withheld,
        "gram_check": gram_check,
        "torch_version": None if torch_proc is None else torch_proc.version,
        "backend": jax.default_backend(),
    }


def table(model: str, out: dict[str, Any], args) -> tuple[str, list[str]]:
    med, mem = out["medians"], out["memory"]
    plain, plain_mem = med["plain step"], mem["plain step"]
    lines = [
        f"### {model}, batch {args.batch_size}",
        "",
        "| step | median (ms) | × plain step | peak memory (MB) | × plain step |",
        "|---|---|---|---|---|",
    ]
    for name in JAX_ROWS:
        lines.append(
            f"| {name} | {1e3 * med[name]:.2f} | {med[name] / plain:.2f} | {mem[name]:.1f} | "
            f"{mem[name] / plain_mem:.2f} |"
        )
    notes = []
    if timing.TORCH_PLAIN in med:
        tplain = med[timing.TORCH_PLAIN]
        for name in TORCH_ROWS:
            lines.append(f"| {name} | {1e3 * med[name]:.2f} | {med[name] / tplain:.2f} | – | – |")
        notes.append(out["sanity"])
        notes.append(
            f"PyTorch's Gram vs ours on the same parameters and batch: max relative difference "
            f"{out['gram_check']:.1e}."
        )
        if out["withheld"]:
            notes.append(f"No cross-library ratio: {out['withheld']}.")
        else:
            notes.append(
                f"Ours / torchjd: Gram {med['Gram (ours)'] / med['torchjd Gram']:.2g}×, IWRM step "
                f"{med['IWRM step (ours)'] / med['torchjd IWRM step']:.2g}× (below 1: ours faster)."
            )
    elif args.no_torch:
        notes.append("PyTorch not run (--no-torch or --smoke).")
    else:
        notes.append("torch not installed (no PyTorch interpreter with torch and torchjd found).")
    return "\n".join(lines), notes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-size", type=common.count, default=256)
    parser.add_argument("--width", type=common.count, default=512, help="MLP hidden width")
    parser.add_argument("--calls", type=common.count, default=20, help="timed rounds")
    parser.add_argument("--tasks", type=common.count, default=4, help="K of the task-Gram table")
    parser.add_argument("--torch-python", default=None, help="interpreter with torch, torchjd")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--out", default=None, help="folder for gram_speed_<backend>.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds, no torch")
    args = parser.parse_args(argv)
    if args.smoke:  # the CNN has both kinds of layers (convolutions, dense)
        args.batch_size, args.width, args.calls, args.no_torch = 8, 16, 2, True
        args.models = ["cnn"]
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns ``{"text": markdown, "results": {model: ...}, "task_gram":
    {shape: ...}}``."""
    args = parse_args(argv)
    clock = common.Stopwatch()
    torch_python = None if args.no_torch else timing.find_torch_python(args.torch_python)
    results, sections = {}, []
    for model in args.models:
        results[model] = run_model(model, args, torch_python)
        text, notes = table(model, results[model], args)
        sections.append(text + "\n\n" + "\n".join(f"* {n}" for n in notes))
        print(sections[-1], flush=True)
    task_gram = run_task_gram(args)
    sections.append(task_table(task_gram, args))
    print(sections[-1], flush=True)
    torch_line = (
        f"PyTorch {results[args.models[0]]['torch_version']} (CPU) in its own process"
        if torch_python
        else "PyTorch not run"
    )
    text = (
        f"# Structured Gram: speed and memory ({results[args.models[0]]['backend']})\n\n"
        f"{common.jax_device()}, {timing.num_cores()} cores; {torch_line}. Median of {args.calls} "
        f"interleaved rounds after 2 warm-up rounds; SGD (lr {LR}); wall time {clock():.0f} s."
        "\n\n" + "\n\n".join(sections) + "\n"
    )
    name = f"gram_speed_{results[args.models[0]]['backend']}"
    for path in common.write_results(args.out, name, text, smoke=args.smoke):
        print(f"wrote {path}")
    return {"text": text, "results": results, "task_gram": task_gram}


if __name__ == "__main__":
    main()
