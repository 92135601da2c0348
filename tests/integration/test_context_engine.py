"""cordum-context-engine as real processes against a real redis-server: windows and memory over
gRPC (our Trio client), the Redis reads on one server and on a Redis Cluster, size limits, replicas
with one killed (before a call, and during a write: not written twice), Redis frozen and killed under
it, shutdown with a call in flight (a write moves on to another replica), configuration errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from cordum.context.client import open_context_client, parse_engine_addrs
from cordum.context.memory import MemoryStore, MemoryUnavailable
from cordum.context.service import STAGES
from cordum.dev.servers import free_port, start_redis
from cordum.infra.config import load_settings
from cordum.infra.grpc import RpcError, open_grpc_client
from cordum.infra.redis import open_redis
from cordum.runtime.instances import list_instances
from cordum.store import keys
from cordum.v1 import context_pb2 as pb
from tests.conftest import ROOT, unique
from tests.integration.stack import metric
from tests.integration.test_multiprocess import _wait_for

CHAT, RAG, RAW = pb.CONTEXT_MODE_CHAT, pb.CONTEXT_MODE_RAG, pb.CONTEXT_MODE_RAW


@dataclass
class Engine:
    proc: object
    grpc_port: int
    metrics_port: int

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            return response.read().decode()

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/health", timeout=5) as response:
            return json.loads(response.read())


def start_engine(spawn, name: str = "context-1", **env: str) -> Engine:
    grpc_port, metrics_port = free_port(), free_port()
    proc = spawn(name, ["-m", "cordum.context.service"], env={
        "CONTEXT_ENGINE_ADDR": f"127.0.0.1:{grpc_port}",
        "CONTEXT_ENGINE_METRICS_ADDR": f"127.0.0.1:{metrics_port}", **env})
    return Engine(proc, grpc_port, metrics_port)


async def ready(*engines: Engine, timeout: float = 60) -> None:
    for engine in engines:
        proc = engine.proc
        await _wait_for(lambda: any(e.get("event") == "service.ready" for e in proc.events()), timeout,
                        f"{proc.name} ready (stderr: {proc.lines('err')[-5:]})")


def prompt(text: str, **more: object) -> bytes:
    return json.dumps({"prompt": text, **more}).encode()


def turn(memory_id: str, question: str, answer: str, mode: int = CHAT, **fields: object) -> pb.UpdateMemoryRequest:
    return pb.UpdateMemoryRequest(memory_id=memory_id, logical_payload=prompt(question),
                                  model_response=answer.encode(), mode=mode, **fields)


def contents(response: pb.BuildWindowResponse) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in response.messages]


@asynccontextmanager
async def writes_paused(url: str):
    """Redis holds every write until the block ends (or UNPAUSE), while reads and new connections
    go on: a write stays in flight inside an engine for as long as a test needs, with no
    client-side timeout of Redis's running out first (as it could with a stopped redis-server)."""
    async with open_redis(load_settings({"REDIS_URL": url})) as client:
        await client.execute("CLIENT", "PAUSE", 120_000, "WRITE")
        try:
            yield client
        finally:
            await client.execute("CLIENT", "UNPAUSE")


# ---- the Redis reads and writes, in process ----------------------------------------------------


async def test_memory_store_reads_a_bounded_chunk_scan_and_keeps_twenty_events(store_redis):
    memory_id = unique("acme/mem")
    store = MemoryStore(store_redis, timeout=5, max_chunk_scan=5)
    for i in range(12):
        await store.append(memory_id, [json.dumps({"role": "user", "content": f"q{i}", "ts": i}),
                                       json.dumps({"role": "assistant", "content": f"a{i}", "ts": i})])
    events = await store_redis.execute("LRANGE", keys.memory_events(memory_id), 0, -1)
    assert [json.loads(e)["content"] for e in events] == [f"{r}{i}" for i in range(2, 12) for r in "qa"]

    chunk_keys = [f"chunk:{memory_id}:{i}" for i in range(12)]  # spread over the cluster's slots
    for i, key in enumerate(chunk_keys):
        await store_redis.execute("SET", key, json.dumps({"path": f"src/f{i}.py", "content": f"c{i}"}))
    await store_redis.execute("SADD", keys.memory_chunks(memory_id), *chunk_keys, f"chunk:{memory_id}:gone")
    await store_redis.execute("SET", keys.memory_summary(memory_id), "gist")

    view = await store.read(memory_id, history=True, summary=True, file_path="src")
    assert view.degraded is None and view.summary == "gist"
    assert [json.loads(e)["content"] for e in view.history][-2:] == ["q11", "a11"] and len(view.history) == 20
    assert 1 <= len(view.chunks) <= 5  # the scan stops at max_chunk_scan members (a missing key is skipped)
    assert {json.loads(c)["content"] for c in view.chunks} <= {f"c{i}" for i in range(12)}

    nothing = await store.read("", history=True, summary=True, file_path="src")
    assert nothing.history == [] and nothing.degraded is None


# ---- the service ------------------------------------------------------------------------------


async def test_engine_builds_windows_records_turns_and_refuses_bad_requests(spawn, redis):
    engine = start_engine(spawn, CONTEXT_ENGINE_MAX_ENTRY_BYTES="1024", CONTEXT_ENGINE_MAX_PAYLOAD_BYTES="4096")
    await ready(engine)
    memory_id = unique("acme/conv")
    async with open_context_client(parse_engine_addrs(engine.addr)) as client:
        await client.update_memory(turn(memory_id, "what is 2+2?", "4", tenant_id="acme"))
        await client.update_memory(turn(memory_id, "and 3+3?", "6"))
        window = await client.build_window(pb.BuildWindowRequest(
            memory_id=memory_id, mode=CHAT, logical_payload=prompt("and 4+4?"), max_output_tokens=50))
        assert contents(window) == [("user", "what is 2+2?"), ("assistant", "4"), ("user", "and 3+3?"),
                                    ("assistant", "6"), ("user", "and 4+4?")]
        assert window.input_tokens == len("what is 2+2?4and 3+3?6and 4+4?") // 4 and window.output_tokens == 50

        # RAG: chunks matching the file, else the summary
        await redis.execute("SET", "chunk:main", json.dumps({"path": "app/main.py", "content": "def main(): ..."}))
        await redis.execute("SET", "chunk:util", json.dumps({"path": "lib/util.py", "content": "UTIL"}))
        await redis.execute("SADD", keys.memory_chunks(memory_id), "chunk:main", "chunk:util")
        await redis.execute("SET", keys.memory_summary(memory_id), "a maths quiz")
        rag = await client.build_window(pb.BuildWindowRequest(
            memory_id=memory_id, mode=RAG, logical_payload=prompt("explain", file_path="app/main.py")))
        assert ("system", "Context from app/main.py:\ndef main(): ...") in contents(rag)
        assert all("UTIL" not in c and "quiz" not in c for _, c in contents(rag))
        summary = await client.build_window(pb.BuildWindowRequest(memory_id=memory_id, mode=RAG,
                                                                  logical_payload=prompt("recap")))
        assert contents(summary)[-2:] == [("system", "a maths quiz"), ("user", "recap")]
        trimmed = await client.build_window(pb.BuildWindowRequest(
            memory_id=memory_id, mode=CHAT, logical_payload=prompt("x" * 40), max_input_tokens=11))
        assert contents(trimmed) == [("assistant", "6"), ("user", "x" * 40)]

        # RAW and an empty memory id remember nothing
        await client.update_memory(turn(unique("acme/raw"), "q", "a", mode=RAW))
        await client.update_memory(turn("", "q", "a"))
        assert await redis.scan_keys("mem:acme/raw*") == []

        # bad requests name the field; governance refusals too
        with pytest.raises(RpcError) as bad:
            await client.build_window(pb.BuildWindowRequest(memory_id="has space", mode=CHAT))
        assert bad.value.code == "INVALID_ARGUMENT" and bad.value.message.startswith("memory_id:")
        with pytest.raises(RpcError) as big:
            await client.update_memory(turn(memory_id, "q", "a" * 2000))
        assert big.value.code == "INVALID_ARGUMENT" and big.value.message.startswith("model_response:")
        with pytest.raises(RpcError) as huge:  # over CONTEXT_ENGINE_MAX_PAYLOAD_BYTES: refused before parsing
            await client.build_window(pb.BuildWindowRequest(memory_id=memory_id, logical_payload=prompt("x" * 5000)))
        assert huge.value.code == "INVALID_ARGUMENT"
        assert huge.value.message.startswith("logical_payload: 5014 bytes, over the 4096-byte limit")
        with pytest.raises(RpcError) as long_id:
            await client.update_memory(turn(memory_id, "q", "a", writer_agent_id="w" * 600))
        assert long_id.value.code == "INVALID_ARGUMENT" and long_id.value.message.startswith("writer_agent_id:")
        with pytest.raises(RpcError) as shared:
            await client.update_memory(turn(memory_id, "q", "a", tenant_id="acme", writer_agent_id="agent-1",
                                            provenance_ref="p-1", write_kind=pb.MEMORY_WRITE_KIND_SHARED_DIRECTIVE))
        assert shared.value.code == "PERMISSION_DENIED" and shared.value.message.startswith("provenance_verified")
        with pytest.raises(RpcError) as foreign:
            await client.update_memory(turn(memory_id, "q", "a", tenant_id="globex"))
        assert foreign.value.code == "PERMISSION_DENIED" and foreign.value.message.startswith("tenant_id")
        await client.update_memory(turn(memory_id, "policy", "set", tenant_id="acme", writer_agent_id="agent-1",
                                        provenance_ref="p-1", provenance_verified=True,
                                        write_kind=pb.MEMORY_WRITE_KIND_SHARED_POLICY_STATE))
    assert len(await redis.execute("LRANGE", keys.memory_events(memory_id), 0, -1)) == 6

    health = engine.health()
    assert health["status"] == "ok" and health["redis"] == "ok" and health["grpc_serving"] is True
    text = engine.metrics()
    assert metric(text, "cordum_context_windows_total") == 4
    assert metric(text, "cordum_context_redis_degraded_total") == 0
    assert metric(text, "cordum_context_messages_trimmed_total") == 3
    assert 'result="written"' in text and 'result="refused"' in text
    assert 'pod="context-1"' in text
    instances = await list_instances(redis)
    assert [e["id"] for e in instances["cordum-context-engine"]] == ["context-1"]
    # memory contents never reach the log
    assert not any("2+2" in line for line in engine.proc.lines("err"))


async def test_client_spreads_calls_and_skips_a_killed_replica(spawn, redis):
    first, second = start_engine(spawn, "context-1"), start_engine(spawn, "context-2")
    await ready(first, second)
    memory_id = unique("acme/ha")
    addrs = parse_engine_addrs(f"{first.addr},{second.addr}")
    async with open_context_client(addrs, timeout=10) as client:
        for i in range(6):
            await client.update_memory(turn(memory_id, f"q{i}", f"a{i}"))
        # both replicas answered a share of the calls
        for engine in (first, second):
            assert metric(engine.metrics(), "cordum_context_memory_updates_total") == 3

        first.proc.popen.kill()
        first.proc.popen.wait()
    # A client started now: its first call goes to the dead replica, whose connection is refused:
    # nothing was sent, so even a write moves on.
    async with open_context_client(addrs, timeout=10) as client:
        for i in range(6, 10):  # every call answered: the dead replica is skipped
            await client.update_memory(turn(memory_id, f"q{i}", f"a{i}"))
            window = await client.build_window(pb.BuildWindowRequest(memory_id=memory_id, mode=CHAT,
                                                                     logical_payload=prompt("next")))
            assert contents(window)[-3:] == [("user", f"q{i}"), ("assistant", f"a{i}"), ("user", "next")]
    assert metric(second.metrics(), "cordum_context_memory_updates_total") == 3 + 4


async def test_a_write_cut_mid_call_is_not_written_again_by_another_replica(spawn, tmp_path):
    """The replica dies while its UpdateMemory waits on Redis: it may have written the turn, so the
    client raises (the job retries as a whole) instead of recording the turn a second time."""
    own = start_redis(tmp_path / "redis-cut")
    try:
        slow = {"REDIS_URL": own.url, "CONTEXT_ENGINE_REDIS_TIMEOUT": "60s"}
        first, second = start_engine(spawn, "context-1", **slow), start_engine(spawn, "context-2", **slow)
        await ready(first, second)
        memory_id = unique("acme/cut")
        errors: list[RpcError] = []
        addrs = parse_engine_addrs(f"{first.addr},{second.addr}")
        async with open_context_client(addrs, timeout=60) as client, writes_paused(own.url) as own_redis:
            async def write() -> None:
                try:
                    await client.update_memory(turn(memory_id, "q", "a"))
                except RpcError as exc:
                    errors.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)  # a new client's first call goes to the first replica
                await _wait_for(lambda: metric(first.metrics(), "cordum_context_calls_in_flight") == 1, 60,
                                "the write in flight on context-1")
                first.proc.popen.kill()
            await own_redis.execute("CLIENT", "UNPAUSE")
            assert [e.code for e in errors] == ["UNAVAILABLE"]
            assert not errors[0].message.startswith("memory store unavailable")  # the replica, not Redis
            assert metric(second.metrics(), "cordum_context_memory_updates_total") == 0  # never sent there
            # had context-1's transaction reached Redis before it died: the turn once, never twice
            assert len(await own_redis.execute("LRANGE", keys.memory_events(memory_id), 0, -1)) in (0, 2)
    finally:
        own.stop()


async def test_windows_degrade_and_writes_fail_clearly_when_redis_freezes_or_dies(spawn, tmp_path):
    own = start_redis(tmp_path / "redis-ctx")
    try:
        engine = start_engine(spawn, REDIS_URL=own.url, CONTEXT_ENGINE_REDIS_TIMEOUT="1s")
        await ready(engine)
        memory_id = unique("acme/frozen")
        request = pb.BuildWindowRequest(memory_id=memory_id, mode=CHAT, logical_payload=prompt("still there?"))
        async with open_context_client(parse_engine_addrs(engine.addr), timeout=30) as client:
            await client.update_memory(turn(memory_id, "q", "a"))
            assert len((await client.build_window(request)).messages) == 3

            own.proc.send_signal(signal.SIGSTOP)  # Redis hangs: every call would wait forever
            try:
                started = trio.current_time()
                window = await client.build_window(request)
                took = trio.current_time() - started
                assert contents(window) == [("user", "still there?")]  # degraded: no history
                assert took < 15  # bounded by CONTEXT_ENGINE_REDIS_TIMEOUT (1 s), not by Redis
                with pytest.raises(RpcError) as failed:
                    await client.update_memory(turn(memory_id, "lost?", "yes"))
                assert failed.value.code == "UNAVAILABLE"
                assert failed.value.message.startswith("memory store unavailable")
            finally:
                own.proc.send_signal(signal.SIGCONT)

            await _wait_until_history(client, request, 3)  # Redis back: history again

            own.stop()  # Redis gone: connections refused
            window = await client.build_window(request)
            assert contents(window) == [("user", "still there?")]
    finally:
        own.stop()
    assert metric(engine.metrics(), "cordum_context_redis_degraded_total") >= 2
    assert 'result="unavailable"' in engine.metrics()
    degraded = [e for e in engine.proc.events() if e.get("event") == "context.window_degraded"]
    assert {e["reason"].split(":")[0] for e in degraded} >= {"redis timeout", "redis error"}
    assert all(memory_id not in json.dumps(e) for e in degraded)  # ids are logged as a digest only


async def _wait_until_history(client, request, count: int) -> None:
    with trio.move_on_after(30):
        while len((await client.build_window(request)).messages) != count:
            await trio.sleep(0.2)
        return
    raise AssertionError("history did not come back after Redis resumed")


async def test_shutdown_drains_grpc_then_metrics_lets_a_call_in_flight_finish_and_moves_new_writes_on(spawn, redis, tmp_path):
    own = start_redis(tmp_path / "redis-drain")
    try:
        # The write in flight waits for Redis until the test lets Redis go on (no deadline races it).
        engine = start_engine(spawn, REDIS_URL=own.url, CONTEXT_ENGINE_REDIS_TIMEOUT="60s",
                              CORDUM_SHUTDOWN_TIMEOUT="60s")
        spare = start_engine(spawn, "context-2")  # on the session's Redis
        await ready(engine, spare)
        slow_id, memory_id = unique("acme/slow"), unique("acme/drain")
        request = pb.BuildWindowRequest(memory_id=slow_id, mode=CHAT, logical_payload=prompt("slow"))
        async with open_context_client(parse_engine_addrs(engine.addr), timeout=60) as client, \
                writes_paused(own.url) as own_redis:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.update_memory, turn(slow_id, "slow", "in flight"))
                await _wait_for(lambda: metric(engine.metrics(), "cordum_context_calls_in_flight") == 1, 60,
                                "the call in flight")
                engine.proc.signal(signal.SIGTERM)
                await _wait_for(lambda: any(e.get("stage") == "grpc drain" for e in engine.proc.events()), 60,
                                "the grpc drain stage")
                with pytest.raises(RpcError) as refused:  # new calls are turned away while draining
                    await client.build_window(request)
                assert refused.value.code == "UNAVAILABLE" and refused.value.message == "server is shutting down"
                async with open_grpc_client(HealthStub, "127.0.0.1", engine.grpc_port) as health:
                    status = await health.call("Check", HealthCheckRequest(service="cordum.v1.ContextEngine"),
                                               timeout=10)
                assert status.status == HealthCheckResponse.NOT_SERVING  # load balancers stop routing here
                # A write turned away unread moves on: a new client tries the draining replica first.
                both = parse_engine_addrs(f"{engine.addr},{spare.addr}")
                async with open_context_client(both, timeout=30) as writer:
                    await writer.update_memory(turn(memory_id, "q", "a"))
                assert metric(spare.metrics(), "cordum_context_memory_updates_total") == 1
                assert len(await redis.execute("LRANGE", keys.memory_events(memory_id), 0, -1)) == 2
                await own_redis.execute("CLIENT", "UNPAUSE")  # the write in flight goes through
            # the nursery ended: the write in flight returned without an error, and it was written
            events = await own_redis.execute("LRANGE", keys.memory_events(slow_id), 0, -1)
            assert [json.loads(e)["content"] for e in events] == ["slow", "in flight"]
        assert await trio.to_thread.run_sync(engine.proc.wait, 60) == 0
    finally:
        own.stop()
    stages = [(e["event"], e["stage"]) for e in engine.proc.events() if e.get("event", "").startswith("stage.")]
    assert stages == [(event, stage) for stage in STAGES for event in ("stage.begin", "stage.end")]
    assert STAGES == ("grpc drain", "metrics drain")


@pytest.mark.parametrize(("name", "value", "needle"), [
    ("CONTEXT_ENGINE_MAX_CHUNK_SCAN", "0", "CONTEXT_ENGINE_MAX_CHUNK_SCAN='0' is invalid"),
    ("CONTEXT_ENGINE_MAX_ENTRY_BYTES", "lots", "CONTEXT_ENGINE_MAX_ENTRY_BYTES='lots' is invalid"),
    ("CONTEXT_ENGINE_MAX_PAYLOAD_BYTES", "10", "CONTEXT_ENGINE_MAX_PAYLOAD_BYTES='10' is invalid"),
    ("CONTEXT_ENGINE_REDIS_TIMEOUT", "-1s", "CONTEXT_ENGINE_REDIS_TIMEOUT='-1s' is invalid"),
    ("CONTEXT_ENGINE_ADDR", "nowhere", "CONTEXT_ENGINE_ADDR='nowhere' is invalid"),
    ("CONTEXT_ENGINE_TLS_CERT", "/etc/cert.pem", "CONTEXT_ENGINE_TLS_CERT and CONTEXT_ENGINE_TLS_KEY go together"),
    ("CONTEXT_ENGINE_TLS_CLIENT_CA", "/etc/ca.pem", "CONTEXT_ENGINE_TLS_CLIENT_CA is invalid without"),
])
def test_bad_configuration_exits_2_naming_the_variable(name: str, value: str, needle: str, server_env) -> None:
    env = {**os.environ, **server_env, name: value, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cordum.context.service"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "cordum-context-engine: configuration error: " + needle in proc.stderr


async def test_store_append_raises_when_redis_is_gone(tmp_path):
    own = start_redis(tmp_path / "redis-gone")
    settings = load_settings({"REDIS_URL": own.url, "REDIS_MIN_IDLE_CONNS": "0"})
    async with open_redis(settings) as client:
        store = MemoryStore(client, timeout=1, max_chunk_scan=10)
        own.stop()
        with pytest.raises(MemoryUnavailable, match="redis error"):
            await store.append("acme/x", ["{}"])
        view = await store.read("acme/x", history=True, summary=False, file_path="")
        assert view.degraded and view.degraded.startswith("redis error")
