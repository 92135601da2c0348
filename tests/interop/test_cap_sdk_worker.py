"""Our scheduler dispatches to a worker written with the public CAP Python SDK (DESIGN §1).

The SDK worker (sdk_worker.py: ``cap.runtime.Agent``, cap-sdk-python 2.17.0, unmodified) runs in
its own venv and process (DESIGN §4.7, §4.10). Our safety kernel and scheduler run as real
processes; jobs are submitted the way the gateway does. Checked: the SDK's heartbeat makes it
routable, our JobRequest passes its receive-side checks, it reads our context (``ctx:<job_id>``)
and writes ``res:<job_id>``, and its JobResult on ``sys.job.result`` completes our job.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import trio

from cordum.protocol.packets import decode
from cordum.store.jobs import JobStore
from tests.conftest import unique
from tests.integration.stack import Stack, submit_direct, wait_state
from tests.integration.stack import nats_server, redis_server  # noqa: F401  (servers of its own)

pytestmark = pytest.mark.slow

WORKER_SCRIPT = Path(__file__).with_name("sdk_worker.py")


@dataclass
class SdkWorker:
    worker_id: str
    popen: subprocess.Popen
    out: Path
    err: Path

    def events(self) -> list[dict]:
        found = []
        for line in self.out.read_text().splitlines() if self.out.exists() else []:
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def diagnostics(self) -> str:
        err = self.err.read_text()[-3000:] if self.err.exists() else ""
        return f"exit={self.popen.poll()} stdout={self.events()} stderr:\n{err}"


@pytest.fixture
def sdk_worker(sdk_python: Path, server_env: dict[str, str], tmp_path: Path) -> Iterator:
    """``sdk_worker(worker_id, **env)`` starts sdk_worker.py with the SDK venv's python; stopped
    (SIGTERM, then SIGKILL) at the end of the test."""
    started: list[SdkWorker] = []

    def start(worker_id: str, **env: str) -> SdkWorker:
        out, err = tmp_path / f"{worker_id}.out", tmp_path / f"{worker_id}.err"
        full_env = {
            "PATH": "/usr/bin:/bin",  # nothing of ours (PYTHONPATH, venv) leaks in
            "NATS_URL": server_env["NATS_URL"],
            "REDIS_URL": server_env["REDIS_URL"],
            "SDK_WORKER_ID": worker_id,
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        with out.open("w") as fo, err.open("w") as fe:
            popen = subprocess.Popen([str(sdk_python), str(WORKER_SCRIPT)], stdout=fo, stderr=fe,
                                     stdin=subprocess.DEVNULL, env=full_env, cwd=tmp_path)
        worker = SdkWorker(worker_id, popen, out, err)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        if worker.popen.poll() is None:
            worker.popen.send_signal(signal.SIGTERM)
            try:
                worker.popen.wait(10)
            except subprocess.TimeoutExpired:
                worker.popen.kill()
                worker.popen.wait()


async def _wait_for_heartbeats(heartbeats, worker: SdkWorker, count: int = 2, timeout: float = 30):
    """The SDK worker's heartbeats, decoded by *our* codec, until `count` were seen."""
    seen = []
    with trio.move_on_after(timeout):
        while len(seen) < count:
            msg = await heartbeats.receive()
            packet = decode(msg.data)
            if packet.WhichOneof("payload") == "heartbeat" and packet.heartbeat.worker_id == worker.worker_id:
                seen.append(packet)
            assert worker.popen.poll() is None, f"SDK worker died: {worker.diagnostics()}"
        return seen
    raise AssertionError(f"no heartbeat from the SDK worker: {worker.diagnostics()}")


async def test_scheduler_dispatches_to_an_sdk_worker(spawn, tmp_path, redis, bus, sdk_worker):
    stack = Stack.create(spawn, tmp_path)
    stack.kernel()
    stack.scheduler()
    await stack.ready()
    store = JobStore(redis)
    worker_id = unique("sdk-worker")

    async with bus.subscribe("sys.heartbeat") as heartbeats:
        worker = sdk_worker(worker_id)
        (first, *_) = await _wait_for_heartbeats(heartbeats, worker)
    assert first.sender_id == worker_id and first.heartbeat.pool == "default"
    assert any(e["event"] == "sdk_worker.ready" for e in worker.events()), worker.diagnostics()

    contexts = {}
    for n in range(5):
        context = {"prompt": f"hello {n}", "n": n, "nested": {"ünï": ["cødé", n]}}
        job_id = await submit_direct(store, bus, context=context)
        contexts[job_id] = context

    for job_id, context in contexts.items():
        try:
            meta = await wait_state(store, job_id, {"SUCCEEDED"}, timeout=30)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nSDK worker: {worker.diagnostics()}") from None
        assert meta["worker_id"] == worker_id
        assert meta["result_ptr"] == f"redis://res:{job_id}"
        result = json.loads(await redis.get(f"res:{job_id}"))
        assert result == {"echo": context, "sdk": True, "worker_id": worker_id}
        states = [e["state"] for e in await store.events(job_id)]
        assert states == ["PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED"]

    # each job ran exactly once on the SDK worker
    ran = Counter(e["job_id"] for e in worker.events() if e["event"] == "sdk_worker.job")
    assert ran == Counter({job_id: 1 for job_id in contexts}), worker.diagnostics()
    jobs = [e for e in worker.events() if e["event"] == "sdk_worker.job"]
    assert all(e["topic"] == "job.default" and e["trace_id"] == e["job_id"] for e in jobs), jobs
    assert worker.popen.poll() is None, worker.diagnostics()
