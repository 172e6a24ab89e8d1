"""Honest timing for the speed benchmarks: interleaved medians, PyTorch in its own process.

Every speed benchmark times through here, so that they all follow one rule:

* **Interleaved rounds.** After warm-up rounds (compilation), each round calls every
  function once in turn and the table reports medians, so a change in machine load hits all
  rows alike and ratios within one run stay fair (:func:`interleaved_medians`).
* **PyTorch in a process of its own** (:class:`TorchProcess`): torch's OpenMP threads
  degrade far more than XLA's when they share the cores, with each other or with another
  job (a torch step measured at 713 ms in-process took 7–13 ms alone). The worker is this
  file run by an interpreter that has torch and torchjd (it needs no JAX); it answers one
  timed call of each of its functions per round, interleaved with the JAX rounds.
* **A sanity line** (:func:`cross_library_verdict`): torch's plain step timed alone before
  the rounds against its interleaved median, with the machine's load average. No
  cross-library ratio is printed when the two differ by more than 1.5×, when the 1-minute
  load exceeds 1.5× the cores (other jobs compete: torch degrades alone and interleaved
  alike), or when JAX runs on an accelerator and torch on the CPU.

Worker kinds (``python benchmarks/timing.py KIND DATA.npz``; the ``.npz`` holds the model's
sizes, parameters and batch):

* ``gram`` -- ``benchmarks/gram_speed.py``'s MLP / CNN with per-example losses: plain SGD
  step, ``torchjd.autogram.Engine(batch_dim=0)``'s Gram and its IWRM step;
* ``multitask`` -- ``benchmarks/speed.py``'s trunk with K linear heads: plain summed-loss
  Adam step and torchjd's ``mtl_backward`` + ``jac_to_grad(trunk, <aggregator>())`` step,
  plus, when the file holds a ``solve_matrix``, the aggregator applied to that matrix alone.

Commands on stdin (one JSON line answers each): ``round``, ``alone N`` (N timed plain
steps), ``gram PATH`` (kind ``gram``: saves the Gram of the initial parameters), ``quit``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SANITY_FACTOR = 1.5
# Pause before each framework's share of a round: the other process's worker threads keep
# spinning for a while after its last call and would be billed to the next one (measured on an
# idle machine: torch's plain step interleaved without the pause 2.06× its time alone, with it
# 1.28×).
SETTLE_S = 0.2
TORCH_PLAIN = "torch plain step"


def num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_load() -> tuple[float, str]:
    """The 1-minute load average and a line describing it."""
    one, five, _ = os.getloadavg()
    return one, f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {num_cores()} cores"


def interleaved_medians(
    fns: dict[str, Callable[[], Any]],
    *,
    calls: int,
    warmup: int = 2,
    torch: TorchProcess | None = None,
) -> dict[str, float]:
    """Median wall seconds of each zero-argument function (which waits for its result).

    After ``warmup`` rounds, ``calls`` rounds call every function once in turn and then, if
    ``torch`` is given, ask the PyTorch process for one call of each of its functions; their
    medians are returned under the worker's names. With ``torch``, each framework's share of
    a round starts after a pause of ``SETTLE_S`` seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + calls):
        if torch is not None:
            time.sleep(SETTLE_S)
        for name, call in fns.items():
            start = time.perf_counter()
            call()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if torch is not None:
            time.sleep(SETTLE_S)
            for name, seconds in torch.ask("round").items():
                if r >= warmup:
                    times.setdefault(name, []).append(seconds)
    return {name: float(np.median(t)) for name, t in times.items()}


def median_seconds(call: Callable[[], Any], *, calls: int, warmup: int = 2) -> float:
    """Median wall seconds of ``call()`` (which must wait for its result) after warm-up."""
    return interleaved_medians({"call": call}, calls=calls, warmup=warmup)["call"]


def cross_library_verdict(
    interleaved: float, alone: float, load: float, *, jax_backend: str = "cpu"
) -> tuple[str, str | None]:
    """``(sanity line, why no cross-library ratio may be printed, or None)``.

    ``interleaved`` / ``alone``: torch's plain step, median seconds in the rounds / timed
    alone just before them; ``load``: the busier 1-minute load average of before and after.
    """
    ratio = interleaved / alone
    line = (
        f"Sanity: PyTorch's plain step interleaved {1e3 * interleaved:.2f} ms vs timed alone "
        f"{1e3 * alone:.2f} ms ({ratio:.2f}×); load average {load:.2f} on {num_cores()} cores."
    )
    if jax_backend != "cpu":
        return line, "JAX runs on an accelerator, PyTorch on the CPU"
    if not 1 / SANITY_FACTOR <= ratio <= SANITY_FACTOR:
        return line, f"the sanity check is off by more than {SANITY_FACTOR}× (the machine is busy)"
    if load > SANITY_FACTOR * num_cores():
        return line, (
            f"the load average exceeds {SANITY_FACTOR}× the cores (other jobs compete for them; "
            "PyTorch's threads degrade much more than XLA's, interleaved and alone alike)"
        )
    return line, None


def timed_rounds(
    fns: dict[str, Callable[[], Any]],
    *,
    calls: int,
    torch: TorchProcess | None = None,
    jax_backend: str = "cpu",
) -> tuple[dict[str, float], str | None, str | None]:
    """``(medians, sanity line, why no cross-library ratio)`` of one benchmark's rounds.

    With ``torch``: its plain step is timed alone first, then the interleaved rounds run
    (:func:`interleaved_medians`), the worker is closed, and :func:`cross_library_verdict`
    judges them with the busier load average of before and after. Without: the JAX
    medians and ``None, None``.
    """
    if torch is None:
        return interleaved_medians(fns, calls=calls), None, None
    alone = torch.alone(calls)
    load = machine_load()[0]
    medians = interleaved_medians(fns, calls=calls, torch=torch)
    torch.close()
    load = max(load, machine_load()[0])
    sanity, withheld = cross_library_verdict(
        medians[TORCH_PLAIN], alone, load, jax_backend=jax_backend
    )
    return medians, sanity, withheld


def find_torch_python(requested: str | None = None) -> str | None:
    """An interpreter with torch and torchjd: ``requested``, else ``$MTL_OPTAX_TORCH_PYTHON``,
    ``.venv-ref/bin/python``, this interpreter; None when none has them."""
    candidates = [requested] if requested else []
    if not requested:
        candidates += [os.environ.get("MTL_OPTAX_TORCH_PYTHON"), str(ROOT / ".venv-ref/bin/python")]
        candidates.append(sys.executable)
    for python in candidates:
        if not python or not Path(python).exists():
            continue
        probe = subprocess.run(
            [python, "-c", "import torch, torchjd"], capture_output=True, text=True
        )
        if probe.returncode == 0:
            return python
    return None


class TorchProcess:
    """A PyTorch worker of ``kind`` on ``arrays`` (saved to a temporary ``.npz``)."""

    def __init__(self, python: str, kind: str, arrays: dict[str, Any]):
        self.npz = Path(tempfile.mkdtemp()) / f"{kind}.npz"
        np.savez(self.npz, **arrays)
        self.proc = subprocess.Popen(
            [python, str(Path(__file__).resolve()), kind, str(self.npz)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.ask("")
        self.version = ready["ready"]

    def ask(self, command: str) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch worker exited (see its error output above).")
        return json.loads(line)

    def alone(self, calls: int, name: str = TORCH_PLAIN) -> float:
        """Median seconds of ``calls`` consecutive calls of the worker's ``name`` (default its
        plain step; JAX idle meanwhile)."""
        return self.ask(f"alone {calls} {name}")["median"]

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- worker side
def _tensor(a):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def _gram_worker(data) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable]]:
    """``benchmarks/gram_speed.py``'s model (parameters in JAX layout in ``data``)."""
    import torch
    from torch import nn
    from torchjd.autogram import Engine

    model_kind, lr = str(data["model"]), float(data["lr"])

    def build() -> nn.Module:
        if model_kind == "mlp":
            layers = []
            sizes = [data["w0"].shape[0], data["w0"].shape[1], data["w1"].shape[1], 10]
            for i, (m, n) in enumerate(zip(sizes[:-1], sizes[1:])):
                lin = nn.Linear(m, n)
                lin.weight.data, lin.bias.data = _tensor(data[f"w{i}"].T), _tensor(data[f"b{i}"])
                layers += [lin] + ([nn.ReLU()] if i < 2 else [])
            return nn.Sequential(*layers)
        convs = []
        for i in range(2):
            k = data[f"c{i}"]  # HWIO -> OIHW
            conv = nn.Conv2d(k.shape[2], k.shape[3], k.shape[0])
            conv.weight.data = _tensor(k.transpose(3, 2, 0, 1))
            conv.bias.data = _tensor(data[f"cb{i}"])
            convs += [conv, nn.ReLU(), nn.MaxPool2d(2)]
        dense = []
        for i in range(3):
            w = data[f"w{i}"]
            lin = nn.Linear(w.shape[0], w.shape[1])
            lin.weight.data, lin.bias.data = _tensor(w.T), _tensor(data[f"b{i}"])
            dense += [lin] + ([nn.ReLU()] if i < 2 else [])
        return nn.Sequential(*convs, nn.Flatten(), *dense)

    x = _tensor(data["x"] if model_kind == "mlp" else data["x"].transpose(0, 3, 1, 2))  # NCHW
    y = _tensor(data["y"].astype(np.int64))
    criterion = nn.CrossEntropyLoss(reduction="none")
    # Two copies of the same initial model: torchjd's engine hooks every forward pass of
    # the modules it is given and expects compute_gramian after each, so the plain step
    # runs on a model of its own.
    model, jd_model = build(), build()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    jd_optimizer = torch.optim.SGD(jd_model.parameters(), lr=lr)
    engine = Engine(jd_model, batch_dim=0)

    def plain():
        criterion(model(x), y).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    def gram():
        return engine.compute_gramian(criterion(jd_model(x), y))

    def iwrm():
        losses = criterion(jd_model(x), y)
        gramian = engine.compute_gramian(losses)
        losses.backward(torch.full_like(losses, 1.0 / losses.shape[0]))
        jd_optimizer.step()
        jd_optimizer.zero_grad()
        return gramian

    def save_gram(path):
        np.save(path, gram().detach().numpy())
        return {"done": True}

    calls = {TORCH_PLAIN: plain, "torchjd Gram": gram, "torchjd IWRM step": iwrm}
    return calls, {"gram": save_gram}


def _multitask_worker(data) -> tuple[dict[str, Callable[[], Any]], dict[str, Callable]]:
    """``benchmarks/speed.py``'s trunk and K heads (torch's own initialisation, seed 0)."""
    import torch
    from torch import nn
    from torchjd import aggregation
    from torchjd.autojac import jac_to_grad, mtl_backward

    torch.manual_seed(0)
    sizes, name = [int(s) for s in data["sizes"]], str(data["aggregator"])
    x, y = _tensor(data["x"].astype(np.float32)), _tensor(data["y"].astype(np.int64))
    layers: list[nn.Module] = []
    for m, n in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(m, n), nn.ReLU()]
    trunk = nn.Sequential(*layers)
    heads = nn.ModuleList([nn.Linear(sizes[-1], 10) for _ in range(y.shape[1])])
    optimizer = torch.optim.Adam([*trunk.parameters(), *heads.parameters()], lr=float(data["lr"]))
    aggregator = getattr(aggregation, name)()

    def losses_and_features():
        z = trunk(x)
        return [nn.functional.cross_entropy(h(z), y[:, k]) for k, h in enumerate(heads)], z

    def plain():
        losses, _ = losses_and_features()
        torch.stack(losses).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    def torchjd_step():
        losses, z = losses_and_features()
        mtl_backward(losses, features=z)
        jac_to_grad(trunk.parameters(), aggregator)
        optimizer.step()
        optimizer.zero_grad()

    calls = {TORCH_PLAIN: plain, f"torchjd {name} step": torchjd_step}
    if "solve_matrix" in data:
        matrix = _tensor(data["solve_matrix"].astype(np.float32))
        calls[f"torchjd {name} solve"] = lambda: aggregator(matrix)
    return calls, {}


WORKERS = {"gram": _gram_worker, "multitask": _multitask_worker}


def serve(kind: str, npz: str) -> None:
    """The worker loop (run by the PyTorch interpreter)."""
    import torch

    torch.set_num_threads(num_cores())
    calls, extra = WORKERS[kind](np.load(npz))
    reply = lambda obj: print(json.dumps(obj), flush=True)  # noqa: E731
    reply({"ready": torch.__version__})
    for line in sys.stdin:
        command = line.strip().split(maxsplit=2)  # "alone <calls> <name with spaces>"
        if not command or command[0] == "quit":
            break
        if command[0] == "alone":
            times = []
            for _ in range(int(command[1])):
                start = time.perf_counter()
                calls[command[2]]()
                times.append(time.perf_counter() - start)
            reply({"median": float(np.median(times))})
        elif command[0] == "round":
            out = {}
            for name, fn in calls.items():
                start = time.perf_counter()
                fn()
                out[name] = time.perf_counter() - start
            reply(out)
        else:
            reply(extra[command[0]](*command[1:]))


if __name__ == "__main__":
    serve(*sys.argv[1:])
