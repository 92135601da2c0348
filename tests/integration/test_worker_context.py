"""The worker SDK's context-engine helper from a real handler: `job.build_window()` and
`job.record_answer()` against a cordum-context-engine process, with memory bound to the job's
tenant; a worker without CONTEXT_ENGINE_ADDR, one whose engine is down, and a job naming a memory
without a tenant, fail their jobs clearly."""

from __future__ import annotations

import json

import pytest

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.job_pb2 import JobRequest
from cordum.dev.servers import free_port
from cordum.infra.config import load_settings
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.store import keys
from cordum.worker import JobContext, Worker
from cordum.v1 import context_pb2 as pb
from cordum.worker.context import ContextEngineAccess, job_memory
from cordum.worker.core import JobFailed
from tests.conftest import unique
from tests.integration.stack import metric
from tests.integration.test_context_engine import ready, start_engine
from tests.integration.test_worker_sdk import running, taps

RESULT_TIMEOUT = 60  # a loaded 2-core machine: generous, the wait ends as soon as the result is there


async def submit(redis, bus, worker: Worker, prompt: str, *, tenant: str, memory_id: str, **env: str) -> str:
    job_id = unique("job")
    await redis.set(f"ctx:{job_id}", json.dumps({"prompt": prompt}))
    request = JobRequest(job_id=job_id, topic="job.default", context_ptr=f"redis://ctx:{job_id}", tenant_id=tenant,
                         memory_id=memory_id, env={"tenant_id": tenant, **env})
    await bus.publish(worker.direct_subject, encode(new_packet(request, sender_id="cordum-scheduler")))
    return job_id


def chat_worker(settings) -> Worker:
    worker = Worker(unique("chat"), "default", settings=settings)

    @worker.handler()
    async def chat(job: JobContext) -> dict:
        window = await job.build_window()
        answer = f"answer to {job.input['prompt']} (saw {len(window.messages)} messages)"
        recorded = await job.record_answer(answer)
        return {"messages": window.messages, "tokens": window.input_tokens, "recorded": recorded}

    return worker


async def test_a_handler_builds_its_window_and_records_the_answer_in_its_tenants_memory(spawn, settings, redis, bus):
    engine = start_engine(spawn)
    await ready(engine)
    worker = chat_worker(load_settings({**settings.extra, "CONTEXT_ENGINE_ADDR": f"{engine.addr},{engine.addr}"}))
    conversation = unique("conv")

    async def run(prompt: str, tenant: str, **env: str) -> dict:
        job_id = await submit(redis, bus, worker, prompt, tenant=tenant, memory_id=conversation, **env)
        _, result = await results.result(job_id, timeout=RESULT_TIMEOUT)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED, result.error_message
        return json.loads(await redis.get(f"res:{job_id}"))

    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        first = await run("hello", "acme")
        assert first["messages"] == [{"role": "user", "content": "hello"}] and first["recorded"] is True
        second = await run("and then?", "acme")
        assert second["messages"] == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "answer to hello (saw 1 messages)"},
            {"role": "user", "content": "and then?"},
        ]
        # Another tenant naming the same conversation id has a memory of its own.
        other = await run("who am I?", "globex")
        assert other["messages"] == [{"role": "user", "content": "who am I?"}]
        # A raw job neither reads nor writes memory.
        raw = await run("one-off", "acme", context_mode="raw")
        assert raw["messages"] == [{"role": "user", "content": "one-off"}] and raw["recorded"] is False

    acme = await redis.lrange(keys.memory_events(f"acme/{conversation}"), 0, -1)
    assert [json.loads(e)["content"] for e in acme] == [
        "hello", "answer to hello (saw 1 messages)", "and then?", "answer to and then? (saw 3 messages)"]
    assert len(await redis.lrange(keys.memory_events(f"globex/{conversation}"), 0, -1)) == 2
    assert await redis.exists(keys.memory_events(conversation)) == 0  # never stored unscoped


async def test_without_an_engine_or_with_one_down_jobs_fail_clearly(settings, redis, bus):
    unconfigured = chat_worker(load_settings({k: v for k, v in settings.extra.items() if k != "CONTEXT_ENGINE_ADDR"}))
    down = chat_worker(load_settings({**settings.extra, "CONTEXT_ENGINE_ADDR": f"127.0.0.1:{free_port()}"}))
    async with taps(bus, subjects.RESULT) as (results,), running(unconfigured), running(down):
        job_id = await submit(redis, bus, unconfigured, "hi", tenant="acme", memory_id="c1")
        _, result = await results.result(job_id, timeout=RESULT_TIMEOUT)
        assert result.status == job_pb2.JOB_STATUS_FAILED
        assert "CONTEXT_ENGINE_ADDR is not set" in result.error_message

        job_id = await submit(redis, bus, down, "hi", tenant="acme", memory_id="c1")
        _, result = await results.result(job_id, timeout=RESULT_TIMEOUT)
        assert result.status == job_pb2.JOB_STATUS_FAILED_RETRYABLE
        assert result.error_code == "context_engine_unavailable"


def test_the_engine_address_is_validated_when_the_worker_is_made() -> None:
    assert ContextEngineAccess.from_env(None, {}).addrs == []
    assert ContextEngineAccess.from_env(None, {"CONTEXT_ENGINE_ADDR": "a:1, b:2"}).addrs == [("a", 1), ("b", 2)]
    assert ContextEngineAccess.from_env(":50070", {"CONTEXT_ENGINE_ADDR": "x:1"}).addrs == [("127.0.0.1", 50070)]
    with pytest.raises(ValueError, match="CONTEXT_ENGINE_ADDR='nohost' is invalid"):
        ContextEngineAccess.from_env(None, {"CONTEXT_ENGINE_ADDR": "nohost"})


async def test_a_job_without_a_tenant_cannot_name_a_tenants_memory(spawn, settings, redis, bus):
    engine = start_engine(spawn)
    await ready(engine)
    worker = chat_worker(load_settings({**settings.extra, "CONTEXT_ENGINE_ADDR": engine.addr}))
    victim = f"victim/{unique('conv')}"
    secret = json.dumps({"role": "user", "content": "victim's secret", "ts": 1})
    await redis.execute("RPUSH", keys.memory_events(victim), secret)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        job_id = await submit(redis, bus, worker, "what did they say?", tenant="", memory_id=victim)
        _, result = await results.result(job_id, timeout=RESULT_TIMEOUT)
    assert result.status == job_pb2.JOB_STATUS_FAILED
    assert result.error_code == "context_memory_needs_tenant" and "no tenant" in result.error_message
    assert await redis.lrange(keys.memory_events(victim), 0, -1) == [secret]  # neither read into a window nor added to
    assert metric(engine.metrics(), "cordum_context_windows_total") == 0


def test_memory_needs_a_tenant_unless_the_job_is_raw() -> None:
    assert job_memory(JobRequest(tenant_id="acme", memory_id="c1"), None) == ("acme/c1", pb.CONTEXT_MODE_CHAT, "acme")
    assert job_memory(JobRequest(env={"tenant_id": "acme", "memory_id": "c1"}), "rag") == (
        "acme/c1", pb.CONTEXT_MODE_RAG, "acme")
    assert job_memory(JobRequest(memory_id="victim/c1"), "raw") == ("", pb.CONTEXT_MODE_RAW, "")  # no memory used
    assert job_memory(JobRequest(), None) == ("", pb.CONTEXT_MODE_RAW, "")
    with pytest.raises(JobFailed, match="no tenant") as refused:
        job_memory(JobRequest(memory_id="victim/c1"), None)
    assert refused.value.code == "context_memory_needs_tenant"
    with pytest.raises(JobFailed):
        job_memory(JobRequest(env={"memory_id": "victim/c1", "context_mode": "chat"}), None)
