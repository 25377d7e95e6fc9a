# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint stack-start stack-stop stack-status clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/ml-release demo

test: setup
	@bash scripts/test.sh

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy

stack-start: setup
	$(BIN)/ml-release stack start

stack-stop:
	$(BIN)/ml-release stack stop

stack-status:
	$(BIN)/ml-release stack status

clean: stack-stop
	rm -rf .local
