# Two entry points for a fresh clone (see README "Quick start"):
#   make demo   set up .venv, then train, evaluate and caption on the synthetic dataset
#   make test   set up .venv, then run the test suite (what CI runs)
#   make test-slow  the slow tests: the default trainings against their quality targets (~20 min),
#                   the soft-vs-hard study end to end (~3 min), torch.compile vs eager (~1 min)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
OUT ?= runs/demo
ATTENTION ?= soft
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow clean

# pyproject.toml holds compatible ranges; constraints.txt the exact versions the tests run against.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) scripts/train.py --attention $(ATTENTION) --out-dir $(OUT)
	$(PY) scripts/evaluate.py --checkpoint $(OUT)/best.ckpt --split test --out-dir $(OUT)/eval
	$(PY) scripts/caption.py --checkpoint $(OUT)/best.ckpt --heatmaps $(OUT)/heatmaps --limit 4 --from-split test

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
