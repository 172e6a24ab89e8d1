"""The API reference (docs/api/*.md) documents every public name, each once.

Public names: those of ``mtl_optax`` (its ``__all__``, or else every attribute not starting
with ``_`` that is not a module), of ``mtl_optax.losses`` and of ``mtl_optax.flax_nnx``
(their ``__all__``, or else what the module itself defines). A name counts as documented
when an ``autofunction`` / ``autoclass`` / ``autodata`` / ``autoexception`` entry of the
reference resolves to the same object (the losses are documented once, as
``mtl_optax.<name>``, and cover ``mtl_optax.losses.<name>`` too).
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"
NAMESPACES = ("mtl_optax", "mtl_optax.losses", "mtl_optax.flax_nnx")
DIRECTIVE = re.compile(
    r"^\s*\.\. (?P<kind>currentmodule|module|autofunction|autoclass|autodata|autoexception)"
    r"::\s*(?P<target>\S+)",
    re.M,
)


def public_names(module: ModuleType) -> list[str]:
    """The public names of ``module``, as the module docstring above defines them."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    names = [n for n in dir(module) if not n.startswith("_")]
    if module.__name__ == "mtl_optax":
        return [n for n in names if not inspect.ismodule(getattr(module, n))]
    return [n for n in names if getattr(getattr(module, n), "__module__", None) == module.__name__]


def documented(pages: list[Path]) -> list[tuple[str, str]]:
    """``(page, dotted name)`` of every autodoc entry of the reference pages, in order."""
    entries = []
    for page in pages:
        module = None  # like Sphinx, a page starts without a current module
        for match in DIRECTIVE.finditer(page.read_text()):
            kind, target = match["kind"], match["target"]
            if kind in ("currentmodule", "module"):
                module = None if target == "None" else target
            elif target.startswith("mtl_optax") or module is None:
                entries.append((page.name, target))
            else:
                entries.append((page.name, f"{module}.{target}"))
    return entries


def resolve(dotted: str):
    """The object named ``dotted``: attributes first, submodules where no attribute exists
    (``mtl_optax.aggregate`` is the function, not the module of the same name)."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=2):
        obj = (
            getattr(obj, part)
            if hasattr(obj, part)
            else importlib.import_module(".".join(parts[:i]))
        )
    return obj


PAGES = sorted(API.glob("*.md"))
ENTRIES = documented(PAGES)


def test_reference_pages_exist():
    assert {p.stem for p in PAGES} >= {"index", "weightings", "aggregators", "losses", "flax"}
    assert len(ENTRIES) > 50


def test_every_entry_names_an_existing_object_once():
    missing, seen, twice = [], {}, []
    for page, name in ENTRIES:
        try:
            obj = resolve(name)
        except (ImportError, AttributeError):
            missing.append(f"{page}: {name}")
            continue
        if id(obj) in seen:
            twice.append(f"{name} ({page}) is also documented as {seen[id(obj)]}")
        seen[id(obj)] = f"{name} ({page})"
    assert not missing, f"entries for names that do not exist: {missing}"
    assert not twice, f"documented twice: {twice}"


def covered_objects(entries: list[tuple[str, str]]) -> set[int]:
    """``id`` of every object an entry names (entries naming nothing are reported above)."""
    covered = set()
    for _, name in entries:
        try:
            covered.add(id(resolve(name)))
        except (ImportError, AttributeError):
            pass
    return covered


@pytest.mark.parametrize("namespace", NAMESPACES)
def test_every_public_name_is_documented(namespace):
    module = importlib.import_module(namespace)
    covered = covered_objects(ENTRIES)
    undocumented = [n for n in public_names(module) if id(getattr(module, n)) not in covered]
    assert not undocumented, (
        f"public names of {namespace} missing from the API reference (docs/api/*.md): "
        f"{undocumented}; add an autofunction/autoclass entry to the page of their group"
    )


def test_the_check_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```{eval-rst}\n.. currentmodule:: mtl_optax\n\n.. autofunction:: mgda\n```\n")
    entries = documented([page])
    assert entries == [("page.md", "mtl_optax.mgda")]
    covered = covered_objects(entries)
    import mtl_optax

    assert id(mtl_optax.mgda) in covered and id(mtl_optax.upgrad) not in covered


def test_losses_guide_mentions_every_public_loss_name():
    """docs/losses.md (one section per family, runnable) names every public loss name."""
    import mtl_optax.losses

    guide = (ROOT / "docs" / "losses.md").read_text()
    missing = [n for n in public_names(mtl_optax.losses) if not re.search(rf"\b{n}\b", guide)]
    assert not missing, f"docs/losses.md does not mention {missing}"
