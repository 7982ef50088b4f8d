#!/usr/bin/env bash
# Ember's tests: lint, types and the import graph first (cheap), then unit and integration tests.
# Needs scripts/setup.sh to have run (the integration tests boot the built guest images).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench  # one layout, so diffs show only changes
.venv/bin/mypy
.venv/bin/lint-imports  # the import graph's rules: [tool.importlinter] in pyproject.toml
# Two workers, one test file each at a time (a file's fixtures, named templates and daemons stay
# in one process): most of an integration test's time is the guest waiting on its emulated
# kernel, so two run side by side in about the time of one (189 integration tests: 49 min
# serially, 23 min with two). CI must stay under 45 min; --durations shows the slowest.
# `-n 0` (after the script's arguments) runs serially, as --pdb and -s need.
.venv/bin/python -m pytest -v -p no:cacheprovider -n 2 --dist loadfile --durations=25 "$@"
