"""The offline check of the built site (docs/_ext/offline_links.py) finds what it should.

``make docs`` runs it on the real site; here it runs on a small hand-written site, so each
kind of problem is shown to be reported (and good links, external links the reader clicks
and the theme's ``_static`` templates are not).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "offline_links", ROOT / "docs" / "_ext" / "offline_links.py"
)
offline_links = importlib.util.module_from_spec(spec)
spec.loader.exec_module(offline_links)


def page(body: str) -> str:
    return f"<!DOCTYPE html><html><head></head><body>{body}</body></html>"


def test_problems_of_a_small_site(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_images").mkdir()
    (tmp_path / "_images" / "plot.png").write_bytes(b"png")
    (tmp_path / "docs" / "b.html").write_text(page('<h2 id="there">There</h2>'))
    (tmp_path / "_static" / "macros.html").write_text('<a href="{{ pathto(x) }}">t</a>')
    (tmp_path / "docs" / "a.html").write_text(
        page(
            '<a href="b.html#there">ok</a> <a href="#here" id="here">self</a>'
            '<img src="../_images/plot.png"> <a href="https://example.org/x">external</a>'
            '<a href="b.html#nowhere">bad anchor</a> <a href="c.html">missing page</a>'
            '<img src="../_images/gone.png"> <a href="#absent">bad self anchor</a>'
            '<script src="https://cdn.example.org/m.js"></script>'
            '<link rel="stylesheet" href="//cdn.example.org/s.css">'
            "<p>.. autofunction:: mgda</p> <pre>.. code:: fine inside pre</pre>"
        )
    )
    found = sorted(offline_links.problems(tmp_path))
    assert [p for p, _ in found] == ["docs/a.html"] * 7
    messages = " | ".join(m for _, m in found)
    for expected in (
        "no anchor #nowhere in docs/b.html",
        "docs/c.html is not in the site",
        "_images/gone.png is not in the site",
        "no anchor #absent in docs/a.html",
        "<script> loads 'https://cdn.example.org/m.js'",
        "<link> loads '//cdn.example.org/s.css'",
        "reStructuredText markup shown as text: '.. autofunction::'",
    ):
        assert expected in messages, (expected, messages)
