"""cordum-safety-kernel as a real process against the real Redis and NATS servers: decisions over
gRPC, hot reload (file poll and `sys.config.changed`), refused policy files, snapshots in Redis,
shutdown in the declared order. Plus the Kernel itself, in process."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import trio

from cordum.agent.v1 import job_pb2, safety_grpc, safety_pb2
from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.dev.servers import free_port
from cordum.infra.grpc import open_grpc_client
from cordum.protocol.packets import encode, new_packet
from cordum.protocol.subjects import CONFIG_CHANGED
from cordum.safety.kernel import DEFAULT_POLICY_PATH, HISTORY_SIZE, Kernel, decision_name
from cordum.safety.policy import parse_policy
from cordum.safety.service import STAGES
from cordum.store.keys import SAFETY_SNAPSHOTS
from tests.integration.test_multiprocess import _wait_for

D = safety_pb2

POLICY = """\
version: "v1"
default_decision: deny
rules:
  - id: allow-default
    match: {topics: ["job.default", "job.default.*"]}
    decision: allow
  - id: deny-secrets
    match: {topics: ["job.vault.*"]}
    decision: deny
    reason: vault jobs are never allowed
  - id: deploys-need-approval
    match: {topics: ["job.deploy.*"], tenants: [acme]}
    decision: require_approval
    reason: a person approves deploys
  - id: slow-bulk
    match: {capabilities: [bulk.export]}
    decision: throttle
    retry_after: 30
  - id: sandboxed-builds
    match: {topics: ["job.build.*"]}
    decision: allow_with_constraints
    constraints:
      budgets: {max_runtime_ms: 60000}
      sandbox: {isolated: true}
"""


def _policy(version: str, *allowed: str) -> str:
    """A small policy allowing `allowed` topics, denying the rest."""
    rules = "".join(
        f"  - id: allow-{i}\n    match: {{topics: [\"{topic}\"]}}\n    decision: allow\n"
        for i, topic in enumerate(allowed)
    )
    return f'version: "{version}"\ndefault_decision: deny\nrules:\n{rules}'


def _write(path: Path, text: str) -> None:
    """Atomic replace, as a deploy tool (or a ConfigMap update) does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _http_get(url: str) -> tuple[int, dict | str]:
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
        return response.status, json.loads(body) if "json" in response.headers.get("content-type", "") else body


def _start(spawn, name: str, policy_path: Path, **env: str):
    grpc_port, admin_port = free_port(), free_port()
    proc = spawn(name, ["-m", "cordum.safety.service"], env={
        "SAFETY_KERNEL_ADDR": f"127.0.0.1:{grpc_port}",
        "SAFETY_KERNEL_ADMIN_ADDR": f"127.0.0.1:{admin_port}",
        "SAFETY_POLICY_PATH": str(policy_path),
        **env,
    })
    return proc, grpc_port, admin_port


async def _ready(proc) -> None:
    def ready():
        if proc.popen.poll() is not None:
            raise AssertionError(f"exited with {proc.popen.returncode}: {proc.lines('err')[-10:]}")
        return any(e["event"] == "service.ready" for e in proc.events())

    await _wait_for(ready, 15, f"{proc.name} ready")


def _check(topic: str, *, tenant: str = "acme", job_id: str = "job-1", capability: str = "") -> D.PolicyCheckRequest:
    return D.PolicyCheckRequest(
        job_id=job_id, topic=topic, tenant=tenant, meta=job_pb2.JobMetadata(capability=capability)
    )


async def _until(client, request: D.PolicyCheckRequest, predicate, what: str, timeout: float = 5.0):
    with trio.move_on_after(timeout):
        while True:
            reply = await client.call("Check", request, timeout=2)
            if predicate(reply):
                return reply
            await trio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_decisions_over_grpc_admin_http_and_shutdown_in_stage_order(spawn, redis, tmp_path):
    policy_path = tmp_path / "safety.yaml"
    policy_path.write_text(POLICY)
    proc, grpc_port, admin_port = _start(spawn, "safety-1", policy_path, SAFETY_DECISION_CACHE_TTL="30s")
    await _ready(proc)
    snapshot = parse_policy(POLICY).snapshot

    async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", grpc_port) as client:
        allowed = await client.call("Check", _check("job.default"), timeout=5)
        assert (allowed.decision, allowed.rule_id, allowed.policy_snapshot) == (D.DECISION_TYPE_ALLOW, "allow-default", snapshot)
        nested = await client.call("Evaluate", _check("job.default.reports.daily", tenant="other"), timeout=5)
        assert (nested.decision, nested.rule_id) == (D.DECISION_TYPE_ALLOW, "allow-default")

        denied = await client.call("Check", _check("job.vault.read"), timeout=5)
        assert (denied.decision, denied.rule_id, denied.reason) == (D.DECISION_TYPE_DENY, "deny-secrets", "vault jobs are never allowed")
        unmatched = await client.call("Check", _check("job.unknown"), timeout=5)
        assert unmatched.decision == D.DECISION_TYPE_DENY and unmatched.rule_id == ""
        assert "default deny" in unmatched.reason
        assert (await client.call("Check", _check("sys.heartbeat"), timeout=5)).decision == D.DECISION_TYPE_DENY

        # REQUIRE_HUMAN carries the approval ref (the job id), also when answered from the cache.
        for job_id in ("deploy-1", "deploy-2"):
            human = await client.call("Check", _check("job.deploy.prod", job_id=job_id), timeout=5)
            assert (human.decision, human.rule_id, human.approval_required, human.approval_ref) == (
                D.DECISION_TYPE_REQUIRE_HUMAN, "deploys-need-approval", True, job_id)
        other_tenant = await client.call("Check", _check("job.deploy.prod", tenant="globex"), timeout=5)
        assert other_tenant.decision == D.DECISION_TYPE_DENY

        throttled = await client.call("Simulate", _check("job.default", capability="bulk.export"), timeout=5)
        # first match wins: allow-default comes first
        assert throttled.rule_id == "allow-default"
        throttled = await client.call("Check", _check("job.reports.x", capability="BULK.EXPORT"), timeout=5)
        assert (throttled.decision, throttled.rule_id) == (D.DECISION_TYPE_THROTTLE, "slow-bulk")

        constrained = await client.call("Check", _check("job.build.wheel"), timeout=5)
        assert constrained.decision == D.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
        assert constrained.constraints.budgets.max_runtime_ms == 60000 and constrained.constraints.sandbox.isolated

        explained = await client.call("Explain", _check("job.deploy.prod", tenant="globex"), timeout=5)
        assert explained.decision == D.DECISION_TYPE_DENY
        lines = explained.reason.splitlines()
        assert "rule deploys-need-approval (line 11): no match: tenant 'globex' not in ['acme']" in [l.strip() for l in lines]
        assert lines[-1].strip() == "no rule matched: default_decision deny"

        listed = await client.call("ListSnapshots", D.ListSnapshotsRequest(), timeout=5)
        assert list(listed.snapshots) == [snapshot]

    status, health = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{admin_port}/health")
    assert status == 200
    assert (health["policy_version"], health["policy_snapshot"], health["instance"]) == (1, snapshot, "safety-1")
    assert health["decision_cache"]["enabled"] and health["decision_cache"]["hits"] >= 1
    _, exposition = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{admin_port}/metrics")
    assert 'cordum_safety_decisions_total{decision="require_human",pod="safety-1"} 2.0' in exposition
    assert 'cordum_safety_decisions_total{decision="throttle",pod="safety-1"} 1.0' in exposition
    assert 'cordum_safety_policy_reloads_total{pod="safety-1",result="ok"} 1.0' in exposition

    proc.signal(signal.SIGTERM)
    assert await trio.to_thread.run_sync(proc.wait, 15) == 0, proc.lines("err")[-20:]
    observed = [(e["event"], e["stage"]) for e in proc.events() if e["event"] in ("stage.begin", "stage.end")]
    assert observed == [(kind, stage) for stage in STAGES for kind in ("stage.begin", "stage.end")]


async def test_hot_reload_by_poll_and_a_refused_policy_file(spawn, redis, tmp_path):
    policy_path = tmp_path / "safety.yaml"
    v1 = _policy("v1", "job.default")
    policy_path.write_text(v1)
    proc, grpc_port, admin_port = _start(spawn, "safety-poll", policy_path,
                                         SAFETY_POLICY_RELOAD_INTERVAL="0.2s", SAFETY_DECISION_CACHE_TTL="60s")
    await _ready(proc)

    async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", grpc_port) as client:
        assert (await client.call("Check", _check("job.reports"), timeout=5)).decision == D.DECISION_TYPE_DENY  # cached

        v2 = _policy("v2", "job.default", "job.reports")
        _write(policy_path, v2)
        reply = await _until(client, _check("job.reports"), lambda r: r.decision == D.DECISION_TYPE_ALLOW, "v2 in force")
        assert reply.policy_snapshot == parse_policy(v2).snapshot  # the cached v1 decision was not reused
        loaded = [e for e in proc.events() if e["event"] == "policy.loaded"]
        assert [(e["version"], e["trigger"]) for e in loaded] == [(1, "start"), (2, "poll")]
        listed = await client.call("ListSnapshots", D.ListSnapshotsRequest(), timeout=5)
        assert list(listed.snapshots) == [parse_policy(v2).snapshot, parse_policy(v1).snapshot]

        # A broken file is refused: the error names the line, v2 keeps answering.
        broken = v2 + "  - id: half-written\n    decision: allow\n    match: {topics: [job.x], colour: blue}\n"
        _write(policy_path, broken)
        refused = await _wait_for(lambda: [e for e in proc.events() if e["event"] == "policy.refused"], 5, "refusal")
        assert refused[0]["level"] == "error" and refused[0]["line"] == 12
        assert f"{policy_path}:12: unknown key 'colour'" in refused[0]["error"]
        await trio.sleep(0.5)  # several polls of the same broken file: reported once
        assert len([e for e in proc.events() if e["event"] == "policy.refused"]) == 1
        still = await client.call("Check", _check("job.reports"), timeout=5)
        assert (still.decision, still.policy_snapshot) == (D.DECISION_TYPE_ALLOW, parse_policy(v2).snapshot)
        _, health = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{admin_port}/health")
        assert health["policy_version"] == 2 and "unknown key 'colour'" in health["policy_reload_error"]
        _, exposition = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{admin_port}/metrics")
        assert 'cordum_safety_policy_reloads_total{pod="safety-poll",result="error"} 1.0' in exposition

        # A deleted file is refused too; the fixed file is picked up again.
        policy_path.unlink()
        await _wait_for(lambda: len([e for e in proc.events() if e["event"] == "policy.refused"]) == 2, 5, "missing file")
        v3 = _policy("v3", "job.default")
        _write(policy_path, v3)
        await _until(client, _check("job.reports"), lambda r: r.decision == D.DECISION_TYPE_DENY, "v3 in force")
        _, health = await trio.to_thread.run_sync(_http_get, f"http://127.0.0.1:{admin_port}/health")
        assert health["policy_version"] == 3 and "policy_reload_error" not in health


async def test_config_changed_broadcast_reloads_at_once_and_redis_keeps_the_newest_ten(spawn, redis, bus, tmp_path):
    policy_path = tmp_path / "safety.yaml"
    policy_path.write_text(_policy("r0", "job.default"))
    proc, grpc_port, _ = _start(spawn, "safety-bcast", policy_path, SAFETY_POLICY_RELOAD_INTERVAL="1h")
    await _ready(proc)
    notice = encode(new_packet(SystemAlert(message="config changed", details={"scope": "system", "scope_id": "default"}),
                               sender_id="test"))

    snapshots = [parse_policy(_policy("r0", "job.default")).snapshot]
    async with open_grpc_client(safety_grpc.SafetyKernelStub, "127.0.0.1", grpc_port) as client:
        for i in range(1, 13):
            text = _policy(f"r{i}", "job.default", f"job.step{i}")
            _write(policy_path, text)
            await bus.publish(CONFIG_CHANGED, notice)
            reply = await _until(client, _check(f"job.step{i}"), lambda r: r.decision == D.DECISION_TYPE_ALLOW,
                                 f"reload {i}", timeout=3)
            snapshots.append(parse_policy(text).snapshot)
            assert reply.policy_snapshot == snapshots[-1]
        listed = await client.call("ListSnapshots", D.ListSnapshotsRequest(), timeout=5)

    assert list(listed.snapshots) == snapshots[::-1][:HISTORY_SIZE]  # newest first, 10 kept
    assert await redis.zcard(SAFETY_SNAPSHOTS) == HISTORY_SIZE
    loaded = [e for e in proc.events() if e["event"] == "policy.loaded"]
    assert [e["version"] for e in loaded] == list(range(1, 14))
    assert {e["trigger"] for e in loaded[1:]} == {CONFIG_CHANGED}


async def test_policy_problems_at_start_are_configuration_errors(spawn, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text('version: "x"\nrules:\n  - id: a\n    decision: maybe\n')
    procs = {
        "missing": _start(spawn, "safety-missing", tmp_path / "nope.yaml")[0],
        "broken": _start(spawn, "safety-broken", broken)[0],
        "url": _start(spawn, "safety-url", broken, SAFETY_POLICY_URL="https://policies.example/safety.yaml")[0],
        "interval": _start(spawn, "safety-interval", broken, SAFETY_POLICY_RELOAD_INTERVAL="soon")[0],
    }
    codes = {name: await trio.to_thread.run_sync(proc.wait, 15) for name, proc in procs.items()}
    assert codes == dict.fromkeys(procs, 2)
    err = {name: "\n".join(proc.lines("err")) for name, proc in procs.items()}
    assert f"SAFETY_POLICY_PATH='{tmp_path / 'nope.yaml'}' is invalid: policy file" in err["missing"]
    assert "does not exist" in err["missing"]
    assert f"{broken}:4: rule 'a': unknown decision 'maybe'" in err["broken"]
    assert "SAFETY_POLICY_URL is set" in err["url"]
    assert "SAFETY_POLICY_RELOAD_INTERVAL='soon' is invalid" in err["interval"]
    assert not any("Traceback" in text for text in err.values())


# ---- the Kernel in process -----------------------------------------------------------------------


def test_packaged_default_policy_allows_only_the_default_topic_and_approval_gates() -> None:
    kernel = Kernel()
    kernel.install(parse_policy(DEFAULT_POLICY_PATH.read_text(), str(DEFAULT_POLICY_PATH)))
    for topic, tenant in (("job.default", "acme"), ("job.default.sub.task", "globex"), ("job.default", "")):
        reply = kernel.check(_check(topic, tenant=tenant))
        assert (reply.decision, reply.rule_id) == (D.DECISION_TYPE_ALLOW, "allow-default-topic"), topic
    # a workflow's approval gate passes the policy; the scheduler then holds it for a human
    reply = kernel.check(_check("job.cordum.approval-gate", tenant="acme"))
    assert (reply.decision, reply.rule_id) == (D.DECISION_TYPE_ALLOW, "allow-workflow-approval-gates")
    for topic in ("job.other", "job.defaults", "job", "sys.config.changed", "job.cordum.other"):
        assert kernel.check(_check(topic)).decision == D.DECISION_TYPE_DENY, topic


def test_kernel_versions_invalidate_the_cache_and_keep_a_short_history() -> None:
    now = [0.0]
    kernel = Kernel(cache_ttl=10, clock=lambda: now[0])
    a, b = parse_policy(_policy("a", "job.x")), parse_policy(_policy("b"))
    assert kernel.install(a).version == 1
    assert kernel.install(a) is None  # same snapshot: not a new version
    assert kernel.check(_check("job.x")).decision == D.DECISION_TYPE_ALLOW
    assert kernel.check(_check("job.x", job_id="other")).decision == D.DECISION_TYPE_ALLOW
    assert kernel.cache.hits == 1
    kernel.install(b)
    assert kernel.check(_check("job.x")).decision == D.DECISION_TYPE_DENY
    kernel.install(a)  # back to a: version 3, the version-1 entries do not answer
    assert kernel.version == 3 and len(kernel.cache) == 0
    assert list(kernel.history) == [a.snapshot, b.snapshot]
    for i in range(20):
        kernel.install(parse_policy(_policy(f"n{i}")))
    assert len(kernel.history) == HISTORY_SIZE
    assert decision_name(D.DECISION_TYPE_REQUIRE_HUMAN) == "require_human"


def test_explain_without_a_policy_fails_closed() -> None:
    reply = Kernel().explain(_check("job.default"))
    assert reply.decision == D.DECISION_TYPE_DENY and "fail-closed" in reply.reason
    assert Kernel().check(_check("job.default")).decision == D.DECISION_TYPE_DENY



async def test_list_snapshots_falls_back_to_local_history_when_redis_fails() -> None:
    from cordum.infra.metrics import Metrics
    from cordum.infra.redis import RedisError
    from cordum.safety.service import KernelMetrics, SafetyKernelService, SnapshotLog

    class Unreachable(SnapshotLog):
        def __init__(self) -> None:
            pass

        async def newest(self) -> list[str]:
            raise RedisError("connection refused")

    kernel = Kernel()
    a, b = parse_policy(_policy("a")), parse_policy(_policy("b"))
    kernel.install(a)
    kernel.install(b)
    service = SafetyKernelService(kernel, Unreachable(), KernelMetrics(Metrics("t")))
    reply = await service.ListSnapshots(D.ListSnapshotsRequest())
    assert list(reply.snapshots) == [b.snapshot, a.snapshot]
