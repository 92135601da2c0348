"""Configuration validation and the `pod` label, without servers."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cordum.infra.config import ConfigError, load_settings, parse_duration, parse_listen_addr
from cordum.infra.metrics import Metrics
from cordum.runtime import log


def test_defaults_follow_the_guide():
    settings = load_settings({"CORDUM_INSTANCE_ID": "pod-a"})
    assert (settings.redis_pool_size, settings.redis_min_idle_conns) == (20, 5)
    assert settings.redis_rate_limit is True
    assert (settings.mcp_transport, settings.mcp_http_addr) == ("stdio", ("0.0.0.0", 8090))
    assert settings.safety_decision_cache_ttl == 0
    assert settings.safety_decision_cache_max_size == 10000
    assert settings.shutdown_timeout == 15
    assert settings.nats_use_jetstream is True
    assert settings.instance_id == "pod-a"


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("REDIS_POOL_SIZE", "lots", "REDIS_POOL_SIZE='lots' is invalid: expected an integer"),
        ("REDIS_POOL_SIZE", "0", "expected an integer between 1 and 10000"),
        ("REDIS_MIN_IDLE_CONNS", "50", "must not exceed REDIS_POOL_SIZE=20"),
        ("REDIS_RATE_LIMIT", "maybe", "REDIS_RATE_LIMIT='maybe' is invalid: expected one of true/false"),
        ("MCP_TRANSPORT", "grpc", "MCP_TRANSPORT='grpc' is invalid: expected one of 'stdio', 'http'"),
        ("MCP_HTTP_ADDR", "8090", "MCP_HTTP_ADDR='8090' is invalid: expected host:port"),
        ("AUDIT_TRANSPORT", "kafka", "AUDIT_TRANSPORT='kafka' is invalid"),
        ("SAFETY_DECISION_CACHE_TTL", "soon", "expected a duration"),
        ("SAFETY_DECISION_CACHE_MAX_SIZE", "-1", "SAFETY_DECISION_CACHE_MAX_SIZE='-1' is invalid"),
        ("REDIS_URL", "localhost:6379", "REDIS_URL='localhost:6379' is invalid: expected a URL starting with redis://"),
        ("NATS_URL", "http://x", "NATS_URL='http://x' is invalid"),
        ("NATS_USE_JETSTREAM", "si", "NATS_USE_JETSTREAM='si' is invalid"),
        ("CORDUM_SHUTDOWN_TIMEOUT", "0s", "expected a duration greater than zero"),
        ("CORDUM_INSTANCE_ID", "two words", "must not contain spaces"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_is_allowed(name, value, message):
    with pytest.raises(ConfigError) as error:
        load_settings({name: value})
    assert message in str(error.value)


def test_parsers():
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120 and parse_duration("7") == 7
    assert parse_listen_addr(":8090") == ("0.0.0.0", 8090)
    assert parse_listen_addr("127.0.0.1:81") == ("127.0.0.1", 81)
    assert load_settings({"REDIS_RATE_LIMIT": "no"}).redis_rate_limit is False
    assert load_settings({"REDIS_RATE_LIMIT": "0"}).redis_rate_limit is False


def test_every_series_carries_the_pod_label():
    metrics = Metrics("scheduler-2")
    metrics.counter("cordum_jobs_total", "jobs", ["topic"]).labels(topic="job.default").inc()
    metrics.gauge("cordum_test_gauge", "g").set(3)
    metrics.histogram("cordum_test_seconds", "h").observe(0.1)
    families = list(text_string_to_metric_families(metrics.exposition().decode()))
    names = {f.name for f in families}
    assert {"cordum_jobs", "process_resident_memory_bytes", "python_info"} <= names
    samples = [s for f in families for s in f.samples]
    assert samples and all(s.labels.get("pod") == "scheduler-2" for s in samples)


def test_logs_never_show_secrets(capsys):
    log.configure(service="t", instance="i")
    log.get_logger("x").info("connect", redis_url="redis://:hunter2@db:6379/0", api_key="s3cret", user="bob")
    line = capsys.readouterr().err
    assert "hunter2" not in line and "s3cret" not in line and '"user":"bob"' in line


def test_services_without_an_api_do_not_load_quart():
    # quart and its dependencies cost ~8 MB per replica; only the gateway needs them.
    import subprocess
    import sys

    for module in ("cordum.scheduler.service", "cordum.safety.service", "cordum.worker.echo"):
        code = f"import sys, {module}; sys.exit('quart' in sys.modules)"
        assert subprocess.run([sys.executable, "-c", code]).returncode == 0, module
    # joserfc and cryptography (~15 MB) only where OIDC is configured
    code = "import sys, cordum.gateway.service; sys.exit('joserfc' in sys.modules or 'cryptography.hazmat' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name,value", [
    ("REDIS_URL", "http://app:hunter2-secret@redis.internal:6379/0"),
    ("NATS_URL", "nats://hunter2-secret@nats-a:4222,nats://app:hunter2-secret@nats-b:notaport"),
])
def test_a_bad_url_is_named_without_its_credentials(name, value):
    with pytest.raises(ConfigError, match=name) as refused:
        load_settings({name: value})
    assert "hunter2" not in str(refused.value) and "***@" in str(refused.value)


async def test_a_failed_health_check_does_not_serve_its_error_text():
    from cordum.infra.http import health_body

    async def failing() -> dict:
        raise ConnectionError("redis://app:hunter2-secret@redis.internal:6379 refused")

    body, status = await health_body("svc", Metrics("i-1"), failing)
    assert status == 503 and body["status"] == "degraded"
    assert "hunter2" not in str(body) and "redis.internal" not in str(body)


def test_http_connections_inherit_tcp_keepalive_from_the_listener():
    """A client that vanishes without closing is noticed (its WebSocket stream ends) once the
    kernel's keepalive probes go unanswered: the accepted sockets carry the listener's settings."""
    import socket

    from cordum.infra.http import KEEPALIVE_COUNT, KEEPALIVE_IDLE_S, _Config

    config = _Config()
    config.bind = ["127.0.0.1:0"]
    (listener,) = config.create_sockets().insecure_sockets
    listener.listen()
    with listener, socket.create_connection(listener.getsockname()) as client:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE_S
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == KEEPALIVE_COUNT
        assert client


def test_labelled_children_are_remembered_and_count_as_before():
    metrics = Metrics("pod-1")
    jobs = metrics.counter("t_jobs_total", "jobs", ["topic", "state"])
    latency = metrics.histogram("t_latency_seconds", "latency", ["topic"], buckets=[0.1, 1.0])
    assert jobs.labels(topic="a", state="ok") is jobs.labels(topic="a", state="ok")
    jobs.labels(topic="a", state="ok").inc()
    jobs.labels("a", "ok").inc(2)  # positional values reach the same series
    jobs.labels(state="ok", topic="a").inc()  # so do the names in another order
    jobs.labels(topic="b", state="ok").inc()
    latency.labels(topic="a").observe(0.5)
    with pytest.raises(ValueError):  # prometheus_client's own checks still run for a new label set
        jobs.labels(topic="a")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics.exposition().decode())
               for s in family.samples}
    assert samples[("t_jobs_total", (("pod", "pod-1"), ("state", "ok"), ("topic", "a")))] == 4
    assert samples[("t_jobs_total", (("pod", "pod-1"), ("state", "ok"), ("topic", "b")))] == 1
    assert samples[("t_latency_seconds_count", (("pod", "pod-1"), ("topic", "a")))] == 1
