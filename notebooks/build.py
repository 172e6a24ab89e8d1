"""Build the notebooks from their percent-format sources, and execute them.

Every notebook ``notebooks/<name>.ipynb`` is generated from ``notebooks/<name>.py``: cells
start at lines ``# %%`` (code) or ``# %% [markdown]`` (markdown, each line behind ``# ``);
a line ``# %% [setup]`` stands for :data:`SETUP`, the first code cell every notebook shares
(in Colab it installs the package from the repository with its ``flax`` and ``examples``
extras; elsewhere it expects the package installed: ``pip install "mtl-optax[flax,examples]"``),
and ``# %% [helpers]`` for :data:`HELPERS`, a plain-JAX MLP and training loop that the
notebooks on MNIST share. The notebooks import nothing from a checkout: their data come from
:mod:`mtl_optax.datasets`, so they run wherever the package is installed. The token
``@GITHUB_REPO@`` becomes :data:`GITHUB_REPO` (the Colab badge and the Colab install), so
the repository is named in this one place.

The notebooks run unchanged on CPU, GPU and TPU runtimes. With the environment variable
``MTL_OPTAX_NOTEBOOK_SMALL=1`` they run a reduced size (the test suite uses it); the
committed notebooks are executed at their normal size and keep their outputs::

    python -m notebooks.build                 # regenerate and execute every notebook
    python -m notebooks.build losses          # only notebooks/losses.ipynb
    python -m notebooks.build --no-execute    # regenerate the cells only (outputs dropped)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

GITHUB_REPO = "ORG/mtl_optax"  # the one place naming the repository (owner/name on GitHub)
NOTEBOOKS = Path(__file__).resolve().parent
SMALL_ENV = "MTL_OPTAX_NOTEBOOK_SMALL"
MARKDOWN, SETUP_MARK, HELPERS_MARK, CODE = (
    "# %% [markdown]",
    "# %% [setup]",
    "# %% [helpers]",
    "# %%",
)
SETUP = f"""\
import importlib.util
import os
import subprocess
import sys

if "google.colab" in sys.modules and importlib.util.find_spec("mtl_optax") is None:
    package = "mtl-optax[flax,examples] @ git+https://github.com/{GITHUB_REPO}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
SMALL = os.environ.get("{SMALL_ENV}") == "1"  # the test suite's reduced size"""
HELPERS = """\
from typing import Any, NamedTuple


def init_mlp(key, sizes):
    \"\"\"He-initialised dense layers sizes[0] -> ... -> sizes[-1] (zero biases).\"\"\"
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros((n,))}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(params, x):
    \"\"\"ReLU MLP with a linear last layer.\"\"\"
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def sample_batch(key, arrays, batch_size):
    \"\"\"A uniform random minibatch (with replacement) of equally long arrays.\"\"\"
    idx = jax.random.randint(key, (batch_size,), 0, arrays[0].shape[0])
    return tuple(a[idx] for a in arrays)


def accuracy(logits, labels):
    return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def per_class_accuracy(logits, labels, num_classes=10):
    pred, labels = np.asarray(jnp.argmax(logits, -1)), np.asarray(labels)
    return np.array([np.mean(pred[labels == c] == c) for c in range(num_classes)])


class TrainState(NamedTuple):
    params: Any
    opt_state: Any


def make_step(loss_fn, optimizer):
    \"\"\"A pure step from loss_fn(params, key) -> (loss, metrics); the key draws the batch.\"\"\"

    def step(state, key):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, key)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params, value=loss)
        return TrainState(optax.apply_updates(state.params, updates), opt_state), {
            "loss": loss,
            **metrics,
        }

    return step


def train(step, state, key, *, steps, chunk=100, evaluate=None):
    \"\"\"Run steps pure steps in jitted lax.scan chunks; the per-step metrics, and
    evaluate(state) after every chunk (with its step in "eval_step"), as arrays.\"\"\"
    run_chunk = jax.jit(lambda state, keys: jax.lax.scan(step, state, keys))
    history, done = {}, 0
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
    return state, {name: np.concatenate(v) for name, v in history.items()}"""


def sources() -> list[Path]:
    """The percent-format source of every notebook (all ``notebooks/*.py`` but this one)."""
    return sorted(p for p in NOTEBOOKS.glob("*.py") if p.name not in ("build.py", "__init__.py"))


def cells(source: str) -> list[tuple[str, str]]:
    """``(cell_type, text)`` of each cell of a percent-format source."""
    found: list[tuple[str, list[str]]] = []
    for line in source.replace("@GITHUB_REPO@", GITHUB_REPO).splitlines():
        if line.startswith(MARKDOWN):
            found.append(("markdown", []))
        elif line.startswith(SETUP_MARK):
            found += [("code", [SETUP]), ("skip", [])]
        elif line.startswith(HELPERS_MARK):
            found += [("code", [HELPERS]), ("skip", [])]
        elif line.startswith(CODE):
            found.append(("code", []))
        elif found:
            kind, lines = found[-1]
            if kind == "skip" and line.strip():
                raise ValueError(f"text after a setup marker: {line!r}")
            if kind == "markdown":
                if line and not line.startswith("#"):
                    raise ValueError(f"markdown cell line without '# ': {line!r}")
                line = line[2:]
            lines.append(line)
        elif line.strip():
            raise ValueError(f"text before the first cell marker: {line!r}")
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in found if kind != "skip"]


def notebook(path: Path) -> nbformat.NotebookNode:
    """The notebook (without outputs) built from the source at ``path``."""
    new = {"markdown": nbformat.v4.new_markdown_cell, "code": nbformat.v4.new_code_cell}
    nb = nbformat.v4.new_notebook(cells=[new[k](text) for k, text in cells(path.read_text())])
    nb.metadata.update(
        kernelspec={"name": "python3", "display_name": "Python 3", "language": "python"},
        language_info={"name": "python"},
        accelerator="GPU",  # Colab opens it on a GPU runtime; it runs on any runtime
        colab={"provenance": []},
    )
    return nb


def execute(nb: nbformat.NotebookNode, *, small: bool, timeout: int = 600, cwd: Path = NOTEBOOKS):
    """Run ``nb`` in a fresh kernel of this Python environment, in the folder ``cwd``.

    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell. The kernel
    is ``python3`` of the running interpreter (jupyter_client starts ``sys.executable`` for
    it), so it sees the same installed packages.
    """
    from nbclient import NotebookClient

    previous = os.environ.get(SMALL_ENV)
    os.environ[SMALL_ENV] = "1" if small else "0"  # inherited by the kernel process
    try:
        client = NotebookClient(
            nb,
            kernel_name="python3",
            timeout=timeout,
            resources={"metadata": {"path": str(cwd)}},
        )
        return client.execute()
    finally:
        if previous is None:
            del os.environ[SMALL_ENV]
        else:
            os.environ[SMALL_ENV] = previous


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook names (default: all)")
    parser.add_argument("--no-execute", action="store_true", help="write the cells only")
    parser.add_argument("--small", action="store_true", help="execute at the test size")
    args = parser.parse_args(argv)
    for path in sources():
        if args.names and path.stem not in args.names:
            continue
        nb = notebook(path)
        if not args.no_execute:
            print(f"executing {path.stem} ...", file=sys.stderr)
            execute(nb, small=args.small)
        out = path.with_suffix(".ipynb")
        nbformat.write(nb, out)
        print(f"wrote {out.relative_to(NOTEBOOKS.parent)}", file=sys.stderr)


if __name__ == "__main__":
    main()
