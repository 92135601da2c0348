"""The local topology as data (cordum.dev.topology) and the state directory (cordum.dev.state)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cordum.dev import control, stack
from cordum.dev import state as st
from cordum.dev import topology as topo
from cordum.dev.servers import free_block
from cordum.dev.supervisor import Supervisor

ROOT = Path(__file__).resolve().parents[2]


def test_default_ports_names_and_order() -> None:
    t = topo.build(replicas=3, workers=2, api_key="k")
    assert t.names == ["redis", "nats", "safety-kernel-1", "safety-kernel-2", "safety-kernel-3",
                       "context-engine-1", "context-engine-2", "context-engine-3",
                       "scheduler-1", "scheduler-2", "scheduler-3", "workflow-engine-1", "workflow-engine-2",
                       "workflow-engine-3", "api-gateway-1", "api-gateway-2", "api-gateway-3",
                       "mcp-1", "mcp-2", "worker-1", "worker-2"]  # cordum-mcp: 2 at most
    assert [t.get(f"api-gateway-{i}").ports["http"] for i in (1, 2, 3)] == [8081, 8083, 8085]
    assert [t.get(f"scheduler-{i}").ports["metrics"] for i in (1, 2, 3)] == [9090, 9092, 9094]
    # the documented 9093 first, then downwards: 9095, 9097, ... are the kernels' admin ports
    assert [dict(t.get(f"workflow-engine-{i}").ports) for i in (1, 2, 3)] == [
        {"http": 9093}, {"http": 9091}, {"http": 9089}]
    assert [dict(t.get(f"safety-kernel-{i}").ports) for i in (1, 2)] == [
        {"grpc": 50051, "admin": 9095}, {"grpc": 50053, "admin": 9097}]
    # gRPC from the documented 50070 (above the kernels' 50051..50069); metrics downwards from 9088,
    # as the documented 9094 is scheduler-3's
    assert [dict(t.get(f"context-engine-{i}").ports) for i in (1, 2, 3)] == [
        {"grpc": 50070, "metrics": 9088}, {"grpc": 50072, "metrics": 9086}, {"grpc": 50074, "metrics": 9084}]
    assert [dict(t.get(f"mcp-{i}").ports) for i in (1, 2)] == [{"http": 8090}, {"http": 8092}]
    assert t.mcp_urls() == ["http://127.0.0.1:8090/mcp", "http://127.0.0.1:8092/mcp"]
    assert (t.get("redis").ports["port"], t.get("nats").ports["port"]) == (6379, 4222)
    assert t.gateway_urls() == ["http://localhost:8081", "http://localhost:8083", "http://localhost:8085"]
    assert [r.kind for r in t.stop_order()][:5] == ["worker", "worker", "mcp", "mcp", "api-gateway"]
    assert [r.name for r in t.stop_order()][-2:] == ["nats", "redis"]
    # the context engines need only Redis: they start with the kernels, before the schedulers
    assert [sorted({r.kind for r in tier}) for tier in t.tiers()] == [
        ["redis"], ["nats"], ["context-engine", "safety-kernel"], ["scheduler"], ["workflow-engine"],
        ["api-gateway"], ["mcp"], ["worker"]]


def test_env_per_replica() -> None:
    t = topo.build(replicas=2, workers=2, api_key="secret")
    ids = [r.env["CORDUM_INSTANCE_ID"] for r in t.replicas if r.entry]
    assert ids == [r.name for r in t.replicas if r.entry] and len(set(ids)) == len(ids)
    k2, s2, g1 = t.get("safety-kernel-2"), t.get("scheduler-2"), t.get("api-gateway-1")
    assert (k2.env["SAFETY_KERNEL_ADDR"], k2.env["SAFETY_KERNEL_ADMIN_ADDR"]) == (":50053", ":9097")
    assert k2.health == "http://127.0.0.1:9097/health"
    assert (s2.env["SCHEDULER_METRICS_ADDR"], s2.env["SAFETY_KERNEL_ADDR"]) == (":9092", "127.0.0.1:50053,127.0.0.1:50051")
    assert (g1.env["GATEWAY_HTTP_ADDR"], g1.env["SAFETY_KERNEL_ADDR"]) == (":8081", "127.0.0.1:50051,127.0.0.1:50053")
    assert g1.health == "http://127.0.0.1:8081/health"
    e2 = t.get("workflow-engine-2")
    assert (e2.env["WORKFLOW_ENGINE_HTTP_ADDR"], e2.health) == (":9091", "http://127.0.0.1:9091/health")
    assert "SAFETY_KERNEL_ADDR" not in e2.env  # it dispatches through the scheduler
    w2 = t.get("worker-2")
    assert (w2.env["WORKER_ID"], w2.health) == ("worker-2", "alive")
    c2 = t.get("context-engine-2")
    assert (c2.env["CONTEXT_ENGINE_ADDR"], c2.env["CONTEXT_ENGINE_METRICS_ADDR"]) == (":50072", ":9086")
    assert c2.health == "http://127.0.0.1:9086/health"
    # the clients (gateway memory routes, the worker SDK) get every context engine, their own first
    assert g1.env["CONTEXT_ENGINE_ADDR"] == "127.0.0.1:50070,127.0.0.1:50072"
    assert w2.env["CONTEXT_ENGINE_ADDR"] == "127.0.0.1:50072,127.0.0.1:50070"
    assert not any("CONTEXT_ENGINE_ADDR" in r.env for r in t.replicas
                   if r.kind in ("scheduler", "workflow-engine", "safety-kernel", "mcp"))
    # MCP over HTTP, each replica in front of its own gateway
    m1, m2 = t.get("mcp-1"), t.get("mcp-2")
    assert (m1.env["MCP_TRANSPORT"], m1.env["MCP_HTTP_ADDR"], m1.health) == (
        "http", ":8090", "http://127.0.0.1:8090/health")
    assert [m.env["CORDUM_GATEWAY_ADDR"] for m in (m1, m2)] == ["http://127.0.0.1:8081", "http://127.0.0.1:8083"]
    assert "CORDUM_TENANT_ID" not in m2.env  # over HTTP each request's key decides its tenant
    assert [r.name for r in topo.build(replicas=5, api_key="k").replicas if r.kind == "mcp"] == ["mcp-1", "mcp-2"]
    assert [r.env["CORDUM_GATEWAY_ADDR"] for r in topo.build(replicas=1, api_key="k").replicas
            if r.kind == "mcp"] == ["http://127.0.0.1:8081"]
    for r in t.replicas:
        if r.entry:
            # the MCP servers hold no key: each HTTP request brings its caller's
            assert r.env["CORDUM_API_KEY"] == ("" if r.kind == "mcp" else "secret") and r.env["CORDUM_ENV"] == "dev"
            assert r.env["REDIS_URL"] == "redis://127.0.0.1:6379/0" and r.env["NATS_URL"] == "nats://127.0.0.1:4222"
    assert [topo.kernel_for(i, 2) for i in (1, 2, 3, 4)] == [1, 2, 1, 2]
    assert [topo.kernels_for(i, 3) for i in (1, 2)] == [[1, 2, 3], [2, 1, 3]]


def test_external_servers_and_base_port() -> None:
    t = topo.build(replicas=2, workers=1, api_key="k", redis_url="redis://h:1/2", nats_url="nats://h:3",
                   base_port=30000)
    assert "redis" not in t.names and "nats" not in t.names and not (t.start_redis or t.start_nats)
    assert t.get("worker-1").env["REDIS_URL"] == "redis://h:1/2"
    assert t.get("api-gateway-2").ports["http"] == 30002
    assert t.get("scheduler-2").ports["metrics"] == 30022
    assert dict(t.get("safety-kernel-2").ports) == {"grpc": 30042, "admin": 30062}
    assert [t.get(f"workflow-engine-{i}").ports["http"] for i in (1, 2)] == [30082, 30084]
    assert t.get("workflow-engine-1").env["WORKFLOW_ENGINE_HTTP_ADDR"] == ":30082"
    assert [dict(t.get(f"context-engine-{i}").ports) for i in (1, 2)] == [
        {"grpc": 30101, "metrics": 30121}, {"grpc": 30103, "metrics": 30123}]
    assert t.get("api-gateway-2").env["CONTEXT_ENGINE_ADDR"] == "127.0.0.1:30103,127.0.0.1:30101"
    assert [t.get(f"mcp-{i}").ports["http"] for i in (1, 2)] == [30141, 30143]
    assert t.get("mcp-2").env["CORDUM_GATEWAY_ADDR"] == "http://127.0.0.1:30002"
    own = topo.build(replicas=1, workers=0, api_key="k", base_port=30000)
    assert (own.get("redis").ports["port"], own.get("nats").ports["port"]) == (30080, 30081)
    assert topo.build(replicas=1, api_key="k", base_port=30000, redis_port=7000).get("redis").ports["port"] == 7000
    for base in (None, 20000):
        full = topo.build(replicas=topo.MAX_REPLICAS, workers=3, api_key="k", base_port=base)
        ports = topo.all_ports(full)
        assert topo.duplicates(ports) == []
        if base:
            assert all(base <= p < base + topo.BLOCK_SIZE for _, p in ports)
            assert max(p for _, p in ports) == base + topo.BLOCK_SIZE - 1  # no slack either


def test_the_stack_runs_the_workflow_engine_and_the_bench_knows_the_block() -> None:
    engine = next(s for s in stack.SERVICES if s.name == "cordum-workflow-engine")
    assert stack.is_available(engine)  # so `cordumctl up` starts workflow-engine-1..N
    # scripts/bench_driver.py runs in another venv and imports the block size from the checkout
    spec = importlib.util.spec_from_file_location("bench_driver", ROOT / "scripts" / "bench_driver.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.BLOCK_SIZE == topo.BLOCK_SIZE


def test_without_the_context_engine_and_mcp_nobody_is_pointed_at_them() -> None:
    # what the stack builds while their console scripts are "not available yet" stubs
    services = [(s.name, s.entry, s.env) for s in stack.SERVICES
                if s.name not in ("cordum-context-engine", "cordum-mcp")]
    t = topo.build(replicas=2, workers=1, api_key="k", services=services)
    assert {r.kind for r in t.replicas} == {"redis", "nats", "safety-kernel", "scheduler", "workflow-engine",
                                            "api-gateway", "worker"}
    assert not any("CONTEXT_ENGINE_ADDR" in r.env for r in t.replicas) and t.mcp_urls() == []
    assert [sorted({r.kind for r in tier}) for tier in t.tiers()][2] == ["safety-kernel"]


def _plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> dict:
    monkeypatch.setenv("CORDUM_DEV_DIR", str(tmp_path / "dev"))
    monkeypatch.setenv("CORDUM_API_KEY", "plan-key")
    for name in ("REDIS_URL", "NATS_URL", "CORDUM_API_KEYS_PATH", "TENANT_ID", "CORDUM_DEV_BASE_PORT"):
        monkeypatch.delenv(name, raising=False)
    argv = ["--replicas", "2", "--workers", "1", "--base-port", str(free_block(topo.BLOCK_SIZE)), *args]
    return stack.prepare(stack.build_parser("x", 1).parse_args(argv))


def _summary(data: dict) -> str:
    """What `up` prints once the plan runs (pids filled in)."""
    ran = {**data, "supervisor": {**data["supervisor"], "pid": 1},
           "replicas": [{**r, "pid": 100 + i} for i, r in enumerate(data["replicas"])]}
    return stack.describe(ran, foreground=True)


def test_the_plan_starts_what_is_available_and_lists_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _plan(tmp_path, monkeypatch)
    kinds = {r["kind"] for r in data["replicas"]}
    for service in stack.SERVICES:
        kind = topo.KINDS[service.name]
        if stack.is_available(service):
            assert kind in kinds and service.name not in data["not_available"], service.name
        else:  # a stub: listed, not started, and no replica is pointed at it
            assert kind not in kinds and service.name in data["not_available"], service.name
    assert all(r["tier"] for r in data["replicas"])
    if "context-engine" not in kinds:
        assert not any("CONTEXT_ENGINE_ADDR" in r["env"] for r in data["replicas"])
    text = _summary(data)
    for name in data["not_available"]:
        assert f"{name:18} not available yet" in text
    assert ("MCP client config" in text) == ("mcp" in kinds)


def test_the_plan_once_everything_is_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # how `up` will run the context engine and MCP once their stubs are replaced
    monkeypatch.setattr(stack, "is_available", lambda service: True)
    data = _plan(tmp_path, monkeypatch)
    base = data["base_port"]
    records = {r["name"]: r for r in data["replicas"]}
    assert data["not_available"] == [] and data["mcp"] == [f"http://127.0.0.1:{base + 141}/mcp",
                                                           f"http://127.0.0.1:{base + 143}/mcp"]
    assert records["context-engine-1"]["tier"] == records["safety-kernel-1"]["tier"] == "safety-kernel"
    sup = Supervisor(data, tmp_path / "dev")
    names = [r["name"] for r in data["replicas"]]
    assert sup.tiers(names)[2] == ["safety-kernel-1", "safety-kernel-2", "context-engine-1", "context-engine-2"]
    assert sup.tiers(list(reversed(names)))[:3] == [["worker-1"], ["mcp-2", "mcp-1"],
                                                    ["api-gateway-2", "api-gateway-1"]]
    text = _summary(data)
    assert f"MCP (streamable HTTP; the API key as Authorization: Bearer or X-API-Key): {', '.join(data['mcp'])}" in text
    assert ('MCP client config: {"mcpServers": {"cordum": {"type": "http", "url": "%s", "headers": '
            '{"Authorization": "Bearer plan-key"}}}}' % data["mcp"][0]) in text
    assert f"CONTEXT_ENGINE_ADDR=127.0.0.1:{base + 101},127.0.0.1:{base + 103}" in text
    assert "not available yet" not in text


@pytest.mark.parametrize("kwargs", [{"replicas": 0}, {"replicas": topo.MAX_REPLICAS + 1}, {"workers": -1},
                                    {"base_port": 80}, {"base_port": 65500}])
def test_bad_options(kwargs: dict) -> None:
    with pytest.raises(topo.TopologyError):
        topo.build(api_key="k", **kwargs)


def test_up_defaults() -> None:
    args = stack.build_parser("x", 1).parse_args([])
    assert (args.replicas, args.workers, args.detach) == (1, 1, False)  # python -m cordum.dev.stack
    args = stack.build_parser("cordumctl up", 2).parse_args(["--replicas", "3", "--detach"])
    assert (args.replicas, args.workers, args.detach) == (3, 2, True)


def test_state_requests_markers_and_process_states(tmp_path: Path) -> None:
    st.request_start(tmp_path, "worker-1")
    st.request_start(tmp_path, "api-gateway-2")
    assert st.take_requests(tmp_path) == [("start", "worker-1"), ("start", "api-gateway-2")]
    assert st.take_requests(tmp_path) == []

    me = os.getpid()
    assert st.process_state(me, st.start_time(me)) == "running"
    assert st.process_state(me, (st.start_time(me) or 0) + 1) == "gone"  # a reused pid
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = {"name": "worker-1", "pid": proc.pid, "start_time": None}
    data = {"supervisor": {"phase": "ready"}, "replicas": [record]}
    assert control.replica_state(data, record, tmp_path) == "exited"
    st.mark_stopped(tmp_path, "worker-1")
    assert control.replica_state(data, record, tmp_path) == "stopped"
    st.save(tmp_path, data)
    assert st.load(tmp_path) == data
    assert (tmp_path / st.STATE_FILE).stat().st_mode & 0o077 == 0  # holds the API key


def test_the_echo_workers_count_their_runs_unless_told_not_to() -> None:
    counted = topo.build(workers=2, api_key="secret")
    assert {counted.get(f"worker-{i}").env["ECHO_EXECUTIONS_KEY"] for i in (1, 2)} == {topo.DEV_EXECUTIONS_KEY}
    quiet = topo.build(workers=1, api_key="secret", echo_executions_key="")
    assert quiet.get("worker-1").env["ECHO_EXECUTIONS_KEY"] == ""


def test_free_ports_are_below_the_ephemeral_range_and_not_handed_out_twice() -> None:
    # A port in the ephemeral range that is free when asked for can become a client's local port
    # before the service binds it (a CI run lost a kernel so); and two callers must not share one.
    from cordum.dev.servers import _ephemeral_low, free_port

    ports = [free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    low = _ephemeral_low()
    if low > 10_100:
        assert max(ports) < low
    base = free_block(8)
    assert not set(range(base, base + 8)) & set(ports)


def test_a_long_run_of_single_ports_leaves_room_for_whole_blocks() -> None:
    # A suite asks for thousands of single ports and then a topology's block of 144: remembering
    # every port given and drawing blocks at random around them failed so (CI: no free block).
    from cordum.dev.servers import free_port

    singles = {free_port() for _ in range(3000)}
    blocks = [free_block(144) for _ in range(20)]
    taken = [port for base in blocks for port in range(base, base + 144)]
    assert len(singles) == 3000
    assert len(set(taken)) == len(taken)
    assert not singles & set(taken)
