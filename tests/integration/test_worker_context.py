"""The worker SDK's context-engine helper from a real handler: `job.build_window()` and
`job.record_answer()` against a cordum-context-engine process, with memory bound to the job's
tenant; a worker without CONTEXT_ENGINE_ADDR, and one whose engine is down, fail their jobs clearly."""

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
from cordum.worker.context import ContextEngineAccess
from tests.conftest import unique
from tests.integration.test_context_engine import ready, start_engine
from tests.integration.test_worker_sdk import running, taps


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
        _, result = await results.result(job_id)
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
        _, result = await results.result(job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED
        assert "CONTEXT_ENGINE_ADDR is not set" in result.error_message

        job_id = await submit(redis, bus, down, "hi", tenant="acme", memory_id="c1")
        _, result = await results.result(job_id, timeout=30)
        assert result.status == job_pb2.JOB_STATUS_FAILED_RETRYABLE
        assert result.error_code == "context_engine_unavailable"


def test_the_engine_address_is_validated_when_the_worker_is_made() -> None:
    assert ContextEngineAccess.from_env(None, {}).addrs == []
    assert ContextEngineAccess.from_env(None, {"CONTEXT_ENGINE_ADDR": "a:1, b:2"}).addrs == [("a", 1), ("b", 2)]
    assert ContextEngineAccess.from_env(":50070", {"CONTEXT_ENGINE_ADDR": "x:1"}).addrs == [("127.0.0.1", 50070)]
    with pytest.raises(ValueError, match="CONTEXT_ENGINE_ADDR='nohost' is invalid"):
        ContextEngineAccess.from_env(None, {"CONTEXT_ENGINE_ADDR": "nohost"})
