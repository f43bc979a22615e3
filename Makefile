# One command to set up, one to test, one for the main job. Each does its own set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu,dev
# The stamp names the inputs of the install, so editing pyproject.toml reinstalls, else nothing does.
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: setup test lint demo mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup
	$(PY) -m pytest -q

# The main job: train (or reuse) a model, replay a log through the embedded broker and a worker.
demo: setup
	$(PY) -m hytrec.cli demo

# Mutation testing, not part of `make test` (about an hour on 2 cores): mutmut over the
# modules where a bug loses data or corrupts figures, each against its own fast tests;
# writes benchmarks/results/mutation.{json,md}. mutmut declares click>=8.4.2 and faust
# click<8.4; it runs with faust's click, so it goes in without pip's dependency check.
MUTMUT := mutmut==3.8.1
mutate: setup
	$(PY) -m pip install -q -e '.[$(EXTRAS),mutate]'
	$(PY) -m pip install -q --no-deps $(MUTMUT)
	nice -n 10 $(PY) benchmarks/mutate.py

lint: setup
	$(VENV)/bin/ruff check hytrec tests
	$(VENV)/bin/ruff format --check hytrec tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mutate
