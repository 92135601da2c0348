"""A worker process whose handler answers with the context engine's help (the worker SDK's
`build_window` / `record_answer`): `python -m tests.procs.chat_worker`.

env: WORKER_ID, WORKER_HEARTBEAT_INTERVAL (5s), CONTEXT_ENGINE_ADDR. Each job's answer is
`reply #<messages in its window>: <its own message>`; the result holds the answer and the window.
"""

from __future__ import annotations

from typing import Any

from cordum.infra.config import Settings, env_value, parse_positive_duration
from cordum.worker import JobContext, Worker, run_worker
from cordum.worker.worker import parse_worker_id


def build(settings: Settings) -> Worker:
    worker = Worker(env_value(settings, "WORKER_ID", "chat-1", parse_worker_id), "default", ["job.default"],
                    settings=settings,
                    heartbeat_interval=env_value(settings, "WORKER_HEARTBEAT_INTERVAL", "5s", parse_positive_duration))

    @worker.handler("job.default")
    async def chat(job: JobContext) -> dict[str, Any]:
        window = await job.build_window()
        answer = f"reply #{len(window.messages)}: {window.messages[-1]['content']}"
        await job.record_answer(answer)
        return {"answer": answer, "window": window.messages}

    return worker


if __name__ == "__main__":
    run_worker(build, name="chat-worker")
