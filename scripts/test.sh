#!/usr/bin/env bash
# Ember's tests: lint, types and the import graph first (cheap), then unit and integration tests.
# Needs scripts/setup.sh to have run (the integration tests boot the built guest images).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench  # one layout, so diffs show only changes
.venv/bin/mypy
.venv/bin/lint-imports  # the import graph's rules: [tool.importlinter] in pyproject.toml
.venv/bin/python -m pytest -v -p no:cacheprovider --durations=25 "$@"  # the slowest: CI must stay under 45 min
