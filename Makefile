# The two commands of the README: `make bench` and `make test`. Both create or reuse .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmreduce-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export TOKENIZERS_PARALLELISM := false

.PHONY: setup bench test clean-venv

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change (idempotent).
$(STAMP): requirements.txt constraints.txt pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

bench: setup
	$(PY) -m mmreduce.eval.latency --preset cpu --out latency-cpu.json

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
