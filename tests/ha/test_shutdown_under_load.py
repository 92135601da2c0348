"""Replicas stopped and restarted while jobs flow: each stops in its documented order within the
deadline, and every job still ends SUCCEEDED, executed exactly once."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import trio

from cordum.gateway.service import STAGES as GATEWAY_STAGES
from cordum.protocol.packets import decode
from cordum.safety.service import STAGES as KERNEL_STAGES
from cordum.scheduler.service import STAGES as SCHEDULER_STAGES
from cordum.store.jobs import JobStore
from tests.conftest import unique
from tests.integration.stack import Stack, nats_server, redis_server, wait_state  # noqa: F401

API_KEY = "ha-test-admin-key-0123456789abcdef"
STAGES = {"gateway": GATEWAY_STAGES, "scheduler": SCHEDULER_STAGES, "kernel": KERNEL_STAGES}


def _submit(port: int, prompt: str) -> str | None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/jobs", method="POST",
        data=json.dumps({"prompt": prompt, "context": {"sleep_ms": 50}}).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())["job_id"]
    except (urllib.error.URLError, OSError, ValueError):
        return None


async def _topology(spawn, tmp_path):
    from cordum.dev.servers import free_port

    kernels = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    stack = Stack.create(spawn, tmp_path, CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev",
                         SAFETY_KERNEL_ADDR=",".join(kernels), CORDUM_SHUTDOWN_TIMEOUT="15s",
                         # Room for a loaded machine, still far below the 30 s ack wait: a result
                         # stranded on a departing replica would still time its job out.
                         SCHEDULER_RUNNING_TIMEOUT="10s", SCHEDULER_DISPATCH_TIMEOUT="10s")
    for n, addr in enumerate(kernels, 1):
        stack.kernel(f"kernel-{n}", SAFETY_KERNEL_ADDR=addr)
    for n in (1, 2):
        stack.scheduler(f"scheduler-{n}")
        stack.start(f"gateway-{n}", "cordum.gateway.service")
        stack.worker(f"worker-{n}", WORKER_MAX_PARALLEL="16")
    await stack.ready()
    await trio.sleep(1.0)
    return stack


class Load:
    """Submits jobs round-robin over the live gateways (as a load balancer would), counts results."""

    def __init__(self, stack: Stack, bus) -> None:
        self.stack = stack
        self.bus = bus
        self.jobs: list[str] = []
        self.results: dict[str, int] = {}
        self.running = True

    async def produce(self, every: float = 0.05) -> None:
        n = 0
        while self.running:
            gateways = [name for name in ("gateway-1", "gateway-2") if self.stack.procs[name].popen.poll() is None]
            for attempt in range(len(gateways)):
                port = self.stack.http_ports[gateways[(n + attempt) % len(gateways)]]
                job_id = await trio.to_thread.run_sync(_submit, port, f"job {n}")
                if job_id:
                    self.jobs.append(job_id)
                    break
            n += 1
            await trio.sleep(every)

    async def watch(self, messages) -> None:
        async for msg in messages:
            job_id = decode(msg.data).job_result.job_id
            self.results[job_id] = self.results.get(job_id, 0) + 1
            await msg.ack()


async def _stop(stack: Stack, name: str, kind: str) -> None:
    proc = stack.procs[name]
    proc.signal(signal.SIGTERM)
    started = trio.current_time()
    code = await trio.to_thread.run_sync(proc.wait, 20)
    assert code == 0, (name, proc.lines("err")[-10:])
    assert trio.current_time() - started < 15, name
    observed = [(e["event"], e["stage"]) for e in proc.events() if e["event"] in ("stage.begin", "stage.end")]
    assert observed[-2 * len(STAGES[kind]):] == [(k, s) for s in STAGES[kind] for k in ("stage.begin", "stage.end")], name


async def _finish(load: Load, store: JobStore) -> None:
    load.running = False
    for job_id in load.jobs:
        await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)
    await trio.sleep(1.0)  # a duplicate execution would have published a second result by now
    assert load.jobs and all(load.results.get(j) == 1 for j in load.jobs), \
        {j: load.results.get(j) for j in load.jobs if load.results.get(j) != 1}


async def test_sigterm_one_replica_of_each_service_while_jobs_run(spawn, tmp_path, redis, bus):
    stack = await _topology(spawn, tmp_path)
    store = JobStore(redis)
    load = Load(stack, bus)
    async with bus.consume("sys.job.result", unique("results")) as results, trio.open_nursery() as nursery:
        nursery.start_soon(load.watch, results)
        nursery.start_soon(load.produce)
        await trio.sleep(1.0)
        await _stop(stack, "scheduler-1", "scheduler")
        await trio.sleep(1.0)
        await _stop(stack, "gateway-1", "gateway")
        await trio.sleep(1.0)
        await _stop(stack, "kernel-1", "kernel")
        await trio.sleep(1.5)
        await _finish(load, store)
        nursery.cancel_scope.cancel()
    assert len(load.jobs) > 40


async def test_rolling_restart_of_every_replica_loses_and_duplicates_nothing(spawn, tmp_path, redis, bus):
    stack = await _topology(spawn, tmp_path)
    store = JobStore(redis)
    load = Load(stack, bus)
    async with bus.consume("sys.job.result", unique("results")) as results, trio.open_nursery() as nursery:
        nursery.start_soon(load.watch, results)
        nursery.start_soon(load.produce)
        for kind in ("kernel", "scheduler", "gateway"):
            for n in (1, 2):
                name = f"{kind}-{n}"
                await _stop(stack, name, kind)
                stack.restart(name)
                await stack.ready(name)
        await trio.sleep(1.0)
        await _finish(load, store)
        nursery.cancel_scope.cancel()
    assert len(load.jobs) > 40
