"""Issue 9's proof: workflow runs stay correct while workflow engines die and freeze.

Real processes: a safety kernel, 2 schedulers, 2 workflow engines, 2 echo workers, a gateway.
Runs of a 6-step workflow (fetch → fan-out of 10 → delay → condition → approval → act) are started
and approved through the gateway's HTTP API; meanwhile one engine is killed -9 (and restarted) and
the other SIGSTOPped past the 30 s run-lock TTL, then resumed. Every run must end in the status its
input and its approval decide, and every step job must have executed exactly once — counted by the
echo workers (ECHO_EXECUTIONS_KEY), never by results on the bus.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import pytest
import trio

from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.runstate import TERMINAL_RUN_STATUSES, Run
from tests.integration.stack import EXECUTIONS_KEY, POLICY, Stack, nats_server, redis_server  # noqa: F401
from tests.integration.test_gateway import _request

pytestmark = pytest.mark.slow

ADMIN = "wf-ha-admin-key-0123456789abcdef"  # starts the runs
APPROVER = "wf-ha-approver-key-0123456789abc"  # a person other than the starter approves
RUN_LOCK_TTL = 30.0
GATE_POLICY = POLICY + """
  - id: workflow-gates
    match: {topics: ["job.cordum.approval-gate"]}
    decision: allow
"""
ENGINE_ENV = {"WORKFLOW_ENGINE_SCAN_INTERVAL": "1s", "WORKFLOW_ENGINE_DELAY_POLL_INTERVAL": "0.5s"}

WORKFLOW = {
    "name": "ha proof",
    "steps": {
        "fetch": {"type": "worker", "topic": "job.default", "input": {"url": "${input.url}"}},
        "fan": {"type": "worker", "topic": "job.default", "depends_on": ["fetch"], "for_each": "input.items",
                "input": {"item": "${item}", "sleep_ms": 20}},
        "pause": {"type": "delay", "depends_on": ["fan"], "delay_sec": 2},
        "decide": {"type": "condition", "depends_on": ["pause"], "condition": "input.risky == true"},
        "review": {"type": "approval", "depends_on": ["decide"], "input": {"reason": "act on ${input.url}"}},
        "act": {"type": "worker", "topic": "job.default", "depends_on": ["review"],
                "condition": "steps.decide.output == true"},
    },
}


class Gateway:
    def __init__(self, port: int, key: str = ADMIN) -> None:
        self.port = port
        self.key = key

    def as_approver(self) -> "Gateway":
        return Gateway(self.port, APPROVER)

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = {"X-API-Key": self.key, "Content-Type": "application/json"}
        reply = await trio.to_thread.run_sync(_request, self.port, method, path, data, headers)
        assert reply.status < 300, (method, path, reply.status, reply.raw[:500])
        return reply.body


def expected_status(index: int) -> str:
    return "denied" if index % 10 == 9 else "succeeded"


def inputs(index: int) -> dict[str, Any]:
    return {"url": f"https://example.test/{index}", "items": list(range(10)), "risky": index % 2 == 0}


async def approver(gw: Gateway, decisions: dict[str, bool], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """A human at the approvals queue: approves or rejects each run's gate as it appears."""
    gw = gw.as_approver()
    done: set[str] = set()
    task_status.started()
    while True:
        try:
            page = await gw.call("GET", "/api/v1/approvals?limit=200")
        except Exception:
            await trio.sleep(0.5)  # the gateway is busy; try again
            continue
        for item in page.get("items") or []:
            job_id = (item.get("job") or {}).get("id") or item.get("job_id") or ""
            run_id = job_id.split(":", 1)[0]
            if job_id in done or run_id not in decisions:
                continue
            verb = "approve" if decisions[run_id] else "reject"
            try:
                await gw.call("POST", f"/api/v1/approvals/{job_id}/{verb}", {"reason": "ha test"})
                done.add(job_id)
            except AssertionError:
                pass  # e.g. 409 while the scheduler holds the job's lock: next pass
        await trio.sleep(0.3)


async def wait_all(store: WorkflowStore, run_ids: list[str], timeout: float) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    with trio.move_on_after(timeout):
        while len(runs) < len(run_ids):
            for run_id in run_ids:
                if run_id not in runs:
                    doc = await store.get_run(run_id)
                    if doc is not None and doc["status"] in TERMINAL_RUN_STATUSES:
                        runs[run_id] = Run.from_dict(doc)
            await trio.sleep(0.5)
    stuck = {r: (await store.get_run(r) or {}).get("status") for r in run_ids if r not in runs}
    assert not stuck, f"{len(stuck)} runs did not end: {list(stuck.items())[:5]}"
    return runs


async def start_stack(spawn, tmp_path) -> tuple[Stack, Gateway]:
    stack = Stack.create(spawn, tmp_path, **ENGINE_ENV)
    (tmp_path / "safety.yaml").write_text(GATE_POLICY)
    stack.kernel()
    for i in (1, 2):
        stack.scheduler(f"scheduler-{i}")
    for i in (1, 2):
        stack.workflow_engine(f"workflow-engine-{i}")
    for i in (1, 2):
        stack.worker(f"worker-{i}")
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- {{key: {APPROVER}, tenant: default, role: admin, principal_id: approver}}\n")
    stack.start("gateway-1", "cordum.gateway.service", CORDUM_API_KEY=ADMIN, CORDUM_API_KEYS_PATH=str(keys_file))
    await stack.ready(timeout=60)
    await trio.sleep(1.0)  # worker heartbeats reach the schedulers
    return stack, Gateway(stack.http_ports["gateway-1"])


async def check_runs(redis, runs: dict[str, Run], expected: dict[str, str], risky: dict[str, bool]) -> None:
    wrong = {r: run.status for r, run in runs.items() if run.status != expected[r]}
    assert not wrong, f"{len(wrong)} runs in a wrong status: {list(wrong.items())[:5]}"
    job_ids: list[str] = []
    for run_id, run in runs.items():
        workers = [p for p in run.steps if p == "fetch" or p.startswith("fan[") or p == "act"]
        acted = expected[run_id] == "succeeded" and risky[run_id]
        assert len(workers) == 12, (run_id, sorted(run.steps))
        # a rejected review skips act (dependency denied); an approved one runs it if risky
        assert run.steps["act"].status == ("succeeded" if acted else "skipped"), (run_id, run.steps["act"])
        assert run.steps["pause"].status == "succeeded", run.steps["pause"]
        job_ids += [run.steps[p].job_id for p in workers if run.steps[p].job_id and
                    run.steps[p].status == "succeeded"]
    # Every execution of the runs' jobs, whatever its job id (a second attempt of a step would
    # show up under another id): exactly the succeeded worker steps' jobs, once each.
    executed = {job: int(n) for job, n in (await redis.execute("HGETALL", EXECUTIONS_KEY)).items()
                if job.split(":", 1)[0] in runs}
    assert executed == {job: 1 for job in job_ids}, (
        f"not exactly once: {[(j, n) for j, n in executed.items() if n != 1][:5]}, "
        f"unexpected: {sorted(set(executed) - set(job_ids))[:5]}, missing: {sorted(set(job_ids) - set(executed))[:5]}")


async def test_engines_killed_and_paused_every_run_ends_right_and_each_step_runs_once(
        spawn, tmp_path, redis) -> None:
    stack, gw = await start_stack(spawn, tmp_path)
    store = WorkflowStore(redis)
    workflow_id = (await gw.call("POST", "/api/v1/workflows", WORKFLOW))["id"]
    decisions: dict[str, bool] = {}
    expected: dict[str, str] = {}
    risky: dict[str, bool] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(approver, gw, decisions)
        for index in range(100):
            run_id = (await gw.call("POST", f"/api/v1/workflows/{workflow_id}/runs", inputs(index)))["run_id"]
            decisions[run_id] = expected_status(index) == "succeeded"
            expected[run_id] = expected_status(index)
            risky[run_id] = index % 2 == 0
        await trio.sleep(2.0)
        stack.procs["workflow-engine-1"].stop()  # kill -9
        stack.restart("workflow-engine-1")
        stack.procs["workflow-engine-2"].signal(signal.SIGSTOP)
        await trio.sleep(RUN_LOCK_TTL + 5)  # its run locks expire; engine-1 takes its runs over
        stack.procs["workflow-engine-2"].signal(signal.SIGCONT)  # its stale writes must be refused
        runs = await wait_all(store, list(expected), timeout=240)
        nursery.cancel_scope.cancel()
    await check_runs(redis, runs, expected, risky)


async def test_a_run_survives_a_restart_of_every_engine(spawn, tmp_path, redis) -> None:
    stack, gw = await start_stack(spawn, tmp_path)
    store = WorkflowStore(redis)
    slow = json.loads(json.dumps(WORKFLOW))
    slow["steps"]["pause"]["delay_sec"] = 20  # long enough for every run to reach it on a loaded machine
    workflow_id = (await gw.call("POST", "/api/v1/workflows", slow))["id"]
    expected, risky, decisions = {}, {}, {}
    for index in range(4):
        run_id = (await gw.call("POST", f"/api/v1/workflows/{workflow_id}/runs", inputs(index)))["run_id"]
        expected[run_id], risky[run_id] = "succeeded", index % 2 == 0
        decisions[run_id] = True

    async def in_delay() -> bool:
        docs = [await store.get_run(r) for r in expected]
        return all(d and d["steps"].get("pause", {}).get("status") == "running" for d in docs)

    with trio.fail_after(60):
        while not await in_delay():
            await trio.sleep(0.2)
    for name in ("workflow-engine-1", "workflow-engine-2"):  # every engine goes, timers pending
        stack.procs[name].signal(signal.SIGTERM)
    for name in ("workflow-engine-1", "workflow-engine-2"):
        await trio.to_thread.run_sync(stack.procs[name].wait, 30)
    due = max([(await store.get_run(r))["steps"]["pause"]["next_attempt_at"] for r in expected])
    await trio.sleep(max(0.0, due - time.time()) + 1)  # the delays fall due while no engine runs
    for name in ("workflow-engine-1", "workflow-engine-2"):
        stack.restart(name)
    await stack.ready("workflow-engine-1", "workflow-engine-2")

    async def all_waiting() -> bool:
        docs = [await store.get_run(r) for r in expected]
        return all(d and d["status"] == "waiting" for d in docs)

    with trio.fail_after(60):
        while not await all_waiting():
            await trio.sleep(0.2)
    for name in ("workflow-engine-1", "workflow-engine-2"):  # and again, approvals waiting
        stack.procs[name].signal(signal.SIGTERM)
    for name in ("workflow-engine-1", "workflow-engine-2"):
        await trio.to_thread.run_sync(stack.procs[name].wait, 30)
    async with trio.open_nursery() as nursery:
        await nursery.start(approver, gw, decisions)
        jobs = JobStore(redis)
        with trio.fail_after(60):  # approved while no engine runs: the results wait in the stream
            while any([(await jobs.get(f"{r}:review@1") or {}).get("state") != "SUCCEEDED" for r in expected]):
                await trio.sleep(0.2)
        for name in ("workflow-engine-1", "workflow-engine-2"):
            stack.restart(name)
        runs = await wait_all(store, list(expected), timeout=120)
        nursery.cancel_scope.cancel()
    await check_runs(redis, runs, expected, risky)
