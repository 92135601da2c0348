"""The local control plane: `cordumctl up` (also `python -m cordum.dev.stack`, `scripts/run_local.sh`).

`cordumctl up [--replicas N] [--workers K] [--detach] [--base-port B] [--redis-port P] [--nats-port P]`
starts a supervision tree of real processes (`cordum.dev.supervisor`): redis-server and nats-server
(JetStream), unless REDIS_URL / NATS_URL are set (then it uses those and starts nothing for them),
N safety kernels, N context engines, N schedulers, N workflow engines, N api-gateways, min(N, 2)
MCP servers over HTTP and K echo workers, each replica with its own CORDUM_INSTANCE_ID
(`safety-kernel-1`, `context-engine-2`, `workflow-engine-1`, `mcp-1`, `worker-1`, ...; names, ports
and env: `cordum.dev.topology`). A service whose console script is still a "not available yet"
stub is listed as such and not started. Data, logs and state (pids, ports, env) live under
`.cordum/dev/` (or $CORDUM_DEV_DIR; `cordum.dev.state`). Once every replica is healthy it prints the
endpoints and the API key (CORDUM_API_KEY, generated when unset; CORDUM_ENV defaults to dev).

Foreground (default): SIGTERM or Ctrl-C stops everything in reverse start order (workers, MCP
servers, gateways, workflow engines, schedulers, kernels and context engines, nats, redis):
SIGTERM, up to 15 s, then SIGKILL; exit 0. A replica that dies is reported and the rest keeps
running. `--detach`: the supervisor runs as its own background process (pid in the state) and `up`
returns once all replicas are healthy; `cordumctl dev ...` (`cordum.dev.control`) then acts on
single replicas and `cordumctl dev down` stops it all.

`python -m cordum.dev.stack` is `cordumctl up --workers 1` (one replica of everything).

Exit codes: 0 after a stop signal (or, detached, once healthy), 1 when something failed to start or
a port is taken, 2 for a configuration error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit

import cordum
from cordum.dev import state as st
from cordum.dev import topology as topo
from cordum.dev.supervisor import PROG, STOP_TIMEOUT, StartupFailed, StopSignal, Supervisor, rel
from cordum.infra.config import ConfigError, load_settings
from cordum.runtime import log as logging

ROOT = st.ROOT
REDIS_PORT = topo.REDIS_PORT
NATS_PORT = topo.NATS_PORT
DETACH_TIMEOUT = 300.0  # `up --detach` gives the supervisor this long to report "ready"
__all__ = ["SERVICES", "Service", "StartupFailed", "STOP_TIMEOUT", "is_available", "main"]


@dataclass(frozen=True)
class Service:
    name: str  # the console script (pyproject.toml [project.scripts])
    entry: str  # "module:function"
    env: Mapping[str, str] | None = None  # forced for the local stack


# In start order: the services others call first, the front doors last.
SERVICES: tuple[Service, ...] = (
    Service("cordum-safety-kernel", "cordum.safety.service:main"),
    Service("cordum-context-engine", "cordum.context.service:main"),
    Service("cordum-scheduler", "cordum.scheduler.service:main"),
    Service("cordum-workflow-engine", "cordum.workflow.service:main"),
    Service("cordum-api-gateway", "cordum.gateway.service:main"),
    # over HTTP (MCP_TRANSPORT=http, the topology sets it): stdio would need a client on stdin
    Service("cordum-mcp", "cordum.mcp.service:main"),
    # The example worker (pool "default", topic job.default) so a submitted job runs end to end.
    Service("cordum-worker-echo", "cordum.worker.echo:main"),  # WORKER_ID worker-1..K (topology)
)


def is_available(service: Service) -> bool:
    """False for a release's "not available yet" stub (`main.not_available = True`)."""
    module, _, attr = service.entry.partition(":")
    main = getattr(importlib.import_module(module), attr)
    return not getattr(main, "not_available", False)


# ---- checks ----------------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def reachable(urls: str, default_port: int) -> bool:
    """Whether any server of a (comma-separated) URL list accepts TCP connections."""
    for url in urls.split(","):
        parts = urlsplit(url.strip())
        if parts.scheme == "unix":
            return os.path.exists(parts.path)
        try:
            with socket.create_connection((parts.hostname or "localhost", parts.port or default_port), timeout=2):
                return True
        except (OSError, ValueError):
            continue
    return False


# ---- `up` ----------------------------------------------------------------------------------


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def build_parser(prog: str, default_workers: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the Cordum control plane locally as a supervision tree of processes: "
        "redis-server, nats-server (JetStream), N safety kernels, N context engines, N schedulers, N "
        "workflow engines, N api-gateways, min(N, 2) MCP servers (HTTP) and K echo workers; in the "
        "foreground until Ctrl-C or SIGTERM, or --detach. State, data and logs under .cordum/dev/ "
        "(env CORDUM_DEV_DIR); `cordumctl dev ps|stop|start|kill|pause|resume|down` act on a running "
        "topology.",
    )
    parser.add_argument("--replicas", type=_count, default=1, metavar="N",
                        help="replicas of the safety kernel, context engine, scheduler, workflow engine "
                        "and api-gateway, and of cordum-mcp up to 2 (default %(default)s; gateways on HTTP "
                        "8081, 8083, ..., workflow engines on 9093, 9091, ..., context engines on gRPC "
                        "50070, 50072, ..., MCP on 8090, 8092)")
    parser.add_argument("--workers", type=_count, default=default_workers, metavar="K",
                        help="echo workers worker-1..K (default %(default)s)")
    parser.add_argument("--detach", action="store_true",
                        help="return once every replica is healthy, leaving the topology running "
                        "(stop it with `cordumctl dev down`)")
    parser.add_argument("--base-port", type=_port, metavar="B",
                        default=os.environ.get("CORDUM_DEV_BASE_PORT") or None,  # argparse converts it
                        help=f"move every port into the block B..B+{topo.BLOCK_SIZE - 1} (gateways B, B+2, "
                        "...; schedulers B+20...; kernels gRPC B+40..., admin B+60...; redis B+80, nats "
                        "B+81; workflow engines B+82...; context engines gRPC B+101..., metrics B+121...; "
                        "MCP B+141, B+143) instead of the defaults (env CORDUM_DEV_BASE_PORT)")
    parser.add_argument("--redis-port", type=_port, default=None, help="port of the redis-server "
                        f"started when REDIS_URL is not set (default {REDIS_PORT})")
    parser.add_argument("--nats-port", type=_port, default=None, help="port of the nats-server "
                        f"started when NATS_URL is not set (default {NATS_PORT})")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m cordum.dev.stack",
         default_workers: int = 1) -> int:
    args = build_parser(prog, default_workers).parse_args(argv)
    stop = StopSignal()
    try:
        data = prepare(args)
    except (ConfigError, topo.TopologyError) as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StartupFailed, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    sdir = Path(data["state_dir"])
    if args.detach:
        return detach(data, sdir, stop)
    print(f"{PROG}: Cordum {cordum.__version__} control plane: starting {len(data['replicas'])} processes "
          f"(state {rel(sdir)}, logs {rel(sdir / 'logs')})", flush=True)
    sup = Supervisor(data, sdir)
    return sup.run(stop, on_ready=lambda d: print(describe(d, foreground=True), flush=True))


def _approver(env: Mapping[str, str], sdir: Path) -> tuple[str, str]:
    """(approver key, keys file) of the local stack: nobody approves a job or a workflow gate they
    started, so a local user with one key could approve nothing. Unless CORDUM_API_KEYS_PATH says
    which keys there are, a second key (CORDUM_APPROVER_KEY, else generated) for principal
    `approver` is written to a keys file the gateways read. ("", "") when the user's file rules."""
    if env.get("CORDUM_API_KEYS_PATH", "").strip():
        return "", ""
    return env.get("CORDUM_APPROVER_KEY", "").strip() or secrets.token_urlsafe(24), str(sdir / "keys.yaml")


def _write_keys(path: str, key: str, tenant: str) -> None:
    """The approver's keys file (JSON is YAML too), readable by this user only."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps([{"key": key, "tenant": tenant, "role": "operator", "principal_id": "approver"}]) + "\n")


def prepare(args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything and return the plan (the state document before anything runs)."""
    env = dict(os.environ)
    sdir = st.state_dir(env)
    generated_key = not env.get("CORDUM_API_KEY", "").strip()
    api_key = env.get("CORDUM_API_KEY", "").strip() or secrets.token_urlsafe(24)
    cordum_env = env.get("CORDUM_ENV", "").strip() or "dev"  # a local stack is a development setup
    approver_key, keys_path = _approver(env, sdir)
    tenant = env.get("TENANT_ID", "").strip() or "default"
    services = [(s, is_available(s)) for s in SERVICES]
    topology = topo.build(
        replicas=args.replicas, workers=args.workers, base_port=args.base_port,
        redis_port=args.redis_port, nats_port=args.nats_port,
        redis_url=env.get("REDIS_URL", ""), nats_url=env.get("NATS_URL", ""), api_key=api_key,
        services=[(s.name, s.entry, s.env) for s, ok in services if ok], cordum_env=cordum_env,
        keys_path=keys_path, echo_executions_key=env.get("ECHO_EXECUTIONS_KEY", topo.DEV_EXECUTIONS_KEY),
    )
    settings = load_settings({**env, "REDIS_URL": topology.redis_url, "NATS_URL": topology.nats_url,
                              "CORDUM_ENV": cordum_env})  # a bad variable stops us before anything starts
    logging.configure(service=PROG, instance=settings.instance_id, level=settings.log_level)

    running = st.load(sdir)
    if st.supervisor_alive(running):
        raise StartupFailed(f"a topology is already running from {rel(sdir)} (supervisor pid "
                            f"{running['supervisor']['pid']}): `cordumctl dev ps` shows it, "
                            f"`cordumctl dev down` stops it (or set CORDUM_DEV_DIR for another one)")
    if topology.start_redis:
        _check_free(topology.get("redis").ports["port"], "redis", "REDIS_URL", topology.redis_url)
    else:
        _external(topology.redis_url, "REDIS_URL", REDIS_PORT)
    if topology.start_nats:
        _check_free(topology.get("nats").ports["port"], "nats", "NATS_URL", topology.nats_url)
    else:
        _external(topology.nats_url, "NATS_URL", NATS_PORT)
    for name, port in topo.all_ports(topology):
        if port_in_use(port):
            raise StartupFailed(f"port {port} (for {name}) is already in use. Stop whatever listens on it, "
                                f"or move the topology's ports with --base-port (env CORDUM_DEV_BASE_PORT).")

    st.clear_markers(sdir)
    if keys_path:
        _write_keys(keys_path, approver_key, tenant)
    return {
        "version": 1,
        "state_dir": str(sdir),
        "root": str(ROOT),
        "replicas_per_service": topology.n,
        "workers": topology.workers,
        "base_port": topology.base_port,
        "redis_url": topology.redis_url,
        "nats_url": topology.nats_url,
        "gateways": topology.gateway_urls(),
        "mcp": topology.mcp_urls(),
        "tenant": tenant,
        "api_key": api_key,
        "api_key_generated": generated_key,
        "approver_key": approver_key,
        "not_available": [s.name for s, ok in services if not ok],
        "streams": None,
        "supervisor": {"pid": None, "start_time": None, "mode": "detached" if args.detach else "foreground",
                       "phase": "planned", "error": None,
                       "log": str(sdir / "logs" / "supervisor.log") if args.detach else None},
        "replicas": [
            {"name": r.name, "kind": r.kind, "index": r.index, "entry": r.entry, "env": dict(r.env),
             "ports": dict(r.ports), "health": r.health, "tier": r.tier_name, "log": str(st.log_path(sdir, r.name)),
             "pid": None, "start_time": None, "argv": None, "started_at": None, "exit_code": None, "starts": 0}
            for r in topology.replicas
        ],
    }


def detach(data: dict[str, Any], sdir: Path, stop: StopSignal) -> int:
    """Start the supervisor as its own process and wait until it reports every replica healthy."""
    st.save(sdir, data)
    log = Path(data["supervisor"]["log"])
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cordum.dev.supervisor", "--state-dir", str(sdir)],
            stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,  # not ours to stop with a terminal's Ctrl-C
        )
    print(f"{PROG}: Cordum {cordum.__version__} control plane: supervisor pid {proc.pid} starting "
          f"{len(data['replicas'])} processes (log {rel(log)})", flush=True)
    deadline = time.monotonic() + DETACH_TIMEOUT
    while True:
        current = st.load(sdir) or data
        phase = (current.get("supervisor") or {}).get("phase")
        if phase == "ready":
            print(describe(current, foreground=False), flush=True)
            return 0
        if proc.poll() is not None or phase in ("failed", "stopped"):
            error = (current.get("supervisor") or {}).get("error") or f"supervisor exited with {proc.poll()}"
            print(f"{PROG}: {error} (log {rel(log)})", file=sys.stderr)
            return 1
        if stop.received or time.monotonic() > deadline:
            if not stop.received:
                print(f"{PROG}: not healthy after {DETACH_TIMEOUT:.0f} s; stopping", file=sys.stderr)
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT * 2 + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
            return 0 if stop.received else 1
        time.sleep(0.1)


def describe(data: Mapping[str, Any], *, foreground: bool) -> str:
    """The endpoints, replicas and API key, as `up` prints them once everything is healthy."""
    replicas = {r["name"]: r for r in data["replicas"]}
    lines = []

    def server_note(name: str, variable: str) -> str:
        record = replicas.get(name)
        if record is None:
            return f"from {variable}, not started here"
        data_dir = Path(data["state_dir"]) / "data" / name
        return (f"{name}-server started, pid {record['pid']}, data {rel(data_dir)}, log {rel(record['log'])}")

    lines.append(f"  REDIS_URL={_show(data['redis_url'])}  ({server_note('redis', 'REDIS_URL')})")
    lines.append(f"  NATS_URL={_show(data['nats_url'])}  ({server_note('nats', 'NATS_URL')})")
    lines.append(f"  JetStream streams: {data.get('streams')}")
    lines.append("replicas:")
    for record in data["replicas"]:
        if record["kind"] in ("redis", "nats"):
            continue
        ports = " ".join(f"{k} :{v}" for k, v in record["ports"].items())
        lines.append(f"  {record['name']:18} pid {record['pid']:<8} {ports:26} log {rel(record['log'])}")
    for name in data.get("not_available") or []:
        lines.append(f"  {name:18} not available yet")
    gateways = data.get("gateways") or []
    lines.append(f"  API: {', '.join(gateways)}  (headers X-API-Key, X-Tenant-ID: {data.get('tenant', 'default')})")
    lines.append(f"  CORDUM_API_KEY={data['api_key']}"
                 + ("  (generated; set CORDUM_API_KEY to choose it)" if data.get("api_key_generated") else ""))
    lines.append("  try: CORDUM_API_KEY=... cordumctl job submit --prompt hello --wait")
    lines.extend(_plug_in(data))
    if data.get("approver_key"):
        lines.append(f"  approver (a second person: nobody approves what they started): "
                     f"cordumctl --api-key {data['approver_key']} approval approve <job>")
    lines.append("  replicas: cordumctl dev ps | dev stop|start|kill|pause|resume NAME | dev down")
    sup = data["supervisor"]
    if foreground:
        lines.append(f"{PROG}: running; Ctrl-C or SIGTERM stops everything")
    else:
        lines.append(f"{PROG}: running in the background (supervisor pid {sup['pid']}, log {rel(sup['log'])}); "
                     "`cordumctl dev down` stops everything")
    return "\n".join(lines)


def _plug_in(data: Mapping[str, Any]) -> list[str]:
    """How a client reaches the MCP servers and the context engines (lines of the summary)."""
    lines = []
    mcp = data.get("mcp") or []
    if mcp:
        config = {"mcpServers": {"cordum": {"type": "http", "url": mcp[0],
                                            "headers": {"Authorization": f"Bearer {data['api_key']}"}}}}
        lines.append(f"  MCP (streamable HTTP; the API key as Authorization: Bearer or X-API-Key): {', '.join(mcp)}")
        lines.append(f"  MCP client config: {json.dumps(config)}")
    engines = [f"127.0.0.1:{r['ports']['grpc']}" for r in data["replicas"] if r["kind"] == "context-engine"]
    if engines:
        lines.append(f"  CONTEXT_ENGINE_ADDR={','.join(engines)}  (gateways and workers here have it set)")
    return lines


def _check_free(port: int, what: str, variable: str, example: str) -> None:
    if port_in_use(port):
        raise StartupFailed(
            f"port {port} is already in use, so the local {what} cannot start there. Stop whatever "
            f"listens on it, or set {variable} (e.g. {variable}={example}) to use that server instead."
        )


def _external(url: str, variable: str, default_port: int) -> str:
    if not reachable(url, default_port):
        raise StartupFailed(f"{variable}={_show(url)} is not reachable")
    return f"from {variable}, not started here"


def _show(url: str) -> str:
    return logging.redact("url", url)  # no credentials on the terminal


if __name__ == "__main__":
    sys.exit(main())
