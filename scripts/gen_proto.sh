#!/usr/bin/env bash
# Regenerate the Python modules for proto/ (protobuf messages, .pyi stubs, grpclib services).
#
#   scripts/gen_proto.sh [OUT_DIR]
#
# OUT_DIR defaults to the repository root, so modules land in cordum/agent/v1/ and cordum/v1/
# where their `from cordum.agent.v1 import ...` imports resolve (DESIGN §4.11).
# tests/unit/test_proto_generated.py runs this into a temp dir and diffs against the committed files.
# The gencode pins a minimum protobuf runtime (its "Protobuf Python Version" header), so regenerate
# with the grpcio-tools version the project pins, or the staleness test will flag every file.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT}"

# Absolute paths: we cd into proto/ below.
PYTHON="$("$PYTHON" -c 'import sys; print(sys.executable)')"
OUT="$(mkdir -p "$OUT" && cd "$OUT" && pwd)"
# grpclib's protoc plugin (protoc-gen-grpclib_python) is installed beside the interpreter.
export PATH="$(dirname "$PYTHON"):$PATH"

MESSAGES=(
  cordum/agent/v1/job.proto
  cordum/agent/v1/heartbeat.proto
  cordum/agent/v1/handshake.proto
  cordum/agent/v1/alert.proto
  cordum/agent/v1/buspacket.proto
  cordum/agent/v1/safety.proto
  cordum/v1/context.proto
  cordum/v1/policy_batch.proto
  cordum/v1/output_policy.proto
)
# Only files that declare a service get a *_grpc.py (the plugin would emit empty ones otherwise).
SERVICES=(
  cordum/agent/v1/safety.proto
  cordum/v1/context.proto
  cordum/v1/policy_batch.proto
  cordum/v1/output_policy.proto
)

cd "$ROOT/proto"
"$PYTHON" -m grpc_tools.protoc -I. --python_out="$OUT" --pyi_out="$OUT" "${MESSAGES[@]}"
"$PYTHON" -m grpc_tools.protoc -I. --grpclib_python_out="$OUT" "${SERVICES[@]}"
