"""The example worker: echoes its input. `python -m cordum.worker.echo`

env: WORKER_ID (default `echo-<instance id>`), WORKER_POOL (`default`), WORKER_TOPICS
(comma-separated, `job.default`), WORKER_MAX_PARALLEL (4), WORKER_HEARTBEAT_INTERVAL (5s).

Input fields it understands (for tests and demos), at the top of the input or inside its
`context` object (where a gateway submit puts the caller's context): `sleep_ms` — sleep that long first, reporting
50% progress halfway; `fail: true` — raise (message from `error`, if given).
"""

from __future__ import annotations

from typing import Any

import trio

from cordum.infra.config import Settings, env_value, parse_positive_duration, parse_positive_int
from cordum.worker.worker import (
    JobContext,
    Worker,
    parse_topics,
    parse_worker_id,
    run_worker,
    sanitize_id,
)


def build(settings: Settings) -> Worker:
    worker_id = env_value(settings, "WORKER_ID", "echo-" + sanitize_id(settings.instance_id), parse_worker_id)
    pool = env_value(settings, "WORKER_POOL", "default", str.strip)
    topics = env_value(settings, "WORKER_TOPICS", "job.default", parse_topics)
    max_parallel = env_value(settings, "WORKER_MAX_PARALLEL", "4", parse_positive_int)
    interval = env_value(settings, "WORKER_HEARTBEAT_INTERVAL", "5s", parse_positive_duration)
    worker = Worker(worker_id, pool or "default", topics, max_parallel_jobs=max_parallel, settings=settings,
                    heartbeat_interval=interval, worker_type="echo", capabilities=["echo"])

    @worker.handler()
    async def echo(job: JobContext) -> dict[str, Any]:
        data = job.input
        # Options sit at the top of the input, or in the `context` object of a gateway submit.
        options = data.get("context") if isinstance(data, dict) and isinstance(data.get("context"), dict) else data
        if isinstance(options, dict):
            sleep_ms = options.get("sleep_ms")
            if isinstance(sleep_ms, (int, float)) and sleep_ms > 0:
                half = sleep_ms / 2000.0
                await trio.sleep(half)
                await job.progress(50, "halfway")
                await trio.sleep(half)
            if options.get("fail") is True:
                raise RuntimeError(str(options.get("error") or "echo: failing as asked"))
        return {"echo": data, "worker_id": worker.worker_id}

    return worker


def main() -> None:
    run_worker(build, name="cordum-worker-echo")


if __name__ == "__main__":
    main()
