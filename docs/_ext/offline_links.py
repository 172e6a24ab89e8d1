"""Sphinx extension: check the built HTML site offline, as the last step of the build.

Every page of the built site is parsed; a warning (an error under ``-W``) is emitted for

* a relative link or resource (``href``/``src``) whose target file is not in the site;
* a ``#fragment`` that names no ``id`` (or ``name``) in the page it points to;
* a page that would load something from the network when viewed: a ``<script src>``,
  ``<img src>``, ``<iframe src>``, ``<source src>`` or a stylesheet/icon/preload
  ``<link href>`` with an absolute URL (``http:``, ``https:``, ``//``);
* reStructuredText markup shown as text (``.. autofunction::``, ``:param x:``,
  ``:py:func:``) outside code: a directive whose output was parsed as Markdown (in a
  MyST page, autodoc and autosummary go inside ``{eval-rst}``).

External links the reader clicks (``<a href="https://...">``) are not fetched: the build
runs without network. The check runs only after a successful HTML build, over the pages
(the theme's ``_static/`` templates are not pages).

An image from another host in a page's source (a notebook's "Open in Colab" badge) is
replaced by its alternative text, kept inside its link, so the page loads nothing from the
network.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LOADED_BY_LINK = {"stylesheet", "icon", "preload", "modulepreload", "prefetch", "manifest"}
LOADING_TAGS = {"script", "img", "iframe", "source", "audio", "video", "embed"}


RAW_RST = re.compile(r"(?:^|\s)(\.\. [a-z][\w:-]*::|:(?:py:)?[a-z]+:`|:param \w+:)")
NOT_TEXT = {"pre", "code", "script", "style", "textarea", "kbd", "samp"}
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


class _Page(HTMLParser):
    """The ids, outgoing references (tag, attribute value, loaded) and prose of one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, bool]] = []
        self.text: list[str] = []
        self._open: list[str] = []

    def handle_endtag(self, tag: str) -> None:
        if tag in self._open:
            while self._open.pop() != tag:
                pass

    def handle_data(self, data: str) -> None:
        if not NOT_TEXT.intersection(self._open):
            self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in VOID:
            self._open.append(tag)
        values = {name: value for name, value in attrs if value is not None}
        for name in ("id", "name"):
            if name in values and (name == "id" or tag == "a"):
                self.ids.add(values[name])
        if "href" in values:
            rel = set(values.get("rel", "").lower().split())
            self.refs.append((tag, values["href"], tag == "link" and bool(rel & LOADED_BY_LINK)))
        if "src" in values:
            self.refs.append((tag, values["src"], tag in LOADING_TAGS))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8", errors="replace"))
    return page


def problems(outdir: Path) -> Iterator[tuple[str, str]]:
    """``(page, message)`` for every broken internal link or network resource in ``outdir``."""
    pages = {
        p.relative_to(outdir).as_posix(): _parse(p)
        for p in sorted(outdir.rglob("*.html"))
        if "_static" not in p.relative_to(outdir).parts
    }
    for name, page in pages.items():
        if name not in ("search.html", "genindex.html"):
            for raw in sorted({m.group(1) for m in RAW_RST.finditer(" ".join(page.text))}):
                yield name, f"reStructuredText markup shown as text: {raw!r}"
        for tag, ref, loaded in page.refs:
            url = urlsplit(ref)
            if url.scheme in ("mailto", "javascript", "data", "tel"):
                continue
            if url.scheme or ref.startswith("//"):
                if loaded:
                    yield name, f"<{tag}> loads {ref!r} from the network when the page is viewed"
                continue
            if not url.path and not url.fragment:
                continue
            target = name
            if url.path:
                target = posixpath.normpath(
                    posixpath.join(posixpath.dirname(name), unquote(url.path))
                )
                path = outdir / target
                if target.startswith("../") or not path.exists():
                    yield name, f"<{tag}> links to {ref!r}: {target} is not in the site"
                    continue
                if path.is_dir():
                    target = posixpath.join(target, "index.html")
            fragment = unquote(url.fragment)
            if fragment and target in pages and fragment not in pages[target].ids:
                yield name, f"<{tag}> links to {ref!r}: no anchor #{fragment} in {target}"


def _check(app: Any, exception: Exception | None) -> None:
    from sphinx.util import logging

    if exception is not None or app.builder.format != "html":
        return
    logger = logging.getLogger(__name__)
    outdir = Path(app.outdir)
    count = 0
    for page, message in problems(outdir):
        count += 1
        logger.warning(f"{page}: {message}", type="offline_links", subtype="broken")
    logger.info(f"offline link check: {count} problem(s) in {outdir}")


def setup(app: Any) -> dict:
    # Sphinx is imported here only, so that the checks above run without it (tests).
    from docutils import nodes
    from sphinx.transforms import SphinxTransform

    class RemoteImagesToText(SphinxTransform):
        """Replace every image with an absolute URL by its alternative text (in a span)."""

        default_priority = 100  # before Sphinx collects the images to copy

        def apply(self, **kwargs) -> None:
            for image in list(self.document.findall(nodes.image)):
                uri = image.get("uri", "")
                if urlsplit(uri).scheme or uri.startswith("//"):
                    text = image.get("alt") or uri
                    image.replace_self(nodes.inline(text, text, classes=["remote-image"]))

    app.add_transform(RemoteImagesToText)
    app.connect("build-finished", _check, priority=900)  # after other extensions' copies
    return {"parallel_read_safe": True, "parallel_write_safe": True}
