# One command sets up and runs each job; the virtual environment lives in .venv.
#   make demo   - install cupylars with torch and run the training demo (the main job)
#   make test   - install the test dependencies and run the whole test suite
#   make lint   - ruff and mypy
#   make docs   - build the documentation site (narrative pages and API reference) into site/
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0: on the project's machines this resolves to a local CPU build. Elsewhere pick the
# build you want, e.g. make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint docs gpu-check clean

$(VENV)/.base: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e .
	touch $@

$(VENV)/.demo: $(VENV)/.base
	$(PIP) -e ".[torch,plot]" $(TORCH_SPEC)
	touch $@

# CuPy 13 (the oldest CuPy the cuda12 extra allows) goes into a folder of its own: both
# CuPy wheels are the package `cupy`, and tests/test_cupy_seams.py runs it in a subprocess.
CUPY13_SPEC ?= "cupy-cuda12x==13.6.0" "fastrlock>=0.5"

$(VENV)/.test: $(VENV)/.base
	$(PIP) -e ".[torch,test,compile,docs]" $(TORCH_SPEC)
	rm -rf $(VENV)/cupy13
	$(PIP) --no-deps --target $(VENV)/cupy13 $(CUPY13_SPEC)
	touch $@

demo: $(VENV)/.demo
	$(PY) -m cupylars.demo $(DEMO_ARGS)

test: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The docs extra comes with the test set-up (tests/test_docs.py builds the site strictly).
docs: $(VENV)/.test
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m mypy

# On a machine with a CUDA GPU and CuPy: GPU tests and benchmarks (installs nothing).
gpu-check:
	bash scripts/gpu_check

clean:
	rm -rf $(VENV) build site *.egg-info .pytest_cache .hypothesis
