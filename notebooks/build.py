"""Build the notebooks from their percent-format sources, and execute them.

Every notebook ``notebooks/<name>.ipynb`` is generated from ``notebooks/<name>.py``: cells
start at lines ``# %%`` (code) or ``# %% [markdown]`` (markdown, each line behind ``# ``);
a line ``# %% [setup]`` stands for :data:`SETUP`, the first code cell every notebook shares
(in Colab it clones the repository and installs the package with its ``flax`` and
``examples`` extras; elsewhere it only puts the repository root on ``sys.path``). The token ``@GITHUB_REPO@``
becomes :data:`GITHUB_REPO` (the Colab badge and the Colab install), so the repository is
named in this one place.

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

GITHUB_REPO = "ORG/mtl_optax"  # owner/name on GitHub: set the owner before publishing
NOTEBOOKS = Path(__file__).resolve().parent
SMALL_ENV = "MTL_OPTAX_NOTEBOOK_SMALL"
MARKDOWN, SETUP_MARK, CODE = "# %% [markdown]", "# %% [setup]", "# %%"
SETUP = f"""\
import os
import subprocess
import sys
from pathlib import Path

if "google.colab" in sys.modules and not Path("/content/mtl_optax").exists():
    url = "https://github.com/{GITHUB_REPO}"
    subprocess.run(["git", "clone", "-q", "--depth=1", url, "/content/mtl_optax"], check=True)
    package = "/content/mtl_optax[flax,examples]"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", package], check=True)
    os.chdir("/content/mtl_optax/notebooks")
sys.path.insert(0, str(Path.cwd().parent))  # the repository root: data helpers in benchmarks/
SMALL = os.environ.get("{SMALL_ENV}") == "1"  # the test suite's reduced size"""


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


def execute(nb: nbformat.NotebookNode, *, small: bool, timeout: int = 600):
    """Run ``nb`` in a fresh kernel of this Python environment, in the notebooks folder.

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
            resources={"metadata": {"path": str(NOTEBOOKS)}},
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
