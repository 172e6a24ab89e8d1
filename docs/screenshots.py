"""Screenshots of the built site in headless Chromium, and a check that its math renders.

Serves ``docs/_build/html`` on the loopback interface, opens a few pages in headless
Chromium (Debian's ``chromium`` package) with every other host unreachable, and writes
one PNG per page. From the same pages' DOM after their scripts ran it checks that MathJax
typeset every formula (no raw ``\\(``/``$$`` delimiters left, no MathJax error) and that
every image loaded. Run after ``make docs``::

    python docs/screenshots.py                  # PNGs under docs/_build/screenshots/
    python docs/screenshots.py --out DIR  PAGE.html#anchor ...
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

DOCS = Path(__file__).resolve().parent
SITE = DOCS / "_build" / "html"
PAGES = {  # file name -> page (and anchor) of the site
    "landing": "docs/index.html",
    "api_math": "docs/api/aggregators.html#mtl_optax.upgrad",
    "api_index": "docs/api/index.html",
    "guide": "docs/flax.html",
    "notebook": "notebooks/quickstart_nnx.html",
}
WIDTH, HEIGHT = 1280, 1500
# A page reports its state in its DOM: the script below appends a marker element once
# MathJax's typesetting promise settled and every image finished loading.
PROBE = """
<script>
window.addEventListener("load", () => {
  const done = (math) => {
    const id = decodeURIComponent(location.hash.slice(1));
    const target = id && document.getElementById(id);
    const broken = [...document.images].filter((i) => i.complete && i.naturalWidth === 0);
    const marker = document.createElement("div");
    marker.id = "screenshot-probe";
    marker.dataset.math = math;
    marker.dataset.brokenImages = broken.map((i) => i.getAttribute("src")).join(" ");
    let top = 0;  // the target's distance from the top of the document
    for (let node = target; node; node = node.offsetParent) top += node.offsetTop;
    marker.dataset.targetTop = Math.round(top);
    marker.style.display = "none";
    document.body.appendChild(marker);
  };
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done("typeset"), () => done("failed"));
  } else {
    done("none");
  }
});
</script>
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no Chromium found: install Debian's package (apt-get install -y chromium)")


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port); yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        pass


def _browser(
    url: str, *args: str, profile: str, height: int = HEIGHT
) -> subprocess.CompletedProcess:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # no other host
        f"--window-size={WIDTH},{height}",
        "--virtual-time-budget=20000",  # let MathJax and the theme's scripts finish
        *args,
        url,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


def probe(dom: str) -> dict[str, str] | None:
    """The attributes the probe script left in the DOM (None: the page did not finish)."""
    found = re.search(r'<div id="screenshot-probe"([^>]*)>', dom)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', found.group(1))) if found else None


def check_dom(dom: str, page: str) -> list[str]:
    """Problems visible in the DOM of ``page`` after its scripts ran."""
    problems = []
    attributes = probe(dom)
    if attributes is None:
        return [f"{page}: the page did not finish loading"]
    if attributes.get("math") == "failed":
        problems.append(f"{page}: MathJax failed to start")
    if attributes.get("broken-images"):
        problems.append(f"{page}: images that did not load: {attributes['broken-images']}")
    if "<mjx-merror" in dom or "data-mjx-error" in dom:
        problems.append(f"{page}: MathJax reports an error in a formula")
    text = re.sub(r"<(script|style|pre|code)\b.*?</\1>", "", dom, flags=re.S)
    if re.search(r"\\\(|\\\[|\$\$", text):
        problems.append(f"{page}: a formula left untypeset (raw \\( or $$ in the page)")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", help="pages of the site (default: a fixed set)")
    parser.add_argument("--out", type=Path, default=DOCS / "_build" / "screenshots")
    parser.add_argument("--site", type=Path, default=SITE, help="the built site")
    args = parser.parse_args(argv)
    if not (args.site / "docs" / "index.html").exists():
        sys.exit(f"no site at {args.site}: run `make docs` first")
    pages = {re.sub(r"[^A-Za-z0-9]+", "_", p.removesuffix(".html")): p for p in args.pages}
    pages = pages or PAGES
    args.out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        probed = Path(tmp) / "site"
        shutil.copytree(args.site, probed)  # the probe script goes into copies of the pages
        for page in pages.values():
            path = probed / page.split("#")[0]
            path.write_text(path.read_text().replace("</body>", PROBE + "</body>"))
        with serve(probed) as base:
            for name, page in pages.items():
                png = args.out / f"{name}.png"
                dom = _browser(base + page, "--dump-dom", profile=f"{tmp}/profile").stdout
                problems += check_dom(dom, page)
                # headless Chromium shoots from the top of the page: for page#anchor, shoot
                # down to the anchor's entry and keep the window that starts there
                top = max(int((probe(dom) or {}).get("target-top", 0)) - 20, 0)
                shot = f"--screenshot={png}"
                _browser(base + page, shot, profile=f"{tmp}/profile", height=top + HEIGHT)
                if top:
                    from PIL import Image  # matplotlib's dependency (the examples extra)

                    with Image.open(png) as image:
                        image.crop((0, top, WIDTH, top + HEIGHT)).save(png)
                print(f"{png}  ({page})")
    for problem in problems:
        print("PROBLEM:", problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
