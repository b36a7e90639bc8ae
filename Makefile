# lvlrfr: `make help` lists the targets. Every target creates the virtual environment when it is missing.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
LVLRFR := $(BIN)/lvlrfr
# cpu: the small profile that finishes on a 2-core machine; gpu: the full-scale configs in configs/gpu/.
PROFILE ?= cpu
CONFIGS := $(if $(filter gpu,$(PROFILE)),configs/gpu,configs)
RUN := runs/$(PROFILE)
PYTEST_ARGS ?=

export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE ?= offline
export PYTHONHASHSEED := 0

.PHONY: help install train-all train-sr-teacher train-generative train-discriminative report test test-slow \
	test-full bench lint clean-runs

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'
	@echo "  Variables: PROFILE=cpu|gpu (default cpu), PYTEST_ARGS='...'"

$(VENV)/.installed: pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.installed ## Create .venv and install lvlrfr with pinned dependencies

# Each stage's final.ckpt is written only when the stage finishes, so `make train-all` after an
# interruption skips finished stages and resumes the interrupted one from its last.ckpt.
$(RUN)/sr_teacher/checkpoints/final.ckpt: | $(VENV)/.installed
	$(LVLRFR) fit --config $(CONFIGS)/sr_teacher.yaml --ckpt_path last

$(RUN)/generative/checkpoints/final.ckpt: $(RUN)/sr_teacher/checkpoints/final.ckpt
	$(LVLRFR) fit --config $(CONFIGS)/generative.yaml --ckpt_path last

$(RUN)/discriminative/checkpoints/final.ckpt: $(RUN)/generative/checkpoints/final.ckpt
	$(LVLRFR) fit --config $(CONFIGS)/discriminative.yaml --ckpt_path last

train-sr-teacher: $(RUN)/sr_teacher/checkpoints/final.ckpt ## Stage 0a: train the diffusion super-resolution teacher
train-generative: $(RUN)/generative/checkpoints/final.ckpt ## Stage 1: generative distillation of the student backbone
train-discriminative: $(RUN)/discriminative/checkpoints/final.ckpt ## Stage 2: discriminative distillation of the head

report: $(RUN)/discriminative/checkpoints/final.ckpt ## Evaluate student and HR teacher on LFW, print the table
	$(LVLRFR) evaluate --config $(CONFIGS)/evaluate.yaml

train-all: install ## Run every stage on real faces and print the LFW-16px table (PROFILE=cpu|gpu)
	$(MAKE) report

test: install ## Run the default test suite (about 1.5 minutes on 2 idle cores)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

test-slow: install ## Run only the slow end-to-end tests
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

test-full: install ## Run every test, slow ones included
	$(BIN)/pytest $(PYTEST_ARGS)

bench: install ## Measure teacher-cache and step speed, write docs/benchmarks.md
	$(BIN)/python -m lvlrfr.benchmarks --output docs/benchmarks.md

clean-runs: ## Delete the run folders under runs/
	rm -rf runs/
