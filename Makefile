# One command per chore. `make install` first; the others use its virtualenv.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run lint format typecheck test bench ci

install:  ## the virtualenv with fanline and the test tools (the README's test command, without running pytest)
	python3 -m venv $(VENV) && $(BIN)/pip install -e '.[test]'

run:  ## the whole platform on this machine (embedded Valkey, the API, 2 workers)
	$(BIN)/fanline up

lint:  ## ruff: lint and format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format:  ## ruff: fix what it can, then format
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

typecheck:  ## mypy --strict on the code and the tests
	$(BIN)/python -m tests.typecheck

test:  ## the whole suite (lint and mypy included, tests/test_lint.py)
	$(BIN)/pytest

bench:  ## the benchmark's quick preset (the full one: $(BIN)/fanline bench)
	$(BIN)/pip install -e '.[bench]' && $(BIN)/fanline bench --quick

ci:  ## what CI runs: .ci/run (installs Chromium, nginx and the npm packages if missing)
	bash .ci/run
