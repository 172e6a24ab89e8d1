# Every target creates the virtual environment it needs; only python3 (>=3.10) and pip are assumed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint speed clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[flax,examples,dev]"
	touch $@

demo: $(VENV)/.installed          ## main job: MultiMNIST, several multi-task methods, results table
	$(PY) -m benchmarks.multimnist

test: $(VENV)/.installed          ## the test suite
	$(PY) -m pytest -q -n 2

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mtl_optax benchmarks tests

speed: $(VENV)/.installed
	$(PY) -m benchmarks.speed

clean:
	rm -rf $(VENV) .pytest_cache
