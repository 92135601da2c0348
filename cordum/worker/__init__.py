"""The worker SDK: run CAP jobs dispatched by the scheduler, on Trio.

    from cordum.worker import JobContext, Worker

    worker = Worker("summarizer-1", "default", ["job.default"], max_parallel_jobs=4)

    @worker.handler("job.default")
    async def summarize(job: JobContext) -> dict:
        await job.progress(50, "halfway")
        return {"summary": job.input["prompt"][:100]}

    run_with_bridge(worker.run)  # from cordum.infra.aio; or, as a process with graceful shutdown: run_worker(build)

With CONTEXT_ENGINE_ADDR set, a handler builds its model window and records the answer in the
job's memory: `await job.build_window()`, `await job.record_answer(text)` (cordum/worker/context.py).
"""

from cordum.worker.context import ContextEngineNotConfigured, ContextWindow
from cordum.worker.core import JobFailed
from cordum.worker.worker import (
    SDK_VERSION,
    WORKER_STAGES,
    Handler,
    JobContext,
    Worker,
    WorkerStats,
    run_worker,
    serve_worker,
)

__all__ = [
    "ContextEngineNotConfigured",
    "ContextWindow",
    "SDK_VERSION",
    "WORKER_STAGES",
    "Handler",
    "JobContext",
    "JobFailed",
    "Worker",
    "WorkerStats",
    "run_worker",
    "serve_worker",
]
