"""Gate 19, the HA validation: five scenarios against a 2-replica topology.

    scripts/production_gate.sh --gate 19 [--strict]

It uses the running local topology (`cordumctl up --replicas 2 --detach`) or starts one. The
scenarios: (1) both gateways and schedulers healthy; (2) 40 jobs split across both gateways all
SUCCEEDED, each executed exactly once; (3) a concurrent burst split across both gateways sees 429s
and admits no more than the global limit; (4) both gateways list the same non-empty sorted
workers; (5) with scheduler-2 stopped, jobs still complete via scheduler-1, and after its restart
nothing ran twice. Advisory by default (exit 0); `--strict` exits 1 when a scenario fails.

Executions are counted where the work happens, at the worker (DESIGN.md §4.12; results on the
bus cannot show a second run, JetStream drops a repeated message id): the echo workers' hash
ECHO_EXECUTIONS_KEY (`cordum.worker.echo`), read from the workers' own environment. A topology
the gate starts gets ECHO_EXECUTIONS_KEY=cordum:gate:executions unless the variable is set; in a
running topology whose workers lack it, scenarios 2 and 5 fail and say so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable

import trio

from cordum.dev import control, gate_checks
from cordum.dev import state as st
from cordum.dev.gate_checks import Verdict
from cordum.infra.aio import run_with_bridge
from cordum.infra.config import load_settings
from cordum.infra.redis import Redis, open_redis
from cordum.worker.echo import read_executions

JOBS = 40
FAILOVER_JOBS = 10
BURST_REQUESTS = 150
EXECUTIONS_KEY = "cordum:gate:executions"  # ECHO_EXECUTIONS_KEY of a topology the gate starts
QUIET_SECONDS = 1.5  # after the jobs are done: time for a second run to show itself


class Gateway:
    def __init__(self, url: str, api_key: str) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key

    def call(self, method: str, path: str, body: Any = None, *, timeout: float = 10) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"X-API-Key": self.api_key, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
                return response.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as error:
            text = error.read()
            try:
                return error.code, json.loads(text) if text else {}
            except ValueError:
                return error.code, {}
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError):  # no answer (or not JSON)
            return 0, {}

    async def acall(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return await trio.to_thread.run_sync(self.call, method, path, body)


class Topology:
    """The local multi-replica topology, as recorded in its state directory."""

    def __init__(self, sdir: Path) -> None:
        self.sdir = sdir
        self.data = st.load(sdir) or {}

    @property
    def gateways(self) -> list[Gateway]:
        return [Gateway(url, self.data["api_key"]) for url in self.data.get("gateways", [])]

    def replicas(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.data.get("replicas", []) if r.get("kind") == kind]

    def health_url(self, record: dict[str, Any]) -> str | None:
        health = record.get("health")
        return health if isinstance(health, str) and health.startswith("http") else None

    def stop(self, name: str) -> bool:
        return control.stop_replica(control._record(st.load(self.sdir) or {}, name))

    def start(self, name: str) -> int:
        return subprocess.run([sys.executable, "-m", "cordum.cli.main", "dev", "start", name],
                              env={**os.environ, "CORDUM_DEV_DIR": str(self.sdir)}, capture_output=True).returncode

    def refresh(self) -> None:
        self.data = st.load(self.sdir) or self.data


def ensure_topology(sdir: Path, replicas: int) -> Topology:
    data = st.load(sdir)
    if not (data and st.supervisor_alive(data)):
        print(f"gate: no running topology under {sdir}: starting one with --replicas {replicas}", flush=True)
        env = {"ECHO_EXECUTIONS_KEY": EXECUTIONS_KEY, **os.environ, "CORDUM_DEV_DIR": str(sdir)}
        code = subprocess.run([sys.executable, "-m", "cordum.cli.main", "up", "--replicas", str(replicas),
                               "--workers", "2", "--detach"], env=env).returncode
        if code != 0:
            raise SystemExit(f"gate: could not start the topology (exit {code})")
    topology = Topology(sdir)
    if len(topology.gateways) < 2:
        raise SystemExit(f"gate: needs 2 gateway replicas, the topology under {sdir} has {len(topology.gateways)}")
    return topology


def process_env(pid: int | None, name: str) -> str | None:
    """A variable of a running process's environment (as it was exec'd), None if unset or unreadable."""
    if not pid:
        return None
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key.decode(errors="replace") == name:
            return value.decode(errors="replace")
    return None


class Executions:
    """Executions counted by the echo workers themselves: HINCRBY <ECHO_EXECUTIONS_KEY> <job id>."""

    def __init__(self, redis: Redis, key: str | None, problem: str = "") -> None:
        self.redis = redis
        self.key = key
        self.problem = problem  # why there is no key

    @classmethod
    def of(cls, redis: Redis, topo: Topology) -> "Executions":
        workers = [r for r in topo.replicas("worker") if st.alive(r.get("pid"), r.get("start_time"))]
        if not workers:
            return cls(redis, None, "no running worker to count executions")
        found = {r["name"]: process_env(r["pid"], "ECHO_EXECUTIONS_KEY") for r in workers}
        keys = {value for value in found.values() if value}
        missing = sorted(name for name, value in found.items() if not value)
        if missing or len(keys) != 1:
            return cls(redis, None, "workers do not count executions alike (ECHO_EXECUTIONS_KEY: "
                       + ", ".join(f"{n}={v or 'unset'}" for n, v in sorted(found.items()))
                       + "); restart the topology with one ECHO_EXECUTIONS_KEY, or let the gate start it")
        return cls(redis, keys.pop())

    async def counts(self, job_ids: list[str], quiet: float = QUIET_SECONDS) -> dict[str, int]:
        """The counts, `quiet` seconds from now (a duplicate run has had time to count)."""
        assert self.key is not None
        await trio.sleep(quiet)
        return await read_executions(self.redis, self.key, job_ids)


async def _submit_all(gateways: list[Gateway], count: int, label: str) -> list[str]:
    job_ids: list[str] = []

    async def one(n: int) -> None:
        status, body = await gateways[n % len(gateways)].acall(
            "POST", "/api/v1/jobs", {"prompt": f"gate {label} {n}", "labels": {"gate": label}})
        if status == 200 and body.get("job_id"):
            job_ids.append(body["job_id"])

    async with trio.open_nursery() as nursery:
        for n in range(count):
            nursery.start_soon(one, n)
    return job_ids


async def _wait_done(gateway: Gateway, job_ids: list[str], timeout: float = 60) -> dict[str, str]:
    states: dict[str, str] = {}
    with trio.move_on_after(timeout):
        while any(states.get(j) not in ("SUCCEEDED", "FAILED", "DENIED", "TIMEOUT", "CANCELLED") for j in job_ids):
            for job_id in job_ids:
                if states.get(job_id) not in (None, "PENDING", "SCHEDULED", "DISPATCHED", "RUNNING"):
                    continue
                status, body = await gateway.acall("GET", f"/api/v1/jobs/{job_id}")
                if status == 200:
                    states[job_id] = body.get("state", "")
            await trio.sleep(0.5)
    return states


async def scenario_health(topo: Topology, executions: Executions) -> Verdict:
    statuses: dict[str, dict[str, Any]] = {}
    for record in topo.replicas("api-gateway") + topo.replicas("scheduler"):
        url = topo.health_url(record)
        status, body = await trio.to_thread.run_sync(_get_json, url) if url else (0, {})
        statuses[record["name"]] = {"http_status": status, **body}
    for name, gateway in zip([r["name"] for r in topo.replicas("api-gateway")], topo.gateways):
        status, body = await gateway.acall("GET", "/api/v1/status")
        statuses[name].update(nats_connected=(body.get("nats") or {}).get("connected"),
                              redis_ok=(body.get("redis") or {}).get("ok"))
    return gate_checks.healthy(statuses)


async def scenario_no_duplicates(topo: Topology, executions: Executions) -> Verdict:
    gateways = topo.gateways
    if executions.key is None:
        return Verdict(False, executions.problem)
    job_ids = await _submit_all(gateways, JOBS, "dispatch")
    if len(job_ids) < JOBS:
        return Verdict(False, f"only {len(job_ids)} of {JOBS} submits were accepted")
    states = await _wait_done(gateways[1], job_ids)
    return gate_checks.exactly_once(job_ids, states, await executions.counts(job_ids))


async def scenario_rate_limit(topo: Topology, executions: Executions) -> Verdict:
    gateways = topo.gateways
    _, status = await gateways[0].acall("GET", "/api/v1/status")
    limiter = status.get("rate_limiter") or {}
    if limiter.get("mode") not in ("redis",):
        return Verdict(False, f"rate limiter mode is {limiter.get('mode')!r}, not the global 'redis' mode")
    await trio.sleep(float(limiter["burst"]) / float(limiter["rps"]) + 0.5)  # start from a full bucket
    codes: list[int] = []
    started = trio.current_time()

    async def hit(n: int) -> None:
        code, _ = await gateways[n % len(gateways)].acall("GET", "/api/v1/workers")
        codes.append(code)

    async with trio.open_nursery() as nursery:
        for n in range(BURST_REQUESTS):
            nursery.start_soon(hit, n)
    elapsed = trio.current_time() - started
    verdict = gate_checks.rate_limited(codes, burst=int(limiter["burst"]), rps=float(limiter["rps"]), seconds=elapsed)
    await trio.sleep(float(limiter["burst"]) / float(limiter["rps"]) + 0.5)  # let later scenarios start clean
    return verdict


async def scenario_workers(topo: Topology, executions: Executions) -> Verdict:
    lists = {}
    for gateway in topo.gateways:
        _, body = await gateway.acall("GET", "/api/v1/workers")
        lists[gateway.url] = [w.get("worker_id") for w in body.get("items", [])]
    return gate_checks.same_workers(lists)


async def scenario_failover(topo: Topology, executions: Executions) -> Verdict:
    if executions.key is None:
        return Verdict(False, executions.problem)
    survivor = next(r for r in topo.replicas("scheduler") if r["name"] == "scheduler-1")
    metrics_url = (topo.health_url(survivor) or "").replace("/health", "/metrics")
    before = await trio.to_thread.run_sync(_dispatched, metrics_url)
    if not await trio.to_thread.run_sync(topo.stop, "scheduler-2"):
        return Verdict(False, "could not stop scheduler-2")
    try:
        job_ids = await _submit_all(topo.gateways, FAILOVER_JOBS, "failover")
        states = await _wait_done(topo.gateways[0], job_ids)
        via_survivor = await trio.to_thread.run_sync(_dispatched, metrics_url) - before
    finally:
        code = await trio.to_thread.run_sync(topo.start, "scheduler-2")
    if code != 0:
        return Verdict(False, f"scheduler-2 did not start again (exit {code})")
    # counted after the restart: nothing may run twice
    verdict = gate_checks.exactly_once(job_ids, states, await executions.counts(job_ids, quiet=3.0))
    if verdict.ok and via_survivor < len(job_ids):
        return Verdict(False, f"scheduler-1 dispatched {via_survivor:g} of {len(job_ids)} jobs while scheduler-2 was down")
    return Verdict(verdict.ok, verdict.detail + ("; all via scheduler-1, scheduler-2 restarted" if verdict.ok else ""))


def _dispatched(metrics_url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(metrics_url, timeout=5) as response:
            text = response.read().decode()
    except (urllib.error.URLError, OSError):
        return 0.0
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "cordum_scheduler_jobs_dispatched_total")


SCENARIOS: list[tuple[str, Callable[[Topology, Executions], Any]]] = [
    ("two-replica deploy: gateways and schedulers healthy", scenario_health),
    ("no duplicate dispatch: 40 jobs across both gateways", scenario_no_duplicates),
    ("distributed rate limit: burst across both gateways", scenario_rate_limit),
    ("worker snapshot consistency across gateways", scenario_workers),
    ("scheduler failover: stop scheduler-2, jobs complete, restart", scenario_failover),
]


def _get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        return error.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


async def run_gate(topo: Topology) -> list[tuple[str, Verdict]]:
    settings = load_settings({**os.environ, "NATS_URL": topo.data["nats_url"], "REDIS_URL": topo.data["redis_url"],
                              "CORDUM_INSTANCE_ID": "gate"})
    outcomes: list[tuple[str, Verdict]] = []
    async with open_redis(settings) as redis:
        executions = Executions.of(redis, topo)
        for number, (title, scenario) in enumerate(SCENARIOS, 1):
            started = time.monotonic()
            try:
                verdict = await scenario(topo, executions)
            except Exception as exc:  # a crashed scenario is a failed scenario
                verdict = Verdict(False, f"error: {exc!r}")
            outcomes.append((title, verdict))
            mark = "PASS" if verdict.ok else "FAIL"
            print(f"gate 19.{number} {mark} {title} ({time.monotonic() - started:.1f}s): {verdict.detail}", flush=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="production_gate.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gate", type=int, default=19, choices=[19], help="the gate to run (only 19)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a scenario fails")
    parser.add_argument("--replicas", type=int, default=2, help="replicas per service if a topology is started")
    args = parser.parse_args(argv)
    topo = ensure_topology(st.state_dir(), args.replicas)
    outcomes = run_with_bridge(run_gate, topo)
    failed = [title for title, verdict in outcomes if not verdict.ok]
    summary = f"gate 19: {len(outcomes) - len(failed)} passed, {len(failed)} failed"
    print(summary + ("" if args.strict or not failed else " (advisory: use --strict to fail the run)"), flush=True)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
