"""Start the job path as real processes for a test: safety kernel, schedulers, workers, gateways."""

from __future__ import annotations

import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from cordum.agent.v1.job_pb2 import JobRequest
from cordum.dev.servers import free_port, start_nats, start_redis
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.store.jobs import JobStore
from cordum.store.jobstate import JobState
from tests.integration.test_multiprocess import _wait_for

# Process-level tests get servers of their own: shared JetStream durables (the scheduler's queue
# group, a worker id reused by the next test) would otherwise carry one test's unfinished
# messages into the next. Import these two fixtures into such a module to override the session's.
@pytest.fixture
def redis_server(tmp_path):
    server = start_redis(tmp_path / "redis-own")
    yield server
    server.stop()


@pytest.fixture
def nats_server(tmp_path):
    server = start_nats(tmp_path / "nats-own")
    yield server
    server.stop()


POLICY = """
version: test
rules:
  - id: allow-default
    match: {topics: ["job.default", "job.default.*"]}
    decision: allow
  - id: needs-human
    match: {topics: ["job.approve"]}
    decision: require_approval
  - id: no-danger
    match: {topics: ["job.danger"]}
    decision: deny
    reason: dangerous work is not allowed
"""

POOLS = """
topics:
  job.default: default
  job.approve: default
  job.danger: default
pools:
  default: {requires: []}
"""

EXECUTIONS_KEY = "test:echo:executions"  # ECHO_EXECUTIONS_KEY of the workers `Stack.worker` starts

FAST = {
    "SCHEDULER_SCAN_INTERVAL": "0.5s",
    "SCHEDULER_PENDING_AGE": "3s",
    "SCHEDULER_DISPATCH_TIMEOUT": "5s",
    "SCHEDULER_RUNNING_TIMEOUT": "3s",
    "WORKER_SNAPSHOT_INTERVAL": "0.5s",
    "WORKER_HEARTBEAT_INTERVAL": "0.5s",
    "CORDUM_SHUTDOWN_TIMEOUT": "10s",
    # tests drive far more than the default 30 requests/s through one tenant
    "API_RATE_LIMIT_RPS": "100000",
    "API_RATE_LIMIT_BURST": "100000",
}


@dataclass
class Stack:
    spawn: object
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, object] = field(default_factory=dict)
    http_ports: dict[str, int] = field(default_factory=dict)
    specs: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)

    @classmethod
    def create(cls, spawn, tmp: Path, **overrides: str) -> "Stack":
        policy, pools = tmp / "safety.yaml", tmp / "pools.yaml"
        policy.write_text(POLICY)
        pools.write_text(POOLS)
        env = {
            **FAST,
            "SAFETY_KERNEL_ADDR": f"127.0.0.1:{free_port()}",
            "SAFETY_POLICY_PATH": str(policy),
            "SCHEDULER_POOLS_PATH": str(pools),
            **overrides,
        }
        return cls(spawn, tmp, env)

    def start(self, name: str, module: str, **env: str) -> object:
        port = free_port()  # the process's HTTP (health/metrics, or the gateway's API)
        self.http_ports[name] = port
        extra = {key: f"127.0.0.1:{port}" for key in ("SAFETY_KERNEL_ADMIN_ADDR", "SCHEDULER_METRICS_ADDR", "GATEWAY_HTTP_ADDR",
                                                           "WORKFLOW_ENGINE_HTTP_ADDR")}
        full_env = {**self.env, **extra, **env}
        proc = self.spawn(name, ["-m", module], env=full_env)
        self.procs[name] = proc
        self.specs[name] = (module, full_env)
        return proc

    def restart(self, name: str) -> object:
        """Start a stopped replica again with the same environment and ports (new log files)."""
        module, env = self.specs[name]
        generation = sum(1 for key in self.procs if key.startswith(name)) + 1
        proc = self.spawn(f"{name}-run{generation}", ["-m", module], env=env)
        self.procs[name] = proc
        return proc

    def kernel(self, name: str = "safety-1", **env: str) -> object:
        return self.start(name, "cordum.safety.service", **env)

    def scheduler(self, name: str = "scheduler-1", **env: str) -> object:
        return self.start(name, "cordum.scheduler.service", **env)

    def workflow_engine(self, name: str = "workflow-engine-1", **env: str) -> object:
        return self.start(name, "cordum.workflow.service", **env)

    def worker(self, name: str = "worker-1", **env: str) -> object:
        # Echo workers count their executions (cordum.worker.echo): exactly-once is checked there.
        return self.start(name, "cordum.worker.echo", **{"WORKER_ID": name, "ECHO_EXECUTIONS_KEY": EXECUTIONS_KEY, **env})

    async def ready(self, *names: str, timeout: float = 60) -> None:  # generous: a loaded CI machine
        for name in names or tuple(self.procs):
            proc = self.procs[name]
            try:
                await _wait_for(lambda: any(e.get("event") == "service.ready" for e in proc.events()), timeout,
                                f"{name} ready")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; {await _diagnose(proc)}") from None


async def _diagnose(proc) -> str:
    """Why a process is not ready: its exit code, or (alive) the stack dump it writes on SIGUSR1."""
    code = proc.popen.poll()
    if code is None:
        proc.signal(signal.SIGUSR1)  # faulthandler, registered by every service
        await trio.sleep(1.0)
    tail = "\n".join(proc.lines("err")[-40:])
    return f"exit code {code}, stderr tail:\n{tail}"


async def gateway_stack(stack: Stack, *, schedulers: int = 1, workflow_engine: bool = False, timeout: float = 60,
                        **gateway_env: str) -> str:
    """A kernel, `schedulers` schedulers (`scheduler-N`), optionally the workflow engine, an echo
    worker and `gateway-1` (with `gateway_env`) in `stack`, ready, and long enough for the worker's
    heartbeats to reach the schedulers: the gateway's base URL."""
    stack.kernel()
    for n in range(1, schedulers + 1):
        stack.scheduler(f"scheduler-{n}")
    if workflow_engine:
        stack.workflow_engine()
    stack.worker()
    stack.start("gateway-1", "cordum.gateway.service", **gateway_env)
    await stack.ready(timeout=timeout)
    await trio.sleep(1.0)
    return f"http://127.0.0.1:{stack.http_ports['gateway-1']}"


async def job_path(spawn, tmp_path: Path, *, worker: bool = True, **env: str) -> Stack:
    """A safety kernel, a scheduler (`scheduler-1`) and, unless told not to, an echo worker
    (`worker-1`), ready; with a worker, also long enough for its heartbeats to reach the scheduler."""
    stack = Stack.create(spawn, tmp_path, **env)
    stack.kernel()
    stack.scheduler("scheduler-1")
    if worker:
        stack.worker("worker-1")
    await stack.ready()
    if worker:
        await trio.sleep(1.0)
    return stack


async def submit_direct(store: JobStore, bus, topic: str = "job.default", tenant: str = "default",
                        context: object = None, job_id: str | None = None, labels: dict | None = None,
                        fields: dict | None = None) -> str:
    """What the gateway does for an allowed job: persist it PENDING with its context (and
    `fields`, the gateway's submit-time decision say), publish it."""
    job_id = job_id or str(uuid.uuid4())
    request = JobRequest(job_id=job_id, topic=topic, tenant_id=tenant, context_ptr=f"redis://ctx:{job_id}",
                         labels=labels or {})
    await store.create(job_id, JobState.PENDING, request=request,
                       fields={"topic": topic, "tenant": tenant, "trace_id": job_id, "labels": labels or {},
                               **(fields or {})},
                       context={"prompt": "test"} if context is None else context)
    packet = new_packet(request, sender_id="test", trace_id=job_id)
    await bus.publish(subjects.SUBMIT, encode(packet), msg_id=f"jobreq:{job_id}")
    return job_id


async def wait_state(store: JobStore, job_id: str, states: set[str], timeout: float = 20) -> dict:
    found: dict = {}

    async def reached() -> bool:
        nonlocal found
        found = await store.get(job_id) or {}
        return found.get("state") in states

    with trio.move_on_after(timeout):
        while not await reached():
            await trio.sleep(0.05)
        return found
    raise AssertionError(f"job {job_id} stuck in {found.get('state')} (wanted {states}): {found}")


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples in a /metrics exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def http_get(port: int, path: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return response.read().decode()
