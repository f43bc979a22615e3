# One command to set up, one to test, one for the main job. Each does its own set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= cpu,dev
# The stamp names the inputs of the install, so editing pyproject.toml reinstalls, else nothing does.
STAMP  := $(VENV)/.installed-$(EXTRAS)

.PHONY: setup test lint demo clean

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

lint: setup
	$(VENV)/bin/ruff check hytrec tests
	$(VENV)/bin/ruff format --check hytrec tests

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
