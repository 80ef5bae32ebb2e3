# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BUDGETLM := $(VENV)/bin/budgetlm
# torch: the CPU build where there is no NVIDIA GPU, so set-up never pulls gigabytes of CUDA wheels.
# Elsewhere set TORCH_SPEC / TORCH_PIP_ARGS (e.g. TORCH_PIP_ARGS="--index-url <a CPU wheel index>").
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.5' || echo 'torch==2.13.0')
TORCH_PIP_ARGS ?=
DEMO_DIR ?= runs/demo
DEMO_BUDGET ?= 240s

.PHONY: demo test lint clean venv

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# the run starts afresh each time (pretrain refuses to overwrite a run); prepared data is reused.
# No recipe and no model keys: pretrain chooses the model, vocabulary, batch and learning rate for the budget on this machine.
demo: venv
	$(BUDGETLM) data prepare "$$($(BUDGETLM) data fetch shakespeare)" --out $(DEMO_DIR)/data
	rm -rf $(DEMO_DIR)/run
	$(BUDGETLM) pretrain --data $(DEMO_DIR)/data --out $(DEMO_DIR)/run --budget $(DEMO_BUDGET)
	$(BUDGETLM) eval $(DEMO_DIR)/run
	$(BUDGETLM) generate $(DEMO_DIR)/run --prompt "ROMEO:" --max-new-tokens 120 --seed 1
	@echo "report: $(DEMO_DIR)/run/report.md"

lint: venv
	$(VENV)/bin/ruff check budgetlm tests bench

test: lint
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
