#!/usr/bin/env bash
# Lint, type-check, then every test layer. Integration and e2e tests start the real services
# they need (moto, TorchServe, Airflow) on their own ports and stop them afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
echo "== ruff";  $BIN/ruff check . && $BIN/ruff format --check .
echo "== mypy";  $BIN/mypy
echo "== hadolint"; PATH="$PWD/$BIN:$PATH" bash scripts/lint_dockerfiles.sh
echo "== pytest"
$BIN/python -m pytest -p no:cacheprovider "$@"
