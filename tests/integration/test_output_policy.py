"""The output policy end to end, as real processes (kernel, scheduler, workflow engine, echo worker,
gateway): a worker's output with a secret is quarantined, personal data under a redact rule is
redacted, a clean output passes; nobody is served an output the policy has not cleared; a workflow
step whose job is quarantined fails. With the kernel away the fail mode decides (open: SUCCEEDED
and a counted skip; closed: quarantined). The output breaker opened by one scheduler is seen open
by another."""

from __future__ import annotations

import json

import pytest
import trio

from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.job_pb2 import JobRequest
from cordum.dev.servers import free_port
from cordum.protocol import subjects
from cordum.safety.client import HEALTHY_LOOK_S, CircuitBreaker, OutputDecision, open_safety_client
from cordum.store import keys
from cordum.store.jobs import JobStore, now_us
from cordum.store.jobstate import JobState
from cordum.v1.output_policy_pb2 import OutputCheckRequest
from cordum.worker.echo import read_executions
from tests.integration import stack as stack_module
from tests.integration.stack import EXECUTIONS_KEY, POLICY, Stack, gateway_stack, http_get, metric, submit_direct, wait_state
from tests.integration.test_gateway import ADMIN, VIEWER, _keys_file
from tests.integration.test_job_path import Api

redis_server, nats_server = stack_module.redis_server, stack_module.nats_server

WAIT = 60
SECRET = "AKIAZ7Q3M5X2R8B4C6D1"  # shaped like an AWS access key id
EMAIL = "bob.smith@example.com"
OUTPUT_RULES = """
output_policy:
  enabled: true
output_rules:
  - id: scrub-labelled
    match: {labels: {scrub: all}}
    decision: redact
    reason: outputs of jobs labelled scrub=all are redacted
  - id: no-secrets
    severity: critical
    match: {scanners: [secret]}
    decision: quarantine
    reason: a credential in the output
  - id: redact-pii
    match: {topics: ["job.default"], detectors: [email]}
    decision: redact
    reason: personal data is redacted
"""


def _stack(spawn, tmp_path, **env: str) -> Stack:
    stack = Stack.create(spawn, tmp_path, **env)
    (tmp_path / "safety.yaml").write_text(POLICY + OUTPUT_RULES)
    return stack


async def _job(api: Api, job_id: str, *, key: str = ADMIN, query: str = "") -> tuple[int, dict]:
    status, body, _ = await api.call("GET", f"/api/v1/jobs/{job_id}{query}", key=key)
    return status, body


async def _settled(api: Api, job_id: str, timeout: float = 30) -> dict:
    """The job once it ended and its output check is over."""
    job: dict = {}
    with trio.move_on_after(timeout):
        while True:
            _, job = await _job(api, job_id)
            if job.get("state") in ("OUTPUT_QUARANTINED", "FAILED", "DENIED", "TIMEOUT") or (
                    job.get("state") == "SUCCEEDED" and job.get("output_check") not in ("due", "pending")):
                return job
            await trio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not settle: {job}")


@pytest.mark.parametrize("inline", [True, False], ids=["small-outputs-checked-at-once", "cordums-two-phases"])
async def test_outputs_are_quarantined_redacted_or_passed_and_withheld_until_cleared(spawn, tmp_path, redis, bus, inline):
    stack = _stack(spawn, tmp_path, **({} if inline else {"SAFETY_OUTPUT_INLINE_BYTES": "0"}))
    await gateway_stack(stack, timeout=WAIT, CORDUM_API_KEY=ADMIN, CORDUM_API_KEYS_PATH=str(_keys_file(tmp_path)))
    api = Api(stack.http_ports["gateway-1"])
    events: list[BusPacket] = []

    async def listen(task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(subjects.AUDIT_OUTPUT_POLICY) as messages:
            task_status.started()
            async for message in messages:
                packet = BusPacket()
                packet.ParseFromString(message.data)
                events.append(packet)

    async with trio.open_nursery() as nursery:
        await nursery.start(listen)
        ids = {}
        for name, context in (("secret", {"note": f"the key is {SECRET}"}), ("email", {"note": f"write to {EMAIL} today"}),
                              ("clean", {"note": "nothing to see"}), ("failed", {"fail": True, "error": "no luck"}),
                              ("labelled", {"note": f"{EMAIL} and {SECRET}"})):
            body = {"prompt": "echo", "context": context, **({"labels": {"scrub": "all"}} if name == "labelled" else {})}
            status, body, _ = await api.call("POST", "/api/v1/jobs", body, key=ADMIN)
            assert status == 200, body
            ids[name] = body["job_id"]
        jobs = {name: await _settled(api, job_id) for name, job_id in ids.items()}

        # A credential: quarantined, its output withheld, the finding named without the secret.
        secret = jobs["secret"]
        assert secret["state"] == "OUTPUT_QUARANTINED", secret
        assert secret["result"] is None and "quarantined" in secret["result_withheld"]
        safety = secret["output_safety"]
        assert safety["decision"] == "quarantine" and safety["rule_id"] == "no-secrets"
        assert safety["phase"] == "content"  # decided on the content: inline, or in the content phase
        assert any(f["type"] == "aws_access_key" for f in safety["findings"]), safety
        assert SECRET not in json.dumps(safety), "a finding leaks the secret"  # (the job's input has it: ours)
        status, _ = await _job(api, ids["secret"], key=VIEWER, query="?include_quarantined=true")
        assert status == 403
        status, admin_view = await _job(api, ids["secret"], query="?include_quarantined=true")
        assert status == 200 and SECRET in json.dumps(admin_view["result"])
        status, body, _ = await api.call("GET", f"/api/v1/memory?key=res:{ids['secret']}", key=ADMIN)
        assert status == 403 and body.get("code") == "output_withheld"
        with trio.fail_after(30):  # the gateway's DLQ tap writes the entry
            while True:
                _, body, _ = await api.call("GET", "/api/v1/dlq?limit=50", key=ADMIN)
                entry = {e["job_id"]: e for e in body["items"]}.get(ids["secret"])
                if entry is not None:
                    break
                await trio.sleep(0.1)
        code = "output_quarantined" if inline else "output_quarantined_async"
        assert entry["reason_code"] == code and entry["status"] == "JOB_STATUS_DENIED", entry

        # Personal data under a redact rule: SUCCEEDED, served redacted; the original kept apart.
        email = jobs["email"]
        assert email["state"] == "SUCCEEDED" and email["output_check"] == "redact", email
        assert email["result_ptr"].endswith(":redacted")
        served = json.dumps(email["result"])
        assert EMAIL not in served and "[REDACTED:email]" in served
        assert EMAIL in (await redis.execute("GET", keys.result(ids["email"])))

        # A rule that decides on metadata alone (a label) to redact: the content is checked at once
        # and every finding of the built-in scanners redacted, the credential too.
        labelled = jobs["labelled"]
        assert labelled["state"] == "SUCCEEDED" and labelled["output_check"] == "redact", labelled
        assert labelled["output_safety"]["rule_id"] == "scrub-labelled"
        served = json.dumps(labelled["result"])
        assert EMAIL not in served and SECRET not in served and "[REDACTED:aws_access_key]" in served

        clean = jobs["clean"]
        assert clean["state"] == "SUCCEEDED" and clean["output_check"] == "allow"
        assert clean["result"]["echo"]["context"] == {"note": "nothing to see"}
        # A failure's output is not checked, and not held back for a check that never comes.
        failed = jobs["failed"]
        assert failed["state"] == "FAILED" and not failed.get("output_check") and "result_withheld" not in failed
        # An output overwritten after its check (a late worker of an earlier attempt) is not
        # served as if it had been checked.
        original = await redis.execute("GET", keys.result(ids["clean"]))
        await redis.execute("SET", keys.result(ids["clean"]), json.dumps({"echo": SECRET}))
        _, changed = await _job(api, ids["clean"])
        assert changed["result"] is None and "changed after" in changed["result_withheld"]
        status, body, _ = await api.call("GET", f"/api/v1/memory?key=res:{ids['clean']}", key=ADMIN)
        assert status == 403 and SECRET not in json.dumps(body)
        await redis.execute("SET", keys.result(ids["clean"]), original)
        _, restored = await _job(api, ids["clean"])
        assert restored["result"]["echo"]["context"] == {"note": "nothing to see"}

        # The work ran once per job (counted at the worker), the quarantine was announced.
        ran = [ids[name] for name in ("secret", "email", "clean", "labelled")]
        executions = await read_executions(redis, EXECUTIONS_KEY, ran)
        assert executions == {job_id: 1 for job_id in ran}
        with trio.fail_after(30):
            while not any(e.job_progress.job_id == ids["secret"] for e in events):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    scheduler = http_get(stack.http_ports["scheduler-1"], "/metrics")
    assert metric(scheduler, "cordum_output_policy_quarantined_total") == 1
    kernel = http_get(stack.http_ports["safety-1"], "/metrics")
    assert metric(kernel, "cordum_output_redactions_total") == 2  # the email job's, the labelled job's


async def test_a_workflow_step_whose_job_is_quarantined_fails(spawn, tmp_path):
    stack = _stack(spawn, tmp_path)
    await gateway_stack(stack, workflow_engine=True, timeout=WAIT, CORDUM_API_KEY=ADMIN,
                        CORDUM_API_KEYS_PATH=str(_keys_file(tmp_path)))
    api = Api(stack.http_ports["gateway-1"])
    status, flow, _ = await api.call("POST", "/api/v1/workflows", {"name": "leaky", "steps": {
        "fetch": {"type": "worker", "topic": "job.default"},
        "act": {"type": "worker", "topic": "job.default", "depends_on": ["fetch"]}}}, key=ADMIN)
    assert status in (200, 201), flow
    runs = {}
    for name, note in (("leaky", f"key {SECRET}"), ("clean", "fine")):
        status, body, _ = await api.call("POST", f"/api/v1/workflows/{flow['id']}/runs", {"input": {"note": note}},
                                         key=ADMIN)
        assert status in (200, 201), body
        runs[name] = body["run_id"]
    done: dict = {}
    with trio.fail_after(WAIT):
        while len(done) < len(runs):
            for name, run_id in runs.items():
                _, run, _ = await api.call("GET", f"/api/v1/workflow-runs/{run_id}", key=ADMIN)
                if run.get("status") in ("succeeded", "failed", "denied", "cancelled", "timed_out"):
                    done[name] = run
            await trio.sleep(0.2)
    leaky, clean = done["leaky"], done["clean"]
    assert clean["status"] == "succeeded", clean
    assert leaky["status"] == "failed", leaky
    steps = leaky["steps"]
    assert steps["fetch"]["status"] == "failed" and "credential" in json.dumps(steps["fetch"]), steps
    assert steps["act"]["status"] in ("pending", "skipped"), steps  # never ran on a quarantined output


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_with_the_kernel_away_the_fail_mode_decides(spawn, tmp_path, redis, bus, mode):
    stack = _stack(spawn, tmp_path, OUTPUT_POLICY_FAIL_MODE=mode, POLICY_CHECK_FAIL_MODE="open")
    stack.kernel()
    stack.scheduler()
    stack.worker()
    await stack.ready()
    await trio.sleep(1.0)
    stack.procs["safety-1"].stop()  # input checks fail open; output checks meet the output fail mode
    store = JobStore(redis)
    job_id = await submit_direct(store, bus, context={"note": "no secret at all"})
    meta = await wait_state(store, job_id, {"SUCCEEDED", "OUTPUT_QUARANTINED"}, timeout=30)
    with trio.fail_after(30):
        while meta.get("output_check") in ("due", "pending"):
            await trio.sleep(0.05)
            meta = await store.get(job_id)
    scheduler = http_get(stack.http_ports["scheduler-1"], "/metrics")
    if mode == "open":
        assert meta["state"] == "SUCCEEDED" and meta["output_check"] == "skipped", meta
        assert metric(scheduler, "cordum_output_policy_skipped_total") == 1
    else:
        assert meta["state"] == "OUTPUT_QUARANTINED" and meta["output_check"] == "quarantine", meta
        assert "OUTPUT_POLICY_FAIL_MODE=closed" in meta["failure_reason"]
        assert metric(scheduler, "cordum_output_policy_quarantined_total") == 1


async def test_the_output_breaker_opened_by_one_scheduler_is_open_for_another(redis):
    """Two schedulers' output clients (their own breaker objects on the shared key) against a
    kernel address nobody listens on: three failures on the first open it for the second, whose
    next check is refused without a call; the input breaker is not touched."""
    nobody = [("127.0.0.1", free_port())]
    request = OutputCheckRequest(job_id="job-1", topic="job.default")
    first = CircuitBreaker(redis, keys.SAFETY_CB_OUTPUT_FAILURES)
    second = CircuitBreaker(redis, keys.SAFETY_CB_OUTPUT_FAILURES)
    async with open_safety_client(nobody, CircuitBreaker(redis), timeout=0.5, batch=False) as one, \
            open_safety_client(nobody, CircuitBreaker(redis), timeout=0.5, batch=False) as other:
        a, b = one.output_client(first), other.output_client(second)
        assert not await second.is_open()
        for _ in range(3):
            verdict = await a.check(request, timeout=0.5)
            assert verdict.decision is OutputDecision.UNAVAILABLE and "circuit" not in verdict.reason
        await trio.sleep(HEALTHY_LOOK_S + 0.05)  # B's last look (no failures then) stands this long
        verdict = await b.check(request, timeout=0.5)
        assert verdict.decision is OutputDecision.UNAVAILABLE and verdict.reason == "safety kernel output circuit open"
        assert await redis.execute("GET", keys.SAFETY_CB_FAILURES) is None  # input checks unaffected
        assert 0 < await redis.execute("PTTL", keys.SAFETY_CB_OUTPUT_FAILURES) <= 30_000  # half-open after the window


async def test_a_result_pointer_to_another_key_is_quarantined_without_tripping_the_breaker(spawn, tmp_path, redis):
    """The kernel reads only the job's own output, whatever `result_ptr` names: a pointer elsewhere
    is this job's problem (quarantined), not the kernel's (the shared breaker stays closed)."""
    stack = _stack(spawn, tmp_path)
    stack.kernel()
    await stack.ready()
    await redis.execute("SET", "cfg:system:default", json.dumps({"data": {"secret": SECRET}}))
    addr = stack.env["SAFETY_KERNEL_ADDR"].rsplit(":", 1)
    breaker = CircuitBreaker(redis, keys.SAFETY_CB_OUTPUT_FAILURES)
    async with open_safety_client([(addr[0], int(addr[1]))], CircuitBreaker(redis), batch=False) as safety:
        client = safety.output_client(breaker)
        for _ in range(4):
            verdict = await client.check(OutputCheckRequest(job_id="j-1", topic="job.default", content_phase=True,
                                                            result_ptr="redis://cfg:system:default"), timeout=5)
            assert verdict.decision is OutputDecision.QUARANTINE and "cannot be checked" in verdict.reason
            assert SECRET not in str(verdict.response)
        await redis.execute("SET", keys.result("j-2"), json.dumps({"note": f"key {SECRET}"}))
        verdict = await client.check(OutputCheckRequest(job_id="j-2", topic="job.default", content_phase=True,
                                                        result_ptr="redis://res:j-2"), timeout=5)
        assert verdict.decision is OutputDecision.QUARANTINE and verdict.response.rule_id == "no-secrets"
        assert verdict.response.content_sha256  # what was checked, for readers to compare
        # An output that is not UTF-8 is read (as bytes) and scanned, not a kernel failure.
        await redis.execute("SET", keys.result("j-3"), b"\xff\xfe binary, then " + SECRET.encode())
        verdict = await client.check(OutputCheckRequest(job_id="j-3", topic="job.default", content_phase=True,
                                                        result_ptr="redis://res:j-3"), timeout=5)
        assert verdict.decision is OutputDecision.QUARANTINE and verdict.response.rule_id == "no-secrets", verdict
    assert await redis.execute("GET", keys.SAFETY_CB_OUTPUT_FAILURES) is None


async def test_a_scheduler_told_not_to_check_finishes_a_job_another_marked_for_a_check(spawn, tmp_path, redis, bus):
    """A rolling change of OUTPUT_POLICY_ENABLED: the job was dispatched (marked `due`) by a
    scheduler that checks outputs, its result is applied by one that does not. It ends SUCCEEDED
    `skipped`, and the checked result a workflow would wait for goes out (a workflow step's job:
    nobody else waits for it)."""
    stack = _stack(spawn, tmp_path, SCHEDULER_RUNNING_TIMEOUT="120s")
    stack.kernel()
    stack.scheduler("scheduler-1")
    stack.worker()
    await stack.ready()
    await trio.sleep(1.0)
    store = JobStore(redis)
    async with bus.subscribe(subjects.RESULT) as results:
        job_id = await submit_direct(store, bus, context={"sleep_ms": 6000}, labels={"run_id": "run-1"})
        meta = await wait_state(store, job_id, {"RUNNING"}, timeout=30)
        assert meta["output_check"] == "due"
        # Killed, not stopped: it is gone at once, so its result waits for scheduler-2 whatever
        # the machine's load (a graceful stop could still take the result if slow).
        stack.procs["scheduler-1"].stop()
        stack.scheduler("scheduler-2", OUTPUT_POLICY_ENABLED="false")
        await stack.ready("scheduler-2")
        meta = await wait_state(store, job_id, {"SUCCEEDED", "FAILED", "OUTPUT_QUARANTINED"}, timeout=30)
        assert meta["state"] == "SUCCEEDED" and meta["output_check"] == "skipped", meta
        with trio.fail_after(10):
            while True:
                packet = BusPacket()
                packet.ParseFromString((await results.receive()).data)
                if packet.job_result.job_id == job_id and packet.sender_id == "cordum-scheduler":
                    break


async def test_a_content_check_left_unfinished_is_taken_up_by_the_reconcilers_leader(spawn, tmp_path, redis):
    """A scheduler died between writing SUCCEEDED (`pending`, listed in job:output:pending) and
    its content check: the reconciler's leader checks it once the content timeout has passed, and
    the output is quarantined; a listed job whose check did finish is only unlisted."""
    stack = _stack(spawn, tmp_path, CORDUM_OUTPUT_CONTENT_TIMEOUT="1s")
    stack.kernel()
    stack.scheduler()
    await stack.ready()
    store = JobStore(redis)
    long_ago = now_us() - 120_000_000
    for job_id, check, output in (("left-1", "pending", {"note": f"key {SECRET}"}), ("done-1", "allow", {"ok": True})):
        await store.create(job_id, JobState.RUNNING, request=JobRequest(job_id=job_id, topic="job.default"),
                           fields={"topic": "job.default", "tenant": "default", "trace_id": job_id})
        await redis.execute("SET", keys.result(job_id), json.dumps(output))
        await store.transition(job_id, JobState.SUCCEEDED, tenant="default",
                               fields={"output_check": check, "result_ptr": f"redis://res:{job_id}", "worker_id": "w"})
        await redis.execute("ZADD", keys.JOB_OUTPUT_PENDING, long_ago, job_id)
    meta = await wait_state(store, "left-1", {"OUTPUT_QUARANTINED"}, timeout=60)
    assert meta["output_check"] == "quarantine" and "credential" in meta["failure_reason"]
    with trio.fail_after(30):
        while await redis.execute("ZSCORE", keys.JOB_OUTPUT_PENDING, "done-1") is not None:
            await trio.sleep(0.1)
    assert (await store.get("done-1"))["state"] == "SUCCEEDED"
    assert await redis.execute("ZCARD", keys.JOB_OUTPUT_PENDING) == 0


async def test_a_scheduler_told_not_to_check_settles_checks_others_left_pending(spawn, tmp_path, redis):
    """Output checks turned off while a job waited for its content check (its scheduler gone):
    the reconciler's leader settles it `skipped` instead of leaving its output withheld for good."""
    stack = _stack(spawn, tmp_path, CORDUM_OUTPUT_CONTENT_TIMEOUT="1s", OUTPUT_POLICY_ENABLED="false")
    stack.scheduler()
    await stack.ready()
    store = JobStore(redis)
    await store.create("left-2", JobState.RUNNING, request=JobRequest(job_id="left-2", topic="job.default"),
                       fields={"topic": "job.default", "tenant": "default", "trace_id": "left-2"})
    await store.transition("left-2", JobState.SUCCEEDED, tenant="default",
                           fields={"output_check": "pending", "result_ptr": "redis://res:left-2", "worker_id": "w"})
    await redis.execute("ZADD", keys.JOB_OUTPUT_PENDING, now_us() - 120_000_000, "left-2")
    with trio.fail_after(60):
        while (await store.get("left-2"))["output_check"] != "skipped":
            await trio.sleep(0.1)
    assert await redis.execute("ZCARD", keys.JOB_OUTPUT_PENDING) == 0
