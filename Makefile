# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU wheel of this version installs in seconds where one lies on disk; a torch that is already importable
# (e.g. a GPU build, seen through --system-site-packages) is kept as it is.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test lint bench-throughput bench-overhead clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q torch
	$(PY) -m pip uninstall -q -y odm 2>/dev/null || true  # the distribution's name before 0.1 was `odm`
	$(PY) -m pip install -q -e ".[dev]"
	touch $@
	@echo "installed into $(VENV): run \`$(VENV)/bin/odm demo --help\` (or \`source $(VENV)/bin/activate\` to put \`odm\` on PATH)"

# The fast synthetic comparison, whatever corpus is cached (the real-corpus run: `odm demo --real`).
demo: setup
	$(VENV)/bin/odm demo

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check odm callbacks tests benchmarks
	$(PY) -m mypy

bench-throughput: setup
	$(PY) benchmarks/throughput.py

bench-overhead: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
