#!/usr/bin/env bash
# Run the control plane locally in the foreground (Ctrl-C stops it): redis, nats, one safety kernel,
# context engine (gRPC :50070, health on :9088), scheduler, workflow engine (health on :9093),
# api-gateway (:8081), MCP server over HTTP (http://127.0.0.1:8090/mcp), one echo worker; a service
# still "not available yet" is listed, not started. Arguments go to `python -m cordum.dev.stack`
# (see --help; --replicas N for N of each service, 2 MCP servers at most).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh
exec .venv/bin/python -m cordum.dev.stack "$@"
