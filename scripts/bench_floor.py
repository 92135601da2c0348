"""The floor of the job path: what the guide's messages alone cost on this stack (issue 11).

`scripts/bench` runs these four processes (R of each, for each replica count R of the run; not
with `--no-floor`) side by side with ours and the peers. Per job they do only what any
implementation of the scaling guide must do on the fixed stack (hypercorn's Trio worker, redis-py,
nats-py, Trio in guest mode on uvloop, the same `Bus` and `Redis` wrappers as the services) and
nothing else: no policy check, no validation, no audit, no metrics, no logs.

- gateway: `POST /api/v1/jobs` from a bare ASGI app: one Redis write (the job's hash), one
  JetStream publish on `sys.job.submit` (returns once the stream stored it), 202 `{"job_id"}`;
- scheduler: `sys.job.submit` (queue cordum-scheduler): one Redis write (dispatched), one JetStream
  publish on `worker.<id>.jobs`, ack; `sys.job.result`: one Redis round trip (finished, and its end
  time for the driver), ack;
- worker: `worker.floor.jobs`: one Redis write (its result), one publish on `sys.job.result`, ack;
- workflow engine: `sys.job.result` (queue cordum-workflow-engine), acked unread.

So its CPU per job is a lower bound for ours: what is left to take out of a governed job without
leaving the stack or the guide's subjects.

FLOOR_WITH (`scripts/bench --floor-with`) puts pieces of ours back in, to measure what each costs:
- `store`: our JobStore instead of the bare writes: the job created PENDING with its request
  snapshot, then DISPATCHED before the dispatch's publish, RUNNING after it, SUCCEEDED on the
  result, each with the spec's state key, indexes and event list (jobpath §2.4);
- `lock` (with `store`): the scheduler holds the job's lock from the submit's first read to the
  RUNNING write (released in its round trip), and fences its writes with it;
- `packets`: BusPackets (protobuf) on the bus instead of bare job ids.

    python scripts/bench_floor.py gateway|scheduler|worker|engine   (env REDIS_URL, NATS_URL, FLOOR_PORT, FLOOR_WITH)
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from cordum.agent.v1.job_pb2 import JobRequest, JobResult, JobStatus  # noqa: E402
from cordum.infra.aio import run_with_bridge  # noqa: E402
from cordum.infra.bus import Bus, Message, open_bus  # noqa: E402
from cordum.infra.config import load_settings  # noqa: E402
from cordum.infra.http import HttpServer, answer_lifespan  # noqa: E402
from cordum.infra.redis import Redis, open_redis  # noqa: E402
from cordum.protocol import subjects  # noqa: E402
from cordum.protocol.packets import decode, encode, job_id_of, new_packet  # noqa: E402
from cordum.runtime.lease import Lease, Leases  # noqa: E402
from cordum.store import keys  # noqa: E402
from cordum.store.jobs import InvalidTransition, JobStore  # noqa: E402
from cordum.store.jobstate import JobState  # noqa: E402

DONE = "floor:done"  # job id -> end time (s): what the driver reads
READY = "floor:ready"  # the consumers that exist; jobs are sent once all are (CONSUMERS per replica)
CONSUMERS = 4
WORKER = subjects.worker_subject("floor")
PARTS = ("store", "lock", "packets")
TENANT, TOPIC = "default", "job.default"


def parse_parts(raw: str) -> frozenset[str]:
    """FLOOR_WITH's comma-separated parts of ours to put back in."""
    parts = frozenset(p.strip() for p in raw.split(",") if p.strip())
    unknown = sorted(parts - set(PARTS))
    if unknown:
        raise ValueError(f"FLOOR_WITH: unknown part(s) {', '.join(unknown)} (known: {', '.join(PARTS)})")
    if "lock" in parts and "store" not in parts:
        raise ValueError("FLOOR_WITH: 'lock' needs 'store' (the lock fences the store's writes)")
    return parts


def job_key(job_id: str) -> str:
    return f"floor:job:{job_id}"


class Floor:
    """One role's connections and the parts of ours it runs with."""

    def __init__(self, redis: Redis, bus: Bus, parts: frozenset[str]) -> None:
        self.redis, self.bus, self.parts = redis, bus, parts
        self.store = JobStore(redis) if "store" in parts else None
        self.leases = Leases(redis, f"floor-{os.getpid()}") if "lock" in parts else None

    def job_id(self, data: bytes) -> str:
        return (job_id_of(decode(data)) or "") if "packets" in self.parts else data.decode()

    async def submit(self, body: bytes) -> str:
        job_id = uuid.uuid4().hex
        request = JobRequest(job_id=job_id, topic=TOPIC, tenant_id=TENANT)
        if self.store is not None:
            await self.store.create(job_id, JobState.PENDING, request=request,
                                    fields={"tenant": TENANT, "topic": TOPIC, "trace_id": job_id})
        else:
            await self.redis.execute("HSET", job_key(job_id), "state", "PENDING", "request", body)
        data = encode(new_packet(request, sender_id="floor-gateway", trace_id=job_id)) \
            if "packets" in self.parts else job_id.encode()
        await self.bus.publish(subjects.SUBMIT, data, msg_id=f"submit:{job_id}")
        return job_id

    async def on_submit(self, msg: Message) -> None:
        packet = decode(msg.data) if "packets" in self.parts else None
        job_id = (job_id_of(packet) or "") if packet is not None else msg.data.decode()
        lease: Lease | None = None
        if self.leases is not None:  # the lock, with the job's record read in its round trip
            granted = self.leases.try_acquire_later(keys.job_lock(job_id), 30)
            read = self.redis.execute_later("HGETALL", keys.job_meta(job_id))
            lease = await granted()
            await read()
            if lease is None:
                await msg.nak(0.05)
                return
        fence = lease.fence if lease is not None else 0
        if packet is not None:
            data = encode(new_packet(packet.job_request, sender_id="floor-scheduler", trace_id=job_id))
        else:
            data = msg.data
        if self.store is not None:
            await self.store.transition(job_id, JobState.DISPATCHED, fence=fence, tenant=TENANT)
        else:
            await self.redis.execute("HSET", job_key(job_id), "state", "DISPATCHED")
        await self.bus.publish(WORKER, data, msg_id=f"dispatch:{job_id}")
        if self.store is not None:
            release = (lambda: self.leases.release_later(lease)) if lease is not None else None  # type: ignore[union-attr]
            try:
                await self.store.transition(job_id, JobState.RUNNING, fence=fence, tenant=TENANT,
                                            allowed_from=[JobState.DISPATCHED], along=release)
            except InvalidTransition:
                pass  # the worker's result was faster
        await msg.ack()

    async def on_result(self, msg: Message) -> None:
        job_id = self.job_id(msg.data)
        if self.store is not None:  # the end time in the transition's script: one round trip, as bare
            await self.store.transition(job_id, JobState.SUCCEEDED, tenant=TENANT,
                                        after=[("ZADD", DONE, time.time(), job_id)])
        else:
            state = self.redis.execute_later("HSET", job_key(job_id), "state", "SUCCEEDED")
            ended = self.redis.execute_later("ZADD", DONE, time.time(), job_id)
            await state()
            await ended()
        await msg.ack()

    async def on_job(self, msg: Message) -> None:
        job_id = self.job_id(msg.data)
        await self.redis.execute("HSET", job_key(job_id), "result", "{}")
        if "packets" in self.parts:
            result = JobResult(job_id=job_id, status=JobStatus.JOB_STATUS_SUCCEEDED, worker_id="floor")
            data = encode(new_packet(result, sender_id="floor-worker", trace_id=job_id))
        else:
            data = msg.data
        await self.bus.publish(subjects.RESULT, data, msg_id=f"result:{job_id}")
        await msg.ack()


async def consume(floor: Floor, subject: str, queue: str, handle: Callable[[Message], Awaitable[None]] | None) -> None:
    """A task per message, at most 64 at a time, as the services' consumers; `handle=None`: every
    message is acked unread on the asyncio side (the workflow engine's `skip`). Once its durable
    consumer exists (it takes new messages only), it adds itself to READY."""
    limiter = trio.CapacityLimiter(64)

    async def one(msg: Message) -> None:
        try:
            await handle(msg)  # type: ignore[misc]
        finally:
            limiter.release_on_behalf_of(msg)

    skip = (lambda data: True) if handle is None else None
    async with trio.open_nursery() as handlers:
        async with floor.bus.consume(subject, queue, skip=skip) as messages:
            await floor.redis.execute("SADD", READY, f"{queue}:{subject}:{os.getpid()}")
            async for msg in messages:
                await limiter.acquire_on_behalf_of(msg)
                handlers.start_soon(one, msg)


def asgi_submit(floor: Floor) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        data = json.dumps({"job_id": await floor.submit(body)}).encode()
        await send({"type": "http.response.start", "status": 202,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


async def main(role: str, parts: frozenset[str]) -> None:
    settings = load_settings(os.environ)
    async with open_redis(settings) as redis, open_bus(settings, name=f"floor-{role}") as bus:
        floor = Floor(redis, bus, parts)
        if floor.leases is not None:  # loads the lock's scripts (the `_later` calls cannot)
            warm = await floor.leases.try_acquire(f"floor:warm:{os.getpid()}", 5)
            if warm is not None:
                await floor.leases.release(warm)
        if role == "gateway":
            await HttpServer(asgi_submit(floor), "127.0.0.1", int(os.environ["FLOOR_PORT"])).serve()
            return
        async with trio.open_nursery() as nursery:
            if role == "scheduler":
                nursery.start_soon(consume, floor, subjects.SUBMIT, "cordum-scheduler", floor.on_submit)
                nursery.start_soon(consume, floor, subjects.RESULT, "cordum-scheduler", floor.on_result)
            elif role == "worker":
                nursery.start_soon(consume, floor, WORKER, "floor-worker", floor.on_job)
            elif role == "engine":
                nursery.start_soon(consume, floor, subjects.RESULT, "cordum-workflow-engine", None)


if __name__ == "__main__":
    role = sys.argv[1] if len(sys.argv) > 1 else ""
    if role not in ("gateway", "scheduler", "worker", "engine"):
        sys.exit(f"usage: bench_floor.py gateway|scheduler|worker|engine (not {role!r})")
    try:
        chosen = parse_parts(os.environ.get("FLOOR_WITH", ""))
    except ValueError as exc:
        sys.exit(str(exc))
    run_with_bridge(main, role, chosen)
