# Two entry points for a fresh CPU-only Linux machine with Python >= 3.11:
#   make demo   set up .venv, then run `shardmesh demo` (3 agents, real MiniLM)
#   make test   set up .venv, then run the whole test suite
# A GPU user installs their own torch build into .venv first (see README).

PYTHON ?= python3
VENV   ?= .venv
# torch pinned in the same pip command as the rest, so pip takes the version the
# package index serves for it (a CPU wheel on the CI machines) instead of
# resolving the newest, multi-GB CUDA build. Elsewhere override TORCH_SPEC or
# install the CPU build into .venv first (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)" -e ".[models,test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/shardmesh demo $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
