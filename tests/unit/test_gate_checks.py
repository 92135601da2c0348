"""Each verdict of the HA gate can fail: the checks are strict, not decorative."""

from __future__ import annotations

from cordum.dev import gate_checks as g


def test_health_needs_every_replica_and_the_gateways_dependencies():
    ok = {"api-gateway-1": {"http_status": 200, "nats_connected": True, "redis_ok": True},
          "scheduler-1": {"http_status": 200}}
    assert g.healthy(ok).ok
    assert not g.healthy({**ok, "scheduler-2": {"http_status": 0}}).ok
    assert not g.healthy({"api-gateway-1": {"http_status": 200, "nats_connected": False, "redis_ok": True}}).ok
    assert not g.healthy({}).ok


def test_exactly_once_fails_on_a_duplicate_a_missing_execution_or_a_failed_job():
    jobs = ["a", "b"]
    assert g.exactly_once(jobs, {"a": "SUCCEEDED", "b": "SUCCEEDED"}, {"a": 1, "b": 1}).ok
    assert not g.exactly_once(jobs, {"a": "SUCCEEDED", "b": "SUCCEEDED"}, {"a": 1, "b": 2}).ok
    assert not g.exactly_once(jobs, {"a": "SUCCEEDED", "b": "SUCCEEDED"}, {"a": 1}).ok
    assert not g.exactly_once(jobs, {"a": "SUCCEEDED", "b": "TIMEOUT"}, {"a": 1, "b": 1}).ok
    assert not g.exactly_once([], {}, {}).ok


def test_rate_limit_needs_429s_and_admits_no_more_than_the_global_limit():
    assert g.rate_limited([200] * 50 + [429] * 100, burst=50, rps=20, seconds=0.5).ok
    assert not g.rate_limited([200] * 150, burst=50, rps=20, seconds=0.5).ok  # no 429 seen
    # two replicas each admitting a whole burst: over the global limit
    assert not g.rate_limited([200] * 100 + [429] * 50, burst=50, rps=20, seconds=0.5).ok
    assert not g.rate_limited([200] * 10 + [429] * 10 + [500], burst=50, rps=20, seconds=0.5).ok


def test_worker_lists_must_be_identical_sorted_and_non_empty():
    assert g.same_workers({"gw1": ["w1", "w2"], "gw2": ["w1", "w2"]}).ok
    assert not g.same_workers({"gw1": ["w1", "w2"], "gw2": ["w1"]}).ok
    assert not g.same_workers({"gw1": [], "gw2": []}).ok
    assert not g.same_workers({"gw1": ["w2", "w1"], "gw2": ["w2", "w1"]}).ok
    assert not g.same_workers({"gw1": ["w1"]}).ok
