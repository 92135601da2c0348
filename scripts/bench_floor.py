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

    python scripts/bench_floor.py gateway|scheduler|worker|engine   (env REDIS_URL, NATS_URL, FLOOR_PORT)
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

from cordum.infra.aio import run_with_bridge  # noqa: E402
from cordum.infra.bus import Bus, Message, open_bus  # noqa: E402
from cordum.infra.config import load_settings  # noqa: E402
from cordum.infra.http import HttpServer  # noqa: E402
from cordum.infra.redis import Redis, open_redis  # noqa: E402
from cordum.protocol import subjects  # noqa: E402

DONE = "floor:done"  # job id -> end time (s): what the driver reads
READY = "floor:ready"  # the consumers that exist; jobs are sent once all are (CONSUMERS per replica)
CONSUMERS = 4
WORKER = subjects.worker_subject("floor")


def job_key(job_id: str) -> str:
    return f"floor:job:{job_id}"


async def consume(bus: Bus, redis: Redis, subject: str, queue: str,
                  handle: Callable[[Message], Awaitable[None]] | None) -> None:
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
        async with bus.consume(subject, queue, skip=skip) as messages:
            await redis.execute("SADD", READY, f"{queue}:{subject}:{os.getpid()}")
            async for msg in messages:
                await limiter.acquire_on_behalf_of(msg)
                handlers.start_soon(one, msg)


def asgi_submit(redis: Redis, bus: Bus) -> Callable[..., Awaitable[None]]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        job_id = uuid.uuid4().hex
        await redis.execute("HSET", job_key(job_id), "state", "PENDING", "request", body)
        await bus.publish(subjects.SUBMIT, job_id.encode(), msg_id=f"submit:{job_id}")
        data = json.dumps({"job_id": job_id}).encode()
        await send({"type": "http.response.start", "status": 202,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    return app


async def main(role: str) -> None:
    settings = load_settings(os.environ)
    async with open_redis(settings) as redis, open_bus(settings, name=f"floor-{role}") as bus:
        if role == "gateway":
            await HttpServer(asgi_submit(redis, bus), "127.0.0.1", int(os.environ["FLOOR_PORT"])).serve()
            return

        async def on_submit(msg: Message) -> None:
            job_id = msg.data.decode()
            await redis.execute("HSET", job_key(job_id), "state", "DISPATCHED")
            await bus.publish(WORKER, msg.data, msg_id=f"dispatch:{job_id}")
            await msg.ack()

        async def on_result(msg: Message) -> None:
            job_id = msg.data.decode()
            state = redis.execute_later("HSET", job_key(job_id), "state", "SUCCEEDED")
            ended = redis.execute_later("ZADD", DONE, time.time(), job_id)
            await state()
            await ended()
            await msg.ack()

        async def on_job(msg: Message) -> None:
            job_id = msg.data.decode()
            await redis.execute("HSET", job_key(job_id), "result", "{}")
            await bus.publish(subjects.RESULT, msg.data, msg_id=f"result:{job_id}")
            await msg.ack()

        async with trio.open_nursery() as nursery:
            if role == "scheduler":
                nursery.start_soon(consume, bus, redis, subjects.SUBMIT, "cordum-scheduler", on_submit)
                nursery.start_soon(consume, bus, redis, subjects.RESULT, "cordum-scheduler", on_result)
            elif role == "worker":
                nursery.start_soon(consume, bus, redis, WORKER, "floor-worker", on_job)
            elif role == "engine":
                nursery.start_soon(consume, bus, redis, subjects.RESULT, "cordum-workflow-engine", None)
            else:
                raise SystemExit(f"unknown role {role!r}: gateway, scheduler, worker or engine")


if __name__ == "__main__":
    run_with_bridge(main, sys.argv[1] if len(sys.argv) > 1 else "")
