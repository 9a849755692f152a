# make demo: the whole pipeline on the built-in synthetic scenes. make test: the test suite.
# Both create .venv and install requirements on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

# float baseline -> PTQ with every calibration method -> QAT (calib mode), all on config.yaml
demo: $(STAMP)
	$(PY) qat_train.py --mode float --config config.yaml --set output_dir=runs/float
	$(PY) calibrate.py --config config.yaml --set model_path=runs/float/best.pt \
		--set output_dir=runs/calibrate
	$(PY) qat_train.py --mode calib --config config.yaml --set model_path=runs/float/best.pt \
		--set output_dir=runs/qat_calib

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check pidnet tests bench *.py

clean:
	rm -rf runs .pytest_cache
