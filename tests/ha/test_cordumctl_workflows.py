"""`cordumctl workflow ...` and `cordumctl run ...` against a real local topology (`cordumctl up
--replicas 2 --detach`: 2 workflow engines, 2 schedulers, 2 gateways, a safety kernel pair and an
echo worker), as a user drives them: create a workflow from YAML, start a run and follow it with
`--wait` through an approval gate, then get, list, time-line, cancel, rerun and delete runs."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cordum.dev import state as st
from tests.ha.test_dev_topology import KEY, ROOT, cordumctl, free_block

pytestmark = pytest.mark.slow
WAIT = 120  # generous: a run crosses several processes on a loaded 2-core machine

FLOW = """\
id: cli-flow
name: cordumctl end to end
steps:
  fetch:
    topic: job.default
    input: {order: "${input.order}"}
  check:
    topic: job.default
    depends_on: [fetch]
    for_each: input.items
    max_parallel: 2
    input: {item: "${item}"}
  review:
    type: approval
    depends_on: [check]
    input: {summary: "ship ${input.order}?"}
  ship:
    topic: job.default
    depends_on: [review]
    input: {order: "${input.order}"}
"""
INPUT = json.dumps({"order": "o-1", "items": ["a", "b", "c"]})
# The default policy plus an allow rule for workflow approval gates (a gate that policy allows is
# still held for a human; one it denies ends the run `denied`).
POLICY = """\
version: cli-test
default_decision: deny
rules:
  - id: allow-default-topic
    match: {topics: ["job.default", "job.default.*"]}
    decision: allow
  - id: workflow-approval-gates
    match: {topics: ["job.cordum.approval-gate"]}
    decision: allow
"""


def ok(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = cordumctl(env, *args)
    assert result.returncode == 0, f"cordumctl {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


def as_json(env: dict[str, str], *args: str) -> Any:
    return json.loads(ok(env, *args, "--json").stdout)


def wait_status(env: dict[str, str], run_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while True:
        got = cordumctl(env, "run", "get", run_id, "--json")  # exit 1 once it ended unsuccessfully
        assert got.returncode in (0, 1), got.stderr
        run = json.loads(got.stdout)
        if run["status"] == status:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}, not {status}"
        time.sleep(0.3)


class Follower:
    """`cordumctl run start ... --wait` in the background, its stdout lines in a queue."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cordum.cli.main", *args], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     stdin=subprocess.DEVNULL)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def until(self, predicate: Any) -> str:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                ended = self.proc.poll() is not None and self.lines.empty()
                if ended or time.monotonic() > deadline:
                    stderr = self.proc.stderr.read() if ended and self.proc.stderr else ""
                    raise AssertionError(f"no such line ({'exit ' + str(self.proc.returncode) if ended else 'timeout'}); "
                                         f"saw {self.seen} {stderr}") from None
                continue
            self.seen.append(line)
            if predicate(line.split()):
                return line

    def finish(self) -> tuple[int, list[str], str]:
        code = self.proc.wait(timeout=WAIT)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read()
        time.sleep(0.2)  # the reader thread drains the pipe
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, self.seen, err


def test_cordumctl_drives_workflow_runs(tmp_path: Path) -> None:
    base = free_block()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    env = {**os.environ, "CORDUM_DEV_DIR": str(tmp_path / "dev"), "CORDUM_API_KEY": KEY, "PYTHONUNBUFFERED": "1",
           "SAFETY_POLICY_PATH": str(policy)}
    for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID", "CORDUM_TENANT_ID"):
        env.pop(name, None)
    up = cordumctl(env, "up", "--replicas", "2", "--workers", "1", "--detach", "--base-port", str(base), timeout=150)
    try:
        assert up.returncode == 0, up.stdout + up.stderr + str(st.load(tmp_path / "dev"))
        gw1 = {**env, "CORDUM_GATEWAY_ADDR": f"http://127.0.0.1:{base}"}
        gw2 = {**env, "CORDUM_GATEWAY_ADDR": f"http://127.0.0.1:{base + 2}"}

        flow = tmp_path / "flow.yaml"
        flow.write_text(FLOW)
        assert ok(gw2, "workflow", "create", "-f", str(flow)).stdout.strip() == "workflow cli-flow saved (4 steps)"
        assert "cli-flow" in ok(gw1, "workflow", "list").stdout
        shown = ok(gw1, "workflow", "get", "cli-flow").stdout
        doc = yaml.safe_load(shown)
        assert doc["id"] == "cli-flow" and set(doc["steps"]) == {"fetch", "check", "review", "ship"}
        (tmp_path / "shown.yaml").write_text(shown)  # what `get` prints, `create -f` takes back
        assert ok(gw1, "workflow", "create", "-f", str(tmp_path / "shown.yaml")).stdout.strip() == \
            "workflow cli-flow saved (4 steps)"
        bad = tmp_path / "bad.yaml"
        bad.write_text(FLOW.replace("depends_on: [review]", "depends_on: [reveiw]"))
        refused = cordumctl(gw2, "workflow", "create", "-f", str(bad))
        assert refused.returncode == 2 and "bad.yaml:" in refused.stderr and "reveiw" in refused.stderr

        # Start and follow a run; it stops at the approval gate until a human approves it.
        follow = Follower(gw2, "run", "start", "cli-flow", "--input", INPUT, "--idempotency-key", "cli-1",
                          "--wait", "--interval", "0.2")
        run_id = follow.until(lambda w: w[:1] == ["run_id"]).split()[-1]
        gate = follow.until(lambda w: w[:2] == ["review", "waiting"])
        job_id = gate.split()[2]
        assert f"(cordumctl approval approve {job_id})" in gate
        refused_self = cordumctl(gw1, "approval", "approve", job_id)  # the run's starter may not
        assert refused_self.returncode != 0 and "self-approval" in refused_self.stderr
        approver = st.load(tmp_path / "dev")["approver_key"]  # the second key `cordumctl up` made
        ok(gw1, "--api-key", approver, "approval", "approve", job_id)
        code, lines, err = follow.finish()
        assert code == 0, "\n".join(lines) + err
        # one line per change, in order (a change between two polls may go unseen, never reordered)
        changes = [line.split()[:2] for line in lines if line.split()[:1] in (["fetch"], ["review"], ["ship"])]
        assert changes[0] in (["fetch", "running"], ["fetch", "succeeded"]) and ["fetch", "succeeded"] in changes
        assert [step for step, _ in changes] == sorted((step for step, _ in changes),
                                                       key=["fetch", "review", "ship"].index)
        assert changes[-1] == ["ship", "succeeded"] and len(changes) == len(set(map(tuple, changes)))
        assert sum(line.split()[1:2] == ["succeeded"] for line in lines if line.startswith("check[")) == 3
        assert lines[-1].split() == ["status", "succeeded"]

        # The same idempotency key names the same run; every gateway sees it finished.
        again = as_json(gw1, "run", "start", "cli-flow", "--input", INPUT, "--idempotency-key", "cli-1")
        assert again["run_id"] == run_id
        got = ok(gw1, "run", "get", run_id).stdout
        assert "status     succeeded" in got and "ship" in got
        assert any(r["id"] == run_id for r in as_json(gw2, "run", "list", "--workflow", "cli-flow")["items"])
        assert "run_created" in ok(gw2, "run", "timeline", run_id).stdout

        # Rerun from the last step: the approval is kept, only `ship` runs again.
        rerun = Follower(gw1, "run", "rerun", run_id, "--from-step", "ship", "--wait", "--interval", "0.2")
        code, lines, err = rerun.finish()
        assert code == 0, "\n".join(lines) + err
        assert [line.split()[:2] for line in lines if line.startswith("ship")][-1] == ["ship", "succeeded"]

        # A run waiting for its approval is cancelled; `run get` then exits 1.
        second = as_json(gw2, "run", "start", "cli-flow", "--input", INPUT)["run_id"]
        wait_status(gw2, second, "waiting")
        assert ok(gw1, "run", "cancel", second).stdout.strip() == f"run {second}: cancelled"
        wait_status(gw2, second, "cancelled")
        cancelled = cordumctl(gw2, "run", "get", second)
        assert cancelled.returncode == 1 and "status     cancelled" in cancelled.stdout

        ok(gw2, "run", "delete", second)
        assert cordumctl(gw1, "run", "get", second).returncode == 3
        ok(gw2, "workflow", "delete", "cli-flow")
        assert cordumctl(gw1, "workflow", "get", "cli-flow").returncode == 3
        assert cordumctl(gw1, "run", "start", "cli-flow").returncode == 3
    finally:
        down = cordumctl(env, "dev", "down", timeout=200)
    assert down.returncode == 0, down.stdout + down.stderr
