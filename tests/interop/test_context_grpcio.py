"""cordum-context-engine answers a plain ``grpcio`` client whose stubs grpc_tools.protoc generates,
at test time, from our proto/cordum/v1/context.proto and the standard grpc.health.v1 proto: the
service path, messages, status codes and the health service are what any gRPC stack expects."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import trio

from cordum.store import keys
from tests.conftest import ROOT, unique
from tests.integration.test_context_engine import ready, start_engine

CLIENT_SCRIPT = Path(__file__).with_name("context_grpcio_client.py")

# The standard health-checking protocol (grpc/health/v1/health.proto), as published by gRPC.
HEALTH_PROTO = """
syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"""


def generate_stubs(out: Path) -> Path:
    """grpcio stubs for context.proto and health.proto in `out` (top-level module names, so
    nothing collides with our own `cordum` package)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "context.proto").write_text((ROOT / "proto" / "cordum" / "v1" / "context.proto").read_text())
    (out / "health.proto").write_text(HEALTH_PROTO)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "context.proto", "health.proto"], check=True, cwd=out, timeout=120)
    return out


async def test_a_generated_grpcio_client_calls_the_engine_and_its_health_service(spawn, redis, tmp_path):
    stubs = await trio.to_thread.run_sync(generate_stubs, tmp_path / "stubs")
    engine = start_engine(spawn)
    await ready(engine)
    memory_id = unique("acme/grpcio")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ENGINE_ADDR": engine.addr, "MEMORY_ID": memory_id}
    result = await trio.run_process([sys.executable, str(CLIENT_SCRIPT), str(stubs)], capture_stdout=True,
                                    capture_stderr=True, check=False, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr.decode()[-4000:]
    out = json.loads(result.stdout)

    assert out["window"] == {
        "messages": [["user", "hello from grpcio"], ["assistant", "hello back"],
                     ["user", "Instruction: review\nCode:\nx = 1"]],
        "input_tokens": len("hello from grpciohello backInstruction: review\nCode:\nx = 1") // 4,
        "output_tokens": 256,
    }
    assert out["bad_budget"]["code"] == "INVALID_ARGUMENT"
    assert out["bad_budget"]["details"].startswith("max_input_tokens:")
    assert out["unverified_shared_write"]["code"] == "PERMISSION_DENIED"
    assert out["unverified_shared_write"]["details"].startswith("provenance_verified")
    assert out["health"] == {"<server>": "SERVING", "cordum.v1.ContextEngine": "SERVING"}
    assert out["health_unknown"]["code"] == "NOT_FOUND"
    assert out["watch_first"] == "SERVING"
    assert len(await redis.execute("LRANGE", keys.memory_events(memory_id), 0, -1)) == 2
