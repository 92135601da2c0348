#!/usr/bin/env bash
# Run the control plane locally in the foreground (Ctrl-C stops it); arguments go to
# `python -m cordum.dev.stack` (see --help).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python -m cordum.dev.stack "$@"
