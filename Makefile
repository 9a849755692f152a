# make demo: the whole pipeline on the built-in synthetic scenes. make test: the test suite.
# Both create .venv and install requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo bench test lint clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# float -> PTQ (every method) -> QAT (three modes) -> sensitivity -> ONNX export -> runs/report.md
# Rerunning after an interruption skips finished stages and resumes the others.
demo: $(STAMP)
	$(PY) -m pidnet.demo --config config.yaml --runs runs

# every benchmark, figures in bench/results.json
bench: $(STAMP)
	$(PY) -m bench

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check pidnet tests bench examples *.py

clean:
	rm -rf runs .pytest_cache
