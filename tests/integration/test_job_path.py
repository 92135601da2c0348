"""The whole governed job path as real processes: HTTP → gateway → policy → scheduler → worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import trio

from tests.integration.stack import POLICY, Stack, gateway_stack
from tests.integration.stack import nats_server, redis_server  # noqa: F401  (servers of its own)

API_KEY = "e2e-admin-key-0123456789abcdef"
# Nobody approves a job submitted with their own key: approvals here use a second key.
APPROVER_KEY = "e2e-approver-key-0123456789ab"
KEYS_FILE = f"- {{key: {APPROVER_KEY}, tenant: default, role: operator, principal_id: approver}}\n"
POLICY_WITH_APPROVALS = POLICY + """
  - id: deploys-need-approval
    match: {topics: ["job.deploy"]}
    decision: require_approval
"""
POOLS = """
topics:
  job.default: default
  job.deploy: default
pools:
  default: {requires: []}
"""


class Api:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def _call(self, method: str, path: str, body: object = None, key: str = API_KEY) -> tuple[int, dict, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={"X-API-Key": key, "X-Tenant-ID": "default",
                                                  "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read()
                return response.status, (json.loads(text) if text else {}), {k.lower(): v for k, v in response.headers.items()}
        except urllib.error.HTTPError as error:
            text = error.read()
            return error.code, (json.loads(text) if text else {}), {k.lower(): v for k, v in error.headers.items()}

    async def call(self, method: str, path: str, body: object = None, *, key: str = API_KEY) -> tuple[int, dict, dict]:
        return await trio.to_thread.run_sync(self._call, method, path, body, key)

    async def job_until(self, job_id: str, states: set[str], timeout: float = 20) -> dict:
        job: dict = {}
        with trio.move_on_after(timeout):
            while True:
                _, job, _ = await self.call("GET", f"/api/v1/jobs/{job_id}")
                if job.get("state") in states:
                    return job
                await trio.sleep(0.1)
        raise AssertionError(f"job {job_id} is {job.get('state')}, wanted {states}: {job}")


async def _gateway_path(stack: Stack) -> tuple[Stack, Api]:
    await gateway_stack(stack)
    return stack, Api(stack.http_ports["gateway-1"])


@pytest.fixture
async def path(spawn, tmp_path):
    (tmp_path / "keys.yaml").write_text(KEYS_FILE)
    stack = Stack.create(spawn, tmp_path, CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev", SCHEDULER_RUNNING_TIMEOUT="5s",
                         CORDUM_API_KEYS_PATH=str(tmp_path / "keys.yaml"))
    (tmp_path / "safety.yaml").write_text(POLICY_WITH_APPROVALS)
    (tmp_path / "pools.yaml").write_text(POOLS)
    return await _gateway_path(stack)


async def test_allowed_job_runs_to_success_with_its_result(path):
    stack, api = path
    status, body, headers = await api.call("POST", "/api/v1/jobs", {"prompt": "hello", "context": {"n": 1}})
    assert status == 200 and body["job_id"] and headers.get("x-trace-id") == body["trace_id"]
    job = await api.job_until(body["job_id"], {"SUCCEEDED", "FAILED", "DENIED", "TIMEOUT"})
    assert job["state"] == "SUCCEEDED"
    assert job["result"]["worker_id"] == "worker-1"
    assert job["result"]["echo"]["context"] == {"n": 1}
    # both policy decisions (the gateway's at submit, the scheduler's before dispatch) are in the
    # tenant's audit chain, with the request that submitted the job, and the chain verifies
    with trio.fail_after(10):
        while True:
            _, audit, _ = await api.call("GET", "/api/v1/audit/events?limit=100")
            mine = {(e["kind"], e["action"]) for e in audit["items"] if e.get("job_id") == body["job_id"]}
            if mine == {("policy_decision", "submit"), ("policy_decision", "dispatch")}:
                break
            await trio.sleep(0.1)
    assert any(e["action"] == "POST /api/v1/jobs" for e in audit["items"])
    _, verified, _ = await api.call("GET", "/api/v1/audit/verify")
    assert verified["valid"] is True


async def test_denied_job_is_403_denied_and_in_the_dlq(path):
    stack, api = path
    status, body, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "x", "topic": "job.danger"})
    assert status == 403 and body["job_id"]
    job = await api.job_until(body["job_id"], {"DENIED"})
    assert job["state"] == "DENIED"
    with trio.fail_after(10):
        while True:
            _, dlq, _ = await api.call("GET", "/api/v1/dlq")
            entries = [e for e in dlq["items"] if e["job_id"] == body["job_id"]]
            if entries:
                break
            await trio.sleep(0.1)
    assert entries[0]["reason_code"] == "policy_denied"


async def test_approval_then_success_and_rejection_then_denied(path):
    stack, api = path
    status, held, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "deploy", "topic": "job.deploy"})
    assert status == 200 and held["status"] == "approval_required"
    _, approvals, _ = await api.call("GET", "/api/v1/approvals")
    assert held["job_id"] in [a["job"]["id"] for a in approvals["items"]]
    status, refused, _ = await api.call("POST", f"/api/v1/approvals/{held['job_id']}/approve", {"reason": "ok"})
    assert status == 403 and refused["code"] == "self_approval_denied"  # the submitter's own key
    status, _, _ = await api.call("POST", f"/api/v1/approvals/{held['job_id']}/approve", {"reason": "ok"},
                                  key=APPROVER_KEY)
    assert status == 200
    assert (await api.job_until(held["job_id"], {"SUCCEEDED", "DENIED", "FAILED"}))["state"] == "SUCCEEDED"

    _, other, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "deploy again", "topic": "job.deploy"})
    status, _, _ = await api.call("POST", f"/api/v1/approvals/{other['job_id']}/reject", {"reason": "no"},
                                  key=APPROVER_KEY)
    assert status == 200
    assert (await api.job_until(other["job_id"], {"DENIED"}))["state"] == "DENIED"


async def test_cancel_a_running_job(path):
    stack, api = path
    _, body, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "long", "context": {"sleep_ms": 20000}})
    await api.job_until(body["job_id"], {"RUNNING"})
    status, cancelled, _ = await api.call("POST", f"/api/v1/jobs/{body['job_id']}/cancel")
    assert status == 200 and cancelled["state"] == "CANCELLED"
    await trio.sleep(1.0)  # the worker's own CANCELLED result must not change anything
    job = await api.job_until(body["job_id"], {"CANCELLED"})
    assert job["state"] == "CANCELLED"
    worker_log = "\n".join(stack.procs["worker-1"].lines("err"))
    assert "worker.job_cancelled" in worker_log


async def test_worker_killed_mid_job_times_out_then_dlq_retry_succeeds(path):
    stack, api = path
    _, body, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "doomed", "context": {"sleep_ms": 2500}})
    await api.job_until(body["job_id"], {"RUNNING"})
    stack.procs["worker-1"].stop()  # SIGKILL mid-job
    job = await api.job_until(body["job_id"], {"TIMEOUT"}, timeout=20)
    assert job["failure_reason"].startswith("timeout: RUNNING")
    with trio.fail_after(10):
        while True:
            status, entry, _ = await api.call("GET", "/api/v1/dlq")
            if any(e["job_id"] == body["job_id"] for e in entry["items"]):
                break
            await trio.sleep(0.1)
    stack.worker("worker-2")
    await stack.ready("worker-2")
    await trio.sleep(1.0)
    status, retried, _ = await api.call("POST", f"/api/v1/dlq/{body['job_id']}/retry")
    assert status == 200 and retried["job_id"].startswith(body["job_id"] + "-retry-")
    job = await api.job_until(retried["job_id"], {"SUCCEEDED", "FAILED", "TIMEOUT"})
    assert job["state"] == "SUCCEEDED" and job["worker_id"] == "worker-2"
    assert job["result"]["echo"]["context"] == {"sleep_ms": 2500}  # the same input ran again
    _, dlq, _ = await api.call("GET", "/api/v1/dlq")
    assert body["job_id"] not in [e["job_id"] for e in dlq["items"]]  # retried entries leave the DLQ


async def test_dlq_retry_of_a_failed_job_succeeds(path):
    stack, api = path
    _, body, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "p", "context": {"fail": True, "error": "boom"}})
    job = await api.job_until(body["job_id"], {"FAILED"})
    assert job["failure_reason"] == "boom"
    with trio.fail_after(10):
        while True:
            _, dlq, _ = await api.call("GET", "/api/v1/dlq")
            if any(e["job_id"] == body["job_id"] for e in dlq["items"]):
                break
            await trio.sleep(0.1)
    status, retried, _ = await api.call("POST", f"/api/v1/dlq/{body['job_id']}/retry")
    assert status == 200
    # same input: fails again, which proves the retry ran as a new job on the worker
    again = await api.job_until(retried["job_id"], {"FAILED", "SUCCEEDED"})
    assert again["state"] == "FAILED" and again["attempts"] >= 1


async def test_cordumctl_submits_and_waits(path):
    stack, api = path
    env = {**os.environ, "CORDUM_API_KEY": API_KEY, "CORDUM_GATEWAY_ADDR": api.base}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cordum.cli.main", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    done = await trio.to_thread.run_sync(run, "--json", "job", "submit", "--prompt", "from the cli", "--wait")
    assert done.returncode == 0, done.stderr
    final = json.loads(done.stdout.strip().splitlines()[-1])
    assert final["state"] == "SUCCEEDED"
    denied = await trio.to_thread.run_sync(run, "job", "submit", "--prompt", "x", "--topic", "job.danger")
    assert denied.returncode == 4 and "denied" in denied.stderr
    listed = await trio.to_thread.run_sync(run, "job", "list")
    assert listed.returncode == 0 and final["id"] in listed.stdout
    workers = await trio.to_thread.run_sync(run, "--json", "workers")
    assert workers.returncode == 0 and "worker-1" in workers.stdout
    # the job's path, from what the gateway and the scheduler recorded: both decisions, every state
    traced = await trio.to_thread.run_sync(run, "--json", "job", "trace", final["id"])
    assert traced.returncode == 0, traced.stderr
    steps = json.loads(traced.stdout)["items"]
    states = [s["state"] for s in steps if s["kind"] == "state"]
    assert states[0] == "PENDING" and states[-1] == "SUCCEEDED" and "DISPATCHED" in states
    assert [s["by"] for s in steps if s["kind"] == "decision"] == ["api-gateway", "cordum-scheduler"]
    assert [s["at"] for s in steps] == sorted(s["at"] for s in steps)
    table = await trio.to_thread.run_sync(run, "job", "trace", final["id"])
    assert table.returncode == 0 and "policy ALLOW" in table.stdout and "SUCCEEDED" in table.stdout
    assert API_KEY not in done.stdout + done.stderr + listed.stdout


async def test_with_debug_logs_one_grep_follows_a_job_through_every_replica(spawn, tmp_path):
    stack, api = await _gateway_path(Stack.create(spawn, tmp_path, CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev",
                                                  CORDUM_LOG_LEVEL="debug"))
    status, body, _ = await api.call("POST", "/api/v1/jobs", {"prompt": "trace me"})
    assert status == 200
    job_id, trace_id = body["job_id"], body["trace_id"]
    await api.job_until(job_id, {"SUCCEEDED"})

    def steps() -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for name in ("gateway-1", "scheduler-1", "worker-1"):
            lines = [line for line in stack.procs[name].lines("err") if job_id in line]  # the grep
            found[name] = {e["event"] for e in map(json.loads, lines) if e.get("trace_id") == trace_id}
        return found

    with trio.fail_after(30):  # the worker may log just after the state is written
        while not all(steps().values()):
            await trio.sleep(0.1)
    found = steps()
    assert {"job.submitted"} <= found["gateway-1"]
    assert {"job.dispatched", "job.result_applied"} <= found["scheduler-1"]
    assert {"job.ran"} <= found["worker-1"]
