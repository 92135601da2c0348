"""The step worker of the workflow figure (scripts/bench_workflows.py), our side.

    CORDUM_INSTANCE_ID=bench-worker-1 REDIS_URL=... NATS_URL=... .venv/bin/python scripts/bench_workflow_worker.py

An echo worker on topic `job.default` (returns `{"echo": input, "worker_id": ...}`) that also
records, like the peers' no-op tasks (scripts/bench_workflow_peers.py), when its handler started and
ended: one RPUSH of `<run id> <step path> <start µs> <end µs>` to `bench:wf:steps`, plus an RPUSH
of the run id to the input's `notify` key when the step has one (the last step of a run: the bench
client waiting on that key starts its next run). The echo worker of `cordumctl up` cannot be used:
it records no times, so a step's start and end as the work saw them would be unknown.

env: WORKER_ID (default `bench-<instance id>`), WORKER_MAX_PARALLEL (4), WORKER_HEARTBEAT_INTERVAL (5s).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cordum.infra.config import Settings, env_value, parse_positive_duration, parse_positive_int  # noqa: E402
from cordum.worker.worker import JobContext, Worker, parse_worker_id, run_worker, sanitize_id  # noqa: E402

RECORDS_KEY = "bench:wf:steps"


def step_of(job_id: str) -> tuple[str, str]:
    """(run id, step path) of a workflow step job id `<run>:<path>@<attempt>`."""
    run, _, rest = job_id.partition(":")
    return run, rest.rpartition("@")[0] or rest


def build(settings: Settings) -> Worker:
    worker_id = env_value(settings, "WORKER_ID", "bench-" + sanitize_id(settings.instance_id), parse_worker_id)
    max_parallel = env_value(settings, "WORKER_MAX_PARALLEL", "4", parse_positive_int)
    interval = env_value(settings, "WORKER_HEARTBEAT_INTERVAL", "5s", parse_positive_duration)
    worker = Worker(worker_id, "default", ["job.default"], max_parallel_jobs=max_parallel, settings=settings,
                    heartbeat_interval=interval, worker_type="echo", capabilities=["echo"])

    @worker.handler()
    async def step(job: JobContext) -> dict[str, Any]:
        started = time.time_ns() // 1000
        data = job.input
        ended = time.time_ns() // 1000
        run, path = step_of(job.job_id)
        commands: list[tuple[Any, ...]] = [("RPUSH", RECORDS_KEY, f"{run} {path} {started} {ended}")]
        notify = data.get("notify") if isinstance(data, dict) else None
        if isinstance(notify, str) and notify:
            commands.append(("RPUSH", notify, run))
        await job.redis.pipeline(commands)
        return {"echo": data, "worker_id": worker.worker_id}

    return worker


if __name__ == "__main__":
    run_worker(build, name="cordum-bench-worker")
