# Every target creates the virtual environment it needs; only python3 (>=3.10) and pip are assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint speed docs screenshots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[flax,examples,dev]"
	touch $@

demo: $(VENV)/.installed          ## main job: MultiMNIST, several multi-task methods, results table
	$(PY) -m benchmarks.multimnist

test: $(VENV)/.installed          ## the test suite
	$(PY) -m pytest -q -n 2 --durations=25

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mtl_optax benchmarks tests

speed: $(VENV)/.installed
	$(PY) -m benchmarks.speed

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[flax,examples,dev,docs]"
	touch $@

# The site under docs/_build/html (open docs/_build/html/index.html), built from a fresh
# environment: warnings are errors, every cross-reference must resolve, internal links and
# anchors are checked offline, the notebooks are executed at their reduced size
# (MTL_OPTAX_DOCS_NOTEBOOKS=committed renders their committed outputs instead).
docs: $(VENV)/.docs-installed     ## the documentation site
	$(VENV)/bin/sphinx-build -E -n -W --keep-going -b html -c docs -d docs/_build/doctrees \
		. docs/_build/html

screenshots: $(VENV)/.docs-installed   ## PNGs of a few pages in headless Chromium (after make docs)
	$(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache docs/_build
