# Each target creates the virtual environment in .venv when it is missing or out of date.
PYTHON_SYS ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
PIP := $(PYTHON) -m pip

.PHONY: demo test lint bench setup clean

# Core install: the library and its run-time dependencies.
$(VENV)/.core: pyproject.toml
	$(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# Demo images; --no-deps because the package's own loader (unused here) pulls in tensorflow.
	$(PIP) install -q --no-deps animal-mnist==0.4
	touch $@

# Everything: the torch extra (conversion from .pth, parity tests), the export extra and the
# dev tools; jax2onnx without its dependencies (see pyproject.toml's export extra).
$(VENV)/.full: $(VENV)/.core
	$(PIP) install -q -e '.[torch,dev,export]'
	$(PIP) install -q --no-deps jax2onnx==0.17.1
	touch $@

setup: $(VENV)/.full

demo: $(VENV)/.core
	$(PYTHON) -m clca_jax.demo --workdir=demo_out

# pytest in a few processes (tools/run_tests.py says why); any failing group fails the target.
test: $(VENV)/.full
	$(PYTHON) tools/run_tests.py -q

bench: $(VENV)/.full
	$(PYTHON) tools/benchmark.py --config=configs/soyglobal.py --methods=none,evit \
		--keep_rates=0.1,0.7 --batch_size=8 --out=bench_out --overwrite --torch

lint: $(VENV)/.full
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) demo_out bench_out
