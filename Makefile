# Two commands on a fresh machine: `make run` (the service on the embedded
# default model) and `make test` (the test suite). Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch by default; for GPUs install the CUDA build instead,
# e.g. `make TORCH_SPEC='torch==2.11.0' run` on a machine whose pip index serves CUDA builds.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test install bench-overhead bench-batching

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	$(VENV)/bin/imagegenx up

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench-overhead: $(VENV)/.installed
	$(PY) -m bench.queue_overhead

bench-batching: $(VENV)/.installed
	$(PY) -m bench.batching_peers
