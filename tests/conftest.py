"""Real servers for every test: one redis-server and one nats-server (JetStream) per session on
free loopback ports, each test run under Trio hosted by an asyncio loop (cordum.infra.aio), and helpers to run service processes."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from cordum.dev.servers import RedisCluster, ServerProcess, start_nats, start_redis, start_redis_cluster
from cordum.infra.aio import run_with_bridge
from cordum.infra.config import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
PROCS = ROOT / "tests" / "procs"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_nats(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture
def server_env(redis_server: ServerProcess, nats_server: ServerProcess) -> dict[str, str]:
    """Environment for a process of ours talking to the session's servers."""
    return {"REDIS_URL": redis_server.url, "NATS_URL": nats_server.url, "REDIS_MIN_IDLE_CONNS": "1"}


@pytest.fixture
def settings(server_env: dict[str, str]) -> Settings:
    return load_settings({**server_env, "CORDUM_INSTANCE_ID": f"test-{uuid.uuid4().hex[:6]}"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every async test runs under Trio with one asyncio loop for the whole test, opened before
    # any fixture (DESIGN.md §4.8): redis-py and nats-py bind to it.
    for item in items:
        if inspect.iscoroutinefunction(getattr(item, "function", None)):
            item.add_marker(pytest.mark.trio(run=run_with_bridge))


@pytest.fixture
async def redis(settings: Settings):
    from cordum.infra.redis import open_redis

    async with open_redis(settings) as client:
        await client.flushdb()
        yield client


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A Redis Cluster of 3 primaries and 3 replicas, started once per session (~2-3 s) when a test
    asks for it."""
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


def crossslot_errors(cluster: RedisCluster) -> int:
    """CROSSSLOT replies the cluster's nodes have sent so far (INFO errorstats)."""
    from cordum.dev.servers import _redis_cli

    total = 0
    for node in cluster.nodes:
        if node.proc.poll() is not None:
            continue
        for line in _redis_cli(node.port, "INFO", "errorstats").splitlines():
            if line.startswith("errorstat_CROSSSLOT:"):
                total += int(line.split("count=")[1].split(",")[0])
    return total


@pytest.fixture(params=["standalone", "cluster"])
def store_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    """The test's settings, once for the session's redis-server and once for the Redis Cluster
    (REDIS_CLUSTER_ADDRESSES)."""
    if request.param == "standalone":
        return settings
    cluster = request.getfixturevalue("redis_cluster")
    return load_settings({**settings.extra, "REDIS_CLUSTER_ADDRESSES": cluster.seeds})


@pytest.fixture
async def store_redis(request: pytest.FixtureRequest, store_settings: Settings):
    """`redis`, on each of store_settings' servers: flushed first (on the cluster, every primary);
    on the cluster, the test must not have caused a single CROSSSLOT reply."""
    from cordum.infra.redis import open_redis

    cluster = request.getfixturevalue("redis_cluster") if store_settings.redis_cluster else None
    before = crossslot_errors(cluster) if cluster else 0
    async with open_redis(store_settings) as client:
        await client.flushdb()
        yield client
    if cluster is not None:
        assert crossslot_errors(cluster) == before, "CROSSSLOT errors on the Redis Cluster"


@pytest.fixture
async def bus(settings: Settings):
    from cordum.infra.bus import open_bus

    async with open_bus(settings, name="tests") as client:
        yield client


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Proc:
    """A child process of a test, with stdout/stderr captured to files."""

    name: str
    popen: subprocess.Popen
    out: Path
    err: Path
    started: float = field(default_factory=time.monotonic)

    def lines(self, stream: str = "out") -> list[str]:
        path = self.out if stream == "out" else self.err
        return path.read_text().splitlines() if path.exists() else []

    def events(self) -> list[dict]:
        """The structured JSON log lines the process wrote to stderr."""
        found = []
        for line in self.lines("err"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def spawn(tmp_path: Path, server_env: dict[str, str]):
    """spawn(name, script_or_module_args, env=...) starts `python <args>` and kills it at the end."""
    procs: list[Proc] = []

    def start(name: str, args: list[str], env: dict[str, str] | None = None) -> Proc:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        full_env = {**os.environ, **server_env, "CORDUM_INSTANCE_ID": name, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
        with out.open("w") as fo, err.open("w") as fe:
            popen = subprocess.Popen([sys.executable, *args], stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                     env=full_env, cwd=ROOT)
        proc = Proc(name, popen, out, err)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()
