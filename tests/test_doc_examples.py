"""Every ``Example::`` block of a docstring in ``mtl_optax`` runs as written.

The docstrings (of modules, functions, classes and methods, public or not) are read from the
source files with ``ast``, so an example is found wherever it is written and run once. Each
example runs in its own copy of the names that the API reference states once for all of
them (the Python block after "The names the examples use." in ``docs/api/index.md``: ``jax``,
``jnp``, ``np``, ``optax``, ``mtl``, a K = 3 problem ``jac``, ``gram``, and a small split
model ``params``, ``batch``, ``mask``, ``encoder``, ``task_head``, ``head_a``...,
``task_losses``, ``losses``, ``task_grads``); anything else an example uses, it defines
itself. All examples run in this one process; an example that raises fails here.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtl_optax"
INDEX = ROOT / "docs" / "api" / "index.md"
PREAMBLE_HEADING = "**The names the examples use.**"
MARKER = re.compile(r"^(?P<indent>[ \t]*)Examples?::[ \t]*$")


def docstrings(path: Path) -> list[tuple[str, int, str]]:
    """``(qualified name, line, docstring)`` of the module and of every def/class in it."""
    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    found = []

    def visit(node, prefix):
        text = ast.get_docstring(node, clean=False)
        if text is not None:
            line = node.body[0].lineno
            found.append((prefix, line, text))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return found


def examples(text: str) -> list[tuple[int, str]]:
    """``(line offset in the docstring, code)`` of every ``Example::`` block of ``text``."""
    lines, blocks = text.splitlines(), []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        indent, body, j = len(marker["indent"].expandtabs()), [], i + 1
        while j < len(lines):
            row = lines[j]
            if row.strip() and len(row) - len(row.lstrip()) <= indent:
                break
            body.append(row)
            j += 1
        code = textwrap.dedent("\n".join(body)).strip("\n")
        assert code, f"an empty Example:: block at docstring line {i}"
        blocks.append((i, code + "\n"))
    return blocks


def collect() -> list[tuple[str, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, line, text in docstrings(path):
            for offset, code in examples(text):
                where = f"{path.relative_to(ROOT).as_posix()}:{line + offset + 1}"
                found.append((f"{name} ({where})", code))
    return found


EXAMPLES = collect()


def test_examples_are_found():
    assert len(EXAMPLES) >= 40
    assert any(name.startswith("mtl_optax.weighting.min_norm.mgda ") for name, _ in EXAMPLES)


def preamble_code() -> str:
    """The first Python block under :data:`PREAMBLE_HEADING` of the reference's index."""
    from tests.test_doc_snippets import fenced_blocks

    text = INDEX.read_text()
    assert PREAMBLE_HEADING in text, f"{INDEX.name} lost its section {PREAMBLE_HEADING!r}"
    section = text[text.index(PREAMBLE_HEADING) :]
    return next(code for _, info, code in fenced_blocks(section) if info == "python")


@pytest.fixture(scope="module")
def preamble() -> dict:
    namespace: dict = {"__name__": "__main__"}
    exec(compile(preamble_code(), "docs/api/index.md preamble", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("code", [c for _, c in EXAMPLES], ids=[n for n, _ in EXAMPLES])
def test_docstring_example_runs(code, preamble, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "example", "exec"), dict(preamble))


def test_example_parser():
    text = "Intro.\n\n    Example::\n\n        x = 1\n\n        y = x + 1\n\n"
    text += "    Args:\n        a: b\n"
    assert examples(text) == [(2, "x = 1\n\ny = x + 1\n")]
    assert examples("No example here.\n    example:: not a marker\n") == []
