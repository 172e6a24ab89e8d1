"""Sphinx configuration of the mtl_optax documentation site (``make docs``).

The source directory is the repository root and this folder the configuration directory
(``sphinx-build -c docs . docs/_build/html``), so the pages under ``docs/`` and the
notebooks under ``notebooks/`` link to each other, and to the plots under
``benchmarks/results/``, with the same relative links that work on GitHub.

* Pages are MyST markdown, notebooks are rendered by myst-nb. By default the notebooks are
  executed during the build at their reduced size (``MTL_OPTAX_NOTEBOOK_SMALL=1``, as in the
  test suite), so the site shows what the current code produces;
  ``MTL_OPTAX_DOCS_NOTEBOOKS=committed`` renders the committed outputs (the notebooks'
  full-size runs) instead.
* Math is rendered by MathJax 3 served from the site itself (the ``sphinx-mathjax-offline``
  package ships its files): a page never loads anything from another host.
* ``_ext/offline_links.py`` checks every internal link and anchor of the built site, and
  that no page loads a script, stylesheet or image from the network; a broken one is a
  warning, and the build treats warnings as errors (``-W --keep-going``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))

import mtl_optax  # noqa: E402
from notebooks import build as notebooks_build  # noqa: E402

project = "mtl_optax"
author = "mtl_optax authors"
copyright = "the mtl_optax authors"  # noqa: A001 (Sphinx's name)
release = version = mtl_optax.__version__
GITHUB_REPO = notebooks_build.GITHUB_REPO  # the one place that names the repository

extensions = [
    "myst_nb",  # MyST markdown pages and notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # Google-style docstrings (Args:, Returns:)
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 files copied into the site (no CDN)
    "sphinx_copybutton",
    "offline_links",  # _ext/offline_links.py: internal links and anchors, no network assets
]

# --- sources -------------------------------------------------------------------------------
root_doc = "docs/index"
include_patterns = ["docs/**", "notebooks/*.ipynb"]
exclude_patterns = [
    "docs/_build",
    "docs/_ext",
    "docs/_root",
    ".venv*",
    ".git",
    "**/.ipynb_checkpoints",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
templates_path: list[str] = []

myst_enable_extensions = [
    "dollarmath",  # $...$ and $$...$$
    "amsmath",
    "colon_fence",
    "deflist",
]
myst_heading_anchors = 3  # `page.md#a-heading` links resolve (and are checked)
myst_dmath_double_inline = True

# --- notebooks -----------------------------------------------------------------------------
NOTEBOOKS_MODE = os.environ.get("MTL_OPTAX_DOCS_NOTEBOOKS", "small")
if NOTEBOOKS_MODE not in ("small", "committed"):
    raise ValueError(
        f"MTL_OPTAX_DOCS_NOTEBOOKS must be 'small' (execute the notebooks at their reduced "
        f"size) or 'committed' (render their committed outputs), got {NOTEBOOKS_MODE!r}"
    )
if NOTEBOOKS_MODE == "small":
    os.environ[notebooks_build.SMALL_ENV] = "1"  # inherited by the notebook kernels
nb_execution_mode = "force" if NOTEBOOKS_MODE == "small" else "off"
nb_execution_timeout = 900
nb_execution_raise_on_error = True  # a failing cell fails the build
nb_execution_show_tb = True
nb_kernel_rgx_aliases = {".*": "python3"}  # the kernel of the building environment
nb_merge_streams = True

# --- API reference -------------------------------------------------------------------------
autodoc_default_options = {"members": False, "show-inheritance": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autosummary_generate = False  # the tables link to the entries written on the same page
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
add_module_names = False
# Every cross-reference must resolve (-n with -W): the project's own names are documented;
# the types of other packages (no intersphinx: the build runs offline) are left unlinked.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(jax|jaxlib|optax|flax|chex|numpy|collections\.abc|typing)(\..*)?"),
    # the inner state of a public state type, shown by name (not a public name itself)
    ("py:class", r"mtl_optax\.weighting\.tracking\.MoCoWeightsState"),
]
python_use_unqualified_type_names = True

# --- HTML ----------------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"mtl_optax {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_extra_path = ["_root"]  # index.html at the site root: a redirect to docs/index.html
html_theme_options = {
    "repository_url": f"https://github.com/{GITHUB_REPO}",
    "repository_branch": "main",
    "use_repository_button": True,
    "use_issues_button": False,
    "use_edit_page_button": False,
    "use_download_button": True,
    "show_toc_level": 2,
    "launch_buttons": {"colab_url": "https://colab.research.google.com"},
    "path_to_docs": "",
}
html_show_sourcelink = False
html_last_updated_fmt = None
pygments_style = "default"
