"""The public ``cordum-sdk`` 0.1.0 (PyPI, unmodified) against the gateway's memory routes, end to
end: jobs submitted through the SDK with one memory id run on a worker that builds its window and
records its answer through cordum-context-engine; the SDK's generated memory operations then read
that conversation and the job's result, upload and read back an artifact, and get 404s for all of
them with another tenant's key.

Processes: safety kernel, scheduler, context engine, a chat worker (tests/procs/chat_worker.py) and
the gateway; the SDK client (cordum_sdk_memory_client.py) in its own venv and process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from cordum.dev.servers import free_port
from tests.conftest import unique
from tests.integration.stack import Stack
from tests.integration.stack import nats_server, redis_server

FIXTURES = (nats_server, redis_server)  # servers of its own (see tests/integration/stack.py)

from .sdk_env import ensure_cordum_sdk_python

pytestmark = pytest.mark.slow

CLIENT_SCRIPT = Path(__file__).with_name("cordum_sdk_memory_client.py")
API_KEY = "sdk-memory-key-0123456789abcdef"
OTHER_KEY = "sdk-memory-other-0123456789abc"


@pytest.fixture(scope="session")
def cordum_sdk_python() -> Path:
    return ensure_cordum_sdk_python()


async def test_cordum_sdk_reads_memory_written_through_the_context_engine(spawn, tmp_path, redis, cordum_sdk_python):
    tenant, other = unique("sdk-mem"), unique("sdk-other")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- {{key: {OTHER_KEY}, tenant: {other}, role: operator, principal_id: eve}}\n")
    engine_port = free_port()
    stack = Stack.create(spawn, tmp_path)
    stack.kernel()
    stack.scheduler()
    stack.start("context-1", "cordum.context.service", CONTEXT_ENGINE_ADDR=f"127.0.0.1:{engine_port}",
                CONTEXT_ENGINE_METRICS_ADDR=f"127.0.0.1:{free_port()}")
    stack.start("chat-1", "tests.procs.chat_worker", WORKER_ID="chat-1", CONTEXT_ENGINE_ADDR=f"127.0.0.1:{engine_port}")
    stack.start("gateway-1", "cordum.gateway.service", CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev", TENANT_ID=tenant,
                CORDUM_API_KEYS_PATH=str(keys_file))
    await stack.ready()
    await trio.sleep(1.0)  # the worker's heartbeats reach the scheduler

    memory_id = unique("conversation")
    result = await trio.run_process(
        [str(cordum_sdk_python), str(CLIENT_SCRIPT)], capture_stdout=True, capture_stderr=True, check=False,
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "CORDUM_BASE_URL": f"http://127.0.0.1:{stack.http_ports['gateway-1']}",
                           "CORDUM_API_KEY": API_KEY, "CORDUM_TENANT_ID": tenant, "CORDUM_OTHER_API_KEY": OTHER_KEY,
                           "CORDUM_OTHER_TENANT_ID": other, "CORDUM_MEMORY_ID": memory_id, "CORDUM_SDK_TIMEOUT": "30"})
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-6000:]
    out = json.loads(result.stdout)

    assert out["sdk_version"] == out["sdk_dist_version"] == "0.1.0"
    assert out["facade_has_memory"] is False  # 0.1.0 ships the operations, not the namespace
    assert [job["state"] for job in out["jobs"]] == ["SUCCEEDED", "SUCCEEDED"]
    assert out["jobs"][1]["result"]["answer"] == "reply #3: second question"  # it saw the first turn

    conversation = ["first question", "reply #1: first question", "second question", "reply #3: second question"]
    memory = out["memory"]
    assert memory["key"] == f"mem:{memory_id}:events" and memory["type"] == "list"
    assert [entry["content"] for entry in memory["value"]] == conversation
    assert [entry["role"] for entry in memory["value"]] == ["user", "assistant"] * 2
    assert out["result_memory"]["value"]["answer"] == "reply #3: second question"

    created = out["created"]
    assert created["artifact_ptr"].startswith("redis://art:") and created["size_bytes"] == 35
    artifact = out["artifact"]
    assert artifact["content"] == "nightly report: 3 jobs, 0 failures\n"
    assert artifact["dict"]["artifact_ptr"] == created["artifact_ptr"]
    assert artifact["dict"]["metadata"]["retention"] == "7d" and artifact["created_at_type"] == "datetime"
    assert artifact["labels"] == {"suite": "memory-interop"}

    assert out["other_tenant"] == {"memory": 404, "result": 404, "artifact": 404}
    assert out["missing"] == 404
    # stored under the tenant's scope, as the worker helper and the gateway both name it
    assert await redis.execute("LLEN", f"mem:{tenant}/{memory_id}:events") == 4
