"""`cordumctl up --replicas 2 --workers 1 --detach` and `cordumctl dev ...` on real processes.

One topology in a temporary state directory (CORDUM_DEV_DIR), every port (redis and nats included)
moved into a free block with --base-port, so nothing collides with a developer's stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import trio

from cordum.dev.servers import free_block as servers_free_block
from cordum.dev import stack
from cordum.dev import state as st
from cordum.dev.topology import BLOCK_SIZE, KINDS, REPLICATED

ROOT = Path(__file__).resolve().parents[2]
KEY = "dev-topology-test-key"
pytestmark = pytest.mark.slow


def free_block(size: int = BLOCK_SIZE) -> int:
    """A base port whose whole block is free right now."""
    return servers_free_block(size)


def cordumctl(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cordum.cli.main", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def ps(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    result = cordumctl(env, "dev", "ps", "--json")
    assert result.returncode == 0, result.stderr
    return {r["name"]: r for r in json.loads(result.stdout)["replicas"]}


def http(method: str, url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read() or b"null")


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def health(url: str) -> int:
    return urllib.request.urlopen(url + "/health", timeout=5).status


async def mcp_tool(url: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """One tool call through the official MCP client over streamable HTTP, with the stack's key."""
    import httpx2
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client, \
            streamable_http_client(url, http_client=client) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        result = await session.call_tool(tool, args)
        assert not result.is_error, result.content[0].text
        return result.structured_content


def test_detached_topology_replicas_and_dev_commands(tmp_path: Path) -> None:
    # the context engine and MCP join once their console scripts are more than stubs
    available = {KINDS[s.name]: s.name for s in stack.SERVICES if stack.is_available(s)}
    base = free_block()
    sdir = tmp_path / "dev"
    env = {**os.environ, "CORDUM_DEV_DIR": str(sdir), "CORDUM_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}
    for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID"):
        env.pop(name, None)
    up = cordumctl(env, "up", "--replicas", "2", "--workers", "1", "--detach", "--base-port", str(base), timeout=150)
    try:
        assert up.returncode == 0, up.stdout + up.stderr + str(st.load(sdir))
        assert f"CORDUM_API_KEY={KEY}" in up.stdout
        assert f"http://localhost:{base}, http://localhost:{base + 2}" in up.stdout

        replicas = ps(env)
        expected = {"redis", "nats", "safety-kernel-1", "safety-kernel-2", "scheduler-1", "scheduler-2",
                    "workflow-engine-1", "workflow-engine-2", "api-gateway-1", "api-gateway-2", "worker-1"}
        expected |= {f"{kind}-{i}" for kind in ("context-engine", "mcp") if kind in available for i in (1, 2)}
        assert set(replicas) == expected
        assert {r["state"] for r in replicas.values()} == {"running"}
        ids = [r["instance_id"] for n, r in replicas.items() if n not in ("redis", "nats")]
        assert len(set(ids)) == len(ids) == len(expected) - 2
        assert replicas["api-gateway-2"]["ports"] == {"http": base + 2}
        engines = [f"http://127.0.0.1:{base + 82 + 2 * i}" for i in range(2)]
        assert [replicas[f"workflow-engine-{i}"]["ports"] for i in (1, 2)] == [{"http": base + 82},
                                                                              {"http": base + 84}]
        for url in engines:
            assert health(url) == 200
        if "context-engine" in available:
            assert [replicas[f"context-engine-{i}"]["ports"] for i in (1, 2)] == [
                {"grpc": base + 101, "metrics": base + 121}, {"grpc": base + 103, "metrics": base + 123}]
            assert health(f"http://127.0.0.1:{base + 123}") == 200
        if "mcp" in available:
            assert [replicas[f"mcp-{i}"]["ports"] for i in (1, 2)] == [{"http": base + 141}, {"http": base + 143}]
            assert health(f"http://127.0.0.1:{base + 143}") == 200
            assert f"http://127.0.0.1:{base + 141}/mcp" in up.stdout  # how to plug an MCP client in
        data = st.load(sdir)
        assert data is not None and data["api_key"] == KEY and data["supervisor"]["mode"] == "detached"

        # A job submitted through gateway-2 is SUCCEEDED as seen through gateway-1.
        gw1, gw2 = f"http://127.0.0.1:{base}", f"http://127.0.0.1:{base + 2}"
        wait_for(lambda: any(w.get("worker_id") == "worker-1" for w in http("GET", gw2 + "/api/v1/workers")["items"]),
                 30, "worker-1 in the worker snapshot")
        job_id = http("POST", gw2 + "/api/v1/jobs", {"prompt": "dev topology"})["job_id"]
        wait_for(lambda: http("GET", f"{gw1}/api/v1/jobs/{job_id}").get("state") == "SUCCEEDED", 30,
                 f"job {job_id} SUCCEEDED via gateway-1")

        if "mcp" in available:  # the URL and key `up` printed are all an MCP client needs
            job = trio.run(mcp_tool, f"http://127.0.0.1:{base + 143}/mcp", "cordum_get_job", {"id": job_id})
            assert (job["id"], job["state"]) == (job_id, "SUCCEEDED")

        # /api/v1/status lists both replicas of every replicated service that runs
        registered = {available[kind]: {f"{kind}-1", f"{kind}-2"} for kind in REPLICATED if kind in available}

        def listed() -> bool:
            found = http("GET", gw1 + "/api/v1/status")["replicas"]
            return all({e["id"] for e in found.get(name, [])} == want for name, want in registered.items())
        wait_for(listed, 30, f"/api/v1/status listing {sorted(registered)}")

        assert cordumctl(env, "dev", "pause", "scheduler-1").returncode == 0
        assert ps(env)["scheduler-1"]["state"] == "paused"
        assert cordumctl(env, "dev", "resume", "scheduler-1").returncode == 0
        assert ps(env)["scheduler-1"]["state"] == "running"

        # a workflow engine is a replica like the others: stopped, then started healthy again
        assert cordumctl(env, "dev", "stop", "workflow-engine-2").returncode == 0
        assert ps(env)["workflow-engine-2"]["state"] == "stopped"
        started = cordumctl(env, "dev", "start", "workflow-engine-2")  # returns once /health answers
        assert started.returncode == 0, started.stderr
        assert ps(env)["workflow-engine-2"]["state"] == "running"
        assert health(engines[1]) == 200
        if "context-engine" in available:  # so is a context engine
            assert cordumctl(env, "dev", "stop", "context-engine-2").returncode == 0
            assert ps(env)["context-engine-2"]["state"] == "stopped"
            started = cordumctl(env, "dev", "start", "context-engine-2")
            assert started.returncode == 0, started.stderr
            assert health(f"http://127.0.0.1:{base + 123}") == 200

        old_pid = replicas["worker-1"]["pid"]
        assert cordumctl(env, "dev", "kill", "worker-1").returncode == 0
        assert ps(env)["worker-1"]["state"] == "exited"
        started = cordumctl(env, "dev", "start", "worker-1")
        assert started.returncode == 0, started.stderr
        worker = ps(env)["worker-1"]
        assert worker["state"] == "running" and worker["pid"] != old_pid

        assert cordumctl(env, "dev", "nosuch", "x").returncode == 2
        assert cordumctl(env, "dev", "stop", "scheduler-9").returncode == 2
    finally:
        down = cordumctl(env, "dev", "down", timeout=200)
    assert down.returncode == 0, down.stdout + down.stderr
    data = st.load(sdir)
    assert data is not None
    live = [r["name"] for r in data["replicas"] if st.alive(r.get("pid"), r.get("start_time"))]
    assert live == []
    assert not st.supervisor_alive(data)
    assert {r["state"] for r in ps(env).values()} == {"stopped"}
