"""Replicas stopped and restarted while jobs flow: each stops in its documented order within the
deadline, each stage did what it says, and every job still ends SUCCEEDED, executed exactly once.

Executions are counted where the work happens, by the echo workers (ECHO_EXECUTIONS_KEY, issue 8):
results on the bus cannot show a second run (JetStream drops a repeated message id).

What the stages did is read from the outside:
- gateway, "HTTP drain": no submit sent to it after the stage ended was accepted by it;
- scheduler, "engine stop" then "cancel context": no job lock taken by it after them (every lease
  acquire is a Lua SET of `<holder>#<fence>`, seen by a `redis-cli MONITOR` of the test's Redis;
  the holder starts with the replica's instance id), and no lease of it left behind once it exited;
- every service: its instance registration (`cordum:instance:<service>:<id>`) is gone once it exited.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import trio

from cordum.dev.servers import redis_cli_binary
from cordum.gateway.context import SERVICE as GATEWAY_SERVICE
from cordum.gateway.service import STAGES as GATEWAY_STAGES
from cordum.safety.service import SERVICE as KERNEL_SERVICE
from cordum.safety.service import STAGES as KERNEL_STAGES
from cordum.scheduler.service import NAME as SCHEDULER_SERVICE
from cordum.scheduler.service import STAGES as SCHEDULER_STAGES
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.worker.echo import read_executions
from tests.integration.stack import EXECUTIONS_KEY, Stack, nats_server, redis_server, wait_state  # noqa: F401

API_KEY = "ha-test-admin-key-0123456789abcdef"
STAGES = {"gateway": GATEWAY_STAGES, "scheduler": SCHEDULER_STAGES, "kernel": KERNEL_STAGES}
SERVICES = {"gateway": GATEWAY_SERVICE, "scheduler": SCHEDULER_SERVICE, "kernel": KERNEL_SERVICE}
JOB_LOCK_PREFIX = keys.job_lock("")
LEADER_KEYS = (keys.RECONCILER_LEADER, keys.REPLAYER_LEADER, keys.SNAPSHOT_WRITER_LEADER, keys.DLQ_CLEANUP_LEADER)


@dataclass
class Submit:
    gateway: str
    sent: float  # wall clock, as the services' log timestamps
    status: int
    job_id: str | None


def _submit(gateway: str, port: int, prompt: str) -> Submit:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/jobs", method="POST",
        data=json.dumps({"prompt": prompt, "context": {"sleep_ms": 50}}).encode(),
        headers={"X-API-Key": API_KEY, "Content-Type": "application/json"})
    sent = time.time()
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Submit(gateway, sent, response.status, json.loads(response.read())["job_id"])
    except urllib.error.HTTPError as error:
        return Submit(gateway, sent, error.code, None)
    except (urllib.error.URLError, OSError, ValueError):
        return Submit(gateway, sent, 0, None)


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
    """Submits jobs round-robin over the live gateways (as a load balancer would)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.jobs: list[str] = []
        self.submits: list[Submit] = []
        self.running = True

    async def produce(self, every: float = 0.05) -> None:
        n = 0
        while self.running:
            gateways = [name for name in ("gateway-1", "gateway-2") if self.stack.procs[name].popen.poll() is None]
            for attempt in range(len(gateways)):
                name = gateways[(n + attempt) % len(gateways)]
                submit = await trio.to_thread.run_sync(_submit, name, self.stack.http_ports[name], f"job {n}")
                self.submits.append(submit)
                if submit.job_id:
                    self.jobs.append(submit.job_id)
                    break
            n += 1
            await trio.sleep(every)


class Monitor:
    """`redis-cli MONITOR` of the test's Redis into a file: every command with its server time."""

    def __init__(self, port: int, path: Path) -> None:
        self.path = path
        self._sink = path.open("w")
        self.proc = subprocess.Popen([redis_cli_binary(), "-p", str(port), "MONITOR"], stdout=self._sink,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def lock_acquires(self, instance_id: str) -> list[tuple[float, str]]:
        """(server time, job lock key) of every job lock granted to `instance_id`: the acquire
        script's `SET <lock> <holder>#<fence> PX ...`, which runs only when the lock was free."""
        self._sink.flush()
        found = []
        for line in self.path.read_text(errors="replace").splitlines():
            if '[0 lua] "SET"' not in line or f'"{JOB_LOCK_PREFIX}' not in line:
                continue
            parts = line.split('"')
            # 1700000000.123456 [0 lua] "SET" "<key>" "<holder>#<fence>" "PX" "30000"
            if len(parts) > 5 and parts[5].startswith(f"{instance_id}/"):
                found.append((float(line.split(" ", 1)[0]), parts[3]))
        return found

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._sink.close()


@dataclass
class Stop:
    name: str
    kind: str
    stage_end: dict[str, float] = field(default_factory=dict)  # stage -> its stage.end time


async def _stop(stack: Stack, name: str, kind: str) -> Stop:
    proc = stack.procs[name]
    proc.signal(signal.SIGTERM)
    started = trio.current_time()
    code = await trio.to_thread.run_sync(proc.wait, 20)
    assert code == 0, (name, proc.lines("err")[-10:])
    assert trio.current_time() - started < 15, name
    events = [e for e in proc.events() if e["event"] in ("stage.begin", "stage.end")]
    observed = [(e["event"], e["stage"]) for e in events]
    assert observed[-2 * len(STAGES[kind]):] == [(k, s) for s in STAGES[kind] for k in ("stage.begin", "stage.end")], name
    return Stop(name, kind, {e["stage"]: e["ts"] for e in events if e["event"] == "stage.end"})


async def _check_stages(stop: Stop, instance_id: str, redis, load: Load, monitor: Monitor) -> list[str]:
    """What the stages of a replica that just exited did, seen from outside: the problems found."""
    problems = []
    if await redis.execute("EXISTS", keys.instance(SERVICES[stop.kind], instance_id)):
        problems.append(f"{stop.name} left its instance registration behind")
    if stop.kind == "gateway":
        drained = stop.stage_end["http drain"]
        late = [s for s in load.submits if s.gateway == stop.name and s.sent > drained and s.status == 200]
        if late:
            problems.append(f"{stop.name} accepted {len(late)} submits sent after its HTTP drain ended")
    if stop.kind == "scheduler":
        acquired = monitor.lock_acquires(instance_id)
        if not acquired:
            problems.append(f"{stop.name} took no job lock at all: the check of its stages says nothing")
        # Bus handlers stop in "engine stop"; the leader loops (which may lock a stuck job) are
        # cancelled in "cancel context", a moment later. After that, nothing may take a job lock.
        late = [(t, key) for t, key in acquired if t > stop.stage_end["cancel context"]]
        if late:
            problems.append(f"{stop.name} took job locks after its engine stopped: {late[:5]}")
        held = []
        for key in [*await redis.scan_keys(JOB_LOCK_PREFIX + "*"), *LEADER_KEYS]:
            value = await redis.execute("GET", key)
            if isinstance(value, str) and value.startswith(f"{instance_id}/"):
                held.append(key)
        if held:
            problems.append(f"{stop.name} exited holding leases: {held[:5]}")
    return problems


async def _finish(load: Load, store: JobStore, redis) -> None:
    load.running = False
    for job_id in load.jobs:
        await wait_state(store, job_id, {"SUCCEEDED"}, timeout=60)
    await trio.sleep(1.0)  # a second run of any of them would have been counted by now
    counts = await read_executions(redis, EXECUTIONS_KEY, load.jobs)
    assert load.jobs and all(counts[j] == 1 for j in load.jobs), {j: n for j, n in counts.items() if n != 1}


async def _under_load(spawn, tmp_path, redis_server, redis, steps) -> None:
    """Run `steps(stack, check)` on the topology while jobs flow; then every job SUCCEEDED, executed
    once, and every stop's stages did what they say (`check(stop, instance_id)` after each stop)."""
    stack = await _topology(spawn, tmp_path)
    load = Load(stack)
    monitor = Monitor(redis_server.port, tmp_path / "redis-monitor.log")
    problems: list[str] = []

    async def check(stop: Stop, instance_id: str) -> None:
        problems.extend(await _check_stages(stop, instance_id, redis, load, monitor))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load.produce)
            await steps(stack, check)
            await _finish(load, JobStore(redis), redis)
            nursery.cancel_scope.cancel()
    finally:
        monitor.close()
    assert len(load.jobs) > 40
    assert not problems


async def test_sigterm_one_replica_of_each_service_while_jobs_run(spawn, tmp_path, redis_server, redis):
    async def steps(stack: Stack, check) -> None:
        for name, kind in (("scheduler-1", "scheduler"), ("gateway-1", "gateway"), ("kernel-1", "kernel")):
            await trio.sleep(1.0)
            await check(await _stop(stack, name, kind), name)
        await trio.sleep(1.5)

    await _under_load(spawn, tmp_path, redis_server, redis, steps)


async def test_rolling_restart_of_every_replica_loses_and_duplicates_nothing(spawn, tmp_path, redis_server, redis):
    async def steps(stack: Stack, check) -> None:
        for kind in ("kernel", "scheduler", "gateway"):
            for n in (1, 2):
                name = f"{kind}-{n}"
                instance_id = stack.procs[name].name  # restarted replicas run as <name>-run<k>
                await check(await _stop(stack, name, kind), instance_id)
                stack.restart(name)
                await stack.ready(name)
        await trio.sleep(1.0)

    await _under_load(spawn, tmp_path, redis_server, redis, steps)
