"""Every notebook under notebooks/ runs from a clean kernel, at its reduced size, where a
user opens it: a copy in an empty folder outside the repository, with only the installed
package (and its extras) to import -- nothing from a checkout (``benchmarks/``).

A notebook that raises fails here. Also checked: each committed ``.ipynb`` has exactly the
cells of its percent-format source (so the two never drift), keeps the outputs of an
executed run, and follows the Colab conventions (badge to itself, install only in Colab,
nothing tied to one platform); and the kernel the tests start is this Python environment.
"""

from __future__ import annotations

import sys

import nbformat
import pytest

from notebooks import build

SOURCES = build.sources()
NAMES = [path.stem for path in SOURCES]
PLATFORM_SPECIFIC = ("JAX_PLATFORMS", "JAX_PLATFORM_NAME", "device_count", "xla_force_host")


def committed(name: str) -> nbformat.NotebookNode:
    return nbformat.read(build.NOTEBOOKS / f"{name}.ipynb", as_version=4)


def test_there_are_notebooks():
    assert {"quickstart_nnx", "two_objective_toy", "primary_auxiliary", "losses"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_matches_its_source_and_has_outputs(name):
    nb = committed(name)
    expected = build.notebook(build.NOTEBOOKS / f"{name}.py")
    assert [(c.cell_type, c.source) for c in nb.cells] == [
        (c.cell_type, c.source) for c in expected.cells
    ], f"notebooks/{name}.ipynb is stale: run `python -m notebooks.build {name}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "committed without executing every cell"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no plot in the outputs"


@pytest.mark.parametrize("name", NAMES)
def test_colab_conventions(name):
    cells = build.notebook(build.NOTEBOOKS / f"{name}.py").cells
    badge = f"colab.research.google.com/github/{build.GITHUB_REPO}/blob/main/notebooks/{name}.ipynb"
    assert cells[0].cell_type == "markdown" and badge in cells[0].source
    setup = next(c.source for c in cells if c.cell_type == "code")
    assert 'if "google.colab" in sys.modules' in setup and "pip" in setup
    assert build.SMALL_ENV in setup
    text = "\n".join(c.source for c in cells)
    assert not [word for word in PLATFORM_SPECIFIC if word in text]
    assert "benchmarks" not in "\n".join(c.source for c in cells if c.cell_type == "code")


def test_kernel_is_this_environment_outside_the_repository(tmp_path):
    code = (
        "import importlib.util, sys\n"
        "print(sys.prefix)\n"
        "print([m for m in ('benchmarks', 'notebooks') if importlib.util.find_spec(m)])\n"
        "print(importlib.util.find_spec('mtl_optax.datasets') is not None)"
    )
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    build.execute(nb, small=True, timeout=120, cwd=tmp_path)
    printed = "".join(o.text for o in nb.cells[0].outputs if o.output_type == "stream")
    assert printed.split("\n")[:3] == [sys.prefix, "[]", "True"]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_outside_the_repository(name, tmp_path):
    copy = tmp_path / f"{name}.ipynb"
    copy.write_text((build.NOTEBOOKS / f"{name}.ipynb").read_text())
    nb = nbformat.read(copy, as_version=4)
    build.execute(nb, small=True, cwd=tmp_path)  # raises CellExecutionError on a failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in errors if o.output_type == "error"]
