"""The local control plane: `python -m cordum.dev.stack` (also `scripts/run_local.sh`, `cordumctl up`).

1. Starts redis-server on 6379 and nats-server (JetStream) on 4222, data and logs under
   `.cordum/local/`, unless REDIS_URL / NATS_URL are set (then it uses those and starts nothing for
   them). A default port that something else already listens on is an error, not silently reused.
2. Creates the JetStream streams and well-known durables once.
3. Prints the endpoints and starts every service of this release as a child process (a service
   whose `main` carries `not_available = True` is listed, not started).
4. Stays in the foreground. SIGTERM or Ctrl-C stops everything in reverse start order: SIGTERM, up
   to 15 s, then SIGKILL. A second signal is ignored.

Exit codes: 0 after a stop signal, 1 when something failed to start or a child died, 2 for a
configuration error.

Plain subprocesses and signal handlers; asyncio only for the one-shot stream creation. Every child
runs in its own session, so a terminal's Ctrl-C reaches only this supervisor (which then stops the
children in order), and the kernel sends it SIGTERM if the supervisor dies: a replica is a child that
dies with its parent.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import urlsplit

import cordum
from cordum.dev.servers import nats_server_binary, redis_server_binary, wait_for_port
from cordum.infra.config import ConfigError, Settings, load_settings
from cordum.runtime import log as logging

ROOT = Path(__file__).resolve().parents[2]
LOCAL = ROOT / ".cordum" / "local"
REDIS_PORT = 6379
NATS_PORT = 4222
STOP_TIMEOUT = 15.0
STREAMS_TIMEOUT = 20.0
PROG = "cordum-local"


class StartupFailed(Exception):
    """Something the stack needs could not start; the message says what and why."""


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
    # stdio needs a client on the other end of stdin; under the supervisor MCP serves HTTP.
    Service("cordum-mcp", "cordum.mcp.service:main", {"MCP_TRANSPORT": "http"}),
    # The example worker (pool "default", topic job.default) so a submitted job runs end to end.
    Service("cordum-worker-echo", "cordum.worker.echo:main", {"WORKER_ID": "echo-1"}),
)
GATEWAY_URL = "http://localhost:8081"


def is_available(service: Service) -> bool:
    """False for a release's "not available yet" stub (`main.not_available = True`)."""
    module, _, attr = service.entry.partition(":")
    main = getattr(importlib.import_module(module), attr)
    return not getattr(main, "not_available", False)


# ---- child processes -------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"{PROG}: {self.name} still running after {STOP_TIMEOUT:.0f} s: killing it", flush=True)
            self.proc.kill()
            self.proc.wait()


def spawn(name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
    log = LOCAL / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            env=dict(env) if env is not None else None, start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Child(name, proc, log)


def start_redis(port: int) -> Child:
    data = LOCAL / "redis"
    data.mkdir(parents=True, exist_ok=True)
    child = spawn("redis", [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
        "--appendonly", "yes", "--save", "",
    ])
    return _listening(child, port)


def start_nats(port: int) -> Child:
    data = LOCAL / "nats"
    data.mkdir(parents=True, exist_ok=True)
    child = spawn("nats", [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)])
    return _listening(child, port)


def _listening(child: Child, port: int) -> Child:
    try:
        wait_for_port(port, proc=child.proc)
    except (RuntimeError, TimeoutError) as exc:
        child.stop()
        raise StartupFailed(f"{child.name}-server did not start: {exc} (log {_rel(child.log)})") from None
    return child


def start_service(service: Service, env: Mapping[str, str]) -> Child:
    module, _, attr = service.entry.partition(":")
    code = f"import sys; from {module} import {attr}; sys.exit({attr}())"
    return spawn(service.name, [sys.executable, "-c", code], {**env, **(service.env or {})})


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


def create_streams(settings: Settings) -> None:
    """Connect once: `open_bus` creates the streams and the well-known durables."""
    import trio

    from cordum.infra.aio import open_bridge
    from cordum.infra.bus import open_bus

    async def create() -> None:
        async with open_bridge():
            with trio.fail_after(STREAMS_TIMEOUT):
                async with open_bus(settings, name=PROG):
                    pass

    try:
        trio.run(create)
    except trio.TooSlowError:
        raise StartupFailed(f"no JetStream answer from NATS_URL={_show(settings.nats_url)} within "
                            f"{STREAMS_TIMEOUT:.0f} s") from None
    except Exception as exc:  # trio may wrap the cause in an ExceptionGroup
        raise StartupFailed(f"could not create the JetStream streams on {_show(settings.nats_url)}: {exc!r}")


# ---- the supervisor --------------------------------------------------------------------------


class StopSignal:
    """Signal handler: remembers the first SIGTERM/SIGINT; later ones are ignored."""

    def __init__(self) -> None:
        self.received: int | None = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{PROG}: {signal.Signals(signum).name}: stopping", flush=True)


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m cordum.dev.stack") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the Cordum control plane locally: redis-server, nats-server (JetStream) and "
        "the services of this release, in the foreground until Ctrl-C or SIGTERM.",
    )
    parser.add_argument("--redis-port", type=int, default=REDIS_PORT, help="port of the redis-server "
                        "started when REDIS_URL is not set (default %(default)s)")
    parser.add_argument("--nats-port", type=int, default=NATS_PORT, help="port of the nats-server "
                        "started when NATS_URL is not set (default %(default)s)")
    args = parser.parse_args(argv)

    stop = StopSignal()
    children: list[Child] = []
    try:
        return supervise(args.redis_port, args.nats_port, stop, children)
    except ConfigError as exc:
        print(f"{PROG}: configuration error: {exc}", file=sys.stderr)
        return 2
    except (StartupFailed, OSError, RuntimeError, TimeoutError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    finally:
        if children:
            print(f"{PROG}: stopping " + ", ".join(c.name for c in reversed(children)), flush=True)
        for child in reversed(children):
            child.stop()


def supervise(redis_port: int, nats_port: int, stop: StopSignal, children: list[Child]) -> int:
    env = dict(os.environ)
    start_redis_here = not env.get("REDIS_URL", "").strip()
    start_nats_here = not env.get("NATS_URL", "").strip()
    if start_redis_here:
        env["REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"
    if start_nats_here:
        env["NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
    env.setdefault("CORDUM_ENV", "dev")  # a local stack is a development setup
    generated_key = not env.get("CORDUM_API_KEY", "").strip()
    if generated_key:
        env["CORDUM_API_KEY"] = secrets.token_urlsafe(24)
    settings = load_settings(env)  # a bad variable stops us before anything starts
    logging.configure(service=PROG, instance=settings.instance_id, level=settings.log_level)
    services = [(service, is_available(service)) for service in SERVICES]

    if start_redis_here:
        _check_free(redis_port, "redis", "REDIS_URL", f"redis://127.0.0.1:{redis_port}/0")
    if start_nats_here:
        _check_free(nats_port, "nats", "NATS_URL", f"nats://127.0.0.1:{nats_port}")

    print(f"{PROG}: Cordum {cordum.__version__} control plane", flush=True)
    if start_redis_here:
        redis_note = _started(children, start_redis(redis_port), LOCAL / "redis")
    else:
        redis_note = _external(settings.redis_url, "REDIS_URL", REDIS_PORT)
    if stop.received:
        return 0
    if start_nats_here:
        nats_note = _started(children, start_nats(nats_port), LOCAL / "nats")
    else:
        nats_note = _external(settings.nats_url, "NATS_URL", NATS_PORT)
    if stop.received:
        return 0
    if settings.nats_use_jetstream:
        create_streams(settings)
        streams = "CORDUM_SYS, CORDUM_JOBS ready"
    else:
        streams = "not used (NATS_USE_JETSTREAM=false)"

    print(f"  REDIS_URL={_show(settings.redis_url)}  ({redis_note})")
    print(f"  NATS_URL={_show(settings.nats_url)}  ({nats_note})")
    print(f"  JetStream streams: {streams}")
    print("services in this release:")
    for service, available in services:
        if stop.received:
            return 0
        if available:
            child = start_service(service, env)
            children.append(child)
            print(f"  {service.name:24} started, pid {child.proc.pid}, log {_rel(child.log)}")
        else:
            print(f"  {service.name:24} not available yet")
    print(f"  API: {GATEWAY_URL}  (headers X-API-Key, X-Tenant-ID: {env.get('TENANT_ID', 'default')})")
    print(f"  CORDUM_API_KEY={env['CORDUM_API_KEY']}" + ("  (generated; set CORDUM_API_KEY to choose it)" if generated_key else ""))
    print("  try: CORDUM_API_KEY=... cordumctl job submit --prompt hello --wait")
    print(f"{PROG}: running; Ctrl-C or SIGTERM stops everything", flush=True)

    while not stop.received:
        for child in children:
            code = child.proc.poll()
            if code is not None:
                print(f"{PROG}: {child.name} exited with code {code} (log {_rel(child.log)})", file=sys.stderr)
                children.remove(child)
                return 1
        time.sleep(0.2)
    return 0


def _check_free(port: int, what: str, variable: str, example: str) -> None:
    if port_in_use(port):
        raise StartupFailed(
            f"port {port} is already in use, so the local {what} cannot start there. Stop whatever "
            f"listens on it, or set {variable} (e.g. {variable}={example}) to use that server instead."
        )


def _started(children: list[Child], child: Child, data: Path) -> str:
    children.append(child)
    return f"{child.name}-server started, pid {child.proc.pid}, data {_rel(data)}, log {_rel(child.log)}"


def _external(url: str, variable: str, default_port: int) -> str:
    if not reachable(url, default_port):
        raise StartupFailed(f"{variable}={_show(url)} is not reachable")
    return f"from {variable}, not started here"


def _show(url: str) -> str:
    return logging.redact("url", url)  # no credentials on the terminal


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
