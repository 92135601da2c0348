#!/usr/bin/env bash
# The HA production gate: `scripts/production_gate.sh --gate 19 [--strict]`.
# Runs gate 19's five scenarios against the running local 2-replica topology (`cordumctl up
# --replicas 2 --detach`), starting one if none runs (state in $CORDUM_DEV_DIR or .cordum/dev/).
# Advisory by default; --strict exits 1 when a scenario fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python -m cordum.dev.gate "$@"
