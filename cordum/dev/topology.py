"""The local multi-replica topology as data: names, ports, environment and health check per replica.

Pure (no processes, no I/O): `build()` turns `cordumctl up` options into the ordered list of
replicas the supervisor (`cordum.dev.supervisor`) starts tier by tier and stops in reverse.

Start order (tiers): redis, nats, the safety kernels together with the context engines, the
schedulers, the workflow engines, the api-gateways, the MCP servers, the echo workers (the services
`cordum.dev.stack.SERVICES` lists as available). A tier starts once the one before is healthy.

Ports. Without a base port the documented defaults, two apart per replica:

    api-gateway-i      HTTP      8081 + 2(i-1)   (8081, 8083, 8085, ...)
    scheduler-i        metrics   9090 + 2(i-1)
    safety-kernel-i    gRPC     50051 + 2(i-1),  admin 9095 + 2(i-1)
    workflow-engine-i  HTTP      9093 - 2(i-1)   (9093, 9091, 9089, ...: upwards it would take the
                                                  kernels' admin ports 9095, 9097, ...)
    context-engine-i   gRPC     50070 + 2(i-1),  metrics 9088 - 2(i-1)   (the documented 9094 is
                                                  scheduler-3's; 9088, 9086, ... are free: the
                                                  workflow engines' ports below 9093 are odd)
    mcp-i              HTTP      8090 + 2(i-1)   (8090, 8092: even, between the gateways' odd ports)
    redis 6379, nats 4222

With a base port B (`--base-port`, env CORDUM_DEV_BASE_PORT) every port moves into the block
B .. B+143 so tests and parallel topologies do not collide with the defaults:

    api-gateway-i B + 2(i-1), scheduler-i B+20 + 2(i-1), safety-kernel-i gRPC B+40 + 2(i-1) and
    admin B+60 + 2(i-1), redis B+80, nats B+81 (unless --redis-port / --nats-port say otherwise),
    workflow-engine-i B+82 + 2(i-1), context-engine-i gRPC B+101 + 2(i-1) and metrics
    B+121 + 2(i-1), mcp-i B+141 + 2(i-1).

Scheduler and gateway replica i dial safety kernel ((i-1) mod N)+1 first; gateways and workers get
every context engine in CONTEXT_ENGINE_ADDR (their own ((i-1) mod N)+1 first); mcp-i (at most
MAX_MCP of them, over HTTP) proxies to gateway ((i-1) mod N)+1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

MAX_REPLICAS = 10  # the base-port block leaves room for 10 replicas of each service
MAX_MCP = 2  # the guide's limit for cordum-mcp (over HTTP behind a plain load balancer)
MAX_WORKERS = 50
REDIS_PORT = 6379
NATS_PORT = 4222

# Ports without a base port: first replica's port per (kind, port name).
DEFAULT_PORTS: dict[str, dict[str, int]] = {
    "api-gateway": {"http": 8081},
    "scheduler": {"metrics": 9090},
    "safety-kernel": {"grpc": 50051, "admin": 9095},
    "workflow-engine": {"http": 9093},
    "context-engine": {"grpc": 50070, "metrics": 9088},
    "mcp": {"http": 8090},
}
# Distance between replicas' default ports per (kind, port name): 2 unless listed.
DEFAULT_STRIDE: dict[str, dict[str, int]] = {"workflow-engine": {"http": -2}, "context-engine": {"metrics": -2}}
# Offsets inside the base-port block.
BLOCK_OFFSETS: dict[str, dict[str, int]] = {
    "api-gateway": {"http": 0},
    "scheduler": {"metrics": 20},
    "safety-kernel": {"grpc": 40, "admin": 60},
    # after redis and nats, which keep B+80 and B+81 for whoever relies on them
    "workflow-engine": {"http": 82},
    "context-engine": {"grpc": 101, "metrics": 121},
    "mcp": {"http": 141},
}
BLOCK_REDIS, BLOCK_NATS = 80, 81
BLOCK_SIZE = 141 + 2 * (MAX_MCP - 1) + 1  # B .. B+143

# Console script (cordum.dev.stack.SERVICES) -> replica kind.
KINDS: dict[str, str] = {
    "cordum-safety-kernel": "safety-kernel",
    "cordum-context-engine": "context-engine",
    "cordum-scheduler": "scheduler",
    "cordum-workflow-engine": "workflow-engine",
    "cordum-api-gateway": "api-gateway",
    "cordum-mcp": "mcp",
    "cordum-worker-echo": "worker",
}
REPLICATED = ("safety-kernel", "context-engine", "scheduler", "workflow-engine", "api-gateway", "mcp")
# replicated kinds with fewer replicas than --replicas asks for
REPLICA_CAP = {"mcp": MAX_MCP}
# kinds started in another kind's tier: the context engine needs only Redis, like the kernels
SAME_TIER = {"context-engine": "safety-kernel"}
# kinds that get CONTEXT_ENGINE_ADDR: the gateway's memory routes and the worker SDK's helper
CONTEXT_CLIENTS = ("api-gateway", "worker")
MCP_PATH = "/mcp"  # the MCP SDK's streamable HTTP endpoint on each mcp replica
# replica kind -> the variable naming its HTTP listen address (health and metrics)
HTTP_ADDR_VARS = {"scheduler": "SCHEDULER_METRICS_ADDR", "workflow-engine": "WORKFLOW_ENGINE_HTTP_ADDR",
                  "api-gateway": "GATEWAY_HTTP_ADDR"}


class TopologyError(ValueError):
    """Options that do not describe a topology (bad counts, ports out of range)."""


@dataclass(frozen=True)
class Replica:
    name: str  # "api-gateway-2", "worker-1", "redis", "nats"
    kind: str  # "api-gateway", "scheduler", "safety-kernel", "worker", "redis", "nats", ...
    index: int  # 1-based; 0 for redis/nats
    entry: str | None  # "module:function" of a service; None for redis-server / nats-server
    env: Mapping[str, str] = field(default_factory=dict)  # set on top of the supervisor's environment
    ports: Mapping[str, int] = field(default_factory=dict)
    health: str = "alive"  # "http://127.0.0.1:P/health", "tcp:P" or "alive" (alive for a moment)
    tier: str = ""  # replicas of one tier start together; "" is the kind's own tier

    @property
    def tier_name(self) -> str:
        return self.tier or self.kind


@dataclass(frozen=True)
class Topology:
    replicas: tuple[Replica, ...]
    n: int  # replicas of each replicated service
    workers: int
    base_port: int | None
    redis_url: str
    nats_url: str
    start_redis: bool
    start_nats: bool

    def get(self, name: str) -> Replica:
        for replica in self.replicas:
            if replica.name == name:
                return replica
        raise KeyError(name)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.replicas]

    def tiers(self) -> list[list[Replica]]:
        """Replicas grouped by tier (consecutive replicas of one tier), in start order."""
        out: list[list[Replica]] = []
        for replica in self.replicas:
            if out and out[-1][0].tier_name == replica.tier_name:
                out[-1].append(replica)
            else:
                out.append([replica])
        return out

    def stop_order(self) -> list[Replica]:
        """Workers, gateways, schedulers, kernels, nats, redis: the reverse of the start order."""
        return list(reversed(self.replicas))

    def gateway_urls(self) -> list[str]:
        return [f"http://localhost:{r.ports['http']}" for r in self.replicas if r.kind == "api-gateway"]

    def mcp_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{r.ports['http']}{MCP_PATH}" for r in self.replicas if r.kind == "mcp"]


def service_ports(kind: str, index: int, base_port: int | None = None) -> dict[str, int]:
    """The ports of replica `index` (1-based) of a replicated service."""
    if base_port is None:
        strides = DEFAULT_STRIDE.get(kind, {})
        return {name: port + strides.get(name, 2) * (index - 1) for name, port in DEFAULT_PORTS[kind].items()}
    return {name: base_port + off + 2 * (index - 1) for name, off in BLOCK_OFFSETS[kind].items()}


DEV_EXECUTIONS_KEY = "cordum:dev:echo:executions"


def kernel_for(index: int, kernels: int) -> int:
    """The safety kernel replica that scheduler/gateway replica `index` dials first."""
    return (index - 1) % kernels + 1


def kernels_for(index: int, kernels: int) -> list[int]:
    """Every kernel replica, its own first: the client spreads over them and skips one that is
    down, so one kernel's crash never makes a gateway deny (fail closed) what the others allow."""
    first = kernel_for(index, kernels)
    return [first] + [k for k in range(1, kernels + 1) if k != first]


def addr_list(kind: str, port: str, index: int, count: int, base_port: int | None) -> str:
    """CONTEXT_ENGINE_ADDR / SAFETY_KERNEL_ADDR of client replica `index`: every replica of `kind`,
    comma-separated, the client's own ((index-1) mod count)+1 first so first calls spread out."""
    return ",".join(f"127.0.0.1:{service_ports(kind, k, base_port)[port]}" for k in kernels_for(index, count))


def build(
    *,
    replicas: int = 1,
    workers: int = 2,
    base_port: int | None = None,
    redis_port: int | None = None,
    nats_port: int | None = None,
    redis_url: str = "",
    nats_url: str = "",
    api_key: str,
    services: Sequence[tuple[str, str, Mapping[str, str] | None]] = (),
    cordum_env: str = "dev",
    keys_path: str = "",
    echo_executions_key: str = DEV_EXECUTIONS_KEY,
) -> Topology:
    """The topology for these options.

    `services`: (console script, "module:function", forced env) of the *available* services in
    start order (cordum.dev.stack.SERVICES filtered by availability). Without it, every service of
    the release is assumed. `redis_url`/`nats_url`: external servers (REDIS_URL/NATS_URL); empty
    means the topology starts its own. `keys_path`: a keys file every replica gets as
    CORDUM_API_KEYS_PATH. `echo_executions_key`: the hash the echo workers count their runs in
    (empty: they count nothing, as the benchmark runs them).
    """
    if not 1 <= replicas <= MAX_REPLICAS:
        raise TopologyError(f"--replicas must be between 1 and {MAX_REPLICAS}, got {replicas}")
    if not 0 <= workers <= MAX_WORKERS:
        raise TopologyError(f"--workers must be between 0 and {MAX_WORKERS}, got {workers}")
    if base_port is not None and not 1024 <= base_port <= 65535 - BLOCK_SIZE:
        raise TopologyError(f"--base-port must be between 1024 and {65535 - BLOCK_SIZE}, got {base_port}")
    if redis_port is None:
        redis_port = REDIS_PORT if base_port is None else base_port + BLOCK_REDIS
    if nats_port is None:
        nats_port = NATS_PORT if base_port is None else base_port + BLOCK_NATS
    for what, port in (("--redis-port", redis_port), ("--nats-port", nats_port)):
        if not 1 <= port <= 65535:
            raise TopologyError(f"{what} must be between 1 and 65535, got {port}")
    if not services:
        services = (
            ("cordum-safety-kernel", "cordum.safety.service:main", None),
            ("cordum-context-engine", "cordum.context.service:main", None),
            ("cordum-scheduler", "cordum.scheduler.service:main", None),
            ("cordum-workflow-engine", "cordum.workflow.service:main", None),
            ("cordum-api-gateway", "cordum.gateway.service:main", None),
            ("cordum-mcp", "cordum.mcp.service:main", None),
            ("cordum-worker-echo", "cordum.worker.echo:main", None),
        )

    start_redis, start_nats = not redis_url.strip(), not nats_url.strip()
    redis_url = redis_url.strip() or f"redis://127.0.0.1:{redis_port}/0"
    nats_url = nats_url.strip() or f"nats://127.0.0.1:{nats_port}"
    common = {"REDIS_URL": redis_url, "NATS_URL": nats_url, "CORDUM_ENV": cordum_env, "CORDUM_API_KEY": api_key}
    if keys_path:  # more keys for the gateways (the local stack's approver)
        common["CORDUM_API_KEYS_PATH"] = keys_path

    out: list[Replica] = []
    if start_redis:
        out.append(Replica("redis", "redis", 0, None, {}, {"port": redis_port}, f"tcp:{redis_port}"))
    if start_nats:
        out.append(Replica("nats", "nats", 0, None, {}, {"port": nats_port}, f"tcp:{nats_port}"))
    kinds = {KINDS.get(script, script.removeprefix("cordum-")) for script, _, _ in services}
    kernels = replicas if "safety-kernel" in kinds else 0
    engines = replicas if "context-engine" in kinds else 0
    gateways = replicas if "api-gateway" in kinds else 0
    for script, entry, forced in services:
        kind = KINDS.get(script, script.removeprefix("cordum-"))
        count = min(replicas, REPLICA_CAP.get(kind, replicas)) if kind in REPLICATED else (
            workers if kind == "worker" else 1)
        for i in range(1, count + 1):
            name = f"{kind}-{i}"
            env = {**common, "CORDUM_INSTANCE_ID": name, **(forced or {})}
            ports: dict[str, int] = {}
            health = "alive"
            if kind in REPLICATED:
                ports = service_ports(kind, i, base_port)
            if engines and kind in CONTEXT_CLIENTS:
                env["CONTEXT_ENGINE_ADDR"] = addr_list("context-engine", "grpc", i, engines, base_port)
            if kind == "safety-kernel":
                env["SAFETY_KERNEL_ADDR"] = f":{ports['grpc']}"
                env["SAFETY_KERNEL_ADMIN_ADDR"] = f":{ports['admin']}"
                health = f"http://127.0.0.1:{ports['admin']}/health"
            elif kind == "context-engine":
                env["CONTEXT_ENGINE_ADDR"] = f":{ports['grpc']}"
                env["CONTEXT_ENGINE_METRICS_ADDR"] = f":{ports['metrics']}"
                health = f"http://127.0.0.1:{ports['metrics']}/health"
            elif kind == "mcp":
                # stdio needs a client on the other end of stdin: under the supervisor MCP serves HTTP,
                # where each request's own key (no CORDUM_TENANT_ID) decides the tenant
                env.update(MCP_TRANSPORT="http", MCP_HTTP_ADDR=f":{ports['http']}")
                # and holds no key of its own (empty: not even one inherited from the supervisor)
                env.update(CORDUM_API_KEY="", CORDUM_API_KEYS_PATH="")
                if gateways:
                    gateway = service_ports("api-gateway", kernel_for(i, gateways), base_port)["http"]
                    env["CORDUM_GATEWAY_ADDR"] = f"http://127.0.0.1:{gateway}"
                health = f"http://127.0.0.1:{ports['http']}/health"
            elif kind in HTTP_ADDR_VARS:
                if kernels and kind != "workflow-engine":  # the engine dispatches through the scheduler
                    env["SAFETY_KERNEL_ADDR"] = addr_list("safety-kernel", "grpc", i, kernels, base_port)
                (port,) = ports.values()
                env[HTTP_ADDR_VARS[kind]] = f":{port}"
                health = f"http://127.0.0.1:{port}/health"
            elif kind == "worker":
                env["WORKER_ID"] = name
                # The echo workers count their executions (the HA gate checks "exactly once" there).
                env["ECHO_EXECUTIONS_KEY"] = echo_executions_key
            out.append(Replica(name, kind, i, entry, env, ports, health, SAME_TIER.get(kind, "")))
    return Topology(tuple(out), replicas, workers, base_port, redis_url, nats_url, start_redis, start_nats)


def all_ports(topology: Topology) -> list[tuple[str, int]]:
    """(replica name, port) for every port the topology listens on."""
    return [(r.name, port) for r in topology.replicas for port in r.ports.values()]


def duplicates(pairs: Iterable[tuple[str, int]]) -> list[int]:
    seen: set[int] = set()
    dup: list[int] = []
    for _, port in pairs:
        if port in seen:
            dup.append(port)
        seen.add(port)
    return dup
