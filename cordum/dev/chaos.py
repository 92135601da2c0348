"""Chaos run: faults while jobs flow, then a verdict counted where the work happens (issue 8).

    scripts/chaos [--rounds N] [--seed S] [--faults kill,term,pause,redis,nats]
                  [--targets scheduler,api-gateway,worker,safety-kernel] [--pause 35] [--json] ...
                  (python -m cordum.dev.chaos --help lists every option)

It starts a topology of its own, `cordumctl up --replicas 2 --workers 0 --detach`, in a private
state directory (`--state-dir`, default `.cordum/chaos/<time>-seed<S>/`, kept afterwards with every
log) and a free block of loopback ports, with chaos timings (SCHEDULER_SCAN_INTERVAL=2s,
SCHEDULER_PENDING_AGE=5s, WORKER_TTL=6s; a variable already set in the environment wins) and
the rate limits out of the way. It runs the echo workers itself (`--workers`, default 2), with
WORKER_HEARTBEAT_INTERVAL=1s and ECHO_EXECUTIONS_KEY set, each process under an id of its own
(`worker-<slot>-g<generation>`): a worker that is killed or stopped comes back as a new process
with a NEW worker id, the realistic case (hostname-pid, a pod name; DESIGN.md §4.13).

While jobs are submitted through both gateways (`--rate` per second, each with an idempotency key
so an unanswered submit can be asked again: plain ones; slow ones, `sleep_ms` 500-3000; retryable
ones, `fail_attempts: 1`; a few permanent failures, `fail: true`) it runs N rounds. Each round
injects one fault drawn from a seeded RNG (`--seed`; the same seed gives the same plan and job mix):

    kill   SIGKILL a replica (scheduler, api-gateway, worker or safety-kernel), restart it after `--down` s
    term   SIGTERM it (its staged shutdown), restart it after `--down` s
    pause  SIGSTOP it for `--pause` s (default 35: past the 30 s job-lock TTL), then SIGCONT
    redis  restart Redis with its data (SIGTERM: the append-only file is synced; a sentinel key
           written before is read back after)
    nats   restart NATS with its JetStream store

Recovery time of a round: from the moment the fault holds (the replica is gone or paused, the
server is down) until the first probe job submitted after it SUCCEEDED; probes are plain jobs
submitted every 0.5 s from then on (the resolution of the measure), through the gateways in turn.
A round whose probes did not succeed within `--recovery-timeout` counts as unrecovered; the
summary gives the p99 (nearest rank) over the rounds.

After the rounds the load stops and it waits (at most `--settle` s) for every job to be terminal,
then `--quiet` s more (a late second run would show by then), and judges:

    lost          a job whose submit was answered with its id, yet unknown to the store or not terminal
    duplicated    a job executed more than once (the ECHO_EXECUTIONS_KEY hash, counted by the worker)
    wrong_state   terminal in another state than expected (SUCCEEDED; FAILED for `fail: true`;
                  DENIED for a submit the gateway denied because the policy check was unavailable),
                  or SUCCEEDED without an execution
    dlq_mismatch  the DLQ (dlq:index members with an entry) is not exactly the failed jobs (FAILED,
                  TIMEOUT, DENIED): one missing, or one too many

It prints one summary line (or, with `--json`, one JSON object) on stdout, progress on stderr, and
always tears its topology down (also on Ctrl-C, SIGTERM or an error), within bounded time.
Everything it talks to listens on 127.0.0.1.

Exit codes: 0 the verdict passed; 1 lost, duplicated, wrong_state or dlq_mismatch is non-zero;
2 the run could not be done as planned (usage, the topology did not start, a replica did not come
back) and the verdict passed; 130 interrupted.

The pure half (the fault plan, the job mix, the verdict) is `cordum.dev.chaos_core`; this module
is the I/O half: the stack, the load, the faults, the counts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Mapping, Sequence

import trio

from cordum.cli.main import _seconds  # a number >= 0, as cordumctl parses it
from cordum.dev import state as st
from cordum.dev.chaos_core import (
    FAULT_KINDS,
    PROBE,
    TARGETS,
    TERMINAL,
    Facts,
    Fault,
    JobSpec,
    judge,
    job_spec,
    parse_list,
    plan_faults,
)
from cordum.dev.servers import free_block
from cordum.dev.stack import _count  # an integer >= 0, as `cordumctl up` parses it

# ---- options ------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
EXECUTIONS_KEY = "cordum:chaos:executions"
# Chaos timings: failures noticed in seconds rather than half a minute (the environment wins).
CHAOS_ENV = {
    "SCHEDULER_SCAN_INTERVAL": "2s",
    "SCHEDULER_PENDING_AGE": "5s",
    "WORKER_TTL": "6s",
    "API_RATE_LIMIT_RPS": "100000",
    "API_RATE_LIMIT_BURST": "100000",
    "CORDUM_ENV": "dev",
}
WORKER_ENV = {"WORKER_HEARTBEAT_INTERVAL": "1s"}
HTTP_TIMEOUT = 5.0  # per request to a gateway (a paused one answers nothing)
FAILED_FOR = 5.0  # seconds a gateway that failed is tried after the others
PROBE_EVERY = 0.5  # seconds between recovery probes: the resolution of a recovery time


def _listed(allowed: Sequence[str], what: str) -> Any:
    def parse(text: str) -> tuple[str, ...]:
        try:
            return parse_list(text, allowed, what)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def build_parser(prog: str = "scripts/chaos") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     epilog="Exit codes: 0 pass, 1 lost/duplicated/wrong_state/dlq_mismatch, "
                                     "2 could not run as planned, 130 interrupted.")
    parser.add_argument("--rounds", type=_count, default=5,
                        help="faults to inject, one per round (%(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the fault plan and job mix (default: random, printed)")
    parser.add_argument("--faults", type=_listed(FAULT_KINDS, "fault kind"), default=FAULT_KINDS,
                        help="fault kinds to draw from: " + ",".join(FAULT_KINDS) + " (default all)")
    parser.add_argument("--targets", type=_listed(TARGETS, "target"), default=TARGETS,
                        help="replica kinds kill/term/pause hit: " + ",".join(TARGETS) + " (default all)")
    parser.add_argument("--pause", type=_seconds, default=35.0,
                        help="seconds a paused replica stays SIGSTOPped (%(default)s: past the 30 s job-lock TTL)")
    parser.add_argument("--down", type=_seconds, default=2.0,
                        help="seconds a killed or stopped replica stays down before its restart (%(default)s)")
    parser.add_argument("--rate", type=_seconds, default=4.0, help="jobs submitted per second (%(default)s)")
    parser.add_argument("--warmup", type=_seconds, default=5.0, help="seconds of load before the first fault")
    parser.add_argument("--gap", type=_seconds, default=3.0, help="seconds between rounds (%(default)s)")
    parser.add_argument("--recovery-timeout", type=_seconds, default=90.0,
                        help="a round not recovered after this many seconds counts as unrecovered (%(default)s)")
    parser.add_argument("--settle", type=_seconds, default=180.0,
                        help="seconds to wait, after the last round, for every job to be terminal (%(default)s)")
    parser.add_argument("--quiet", type=_seconds, default=5.0,
                        help="seconds to wait once all are terminal before counting executions (%(default)s)")
    parser.add_argument("--workers", type=_count, default=2, help="echo workers (%(default)s)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the topology's state, data and logs (default .cordum/chaos/<time>-seed<S>/)")
    parser.add_argument("--base-port", type=int, default=None, help="port block start (default: a free block)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the summary line")
    return parser


# ---- the I/O part ----------------------------------------------------------------------------------


class ChaosError(Exception):
    """The run cannot go on as planned; the message says why."""


class Interrupted(Exception):
    """SIGTERM or SIGHUP."""


def say(text: str) -> None:
    print(f"chaos: {text}", file=sys.stderr, flush=True)


@dataclass
class WorkerProc:
    slot: int
    generation: int
    popen: subprocess.Popen
    log: Path
    worker_id: str = ""

    def ready(self) -> bool:
        """Whether its log says it is serving (and then its id is known)."""
        if self.worker_id:
            return True
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return False
        for line in lines:
            if '"worker.ready"' in line:
                try:
                    self.worker_id = json.loads(line).get("worker_id", "") or "?"
                except ValueError:
                    self.worker_id = "?"
                return True
        return False

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        try:
            self.popen.send_signal(signum)
        except ProcessLookupError:
            pass


class Stack:
    """The run's own topology: `cordumctl up --replicas 2 --workers 0 --detach` in a private state
    directory and port block, plus the echo workers, which this class runs as its children (with
    PR_SET_PDEATHSIG: they die with it)."""

    def __init__(self, sdir: Path, base_port: int, workers: int, env: Mapping[str, str]) -> None:
        self.sdir = sdir
        self.base_port = base_port
        self.n_workers = workers
        self.api_key = secrets.token_urlsafe(24)
        self.env = {**env, "CORDUM_DEV_DIR": str(sdir), "CORDUM_API_KEY": self.api_key, "PYTHONUNBUFFERED": "1"}
        for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID", "WORKER_ID",
                     "REDIS_CLUSTER_ADDRESSES"):
            self.env.pop(name, None)
        for name, value in CHAOS_ENV.items():
            self.env.setdefault(name, value)
        self.executions_key = self.env.get("ECHO_EXECUTIONS_KEY") or EXECUTIONS_KEY
        self.env.pop("ECHO_EXECUTIONS_KEY", None)  # the workers get it, nothing else needs it
        self.workers: dict[int, WorkerProc] = {}
        self.generations = 0
        self.data: dict[str, Any] = {}
        self._up: subprocess.Popen | None = None

    # -- the topology

    def cordumctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([sys.executable, "-m", "cordum.cli.main", *args], cwd=ROOT, env=self.env,
                                  capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ChaosError(f"`cordumctl {' '.join(args)}` did not finish within {timeout:.0f} s") from None

    def dev(self, *args: str, timeout: float = 120) -> None:
        done = self.cordumctl("dev", *args, timeout=timeout)
        if done.returncode != 0:
            raise ChaosError(f"`cordumctl dev {' '.join(args)}` failed: {(done.stderr or done.stdout).strip()[-500:]}")

    def up(self) -> None:
        self.sdir.mkdir(parents=True, exist_ok=True)
        log = self.sdir / "up.log"
        with log.open("w") as sink:
            self._up = subprocess.Popen(
                [sys.executable, "-m", "cordum.cli.main", "up", "--replicas", "2", "--workers", "0", "--detach",
                 "--base-port", str(self.base_port)],
                cwd=ROOT, env=self.env, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                code = self._up.wait(360)
            except subprocess.TimeoutExpired:
                raise ChaosError(f"the topology did not start within 360 s (log {log})") from None
        if code != 0:
            raise ChaosError(f"the topology did not start (exit {code}): {log.read_text()[-1500:]}")
        self.refresh()

    def refresh(self) -> dict[str, Any]:
        self.data = st.load(self.sdir) or self.data
        return self.data

    def record(self, name: str) -> dict[str, Any]:
        for record in self.refresh().get("replicas") or []:
            if record["name"] == name:
                return record
        raise ChaosError(f"no replica {name!r} in the topology")

    def replica_alive(self, name: str) -> bool:
        record = self.record(name)
        return st.process_state(record.get("pid"), record.get("start_time")) != "gone"

    def service_names(self) -> list[str]:
        return [r["name"] for r in self.data.get("replicas") or []]

    @property
    def gateway_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{r['ports']['http']}" for r in self.data.get("replicas") or []
                if r["kind"] == "api-gateway"]

    @property
    def redis_url(self) -> str:
        return self.data["redis_url"]

    # -- the workers (children of this process, so a replacement gets a new id)

    def spawn_worker(self, slot: int) -> WorkerProc:
        from cordum.dev.supervisor import _die_with

        self.generations += 1
        # A new process, a new id: what hostname-pid gives on a bare host and a pod name in Kubernetes
        # (in a container the default would be the hostname, shared by every worker here).
        worker_id = f"worker-{slot}-g{self.generations}"
        log = self.sdir / "logs" / f"{worker_id}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        env = {**WORKER_ENV, **self.env, "ECHO_EXECUTIONS_KEY": self.executions_key, "WORKER_ID": worker_id,
               "CORDUM_INSTANCE_ID": worker_id, "REDIS_URL": self.data["redis_url"], "NATS_URL": self.data["nats_url"]}
        with log.open("ab") as sink:
            popen = subprocess.Popen([sys.executable, "-m", "cordum.worker.echo"], cwd=ROOT, env=env,
                                     stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with(os.getpid()))
        worker = WorkerProc(slot, self.generations, popen, log)
        self.workers[slot] = worker
        return worker

    def stop_workers(self, timeout: float = 20.0) -> None:
        for worker in self.workers.values():
            if worker.alive():
                worker.signal(signal.SIGTERM)
                worker.signal(signal.SIGCONT)
        deadline = time.monotonic() + timeout
        for worker in self.workers.values():
            try:
                worker.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                worker.popen.kill()
                worker.popen.wait(10)

    # -- teardown: always, bounded

    def teardown(self) -> None:
        """Workers, then `cordumctl dev down`, then SIGKILL for anything of ours still alive."""
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            self.stop_workers()
            if self._up is not None and self._up.poll() is None:
                self._up.terminate()
                try:
                    self._up.wait(30)
                except subprocess.TimeoutExpired:
                    self._up.kill()
            if (self.sdir / st.STATE_FILE).exists():
                try:
                    done = self.cordumctl("dev", "down", timeout=240)
                    if done.returncode != 0:
                        say(f"`cordumctl dev down` failed: {(done.stderr or done.stdout).strip()[-300:]}")
                except ChaosError as exc:
                    say(str(exc))
                data = st.load(self.sdir) or {}
                sup = data.get("supervisor") or {}
                leftovers = [(r.get("pid"), r.get("start_time")) for r in data.get("replicas") or []]
                for pid, started in [(sup.get("pid"), sup.get("start_time")), *leftovers]:
                    if st.alive(pid, started):
                        say(f"pid {pid} still running after `dev down`: killing it")
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        finally:
            for signum, handler in old.items():
                signal.signal(signum, handler)


class Run:
    """One chaos run against a started Stack: load, rounds, settle, facts."""

    def __init__(self, stack: Stack, plan: list[Fault], opts: argparse.Namespace, seed: int) -> None:
        from cordum.dev.gate import Gateway

        self.stack = stack
        self.plan = plan
        self.opts = opts
        self.facts = Facts(seed=seed, state_dir=str(stack.sdir))
        self.run_id = f"{seed}-{secrets.token_hex(3)}"
        self.rng = random.Random(f"jobs:{seed}")
        self.gateways = [Gateway(url, stack.api_key) for url in stack.gateway_urls]
        self.submitted = 0
        self.stop_load = trio.Event()
        self.failed_at: dict[str, float] = {}  # gateway url -> monotonic time of its last failure

    # -- submitting and reading jobs

    def _track(self, job_id: str, kind: str) -> None:
        self.facts.jobs[job_id] = kind

    def _order(self, n: int) -> list[Any]:
        """The gateways, starting at the n-th (round robin), those that failed lately last."""
        k = n % len(self.gateways)
        rotated = self.gateways[k:] + self.gateways[:k]
        now = time.monotonic()
        return sorted(rotated, key=lambda g: now - self.failed_at.get(g.url, -math.inf) < FAILED_FOR)

    def _call(self, gateway: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        status, reply = gateway.call(method, path, body, timeout=HTTP_TIMEOUT)
        if status == 0 or status >= 500:
            self.failed_at[gateway.url] = time.monotonic()
        return status, reply

    async def submit(self, spec: JobSpec, n: int, *, patience: float = 60.0) -> str | None:
        """Submit until a gateway answers with the job's id (the idempotency key makes a retry the
        same job); None if none did within `patience` seconds."""
        key = f"chaos-{self.run_id}-{n}"
        body = {"prompt": f"chaos {n} ({spec.kind})", "context": dict(spec.context), "idempotency_key": key,
                "labels": {"chaos": self.run_id, "chaos_kind": spec.kind}}
        deadline = trio.current_time() + patience
        tries = 0
        while trio.current_time() < deadline:
            for gateway in self._order(n + tries):

                def call() -> str | None:
                    status, reply = self._call(gateway, "POST", "/api/v1/jobs", body)
                    job_id = reply.get("job_id") if isinstance(reply, dict) else None
                    if status == 200 and job_id:
                        self._track(job_id, spec.kind)  # in the thread: known even if we are cancelled now
                        return job_id
                    if status == 403 and job_id:
                        # Denied because the policy check was unavailable (fail closed): that job
                        # exists, DENIED with a DLQ entry; the key is not held, so a retry makes a new job.
                        self._track(job_id, "denied")
                    return None

                job_id = await trio.to_thread.run_sync(call)
                if job_id:
                    return job_id
            tries += 1
            await trio.sleep(0.5)
        self.facts.unconfirmed += 1
        return None

    async def state(self, job_id: str) -> tuple[bool, str | None]:
        """(answered, state): state None when the store does not know the job (404)."""
        for gateway in self._order(hash(job_id)):
            status, body = await trio.to_thread.run_sync(self._call, gateway, "GET", f"/api/v1/jobs/{job_id}")
            if status == 200 and isinstance(body, dict):
                return True, body.get("state")
            if status == 404:
                return True, None
        return False, None

    async def refresh_states(self, job_ids: Iterable[str]) -> None:
        limiter = trio.CapacityLimiter(8)

        async def one(job_id: str) -> None:
            async with limiter:
                answered, state = await self.state(job_id)
            if answered:
                self.facts.states[job_id] = state

        async with trio.open_nursery() as nursery:
            for job_id in list(job_ids):
                nursery.start_soon(one, job_id)

    # -- the load

    async def produce(self) -> None:
        """Submit `--rate` jobs a second until `stop_load` is set; return once every submit has its answer."""
        interval = 1.0 / self.opts.rate if self.opts.rate > 0 else math.inf
        async with trio.open_nursery() as nursery:
            while not self.stop_load.is_set():
                nursery.start_soon(self.submit, job_spec(self.rng), self.submitted)
                self.submitted += 1
                with trio.move_on_after(interval):
                    await self.stop_load.wait()

    # -- recovery probes

    async def recovery(self, round_no: int, started: float) -> float | None:
        first: list[float] = []
        done = trio.Event()

        async def probe(n: int) -> None:
            job_id = await self.submit(PROBE, n, patience=self.opts.recovery_timeout)
            while job_id and not done.is_set():
                answered, state = await self.state(job_id)
                if state == "SUCCEEDED":
                    first.append(trio.current_time())
                    done.set()
                    return
                if state in TERMINAL:
                    return
                await trio.sleep(0.25)

        async with trio.open_nursery() as nursery:
            with trio.move_on_at(started + self.opts.recovery_timeout):
                n = 0
                while not done.is_set():
                    nursery.start_soon(probe, 1_000_000 * round_no + n)
                    n += 1
                    with trio.move_on_after(PROBE_EVERY):
                        await done.wait()
            nursery.cancel_scope.cancel()
        return min(first) - started if first else None

    # -- faults

    async def _dev(self, *args: str, timeout: float = 120) -> None:
        await trio.to_thread.run_sync(lambda: self.stack.dev(*args, timeout=timeout))

    async def _worker_ready(self, worker: WorkerProc, timeout: float = 60) -> None:
        with trio.move_on_after(timeout):
            while not worker.ready():
                if not worker.alive():
                    raise ChaosError(f"worker slot {worker.slot} exited while starting (log {worker.log})")
                await trio.sleep(0.2)
            return
        raise ChaosError(f"worker slot {worker.slot} not ready after {timeout:.0f} s (log {worker.log})")

    async def start_workers(self) -> None:
        for slot in range(1, self.stack.n_workers + 1):
            await self._worker_ready(self.stack.spawn_worker(slot))

    async def inject(self, fault: Fault, in_effect: Any) -> None:
        """Apply `fault`, calling `in_effect()` the moment it holds (the replica is gone or paused,
        the server is down), and undo it: restart, resume."""
        opts = self.opts
        if fault.kind in ("redis", "nats"):
            if fault.kind == "redis":
                await self._redis("SET", "cordum:chaos:sentinel", str(fault.round))
            await self._dev("stop", fault.target)
            in_effect()
            await trio.sleep(opts.down)
            await self._dev("start", fault.target)
            if fault.kind == "redis" and await self._redis("GET", "cordum:chaos:sentinel") != str(fault.round):
                self.facts.errors.append(f"round {fault.round}: Redis lost its data across the restart")
            return
        if fault.target == "worker":
            worker = self.stack.workers[fault.index]
            if fault.kind == "pause":
                worker.signal(signal.SIGSTOP)
                in_effect()
                await trio.sleep(opts.pause)
                worker.signal(signal.SIGCONT)
                return
            worker.signal(signal.SIGKILL if fault.kind == "kill" else signal.SIGTERM)
            if fault.kind == "kill":
                in_effect()
            with trio.move_on_after(30):
                while worker.alive():
                    await trio.sleep(0.1)
            if worker.alive():
                worker.popen.kill()
            in_effect()  # for SIGTERM: once its staged shutdown is over
            await trio.sleep(opts.down)
            replacement = self.stack.spawn_worker(fault.index)  # a new process: a new worker id
            await self._worker_ready(replacement)
            say(f"  worker slot {fault.index}: {worker.worker_id} replaced by {replacement.worker_id}")
            return
        name = fault.replica
        if fault.kind == "pause":
            await self._dev("pause", name)
            in_effect()
            await trio.sleep(opts.pause)
            await self._dev("resume", name)
            return
        await self._dev("kill" if fault.kind == "kill" else "stop", name)
        in_effect()
        await trio.sleep(opts.down)
        await self._dev("start", name)

    @asynccontextmanager
    async def _redis_client(self) -> AsyncIterator[Any]:
        """A Redis client of the run's own, for a few commands (Redis may have just restarted)."""
        from cordum.infra.config import load_settings
        from cordum.infra.redis import open_redis

        settings = load_settings({"REDIS_URL": self.stack.redis_url, "CORDUM_INSTANCE_ID": "chaos",
                                  "REDIS_MIN_IDLE_CONNS": "1"})
        async with open_redis(settings) as redis:
            yield redis

    async def _redis(self, *command: Any, patience: float = 30.0) -> Any:
        """One command, retried for up to `patience` s while Redis is down or still loading its data."""
        deadline = trio.current_time() + patience
        while True:
            try:
                with trio.fail_after(5):
                    async with self._redis_client() as redis:
                        return await redis.execute(*command)
            except Exception as exc:  # refused, LOADING, timed out: a restarting Redis
                if trio.current_time() > deadline:
                    raise ChaosError(f"Redis did not answer {command[0]} within {patience:.0f} s: {exc!r}") from None
            await trio.sleep(0.5)

    async def heal(self) -> None:
        """Start again whatever is down that should run (a replica that crashed on its own)."""
        try:
            await self._heal()
        except ChaosError as exc:
            self.facts.errors.append(f"could not heal the topology: {exc}")
            say(f"  {exc}")

    async def _heal(self) -> None:
        for name in self.stack.service_names():
            if not self.stack.replica_alive(name):
                self.facts.errors.append(f"{name} had exited on its own (log {self.stack.record(name)['log']})")
                say(f"  {name} exited on its own: starting it again")
                await self._dev("start", name)
        for slot, worker in list(self.stack.workers.items()):
            if not worker.alive():
                self.facts.errors.append(f"worker slot {slot} ({worker.worker_id}) exited on its own "
                                         f"(log {worker.log})")
                await self._worker_ready(self.stack.spawn_worker(slot))

    async def round(self, fault: Fault) -> None:
        """Inject one fault and measure the recovery: from the moment the fault holds until the
        first probe submitted after it SUCCEEDED."""
        say(f"round {fault.round}/{len(self.plan)}: {fault.label}")
        held = trio.Event()
        since: list[float] = []
        recovered: list[float | None] = []

        def in_effect() -> None:
            if not held.is_set():
                since.append(trio.current_time())
                held.set()

        async def measure() -> None:
            await held.wait()
            recovered.append(await self.recovery(fault.round, since[0]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(measure)
            try:
                await self.inject(fault, in_effect)
            except Exception as exc:  # ChaosError, or a surprise: recorded, and the run goes on
                self.facts.errors.append(f"round {fault.round} ({fault.label}): {exc!r}")
                say(f"  {exc!r}")
                nursery.cancel_scope.cancel()
        self.facts.faults.append(fault)
        took = recovered[0] if recovered else None
        self.facts.recoveries.append(took)
        say(f"  recovered in {took:.1f} s" if took is not None else "  not recovered")
        await self.heal()

    # -- the whole run

    async def run(self) -> Facts:
        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as received:
                async for signum in received:
                    raise Interrupted(signal.Signals(signum).name)

        async with trio.open_nursery() as root:
            root.start_soon(signals)
            await self.start_workers()
            ids = ", ".join(w.worker_id for w in self.stack.workers.values())
            say(f"workers {ids}; load {self.opts.rate:g} jobs/s")
            async with trio.open_nursery() as load:
                load.start_soon(self.produce)
                await trio.sleep(self.opts.warmup)
                for fault in self.plan:
                    await self.round(fault)
                    await trio.sleep(self.opts.gap)
                self.stop_load.set()
            await self.settle()
            root.cancel_scope.cancel()
        return self.facts

    async def settle(self) -> None:
        say(f"load stopped after {self.submitted} submits; waiting for {len(self.facts.jobs)} jobs to end")
        with trio.move_on_after(self.opts.settle):
            while True:
                open_ = [j for j in self.facts.jobs if self.facts.states.get(j) not in TERMINAL]
                if not open_:
                    break
                await self.refresh_states(open_)
                if all(self.facts.states.get(j) in TERMINAL for j in open_):
                    break
                await trio.sleep(2.0)
        await trio.sleep(self.opts.quiet)
        await self.refresh_states(list(self.facts.jobs))  # the final word, late changes included
        await self.collect_counts()

    async def collect_counts(self) -> None:
        from cordum.store import keys
        from cordum.worker.echo import read_executions, starts_key

        await self._redis("PING")  # up and loaded
        with trio.fail_after(60):
            async with self._redis_client() as redis:
                key = self.stack.executions_key
                self.facts.executions = await read_executions(redis, key, list(self.facts.jobs))
                starts = await redis.execute("HVALS", starts_key(key)) or []
                self.facts.starts = sum(int(v) for v in starts)
                members = await redis.execute("ZRANGE", keys.DLQ_INDEX, 0, -1) or []
                exists = await redis.pipeline([("EXISTS", keys.dlq_entry(m)) for m in members]) if members else []
                self.facts.dlq = {m for m, e in zip(members, exists) if int(e or 0)}


def _holds(exc: BaseException, kind: type[BaseException]) -> bool:
    if isinstance(exc, kind):
        return True
    return isinstance(exc, BaseExceptionGroup) and exc.subgroup(kind) is not None


def main(argv: Sequence[str] | None = None, *, prog: str = "scripts/chaos") -> int:
    opts = build_parser(prog).parse_args(argv)
    seed = opts.seed if opts.seed is not None else random.randrange(1_000_000)
    try:
        if opts.workers < 1:
            raise ValueError("--workers must be at least 1")
        plan = plan_faults(seed, opts.rounds, opts.faults, opts.targets, replicas=2, workers=opts.workers)
    except ValueError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    sdir = (opts.state_dir or ROOT / ".cordum" / "chaos" / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{seed}").resolve()

    from cordum.dev.topology import BLOCK_SIZE
    from cordum.infra.aio import run_with_bridge

    stack = Stack(sdir, opts.base_port or free_block(BLOCK_SIZE), opts.workers, os.environ)
    say(f"seed {seed}; plan: {', '.join(f.label for f in plan) or 'no faults'}; state {sdir}")
    facts: Facts | None = None
    aborted = ""
    try:
        stack.up()
        say(f"topology up: gateways {', '.join(stack.gateway_urls)}")
        facts = run_with_bridge(Run(stack, plan, opts, seed).run)
    except BaseException as exc:  # Ctrl-C, SIGTERM, ChaosError, a bug: the topology still goes down
        if _holds(exc, KeyboardInterrupt) or _holds(exc, Interrupted):
            say("interrupted")
            aborted = "interrupted"
        else:
            aborted = f"{exc!r}"
            say(f"aborted: {aborted}")
    finally:
        say("tearing the topology down")
        stack.teardown()
    if aborted == "interrupted":
        return 130
    if facts is None:
        print(json.dumps({"ok": False, "aborted": aborted, "seed": seed, "state_dir": str(sdir)}) if opts.json
              else f"chaos: ABORTED ({aborted}) seed={seed} state={sdir}", flush=True)
        return 2
    summary = judge(facts)
    for name, items in summary.examples.items():
        for item in items:
            say(f"{name}: {item}")
    for error in summary.errors:
        say(f"error: {error}")
    print(json.dumps(summary.as_dict()) if opts.json else summary.line(), flush=True)
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main(prog="python -m cordum.dev.chaos"))
