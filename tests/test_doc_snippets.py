"""Every code block of README.md and docs/**/*.md runs as written.

The fenced blocks of one page run in order in one namespace (a page may build on its own
earlier blocks, never on another page's), in a fresh temporary working directory. A block
tagged ``python`` (or ``py``) is executed; a block may stay unexecuted only with a visible
tag saying it is not Python: ``console`` (shell commands, written with a ``$`` prompt) or
``text`` (output, file trees, formulas). Any other tag, or none, fails here. MyST
directives (```` ```{toctree} ````, ```` ```{eval-rst} ````, ...) are not code blocks.
The pages of ``EXECUTED_ELSEWHERE`` are executed by the test named there, not here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXECUTED = {"python", "py"}
SHOWN = {"console", "text"}  # the visible opt-outs: shell commands and output
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`\n]*)$")


# Pages whose blocks another test executes, in the setting they are written for (each is
# run once in the suite, not twice): page -> that test.
EXECUTED_ELSEWHERE = {
    "docs/scaling.md": "tests/multidevice/test_scaling_docs.py",  # on 4 simulated devices
}


def pages() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
    return [
        p
        for p in [ROOT / "README.md", *docs]
        if p.relative_to(ROOT).as_posix() not in EXECUTED_ELSEWHERE
    ]


def fenced_blocks(text: str) -> list[tuple[int, str, str]]:
    """``(line, info string, code)`` of every fenced block of a markdown text."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, start, body = opening["fence"], i + 1, []
        i += 1
        while i < len(lines):
            closing = FENCE.match(lines[i])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence):
                if not closing["info"].strip():
                    break
            body.append(lines[i][len(opening["indent"]) :] if opening["indent"] else lines[i])
            i += 1
        else:
            raise AssertionError(f"line {start}: a fenced block that is never closed")
        blocks.append((start, opening["info"].strip(), "\n".join(body) + "\n"))
        i += 1
    return blocks


def code_blocks(path: Path, root: Path = ROOT) -> tuple[list[tuple[int, str]], list[str]]:
    """The Python blocks ``(line, code)`` of a page, and what is wrong with its other blocks."""
    executed, problems = [], []
    for line, info, code in fenced_blocks(path.read_text()):
        words = info.split()
        language = words[0].lower() if words else ""
        if language in ("{code-block}", "{code}", "{sourcecode}", "{code-cell}"):
            language = words[1].lower() if len(words) > 1 else ""
            code = "\n".join(row for row in code.splitlines() if not row.startswith(":"))
        elif language.startswith("{"):
            continue  # a MyST directive (toctree, eval-rst, note, math, ...)
        if language in EXECUTED:
            executed.append((line, code))
        elif language == "console" and not code.lstrip().startswith("$ "):
            problems.append(
                f"{path.relative_to(root)}:{line}: a `console` block starts with its command "
                f"after a `$ ` prompt"
            )
        elif language not in SHOWN:
            problems.append(
                f"{path.relative_to(root)}:{line}: a code block tagged {info!r}: tag Python "
                f"`python` (it is executed), shell commands `console`, output `text`"
            )
    return executed, problems


PAGES = pages()


def test_pages_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md", "docs/flax.md"} <= names


@pytest.mark.parametrize("page", sorted(EXECUTED_ELSEWHERE))
def test_pages_executed_elsewhere_are(page):
    test = (ROOT / EXECUTED_ELSEWHERE[page]).read_text()
    assert Path(page).name in test and "exec(" in test, f"{page}: no test executes its blocks"
    assert code_blocks(ROOT / page)[0], f"{page} has no Python block"


@pytest.mark.parametrize("path", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_code_block_runs(path, tmp_path, monkeypatch):
    executed, problems = code_blocks(path)
    assert not problems, "\n".join(problems)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__main__"}
    for line, code in executed:
        name = f"{path.relative_to(ROOT)}, block at line {line}"
        exec(compile(code, name, "exec"), namespace)


def test_block_parser():
    text = "\n".join(
        [
            "```python",
            "x = 1",
            "```",
            "````markdown",
            "```python",
            "inner",
            "```",
            "````",
            "~~~",
            "untagged",
            "~~~",
            "```{toctree}",
            "page",
            "```",
        ]
    )
    assert [(line, info) for line, info, _ in fenced_blocks(text)] == [
        (1, "python"),
        (4, "markdown"),
        (9, ""),
        (12, "{toctree}"),
    ]
    assert fenced_blocks(text)[1][2] == "```python\ninner\n```\n"


def test_untagged_and_unknown_blocks_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "```\nls\n```\n\n```bash\nls\n```\n\n```console\n$ ls\n```\n\n```console\nls\n```\n"
    )
    executed, problems = code_blocks(page, root=tmp_path)
    assert executed == [] and len(problems) == 3
    assert "page.md:1: a code block tagged ''" in problems[0]


def test_a_failing_block_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nx = 1\n```\n\n```python\nassert x == 2, 'wrong'\n```\n")
    executed, problems = code_blocks(page, root=tmp_path)
    assert not problems and len(executed) == 2
    namespace: dict = {}
    exec(compile(executed[0][1], "block 0", "exec"), namespace)
    with pytest.raises(AssertionError, match="wrong"):
        exec(compile(executed[1][1], "block 1", "exec"), namespace)
