"""A CAP worker written with the public SDK (cap-sdk-python, unmodified), for interop tests.

Run *only* by the SDK venv's interpreter (tests/interop/sdk_env.py), never imported by our test
process (DESIGN §4.7, §4.10):

    <sdk-venv>/bin/python sdk_worker.py

It uses the SDK's high-level runtime, ``cap.runtime.Agent``, with its defaults: the agent
queue-subscribes to each handler topic (``job.default``, queue ``job.default``), subscribes to its
direct subject ``worker.<worker_id>.jobs``, publishes a Handshake on ``sys.handshake`` and
Heartbeats (``pool``, ``worker_id``, ``max_parallel_jobs``, ``active_jobs``) on
``sys.heartbeat``; per job it reads the JSON context at the Redis key of ``context_ptr``
(``redis://ctx:<job_id>``), runs the handler, writes the JSON output to ``res:<job_id>`` and
publishes a JobResult (``worker_id`` = ``sender_id`` = the worker id) on ``sys.job.result``.

Environment: NATS_URL, REDIS_URL (read by the SDK itself), SDK_WORKER_ID, SDK_WORKER_POOL
(default ``default``), SDK_WORKER_TOPICS (comma-separated, default ``job.default``),
SDK_WORKER_MAX_PARALLEL (default 8), SDK_WORKER_HEARTBEAT (seconds, default 0.5).

Prints one JSON line ``{"event": "sdk_worker.ready", ...}`` on stdout once subscribed, and
``{"event": "sdk_worker.job", "job_id": ...}`` per job handled; stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from importlib import metadata

from cap.runtime import Agent, Context


def _say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def main() -> None:
    worker_id = os.environ.get("SDK_WORKER_ID", "sdk-worker-1")
    pool = os.environ.get("SDK_WORKER_POOL", "default")
    topics = [t for t in os.environ.get("SDK_WORKER_TOPICS", "job.default").split(",") if t]
    agent = Agent(
        worker_id=worker_id,
        pool=pool,
        max_parallel=int(os.environ.get("SDK_WORKER_MAX_PARALLEL", "8")),
        heartbeat_interval=float(os.environ.get("SDK_WORKER_HEARTBEAT", "0.5")),
    )

    async def echo(ctx: Context, data: object) -> dict:
        _say("sdk_worker.job", job_id=ctx.job_id, topic=ctx.job.topic, trace_id=ctx.trace_id,
             sender_id=ctx.packet.sender_id)
        return {"echo": data, "sdk": True, "worker_id": worker_id}

    for topic in topics:
        agent.job(topic)(echo)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    await agent.start()
    try:
        _say("sdk_worker.ready", worker_id=worker_id, pool=pool, topics=topics,
             sdk=metadata.version("cap-sdk-python"), python=sys.executable)
        await stop.wait()
    finally:
        await agent.close()
        _say("sdk_worker.stopped", worker_id=worker_id)


if __name__ == "__main__":
    asyncio.run(main())
