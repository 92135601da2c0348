#!/usr/bin/env bash
# Run the control plane locally in the foreground (Ctrl-C stops it): redis, nats, one safety kernel,
# scheduler, workflow engine (health on :9093) and api-gateway (:8081), one echo worker. Arguments go
# to `python -m cordum.dev.stack` (see --help; --replicas N for N of each service).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python -m cordum.dev.stack "$@"
