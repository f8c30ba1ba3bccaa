# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv first.
# `make test-fast`: the fast tier (unit + the core path's tiny-model tests, about a minute on 2 cores).
# `make test-oldest`: the fast tier on the oldest versions pyproject.toml allows, in .venv-oldest.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned here (not in pyproject) so CPU machines take the local CPU wheel instead of CUDA builds.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: demo test test-fast test-oldest test-torchvision lint clean

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

test-fast: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -p no:cacheprovider -m "fast and not slow"

# The lower bounds of pyproject.toml's dependencies, installed together. torch's bound (2.6) needs a CPU build of
# that version where one is at hand: TORCH_OLDEST=torch==2.6.0; by default the pinned torch is used.
TORCH_OLDEST ?= $(TORCH_PIN)
OLDEST_PINS := "transformers==5.18.0" "accelerate==1.6.0" "peft==0.15.0" "datasets==4.7.0" "pillow==10.0.0" \
	"pyyaml==6.0" "pytest>=8" "hypothesis>=6"
OLDEST_VENV := .venv-oldest

$(OLDEST_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/pip install -q "$(TORCH_OLDEST)"
	$(OLDEST_VENV)/bin/pip install -q -e ".[plots]" $(OLDEST_PINS) "$(TORCH_OLDEST)"
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	HF_HUB_OFFLINE=1 $(OLDEST_VENV)/bin/python -m pytest -q -p no:cacheprovider -m "fast and not slow"

# A second environment with torchvision and timm (torch 2.14.1, whose torchvision imports on CPU; ~12 min, 5.8 GB):
# the tests that need them (component table on Gemma 3n's timm tower, processors with real video processors, and
# every per-family check of the families whose processors need torchvision or whose tower needs timm:
# adpo.testing.tiny.TORCHVISION_FAMILIES).
TV_VENV := .venv-torchvision
TV_PIN := torch==2.14.1
$(TV_VENV)/bin/.installed: pyproject.toml
	$(PYTHON) -m venv $(TV_VENV)
	$(TV_VENV)/bin/pip install -q --upgrade pip
	$(TV_VENV)/bin/pip install -q "$(TV_PIN)" torchvision==0.29.1
	$(TV_VENV)/bin/pip install -q -e ".[dev]" timm==1.0.31 "$(TV_PIN)"
	touch $@

test-torchvision: $(TV_VENV)/bin/.installed
	HF_HUB_OFFLINE=1 $(TV_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_families.py \
		-k "components_resolve or reload_keeps or unavailable or errors_name or mistral3 or lfm2_vl or llama4 or gemma3n"

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests bench train_adpo_multimodal.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(TV_VENV) runs .pytest_cache
