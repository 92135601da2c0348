"""The worker SDK against real NATS (JetStream) and Redis: jobs, failures, cancels, duplicates,
concurrency, announcements, give-back on shutdown, and the echo worker as a process."""

from __future__ import annotations

import json
import signal
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable

import pytest
import trio

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.handshake_pb2 import COMPONENT_ROLE_WORKER
from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.agent.v1.job_pb2 import JobCancel, JobRequest
from cordum.infra.aio import aio
from cordum.protocol import subjects
from cordum.protocol.packets import decode, encode, new_packet
from cordum.worker import SDK_VERSION, WORKER_STAGES, JobContext, Worker
from cordum.worker.core import RecentMap, decode_input, encode_output, JobFailed
from tests.conftest import unique

TIMEOUT = 10


class Tap:
    """Every packet seen on a broadcast subscription, with a way to wait for one."""

    def __init__(self) -> None:
        self.packets: list[BusPacket] = []
        self._changed = trio.Event()

    async def run(self, bus, subject: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(subject) as messages:
            task_status.started()
            async for msg in messages:
                self.packets.append(decode(msg.data))
                self._changed.set()
                self._changed = trio.Event()

    async def wait(self, predicate: Callable[[BusPacket], bool], what: str, timeout: float = TIMEOUT) -> BusPacket:
        with trio.move_on_after(timeout):
            while True:
                for packet in self.packets:
                    if predicate(packet):
                        return packet
                await self._changed.wait()
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    def results(self, job_id: str) -> list[job_pb2.JobResult]:
        return [p.job_result for p in self.packets if p.WhichOneof("payload") == "job_result" and p.job_result.job_id == job_id]

    async def result(self, job_id: str, timeout: float = TIMEOUT) -> tuple[BusPacket, job_pb2.JobResult]:
        packet = await self.wait(lambda p: p.WhichOneof("payload") == "job_result" and p.job_result.job_id == job_id,
                                 f"result of {job_id}", timeout)
        return packet, packet.job_result


@asynccontextmanager
async def taps(bus, *subject_list: str) -> AsyncIterator[list[Tap]]:
    async with trio.open_nursery() as nursery:
        found = []
        for subject in subject_list:
            tap = Tap()
            await nursery.start(tap.run, bus, subject)
            found.append(tap)
        yield found
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(worker: Worker, *, drain: float = 1.0) -> AsyncIterator[Worker]:
    # Stopped with drain(), not by cancelling: a cancelled scope around open_bus kills the bus's
    # batchers before its final flush, which then waits out its 3 s timeout.
    async with trio.open_nursery() as nursery:
        await nursery.start(worker.run)
        try:
            yield worker
        finally:
            with trio.move_on_after(drain + 4) as scope:
                await worker.drain(timeout=drain)
            if scope.cancelled_caught:
                nursery.cancel_scope.cancel()


async def submit(redis, bus, subject: str, input=None, *, job_id: str | None = None, topic: str = "job.default",
                 write_ctx: bool = True, raw_ctx: str | None = None) -> BusPacket:
    job_id = job_id or unique("job")
    if write_ctx:
        await redis.set(f"ctx:{job_id}", raw_ctx if raw_ctx is not None else json.dumps(input))
    request = JobRequest(job_id=job_id, topic=topic, context_ptr=f"redis://ctx:{job_id}")
    packet = new_packet(request, sender_id="cordum-scheduler")
    await bus.publish(subject, encode(packet))
    return packet


def echo_worker(settings, **kwargs) -> tuple[Worker, list[str]]:
    """A worker whose handler echoes; `calls` records the job ids it ran."""
    topics = kwargs.pop("topics", ())
    worker = Worker(kwargs.pop("worker_id", unique("w")), "default", topics, settings=settings, **kwargs)
    calls: list[str] = []

    @worker.handler()
    async def echo(job: JobContext) -> dict:
        calls.append(job.job_id)
        data = job.input if isinstance(job.input, dict) else {}
        if data.get("sleep"):
            await trio.sleep(data["sleep"])
        if data.get("fail"):
            raise RuntimeError(data.get("error", "asked to fail"))
        return {"echo": job.input, "worker_id": job.worker_id, "topic": job.topic}

    return worker, calls


# ---- the pure core ----------------------------------------------------------------------------


def test_core_input_output_and_recent_map():
    assert decode_input('{"a": 1}') == {"a": 1}
    with pytest.raises(JobFailed, match="context not found"):
        decode_input(None)
    with pytest.raises(JobFailed, match="invalid input"):
        decode_input("{nope")
    with pytest.raises(JobFailed, match="exceeds max size"):
        decode_input("1" * 11, limit=10)
    assert encode_output({"b": [1, "x"]}) == '{"b":[1,"x"]}'
    assert encode_output("text") == '"text"'
    with pytest.raises(JobFailed, match="not JSON-serializable"):
        encode_output({1, 2})
    now = [0.0]
    recent: RecentMap[int] = RecentMap(2, ttl=10, clock=lambda: now[0])
    recent.put("a", 1)
    recent.put("b", 2)
    assert recent.get("a") == 1  # a is now the most recent
    recent.put("c", 3)
    assert recent.get("b") is None and recent.get("a") == 1 and recent.get("c") == 3
    now[0] = 11
    assert recent.get("a") is None  # expired


# ---- jobs ------------------------------------------------------------------------------------


async def test_job_on_the_direct_subject_succeeds_and_writes_the_result(settings, redis, bus):
    worker, calls = echo_worker(settings)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        request = await submit(redis, bus, worker.direct_subject, {"prompt": "hi"})
        job_id = request.job_request.job_id
        packet, result = await results.result(job_id)

        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert result.result_ptr == f"redis://res:{job_id}"
        assert result.worker_id == packet.sender_id == worker.worker_id
        assert result.execution_ms >= 0
        assert packet.trace_id == request.trace_id and packet.protocol_version == 1
        assert packet.created_at.seconds > 0
        assert json.loads(await redis.get(f"res:{job_id}")) == {
            "echo": {"prompt": "hi"}, "worker_id": worker.worker_id, "topic": "job.default"}
        assert 86000 < await redis.ttl(f"res:{job_id}") <= 86400
        assert calls == [job_id]

        # Acked after the result: nothing left pending on the worker's durable.
        durable = subjects.durable_name(worker.direct_subject, worker.direct_subject)

        async def pending() -> tuple[int, int]:
            info = await bus._js.consumer_info(subjects.STREAM_JOBS, durable)
            return info.num_ack_pending, info.num_pending

        with trio.fail_after(5):
            while await aio(pending)() != (0, 0):
                await trio.sleep(0.05)


async def test_job_on_the_pool_topic_succeeds(settings, redis, bus):
    worker, calls = echo_worker(settings, topics=["job.default"])
    assert worker.subjects == [worker.direct_subject, "job.default"]
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        request = await submit(redis, bus, "job.default", {"n": 1})
        _, result = await results.result(request.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert calls == [request.job_request.job_id]


async def test_failing_handler_missing_and_bad_context_give_failed_results(settings, redis, bus):
    worker, calls = echo_worker(settings)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        failing = await submit(redis, bus, worker.direct_subject, {"fail": True, "error": "model exploded"})
        missing = await submit(redis, bus, worker.direct_subject, write_ctx=False)
        garbled = await submit(redis, bus, worker.direct_subject, raw_ctx="{not json")
        huge = await submit(redis, bus, worker.direct_subject, "x" * (2 * 1024 * 1024 + 10))

        _, result = await results.result(failing.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED
        assert result.error_message == "model exploded" and result.error_code == "handler_error"
        assert result.worker_id == worker.worker_id and result.result_ptr == ""

        _, result = await results.result(missing.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED and result.error_message == "context not found"

        _, result = await results.result(garbled.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED and result.error_message.startswith("invalid input")

        _, result = await results.result(huge.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED and "exceeds max size" in result.error_message

        assert calls == [failing.job_request.job_id]  # the handler never saw the bad inputs
        assert await redis.exists(f"res:{failing.job_request.job_id}") == 0
        with trio.fail_after(2):  # counted once the result is out, a moment after we saw it
            while worker.stats.failed < 4:
                await trio.sleep(0.01)
        assert worker.stats.failed == 4


async def test_malformed_and_foreign_packets_do_not_stop_the_worker(settings, redis, bus):
    worker, calls = echo_worker(settings)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        await bus.publish(worker.direct_subject, b"\x00not a bus packet")
        await bus.publish(worker.direct_subject, encode(new_packet(Heartbeat(worker_id="x"), sender_id="x")))
        request = await submit(redis, bus, worker.direct_subject, {"after": "garbage"})
        _, result = await results.result(request.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert worker.stats.malformed == 1 and worker.stats.ignored == 1


async def test_handshake_and_heartbeats_carry_the_workers_identity(settings, redis, bus):
    worker, _ = echo_worker(settings, topics=["job.default"], max_parallel_jobs=3, heartbeat_interval=0.2,
                            labels={"placement.region": "eu"}, capabilities=["echo", "gpu"])
    async with taps(bus, subjects.HANDSHAKE, subjects.HEARTBEAT) as (handshakes, heartbeats):
        async with running(worker):
            packet = await handshakes.wait(lambda p: p.handshake.component_id == worker.worker_id, "handshake")
            hs = packet.handshake
            assert hs.role == COMPONENT_ROLE_WORKER and list(hs.supported_versions) == [1]
            assert list(hs.ready_topics) == ["job.default"] and hs.sdk_version == SDK_VERSION
            assert dict(hs.capabilities) == {"echo": True, "gpu": True}
            assert packet.sender_id == worker.worker_id and packet.trace_id and packet.protocol_version == 1
            assert packet.created_at.seconds > 0

            mine = lambda p: p.heartbeat.worker_id == worker.worker_id  # noqa: E731
            packet = await heartbeats.wait(mine, "first heartbeat", timeout=1)  # immediate
            hb = packet.heartbeat
            assert packet.sender_id == worker.worker_id and packet.trace_id and packet.protocol_version == 1
            assert hb.pool == "default" and hb.max_parallel_jobs == 3 and hb.active_jobs == 0
            assert dict(hb.labels) == {"placement.region": "eu", "cordum.worker.presence": "redis"}
            assert list(hb.capabilities) == ["echo", "gpu"]
            assert hb.type == "default" and 0 <= hb.cpu_load <= 100 and 0 < hb.memory_load < 100

            await submit(redis, bus, worker.direct_subject, {"sleep": 1})
            await heartbeats.wait(lambda p: mine(p) and p.heartbeat.active_jobs == 1, "a busy heartbeat")
            assert sum(map(mine, heartbeats.packets)) >= 2


async def test_job_cancel_stops_a_running_handler_with_a_cancelled_result(settings, redis, bus):
    worker = Worker(unique("w"), settings=settings)
    seen: dict[str, object] = {}

    @worker.handler()
    async def slow(job: JobContext) -> str:
        await job.progress(10, "started")
        try:
            await trio.sleep(30)
        finally:
            seen["cancelled"] = job.cancelled.is_set()
            seen["reason"] = job.cancel_reason
        return "never"

    async with taps(bus, subjects.RESULT, subjects.PROGRESS) as (results, progress), running(worker):
        request = await submit(redis, bus, worker.direct_subject, {})
        job_id = request.job_request.job_id
        packet = await progress.wait(lambda p: p.job_progress.job_id == job_id, "progress")
        assert packet.job_progress.percent == 10 and packet.job_progress.message == "started"
        assert packet.trace_id == request.trace_id and packet.sender_id == worker.worker_id

        cancel = new_packet(JobCancel(job_id=job_id, reason="user asked", requested_by="tester"),
                            sender_id="api-gateway", trace_id=job_id)
        await bus.publish(subjects.CANCEL, encode(cancel))
        _, result = await results.result(job_id, timeout=5)
        assert result.status == job_pb2.JOB_STATUS_CANCELLED and "user asked" in result.error_message
        assert result.worker_id == worker.worker_id
        assert seen == {"cancelled": True, "reason": "user asked"}
        with trio.fail_after(2):  # the stream's publish ack may come after our copy of the result
            while worker.active_jobs:
                await trio.sleep(0.01)
        assert worker.stats.cancelled == 1


async def test_a_duplicate_delivery_runs_the_handler_once(settings, redis, bus):
    worker, calls = echo_worker(settings)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        # Redelivered after it finished: the cached result is published again.
        request = await submit(redis, bus, worker.direct_subject, {"n": 1})
        job_id = request.job_request.job_id
        await results.result(job_id)
        await bus.publish(worker.direct_subject, encode(request))
        await results.wait(lambda p: len(results.results(job_id)) >= 2, "the re-published result")
        first, second = results.results(job_id)
        assert first == second and first.status == job_pb2.JOB_STATUS_SUCCEEDED

        # Delivered twice while it runs: both messages settle with the one run.
        request = await submit(redis, bus, worker.direct_subject, {"sleep": 0.5})
        running_id = request.job_request.job_id
        await bus.publish(worker.direct_subject, encode(request))
        await results.result(running_id)
        await trio.sleep(0.3)
        assert calls == [job_id, running_id]
        assert worker.stats.duplicates == 2 and worker.stats.handler_runs == 2


def _track_concurrency(worker: Worker, seconds: float) -> dict[str, int]:
    """A handler that takes `seconds` and echoes its input; the returned counts say how many ran at
    once (`running` now, `peak` at most)."""
    now = {"running": 0, "peak": 0}

    @worker.handler()
    async def tracked(job: JobContext) -> int:
        now["running"] += 1
        now["peak"] = max(now["peak"], now["running"])
        await trio.sleep(seconds)
        now["running"] -= 1
        return job.input

    return now


async def test_max_parallel_jobs_bounds_concurrent_handlers(settings, redis, bus):
    worker = Worker(unique("w"), settings=settings, max_parallel_jobs=2)
    now = _track_concurrency(worker, 0.2)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        ids = [(await submit(redis, bus, worker.direct_subject, i)).job_request.job_id for i in range(6)]
        for job_id in ids:
            _, result = await results.result(job_id)
            assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert now["peak"] == 2
        assert [json.loads(await redis.get(f"res:{job_id}")) for job_id in ids] == list(range(6))


async def test_a_full_worker_leaves_further_jobs_in_the_stream(settings, redis, bus):
    # Pull requests ask for the free slots only: a job this worker could not start now stays
    # in the stream (another replica may take it) instead of waiting here undelivered-to-others.
    worker = Worker(unique("w"), settings=settings, max_parallel_jobs=2)
    started: list[int] = []
    held = trio.Event()  # the jobs run until the check is made, however slow the machine

    @worker.handler()
    async def slow(job: JobContext) -> int:
        started.append(job.input)
        await held.wait()
        return job.input

    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        ids = [(await submit(redis, bus, worker.direct_subject, i)).job_request.job_id for i in range(6)]
        with trio.fail_after(10):
            while len(started) < 2:
                await trio.sleep(0.02)
        await trio.sleep(0.3)  # time for a further pull, were one made
        pending, delivered = await bus.consumer_backlog(worker.direct_subject, worker.direct_subject)
        assert (len(started), delivered, pending) == (2, 2, 4)
        held.set()
        for job_id in ids:
            _, result = await results.result(job_id)
            assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert sorted(started) == list(range(6))


@pytest.mark.parametrize("slots", [1, 2])
async def test_an_idle_topic_holds_no_slot_from_the_direct_subject(settings, redis, bus, slots):
    # Two subjects (direct + topic) share the slots: the topic's open pull request, idle, must
    # not keep the direct subject's jobs from starting (every slot busy, no job left waiting).
    worker = Worker(unique("w"), "default", ["job.default"], settings=settings, max_parallel_jobs=slots)
    now = _track_concurrency(worker, 0.5)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        await trio.sleep(2.5)  # the topic's first (idle) pull request expires and is renewed
        ids = [(await submit(redis, bus, worker.direct_subject, i)).job_request.job_id for i in range(3 * slots)]
        with trio.fail_after(20):
            for job_id in ids:
                _, result = await results.result(job_id)
                assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert now["peak"] == slots


async def test_drain_finishes_short_jobs_and_gives_back_long_ones(settings, redis, bus):
    worker_id = unique("w")
    first = Worker(worker_id, settings=settings)
    started: set[str] = set()

    @first.handler()
    async def stuck(job: JobContext) -> str:
        started.add(job.input)
        await trio.sleep(30 if job.input == "long" else 0.3)
        return "first"

    second = Worker(worker_id, settings=settings)

    @second.handler()
    async def quick(job: JobContext) -> dict:
        return {"by": "second", "attempt": job.attempt}

    async with taps(bus, subjects.RESULT) as (results,):
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            long_job = await submit(redis, bus, first.direct_subject, "long")
            short_job = await submit(redis, bus, first.direct_subject, "short")
            with trio.fail_after(5):
                while started != {"long", "short"}:
                    await trio.sleep(0.01)
            with trio.fail_after(5):
                await first.drain(timeout=1.0)  # serve() returns: the nursery ends
        _, result = await results.result(short_job.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert results.results(long_job.job_request.job_id) == []
        assert first.stats.given_back == 1

        # The given-back job goes to the next worker on the same subject, at once.
        async with running(second):
            _, result = await results.result(long_job.job_request.job_id, timeout=5)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert json.loads(await redis.get(f"res:{long_job.job_request.job_id}")) == {"by": "second", "attempt": 2}


# ---- the echo worker process -------------------------------------------------------------------


async def test_echo_worker_process_finishes_its_job_and_exits_0_on_sigterm(spawn, redis, bus):
    worker_id = unique("echo")
    async with taps(bus, subjects.HANDSHAKE, subjects.RESULT, subjects.PROGRESS) as (handshakes, results, progress):
        proc = spawn(worker_id, ["-m", "cordum.worker.echo"], env={"WORKER_ID": worker_id, "WORKER_MAX_PARALLEL": "2"})
        packet = await handshakes.wait(lambda p: p.handshake.component_id == worker_id, "the echo handshake", 15)
        assert list(packet.handshake.ready_topics) == ["job.default"]

        quick = await submit(redis, bus, subjects.worker_subject(worker_id), {"hello": "world"})
        _, result = await results.result(quick.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        assert json.loads(await redis.get(f"res:{quick.job_request.job_id}")) == {
            "echo": {"hello": "world"}, "worker_id": worker_id}

        failing = await submit(redis, bus, subjects.worker_subject(worker_id), {"fail": True})
        _, result = await results.result(failing.job_request.job_id)
        assert result.status == job_pb2.JOB_STATUS_FAILED and result.error_message == "echo: failing as asked"

        slow = await submit(redis, bus, subjects.worker_subject(worker_id), {"sleep_ms": 1200})
        job_id = slow.job_request.job_id
        await progress.wait(lambda p: p.job_progress.job_id == job_id and p.job_progress.percent == 50, "50%")
        proc.signal(signal.SIGTERM)  # mid-job: it finishes the job, then exits
        _, result = await results.result(job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED

        code = await trio.to_thread.run_sync(proc.wait, 15)
        assert code == 0, proc.lines("err")[-20:]
    observed = [(e["event"], e["stage"]) for e in proc.events() if e["event"] in ("stage.begin", "stage.end")]
    assert observed == [(kind, stage) for stage in WORKER_STAGES for kind in ("stage.begin", "stage.end")]


async def test_a_job_longer_than_the_ack_wait_is_kept_alive_not_redelivered(server_env, redis, bus):
    from cordum.infra.config import load_settings

    # A durable whose ack wait (1 s) is a third of the job: without the in-progress word every
    # half interval, JetStream would redeliver it twice while it runs.
    settings = load_settings({**server_env, "NATS_JS_ACK_WAIT": "1s", "CORDUM_INSTANCE_ID": unique("keep")})
    worker, calls = echo_worker(settings, in_progress_interval=0.5)
    async with taps(bus, subjects.RESULT) as (results,), running(worker):
        request = await submit(redis, bus, worker.direct_subject, {"sleep": 3.0})
        job_id = request.job_request.job_id
        _, result = await results.result(job_id)
        assert result.status == job_pb2.JOB_STATUS_SUCCEEDED
        await trio.sleep(1.5)  # a redelivery would arrive within the next ack wait
        assert calls == [job_id]
        assert worker.stats.duplicates == 0 and len(results.results(job_id)) == 1
