# Two entry points for a fresh clone (see README "Quick start"):
#   make demo   set up .venv, then train, evaluate and caption on the synthetic dataset
#               (one default training: about 5 min on an idle 2-core CPU, longer on a busy one,
#               README "Quick start"); make demo QUICK=1 checks the same steps with configs/tiny.yaml
#               in under a minute
#   make test   set up .venv, then run the test suite (what CI runs)
#   make test-slow  the slow tests: the default trainings against their quality targets (~12 min),
#                   the soft-vs-hard study end to end and torch.compile vs eager (about 1 min in all)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ATTENTION ?= soft
# A YAML file of differences for the demo's training (captioning train --config); QUICK=1 picks
# configs/tiny.yaml: 32 tiny images, seconds of training, so its captions mean nothing.
CONFIG ?= $(if $(QUICK),configs/tiny.yaml)
# One folder per variant, so that no demo replaces another: runs/demo-soft, runs/demo-hard,
# runs/demo-tiny-soft (CONFIG=configs/tiny.yaml), ...
OUT ?= runs/demo-$(if $(CONFIG),$(basename $(notdir $(CONFIG)))-)$(ATTENTION)
# What to type after setup: the venv's captioning is on PATH only once the venv is activated.
RUN_HINT := to run captioning yourself: source $(VENV)/bin/activate, then captioning --help (or, without activating, $(VENV)/bin/captioning --help)
PYTEST_ARGS ?=
# The default suite's pytest-xdist workers: one per core (auto); PYTEST_WORKERS=0 runs it in this one process.
PYTEST_WORKERS ?= auto
# What the demo's training is, and how long it took as measured (README "Quick start").
ifeq ($(CONFIG),)
DEMO_TIME := the default settings (10,000 synthetic scenes, 6 epochs): about 5 min on an idle 2-core CPU, longer when it is busy
else
DEMO_TIME := $(CONFIG)$(if $(filter configs/tiny.yaml,$(CONFIG)),: under a minute in all)
endif

.PHONY: setup demo test test-slow clean

# pyproject.toml holds compatible ranges; constraints.txt the exact versions the tests run against.
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setup: a virtual environment in $(VENV) with PyTorch, Lightning and the rest of constraints.txt"
	@echo "setup: pip downloads a few GB on first use and shows its progress"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed
	@echo "setup: done; $(RUN_HINT)"

demo: setup
	@echo "demo 1/3: train $(ATTENTION) attention into $(OUT) with $(DEMO_TIME)"
	$(PY) scripts/train.py --attention $(ATTENTION) --out-dir $(OUT) --overwrite $(if $(CONFIG),--config $(CONFIG))
	@echo "demo 2/3: score $(OUT)/best.ckpt on the test split (beam search, the COCO metrics)"
	$(PY) scripts/evaluate.py --checkpoint $(OUT)/best.ckpt --split test --out-dir $(OUT)/eval
	@echo "demo 3/3: caption 4 test images, one attention figure each in $(OUT)/heatmaps"
	$(PY) scripts/caption.py --checkpoint $(OUT)/best.ckpt --heatmaps $(OUT)/heatmaps --limit 4 --from-split test
	@echo "demo: done, everything is in $(OUT) (another ATTENTION or CONFIG writes its own folder)"
	@echo "demo: $(RUN_HINT)"

test: setup
	$(PY) -m pytest -m "not slow" -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow -s $(PYTEST_ARGS)

# Only the environment: run folders under runs/ may hold work of yours, so they are left to you.
clean:
	rm -rf $(VENV)
