# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so CPU machines take the local CPU wheel instead of CUDA builds.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	# DS_BUILD_OPS=0: DeepSpeed installs without compiling kernels (the CPU tests need none).
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[dev,plots,deepspeed]" "$(TORCH_PIN)"
	touch $@

demo: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m adpo.demo --output_dir $(DEMO_DIR)

test: $(BIN)/.installed
	$(BIN)/ruff check src tests bench train_adpo_multimodal.py
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench train_adpo_multimodal.py

clean:
	rm -rf $(VENV) runs .pytest_cache
