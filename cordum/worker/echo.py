"""The example worker: echoes its input. `python -m cordum.worker.echo`

env: WORKER_ID (default `echo-<instance id>`), WORKER_POOL (`default`), WORKER_TOPICS
(comma-separated, `job.default`), WORKER_MAX_PARALLEL (4), WORKER_HEARTBEAT_INTERVAL (5s),
ECHO_EXECUTIONS_KEY (unset: no counting; below).

Input fields it understands (for tests and demos), at the top of the input or inside its
`context` object (where a gateway submit puts the caller's context):

- `sleep_ms` — sleep that long first, reporting 50% progress halfway;
- `fail_attempts: N` — fail retryably (status FAILED_RETRYABLE, error code `retryable`) while the
  scheduler's dispatch attempt (`JobContext.attempt`, 1 for the first run) is at most N, so the job
  succeeds on attempt N+1 if the scheduler retries it;
- `fail: true` — fail for good (status FAILED; message from `error`, if given).

Counting executions (issue 8: "exactly once" is counted where the work happens, never from results
on the bus, which JetStream de-duplicates by message id). With ECHO_EXECUTIONS_KEY=<key> set:

- every handler start does `HINCRBY <key>:starts <job_id> 1` (informational: a run killed or given
  back half-way counts a start, not an execution; if Redis refuses it, the run goes on);
- every handler run that completes successfully does `HINCRBY <key> <job_id> 1` right before it
  returns: that increment is "the work". A job executed exactly once has 1 there; a job that
  failed (permanently, or on its retryable attempts) adds nothing for those runs.

If Redis refuses the execution's increment (say, while it restarts) the run fails retryably, so the
scheduler can run it again; a reply lost after Redis applied the increment would then count twice,
which `scripts/chaos` reports as a duplicate (in practice only a Redis killed mid-command does that).
`read_executions` reads the counts back (the HA gate, `scripts/chaos`, the HA tests).
"""

from __future__ import annotations

from typing import Any, Iterable

import trio

from cordum.agent.v1.job_pb2 import JOB_STATUS_FAILED_RETRYABLE
from cordum.infra.config import Settings, env_value, parse_positive_duration, parse_positive_int
from cordum.infra.redis import Redis
from cordum.runtime.log import get_logger
from cordum.worker.core import JobFailed
from cordum.worker.worker import (
    IO_TIMEOUT,
    JobContext,
    Worker,
    parse_topics,
    parse_worker_id,
    run_worker,
    sanitize_id,
)

log = get_logger("echo")


def starts_key(executions_key: str) -> str:
    """The hash counting handler starts next to the executions hash `executions_key`."""
    return f"{executions_key}:starts"


async def read_executions(redis: Redis, key: str, job_ids: Iterable[str]) -> dict[str, int]:
    """The counts in the executions hash `key` for `job_ids` (0 for a job never executed)."""
    ids = list(dict.fromkeys(job_ids))
    counts: dict[str, int] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        values = await redis.execute("HMGET", key, *chunk)
        counts.update({job_id: int(value or 0) for job_id, value in zip(chunk, values)})
    return counts


async def _count(job: JobContext, key: str, *, required: bool) -> None:
    try:
        with trio.fail_after(IO_TIMEOUT):
            await job.redis.execute("HINCRBY", key, job.job_id, 1)
    except (Exception, trio.TooSlowError) as exc:
        if required:
            raise JobFailed(f"echo: could not count the run in {key}: {exc!r}", code="retryable",
                            status=JOB_STATUS_FAILED_RETRYABLE) from None
        log.warning("echo.count_failed", job_id=job.job_id, key=key, error=repr(exc))


def build(settings: Settings) -> Worker:
    worker_id = env_value(settings, "WORKER_ID", "echo-" + sanitize_id(settings.instance_id), parse_worker_id)
    pool = env_value(settings, "WORKER_POOL", "default", str.strip)
    topics = env_value(settings, "WORKER_TOPICS", "job.default", parse_topics)
    max_parallel = env_value(settings, "WORKER_MAX_PARALLEL", "4", parse_positive_int)
    interval = env_value(settings, "WORKER_HEARTBEAT_INTERVAL", "5s", parse_positive_duration)
    executions_key = env_value(settings, "ECHO_EXECUTIONS_KEY", "", str.strip)
    worker = Worker(worker_id, pool or "default", topics, max_parallel_jobs=max_parallel, settings=settings,
                    heartbeat_interval=interval, worker_type="echo", capabilities=["echo"])

    @worker.handler()
    async def echo(job: JobContext) -> dict[str, Any]:
        if executions_key:
            await _count(job, starts_key(executions_key), required=False)
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
            fail_attempts = options.get("fail_attempts")
            if isinstance(fail_attempts, int) and not isinstance(fail_attempts, bool) and job.attempt <= fail_attempts:
                raise JobFailed(f"echo: failing attempt {job.attempt} of {fail_attempts} as asked", code="retryable",
                                status=JOB_STATUS_FAILED_RETRYABLE)
            if options.get("fail") is True:
                raise RuntimeError(str(options.get("error") or "echo: failing as asked"))
        if executions_key:
            await _count(job, executions_key, required=True)  # the work: counted once per successful run
        return {"echo": data, "worker_id": worker.worker_id}

    return worker


def main() -> None:
    run_worker(build, name="cordum-worker-echo")


if __name__ == "__main__":
    main()
