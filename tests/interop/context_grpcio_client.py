"""A client of cordum-context-engine written with plain ``grpcio`` (the most common Python gRPC
stack), on stubs that grpc_tools.protoc generated from the .proto files at test time.

Run as its own process, never imported: ``python context_grpcio_client.py <stubs dir>``; it imports
nothing of ours. Environment: ENGINE_ADDR (host:port), MEMORY_ID.

Prints one JSON object: what each call returned (messages, token counts, status codes, details).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, sys.argv[1])

import context_pb2  # noqa: E402  (generated into argv[1])
import context_pb2_grpc  # noqa: E402
import grpc  # noqa: E402
import health_pb2  # noqa: E402
import health_pb2_grpc  # noqa: E402


def _error(call) -> dict:
    try:
        call()
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "details": exc.details()}
    return {"code": "OK"}


def main() -> None:
    memory_id = os.environ["MEMORY_ID"]
    out: dict = {"grpcio": grpc.__version__}
    with grpc.insecure_channel(os.environ["ENGINE_ADDR"]) as channel:
        engine = context_pb2_grpc.ContextEngineStub(channel)
        engine.UpdateMemory(context_pb2.UpdateMemoryRequest(
            memory_id=memory_id, logical_payload=json.dumps({"message": "hello from grpcio"}).encode(),
            model_response=b"hello back", mode=context_pb2.CONTEXT_MODE_CHAT, tenant_id="acme"), timeout=10)
        window = engine.BuildWindow(context_pb2.BuildWindowRequest(
            memory_id=memory_id, mode=context_pb2.CONTEXT_MODE_CHAT, model="any",
            logical_payload=json.dumps({"instruction": "review", "code_snippet": "x = 1"}).encode(),
            max_input_tokens=1000, max_output_tokens=256), timeout=10)
        out["window"] = {"messages": [[m.role, m.content] for m in window.messages],
                         "input_tokens": window.input_tokens, "output_tokens": window.output_tokens}
        out["bad_budget"] = _error(lambda: engine.BuildWindow(
            context_pb2.BuildWindowRequest(memory_id=memory_id, max_input_tokens=-3), timeout=10))
        out["unverified_shared_write"] = _error(lambda: engine.UpdateMemory(context_pb2.UpdateMemoryRequest(
            memory_id=memory_id, mode=context_pb2.CONTEXT_MODE_CHAT, tenant_id="acme", writer_agent_id="a-1",
            provenance_ref="p-1", write_kind=context_pb2.MEMORY_WRITE_KIND_SHARED_TRUST_STATE), timeout=10))

        health = health_pb2_grpc.HealthStub(channel)
        out["health"] = {
            name or "<server>": health_pb2.HealthCheckResponse.ServingStatus.Name(
                health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status)
            for name in ("", "cordum.v1.ContextEngine")
        }
        out["health_unknown"] = _error(lambda: health.Check(health_pb2.HealthCheckRequest(service="no.Such"), timeout=10))
        watch = health.Watch(health_pb2.HealthCheckRequest(service="cordum.v1.ContextEngine"), timeout=10)
        out["watch_first"] = health_pb2.HealthCheckResponse.ServingStatus.Name(next(watch).status)
        watch.cancel()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
