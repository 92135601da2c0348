"""Routing and the worker registry, pure."""

from __future__ import annotations

import pytest

from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.scheduler.registry import WorkerRegistry, WorkerStatus
from cordum.scheduler.routing import NoRoute, PoolsError, WorkerInfo, load_pools_text, pick_worker

POOLS = load_pools_text("""
topics:
  job.default: default
  job.gpu: [gpu, default]
  job.old: retired
pools:
  default: {requires: []}
  gpu: {requires: [cuda, docker]}
  retired: {status: draining}
""", "pools.yaml")


def w(worker_id: str, pool: str = "default", **kw) -> WorkerInfo:
    return WorkerInfo(worker_id, pool, **kw)


def test_least_loaded_worker_wins():
    workers = [w("a", active_jobs=3, max_parallel_jobs=8), w("b", active_jobs=1, max_parallel_jobs=8, cpu_load=50),
               w("c", active_jobs=1, max_parallel_jobs=8, cpu_load=10)]
    assert pick_worker(POOLS, workers, topic="job.default").worker_id == "c"


def test_overloaded_workers_are_skipped_and_reported():
    busy = [w("a", active_jobs=9, max_parallel_jobs=10), w("b", cpu_load=95)]
    with pytest.raises(NoRoute) as none:
        pick_worker(POOLS, busy, topic="job.default")
    assert none.value.code == "pool_overloaded"
    assert pick_worker(POOLS, busy + [w("c", active_jobs=8, max_parallel_jobs=10)], topic="job.default").worker_id == "c"


def test_requires_selects_pools_that_offer_them():
    workers = [w("cpu"), w("gpu-1", "gpu")]
    assert pick_worker(POOLS, workers, topic="job.gpu", requires=["CUDA"]).worker_id == "gpu-1"
    with pytest.raises(NoRoute) as none:
        pick_worker(POOLS, workers, topic="job.gpu", requires=["tpu"])
    assert none.value.code == "no_pool_mapping"


def test_unknown_topics_draining_pools_and_missing_workers():
    with pytest.raises(NoRoute, match="no pool serves topic job.nope"):
        pick_worker(POOLS, [w("a")], topic="job.nope")
    with pytest.raises(NoRoute) as draining:
        pick_worker(POOLS, [w("a", "retired")], topic="job.old")
    assert draining.value.code == "no_pool_mapping"
    with pytest.raises(NoRoute) as nobody:
        pick_worker(POOLS, [w("g", "gpu")], topic="job.default")
    assert nobody.value.code == "no_workers"


def test_placement_labels_and_preferences():
    workers = [w("a", labels={"placement.zone": "eu"}), w("b", labels={"placement.zone": "us"}, active_jobs=5)]
    assert pick_worker(POOLS, workers, topic="job.default", labels={"placement.zone": "us"}).worker_id == "b"
    assert pick_worker(POOLS, workers, topic="job.default", labels={"team": "x"}).worker_id == "a"  # other labels don't constrain
    assert pick_worker(POOLS, workers, topic="job.default", labels={"preferred_worker_id": "b"}).worker_id == "b"
    with pytest.raises(NoRoute):
        pick_worker(POOLS, workers, topic="job.default", labels={"preferred_pool": "gpu"})


@pytest.mark.parametrize("text, message", [
    ("pools: {}", "'topics' must map at least one topic"),
    ("topics: {job.a: 3}", "topics.job.a must be a pool name"),
    ("topics: {job.a: p}\npools: {p: {status: gone}}", "pools.p.status must be active, draining or inactive"),
    ("topics: {job.a: p}\nzones: {}", "unknown key(s) zones"),
    ("topics: [", "line 1"),
])
def test_bad_pools_files_are_refused_with_a_reason(text, message):
    with pytest.raises(PoolsError, match=None) as error:
        load_pools_text(text, "pools.yaml")
    assert message in str(error.value)


def test_registry_expires_silent_workers_and_counts_dispatches():
    registry = WorkerRegistry(ttl=30)
    assert registry.observe(Heartbeat(worker_id="a", pool="default", active_jobs=1, max_parallel_jobs=4), now=0)
    assert not registry.observe(Heartbeat(worker_id="a", pool="default", active_jobs=1, max_parallel_jobs=4), now=10)
    registry.dispatched("a")
    registry.dispatched("a")
    assert [x.active_jobs for x in registry.alive(now=11)] == [3]
    assert registry.alive(now=41) == [] and not registry.is_alive("a", 41)
    snapshot = registry.snapshot(POOLS, 11, writer_id="s-1", wall_time=1_700_000_000)
    assert snapshot["writer_id"] == "s-1" and snapshot["topics"]["job.default"]["pool"] == "default"


def test_results_seen_by_this_replica_free_the_estimated_slots():
    registry = WorkerRegistry(ttl=30)
    registry.observe(Heartbeat(worker_id="a", pool="default", active_jobs=0, max_parallel_jobs=4), now=0)
    for _ in range(4):
        registry.dispatched("a")
    assert registry.alive(now=1)[0].overloaded  # 4 of 4 slots taken, as far as we know
    registry.completed("a")
    registry.completed("a")
    assert [x.active_jobs for x in registry.alive(now=1)] == [2] and not registry.alive(now=1)[0].overloaded
    for _ in range(5):
        registry.completed("a")  # never below what the last heartbeat said
    assert [x.active_jobs for x in registry.alive(now=1)] == [0]


def _beat(worker_id: str, state: str = "") -> Heartbeat:
    labels = {"cordum.worker.state": state} if state else {}
    return Heartbeat(worker_id=worker_id, pool="default", max_parallel_jobs=4, labels=labels)


def test_a_worker_that_says_it_is_leaving_gets_no_more_jobs_at_once():
    registry = WorkerRegistry(ttl=30, started=0)
    registry.observe(_beat("a"), now=0)
    registry.observe(_beat("b"), now=0)
    assert registry.status("a", 1) is WorkerStatus.ALIVE
    registry.observe(_beat("a", "draining"), now=2)
    assert registry.status("a", 2) is WorkerStatus.DRAINING
    assert [w.worker_id for w in registry.alive(now=2)] == ["b"]
    assert pick_worker(POOLS, registry.alive(now=2), topic="job.default").worker_id == "b"
    registry.observe(_beat("a", "stopped"), now=3)
    assert registry.status("a", 3) is WorkerStatus.GONE
    registry.observe(_beat("a"), now=4)  # the same id started again
    assert registry.status("a", 4) is WorkerStatus.ALIVE


def test_silence_means_gone_only_after_the_registry_has_listened_for_a_ttl():
    registry = WorkerRegistry(ttl=30, started=100)
    assert registry.status("never-heard", 110) is WorkerStatus.UNKNOWN and not registry.warmed_up(110)
    assert registry.warmed_up(130)
    registry.observe(_beat("a"), now=110)
    assert registry.status("a", 140) is WorkerStatus.ALIVE
    assert registry.status("a", 141) is WorkerStatus.GONE


def test_metric_topic_labels_are_bounded_by_the_pools_file():
    """Anyone may publish `job.<anything>`: a counter labelled by raw topic would grow a series
    per made-up topic forever. Only routed topics are labels of their own."""
    from cordum.infra.metrics import Metrics
    from cordum.scheduler.engine import SchedulerMetrics
    from cordum.scheduler.routing import load_pools_text, topic_label

    pools = load_pools_text("topics:\n  job.default: default\n  job.deploy: [default]\npools:\n  default: {}\n", "test")
    assert topic_label(pools, "job.default") == "job.default"
    assert topic_label(pools, "job.default.x9f3") == "other"
    metrics = Metrics("sched-1")
    counters = SchedulerMetrics(metrics, lambda: pools)
    for topic in ["job.default", "job.deploy"] + [f"job.random.{i}" for i in range(50)]:
        counters.received.labels(topic=topic).inc()
        counters.finished.labels(topic=topic, state="SUCCEEDED").inc()
    text = metrics.exposition().decode()
    received = [line for line in text.splitlines() if line.startswith("cordum_jobs_received_total{")]
    assert len(received) == 3 and any('topic="other"' in line and line.endswith(" 50.0") for line in received)


def test_workflow_metric_labels_are_bounded():
    from types import SimpleNamespace

    from cordum.infra.metrics import Metrics
    from cordum.workflow.engine import WorkflowMetrics

    metrics = Metrics("wf-1")
    counters = WorkflowMetrics(metrics)
    for n in range(WorkflowMetrics.MAX_NAMED + 50):
        run = SimpleNamespace(workflow_id=f"wf-{n}", status="running", terminal=False)
        counters.moved(run, "pending")
    counters.moved(SimpleNamespace(workflow_id="wf-0", status="running", terminal=False), "pending")
    text = metrics.exposition().decode()
    started = [line for line in text.splitlines() if line.startswith("cordum_workflows_started_total{")]
    assert len(started) == WorkflowMetrics.MAX_NAMED + 1  # the named ones and "other"
    assert any('workflow="other"' in line and line.endswith(" 50.0") for line in started)
    assert any('workflow="wf-0"' in line and line.endswith(" 2.0") for line in started)  # a known one keeps its own
