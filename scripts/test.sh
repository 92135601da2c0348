#!/usr/bin/env bash
# Run the test suite (default: all of tests/); arguments go to pytest. Exit code = pytest's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh --tests
exec .venv/bin/python -m pytest -q "$@"
