"""The operators' dashboard and alerts against the real services: every metric they read is
exported by some service once jobs have run, and the metrics added for them move — the
submit→dispatch and dispatch→final-state histograms, the leader gauges and counters through a
failover, the DLQ size, the safety breaker, the consumer backlog and the Redis pool."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from cordum.agent.v1.job_pb2 import JobCancel
from cordum.dev.servers import free_port
from cordum.infra.metrics import Metrics
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.gauges import ConsumerBacklog
from cordum.store import keys
from cordum.store.jobs import JobStore
from tests.integration import stack as stack_module
from tests.integration.stack import Stack, http_get, wait_state
from tests.integration.test_gateway_workflows import eventually
from tests.unit.test_observability_files import ALERTS, PROMETHEUS_YML, alert_rules, dashboard_queries, metric_names

redis_server, nats_server = stack_module.redis_server, stack_module.nats_server

KEY = secrets.token_hex(24)
WAIT = 60  # process start-up, and the 15 s gauge refresh, on a loaded 2-core machine
SCHEDULER_LEASES = (keys.RECONCILER_LEADER, keys.REPLAYER_LEADER, keys.SNAPSHOT_WRITER_LEADER,
                    keys.WORKER_REAPER_LEADER)
# Counted only when it happens (no series before): declared in /metrics is all that can be asked.
ONLY_WHEN_IT_HAPPENS = {"cordum_bus_handler_errors_total"}


async def _start(spawn, tmp_path, *, schedulers: int, workflow_engine: bool = False, **gateway_env: str) -> Stack:
    stack = Stack.create(spawn, tmp_path)
    stack.kernel("safety-kernel-1")
    for n in range(1, schedulers + 1):
        stack.scheduler(f"scheduler-{n}")
    stack.worker("worker-1")
    if workflow_engine:
        stack.workflow_engine("workflow-engine-1")
    stack.start("api-gateway-1", "cordum.gateway.service", CORDUM_API_KEY=KEY, **gateway_env)
    await stack.ready(timeout=WAIT)
    await trio.sleep(1.0)  # the worker's heartbeats reach the schedulers
    return stack


def _request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {}


async def _submit(stack: Stack) -> str:
    status, body = await trio.to_thread.run_sync(
        _request, stack.http_ports["api-gateway-1"], "POST", "/api/v1/jobs", {"prompt": "observe"})
    assert status in (200, 201, 202), (status, body)
    return body["job_id"]


async def _scrape(stack: Stack, name: str) -> list:
    """The samples of one process's /metrics."""
    text = await trio.to_thread.run_sync(http_get, stack.http_ports[name], "/metrics")
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def _value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def test_every_metric_the_dashboard_and_the_alerts_read_is_exported(spawn, tmp_path, redis):
    # A low rate limit, so that a rejection is counted too.
    stack = await _start(spawn, tmp_path, schedulers=1, workflow_engine=True,
                         API_RATE_LIMIT_RPS="1", API_RATE_LIMIT_BURST="10")
    store = JobStore(redis)
    for job_id in [await _submit(stack) for _ in range(2)]:
        await wait_state(store, job_id, {"SUCCEEDED"}, timeout=WAIT)
    codes = []
    while 429 not in codes and len(codes) < 100:  # 10 at once, then 1/s: a quick burst is refused
        codes.append((await trio.to_thread.run_sync(_request, stack.http_ports["api-gateway-1"], "GET", "/api/v1/jobs"))[0])
    assert 429 in codes, codes

    wanted = {name for _, expr in dashboard_queries() for name in metric_names(expr)}
    wanted |= {name for rule in alert_rules() for name in metric_names(rule["expr"])}
    wanted.discard("up")  # Prometheus' own, per scrape target
    assert len(wanted) >= 15, wanted
    serving = [name for name in stack.http_ports if not name.startswith("worker")]  # workers serve no HTTP

    async def missing() -> dict[str, str] | None:
        declared: set[str] = set()
        sampled: set[str] = set()
        for name in serving:
            text = await trio.to_thread.run_sync(http_get, stack.http_ports[name], "/metrics")
            for family in text_string_to_metric_families(text):
                declared.add(family.name)
                sampled |= {s.name for s in family.samples}
        gaps = {}
        for name in sorted(wanted):
            if name in sampled:
                continue
            base = name.removesuffix("_total")
            for suffix in ("_bucket", "_count", "_sum"):
                base = base.removesuffix(suffix)
            if name in ONLY_WHEN_IT_HAPPENS and base in declared:
                continue
            gaps[name] = "declared, no series" if base in declared else "not exported"
        return gaps or None

    # The histograms are observed just after the job's final write: look until they are there.
    with trio.move_on_after(WAIT):
        while (gaps := await missing()) is not None:
            await trio.sleep(0.5)
    assert gaps is None, gaps


async def test_a_job_moves_the_new_histograms_and_gauges(spawn, tmp_path, redis):
    stack = await _start(spawn, tmp_path, schedulers=2)
    schedulers = ["scheduler-1", "scheduler-2"]

    async def total(name: str, **labels: str) -> float:
        return sum([_value(await _scrape(stack, s), name, **labels) for s in schedulers])

    assert await total("cordum_scheduler_submit_to_dispatch_seconds_count") == 0
    store = JobStore(redis)
    jobs = [await _submit(stack) for _ in range(3)]
    for job_id in jobs:
        await wait_state(store, job_id, {"SUCCEEDED"}, timeout=WAIT)

    # One observation per job in each histogram, summed over the replicas that handled them.
    async def observed() -> bool:
        return all([await total(f"cordum_scheduler_{h}_seconds_count", topic="job.default") == len(jobs)
                    for h in ("submit_to_dispatch", "dispatch_to_terminal")])

    await eventually(observed, timeout=WAIT, what="both histograms counted every job")
    for histogram in ("submit_to_dispatch", "dispatch_to_terminal"):
        name = f"cordum_scheduler_{histogram}_seconds"
        seconds = await total(f"{name}_sum", topic="job.default")
        assert 0 < seconds < len(jobs) * WAIT, (histogram, seconds)  # real durations, not epoch times
        assert await total(f"{name}_bucket", topic="job.default", le="+Inf") == len(jobs)

    # Every lease has exactly one holder among the replicas that campaign for it.
    async def holders(lease: str, names: list[str]) -> dict[str, float]:
        return {n: _value(await _scrape(stack, n), "cordum_leader_is_leader", lease=lease) for n in names}

    for lease in SCHEDULER_LEASES:
        await eventually(lambda: _one_holder(holders, lease, schedulers), timeout=WAIT, what=f"one holder of {lease}")
    await eventually(lambda: _one_holder(holders, keys.DLQ_CLEANUP_LEADER, ["api-gateway-1"]), timeout=WAIT,
                     what="the gateway leads the DLQ cleanup")

    # A failover: the reconciler's leader stops (and releases the lease); the other takes over.
    (leader,) = [n for n, v in (await holders(keys.RECONCILER_LEADER, schedulers)).items() if v == 1]
    (other,) = [n for n in schedulers if n != leader]
    elected = lambda samples: _value(samples, "cordum_leader_elections_total", lease=keys.RECONCILER_LEADER)  # noqa: E731
    before = elected(await _scrape(stack, other))
    stack.procs[leader].signal(signal.SIGTERM)
    await trio.to_thread.run_sync(stack.procs[leader].wait, WAIT)

    async def took_over() -> bool:
        samples = await _scrape(stack, other)
        return _value(samples, "cordum_leader_is_leader", lease=keys.RECONCILER_LEADER) == 1 and \
            elected(samples) == before + 1

    await eventually(took_over, timeout=WAIT, what=f"{other} leads the reconciler")
    schedulers = [other]

    # Idle: nothing waits in the schedulers' durables, and the pool reports its configured limit.
    samples = await _scrape(stack, other)
    for subject in (subjects.SUBMIT, subjects.RESULT, subjects.CANCEL):
        assert [s.value for s in samples if s.name == "cordum_bus_consumer_pending"
                and s.labels == {"queue": subjects.QUEUE_SCHEDULER, "subject": subject, "pod": other}] == [0]
    assert _value(samples, "cordum_redis_pool_connections", state="max") == 20  # REDIS_POOL_SIZE's default
    assert _value(samples, "cordum_redis_pool_connections", state="idle") + \
        _value(samples, "cordum_redis_pool_connections", state="in_use") >= 1

    # A job denied by policy lands in the DLQ: every gateway reads the DLQ's size.
    assert _value(await _scrape(stack, "api-gateway-1"), "cordum_dlq_entries") == 0
    status, _ = await trio.to_thread.run_sync(_request, stack.http_ports["api-gateway-1"], "POST", "/api/v1/jobs",
                                              {"prompt": "observe", "topic": "job.danger"})
    assert status == 403

    async def dlq_counted() -> bool:
        return _value(await _scrape(stack, "api-gateway-1"), "cordum_dlq_entries") == 1

    await eventually(dlq_counted, timeout=WAIT, interval=0.5, what="cordum_dlq_entries == 1")

    # With the safety kernel gone, failed checks open the shared breaker: the gateway that counted
    # them sees it at once, the scheduler at its next look.
    for name in ("api-gateway-1", other):
        assert _value(await _scrape(stack, name), "cordum_safety_breaker_open") == 0, name
    stack.procs["safety-kernel-1"].stop()

    async def gateway_sees_it_open() -> bool:
        await trio.to_thread.run_sync(_request, stack.http_ports["api-gateway-1"], "POST", "/api/v1/jobs",
                                      {"prompt": "unchecked", "topic": "job.default"})
        return _value(await _scrape(stack, "api-gateway-1"), "cordum_safety_breaker_open") == 1

    await eventually(gateway_sees_it_open, timeout=WAIT, interval=0.2, what="the gateway's breaker gauge")

    async def scheduler_sees_it_open() -> bool:
        return _value(await _scrape(stack, other), "cordum_safety_breaker_open") == 1

    await eventually(scheduler_sees_it_open, timeout=WAIT, interval=0.5, what="the scheduler's breaker gauge")


async def _one_holder(holders, lease: str, names: list[str]) -> bool:
    found = await holders(lease, names)
    return sorted(found.values()) == [0.0] * (len(names) - 1) + [1.0]


async def test_the_consumer_backlog_counts_what_the_group_has_not_taken(bus):
    """Nobody consumes here: what is published on sys.job.cancel waits in the schedulers' durable."""
    backlog = ConsumerBacklog(metrics := Metrics("backlog-test"), bus, [(subjects.CANCEL, subjects.QUEUE_SCHEDULER)])
    await backlog.refresh()
    before = _value(_samples(metrics), "cordum_bus_consumer_pending", subject=subjects.CANCEL)
    for n in range(3):
        cancel = new_packet(JobCancel(job_id=f"backlog-{n}", reason="test"), sender_id="test")
        await bus.publish(subjects.CANCEL, encode(cancel))
    await backlog.refresh()
    samples = _samples(metrics)
    assert _value(samples, "cordum_bus_consumer_pending", subject=subjects.CANCEL, queue=subjects.QUEUE_SCHEDULER,
                  pod="backlog-test") == before + 3
    assert _value(samples, "cordum_bus_consumer_ack_pending", subject=subjects.CANCEL) == 0  # none delivered


def _samples(metrics: Metrics) -> list:
    return [s for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples]


PROMETHEUS = "/usr/bin/prometheus"  # Debian's `prometheus` package (scripts/install.sh --tests)


async def test_prometheus_scrapes_every_replica_and_answers_the_dashboard(spawn, tmp_path, redis):
    """compose/prometheus/prometheus.yml run by a real Prometheus (every second instead of every
    15 s), with a target file for this test's processes laid out like targets/single.yml."""
    stack = await _start(spawn, tmp_path, schedulers=1)
    serving = {name: port for name, port in stack.http_ports.items() if not name.startswith("worker")}
    root = tmp_path / "etc-prometheus"
    (root / "targets").mkdir(parents=True)
    (root / "alerts.yml").write_text(ALERTS.read_text())
    config = PROMETHEUS_YML.read_text().replace("/etc/prometheus", str(root))
    for setting in ("scrape_interval: 15s", "scrape_timeout: 10s", "evaluation_interval: 15s", "refresh_interval: 1m"):
        config = config.replace(setting, setting.split(":")[0] + ": 1s")
    (root / "prometheus.yml").write_text(config)
    (root / "targets" / "cordum.yml").write_text(yaml.safe_dump([
        {"targets": [f"127.0.0.1:{port}"], "labels": {"service": _program(name), "pod": name}}
        for name, port in serving.items()]))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    prometheus = subprocess.Popen([PROMETHEUS, f"--config.file={root / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
                                   f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        async def query(expr: str) -> list:
            text = await trio.to_thread.run_sync(http_get, port, "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
            answer = json.loads(text)
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        async def all_up() -> bool:
            try:
                found = await query('up{job="cordum"}')
            except OSError:
                return False  # not listening yet
            return {(r["metric"]["service"], r["metric"]["pod"], r["value"][1]) for r in found} == \
                {(_program(name), name, "1") for name in serving}

        await eventually(all_up, timeout=WAIT, interval=0.5, what="Prometheus scraped every replica")
        # A labelled series starts with its first job: Prometheus' rates count from its first
        # sample, so one job first, then more once that sample is in.
        store = JobStore(redis)
        await wait_state(store, await _submit(stack), {"SUCCEEDED"}, timeout=WAIT)
        await eventually(lambda: query('cordum_jobs_dispatched_total{pod="scheduler-1"}'), timeout=WAIT,
                         interval=0.5, what="the first job in Prometheus")
        for job_id in [await _submit(stack) for _ in range(3)]:
            await wait_state(store, job_id, {"SUCCEEDED"}, timeout=WAIT)

        async def counted() -> bool:  # scraped after the jobs ran: the rates see them
            found = await query('sum(increase(cordum_jobs_dispatched_total[1m]))')
            dispatched = await query("sum(cordum_jobs_dispatched_total)")
            return bool(found) and float(found[0]["value"][1]) > 0 and dispatched[0]["value"][1] == "4"

        await eventually(counted, timeout=WAIT, interval=0.5, what="the jobs in Prometheus")
        for title, expr in dashboard_queries():  # each query runs without error
            await query(expr)
        # The series the scrape stored carry their replica's `pod`, not an exported_ copy.
        dispatched = await query("sum by (pod) (cordum_jobs_dispatched_total)")
        assert [(r["metric"], r["value"][1]) for r in dispatched] == [({"pod": "scheduler-1"}, "4")]
        leaders = await query("sum by (lease) (cordum_leader_is_leader)")
        assert {r["metric"]["lease"]: r["value"][1] for r in leaders} == \
            {lease: "1" for lease in (*SCHEDULER_LEASES, keys.DLQ_CLEANUP_LEADER)}
        p50 = await query("histogram_quantile(0.5, sum by (le) (rate(cordum_scheduler_submit_to_dispatch_seconds_bucket[1m])))")
        assert 0 < float(p50[0]["value"][1]) < WAIT

        # The rules are loaded and, with every replica healthy, none fires.
        rules = json.loads(await trio.to_thread.run_sync(http_get, port, "/api/v1/rules"))["data"]["groups"]
        loaded = {r["name"]: r for group in rules for r in group["rules"]}
        assert set(loaded) == {r["alert"] for r in alert_rules()}
        assert all(r["health"] == "ok" and r["state"] == "inactive" for r in loaded.values()), loaded
    finally:
        prometheus.terminate()
        try:
            await trio.to_thread.run_sync(prometheus.wait, 30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
        log.close()


def _program(process: str) -> str:
    """The `service` label of one of this test's processes (what compose's targets file names)."""
    return {"safety-kernel": "cordum-safety-kernel", "scheduler": "cordum-scheduler",
            "api-gateway": "cordum-api-gateway", "workflow-engine": "cordum-workflow-engine"}[process.rsplit("-", 1)[0]]


# ---- Cordum's names (issue 14) -------------------------------------------------------------------

SPEC = Path(__file__).parents[1] / "testdata" / "cordum_metrics.txt"
# What we measure under Cordum's names: each must be exported with its type and labels.
IMPLEMENTED = {
    "cordum_jobs_received_total", "cordum_jobs_dispatched_total", "cordum_jobs_completed_total",
    "cordum_safety_denied_total", "cordum_safety_unavailable_total", "cordum_validation_rejections_total",
    "cordum_input_fail_open_total", "cordum_dlq_emit_failures_total", "cordum_scheduler_dispatch_latency_seconds",
    "cordum_scheduler_dispatch_rollback_total", "cordum_scheduler_orphan_replayed_total",
    "cordum_scheduler_job_lock_wait_seconds", "cordum_scheduler_job_lock_abandoned_total", "cordum_scheduler_stale_jobs",
    "cordum_http_requests_total", "cordum_http_request_duration_seconds", "cordum_approval_decisions_total",
    "cordum_approval_latency_seconds", "cordum_job_cancel_failures_total", "cordum_safety_default_decision_total",
    "cordum_workflows_started_total", "cordum_workflows_completed_total", "cordum_workflow_duration_seconds",
    "cordum_gateway_ws_clients_active", "cordum_gateway_ws_slow_client_evictions_total",
    "cordum_gateway_ws_events_dropped_total", "cordum_gateway_ws_revalidation_total",
    "cordum_gateway_ws_connection_duration_seconds", "cordum_audit_export_total", "cordum_audit_export_events",
    "cordum_audit_batch_drops_total",
}


def _spec() -> dict[str, tuple[str, set[str] | None]]:
    rows = {}
    for line in SPEC.read_text().splitlines():
        if line and not line.startswith("#"):
            name, kind, labels = line.split()
            rows[name] = (kind, None if labels == "?" else set() if labels == "-" else set(labels.split(",")))
    return rows


async def _exported(stack: Stack) -> dict[str, tuple[str, set[str] | None]]:
    """Every cordum_* family the serving processes export: its type and, once it has a series,
    its label names (without `pod`, which every series carries)."""
    found: dict[str, tuple[str, set[str] | None]] = {}
    for name in (n for n in stack.http_ports if not n.startswith("worker")):
        text = await trio.to_thread.run_sync(http_get, stack.http_ports[name], "/metrics")
        for family in text_string_to_metric_families(text):
            full = family.name + "_total" if family.type == "counter" else family.name
            if not full.startswith("cordum_"):
                continue
            labels = {k for s in family.samples for k in s.labels} - {"pod", "le"}
            kind, known = found.get(full, (family.type, None))
            found[full] = (kind, (known or set()) | labels if family.samples else known)
    return found


async def test_cordum_metric_names_types_and_labels(spawn, tmp_path, redis):
    stack = await _start(spawn, tmp_path, schedulers=1, workflow_engine=True)
    port = stack.http_ports["api-gateway-1"]
    store = JobStore(redis)
    await wait_state(store, await _submit(stack), {"SUCCEEDED"}, timeout=WAIT)
    held = (await trio.to_thread.run_sync(_request, port, "POST", "/api/v1/jobs",
                                          {"prompt": "hold", "topic": "job.approve"}))[1]["job_id"]
    status, _ = await trio.to_thread.run_sync(_request, port, "POST", f"/api/v1/approvals/{held}/reject", {})
    assert status == 200

    spec = _spec()
    exported = await _exported(stack)
    mismatched, missing = {}, sorted(set(spec) - set(exported))
    for name, (kind, labels) in spec.items():
        if name not in exported:
            continue
        ours_kind, ours_labels = exported[name]
        if kind != "?" and ours_kind != kind:
            mismatched[name] = f"type {ours_kind}, Cordum's is {kind}"
        elif labels is not None and ours_labels is not None and ours_labels != labels:
            mismatched[name] = f"labels {sorted(ours_labels)}, Cordum's are {sorted(labels)}"
    print(f"Cordum metrics not exported yet ({len(missing)} of {len(spec)}):", ", ".join(missing))
    assert not mismatched, mismatched
    assert IMPLEMENTED <= set(exported), sorted(IMPLEMENTED - set(exported))
    # the guide's names stand beside Cordum's, every series with its replica's `pod`
    assert {"cordum_jobs_total", "cordum_rate_limit_hits_total"} <= set(exported)
    samples = await _scrape(stack, "api-gateway-1")
    assert all(s.labels.get("pod") == "api-gateway-1" for s in samples if s.name.startswith("cordum_"))
    assert _value(samples, "cordum_approval_decisions_total", decision="rejected") == 1
    assert _value(samples, "cordum_approval_latency_seconds_count") == 1
    # a renamed counter still counts under its old name, for one release
    scheduler = await _scrape(stack, "scheduler-1")
    assert _value(scheduler, "cordum_jobs_dispatched_total") == _value(scheduler, "cordum_scheduler_jobs_dispatched_total") >= 1
