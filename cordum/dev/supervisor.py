"""The supervisor of a local topology: one process owning every replica as a child.

Tractor-style supervision tree (DESIGN.md §7): each replica is a child process in its own session
(a terminal's Ctrl-C reaches only the supervisor, which then stops the children in order), with
PR_SET_PDEATHSIG so the kernel sends it SIGTERM if the supervisor dies: a replica dies with its
parent. The supervisor

1. starts the replicas tier by tier in `cordum.dev.topology` order (redis, nats, kernels and
   context engines, schedulers, workflow engines, gateways, MCP servers, workers), creating the
   JetStream streams once nats is up, and waits for each tier to be healthy (HTTP /health 200, a
   listening port for redis/nats, alive for ALIVE_SECONDS for workers) before starting the next;
2. records pids, ports, env and logs in the state directory (`cordum.dev.state`) and sets its phase
   to "ready";
3. then polls: a child that exits is reported (not restarted: failover tests kill replicas on
   purpose), and `requests/<n>-start-<name>` files (`cordumctl dev start`) start that replica again
   with the same argv, env and ports, as a child of this supervisor;
4. on SIGTERM/SIGINT/SIGHUP stops everything in reverse order, a tier at a time: SIGTERM (plus
   SIGCONT, for a paused replica), up to STOP_TIMEOUT, then SIGKILL.

It runs inside `cordumctl up` (foreground) or, for `cordumctl up --detach`, as its own process:
`python -m cordum.dev.supervisor --state-dir DIR`, reading the plan `up` wrote to DIR/state.json,
with its output in DIR/logs/supervisor.log.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from cordum.dev import state as st
from cordum.dev.servers import nats_server_binary, redis_server_binary

ROOT = st.ROOT
PROG = "cordum-local"
STOP_TIMEOUT = 15.0
STARTUP_TIMEOUT = 60.0  # per tier; generous: 2-core CI machines run several stacks at once
ALIVE_SECONDS = 2.0  # a replica without a health endpoint is healthy once alive this long
STREAMS_TIMEOUT = 20.0
POLL = 0.2


class StartupFailed(Exception):
    """Something the topology needs could not start; the message says what and why."""


class StopSignal:
    """Signal handler: remembers the first SIGTERM/SIGINT/SIGHUP; later ones are ignored."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.received: int | None = None
        self.out = out or sys.stdout
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is None:
            self.received = signum
            print(f"\n{PROG}: {signal.Signals(signum).name}: stopping", file=self.out, flush=True)


# ---- child processes -------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def _die_with(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def command(record: dict[str, Any], sdir: Path) -> list[str]:
    """argv of a replica: redis-server, nats-server, or `python -c` running a service's main."""
    kind, port = record["kind"], record.get("ports", {}).get("port")
    if kind == "redis":
        data = sdir / "data" / "redis"
        data.mkdir(parents=True, exist_ok=True)
        return [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
                "--appendonly", "yes", "--save", ""]
    if kind == "nats":
        data = sdir / "data" / "nats"
        data.mkdir(parents=True, exist_ok=True)
        return [nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(data)]
    module, _, attr = record["entry"].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {attr}; sys.exit({attr}())"]


def healthy(record: dict[str, Any], started_at: float) -> bool:
    check = record.get("health") or "alive"
    if check.startswith("http"):
        try:
            with urllib.request.urlopen(check, timeout=1.0) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError, ValueError):
            return False
    if check.startswith("tcp:"):
        try:
            with socket.create_connection(("127.0.0.1", int(check[4:])), timeout=0.5):
                return True
        except OSError:
            return False
    return time.monotonic() - started_at >= ALIVE_SECONDS


def log_tail(path: str | Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n".join("    " + line for line in text)


def rel(path: str | Path) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return str(path)


class Supervisor:
    """Starts, watches and stops the replicas listed in `data["replicas"]` (the state document)."""

    def __init__(self, data: dict[str, Any], sdir: Path, *, out: TextIO | None = None) -> None:
        self.data = data
        self.sdir = sdir
        self.out = out or sys.stdout
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.records = {r["name"]: r for r in data["replicas"]}

    def say(self, text: str) -> None:
        print(f"{PROG}: {text}", file=self.out, flush=True)

    def save(self) -> None:
        st.save(self.sdir, self.data)

    def phase(self, phase: str, error: str | None = None) -> None:
        self.data["supervisor"]["phase"] = phase
        self.data["supervisor"]["error"] = error
        self.save()

    # -- one replica

    def spawn(self, name: str) -> None:
        record = self.records[name]
        argv = command(record, self.sdir)
        log = Path(record["log"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as sink:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, **record.get("env", {})}, start_new_session=True,
                preexec_fn=_die_with(os.getpid()),
            )
        self.procs[name] = proc
        self.started[name] = time.monotonic()
        record.update(pid=proc.pid, start_time=st.start_time(proc.pid), argv=argv, exit_code=None,
                      started_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      starts=int(record.get("starts") or 0) + 1)
        st.unmark_stopped(self.sdir, name)

    def reap(self) -> None:
        """Report replicas that exited since the last look."""
        changed = False
        for name, proc in list(self.procs.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.procs[name]
            self.records[name]["exit_code"] = code
            changed = True
            if st.is_marked_stopped(self.sdir, name):
                self.say(f"{name} stopped (exit code {code})")
            else:
                self.say(f"{name} exited unexpectedly with code {code} (log {rel(self.records[name]['log'])}); "
                         f"the rest keeps running; `cordumctl dev start {name}` starts it again")
        if changed:
            self.save()

    def serve_requests(self) -> None:
        for verb, name in st.take_requests(self.sdir):
            if verb != "start" or name not in self.records:
                self.say(f"ignoring request {verb} {name}: unknown")
                continue
            if name in self.procs and self.procs[name].poll() is None:
                continue  # already running
            try:
                self.spawn(name)
            except OSError as exc:
                self.say(f"could not start {name}: {exc}")
                continue
            self.say(f"{name} started again, pid {self.records[name]['pid']}")
            self.save()

    # -- the tree

    def wait_healthy(self, names: Sequence[str], stop: StopSignal) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        pending = list(names)
        while pending and not stop.received:
            for name in list(pending):
                proc, record = self.procs[name], self.records[name]
                if proc.poll() is not None:
                    raise StartupFailed(f"{name} exited with code {proc.returncode} while starting "
                                        f"(log {rel(record['log'])}):\n{log_tail(record['log'])}")
                if healthy(record, self.started[name]):
                    pending.remove(name)
            if pending:
                if time.monotonic() > deadline:
                    raise StartupFailed(f"not healthy after {STARTUP_TIMEOUT:.0f} s: {', '.join(pending)} "
                                        f"(logs under {rel(self.sdir / 'logs')})")
                time.sleep(POLL)

    def tiers(self, names: list[str]) -> list[list[str]]:
        """Consecutive replicas of one tier (`tier`, else their kind: older state files have none)."""
        out: list[tuple[str, list[str]]] = []
        for name in names:
            record = self.records[name]
            tier = record.get("tier") or record["kind"]
            if out and out[-1][0] == tier:
                out[-1][1].append(name)
            else:
                out.append((tier, [name]))
        return [members for _, members in out]

    def start_all(self, stop: StopSignal) -> bool:
        """Start tier by tier; False when a stop signal came first."""
        for tier in self.tiers([r["name"] for r in self.data["replicas"]]):
            if stop.received:
                return False
            if self.data.get("streams") is None and self.records[tier[0]]["kind"] not in ("redis", "nats"):
                self.data["streams"] = create_streams({**os.environ, "NATS_URL": self.data["nats_url"],
                                                       "REDIS_URL": self.data["redis_url"]})
            for name in tier:
                self.spawn(name)
            self.save()
            self.wait_healthy(tier, stop)
        return not stop.received

    def stop_all(self) -> None:
        order = [r["name"] for r in reversed(self.data["replicas"])]
        running = [n for n in order if n in self.procs and self.procs[n].poll() is None]
        if running:
            self.say("stopping " + ", ".join(running))
        for tier in self.tiers(order):
            procs = [(n, self.procs[n]) for n in tier if n in self.procs and self.procs[n].poll() is None]
            for _, proc in procs:
                _signal(proc, signal.SIGTERM)
                _signal(proc, signal.SIGCONT)  # a paused replica handles SIGTERM only once resumed
            deadline = time.monotonic() + STOP_TIMEOUT
            for name, proc in procs:
                try:
                    proc.wait(max(deadline - time.monotonic(), 0.01))
                except subprocess.TimeoutExpired:
                    self.say(f"{name} still running after {STOP_TIMEOUT:.0f} s: killing it")
                    proc.kill()
                    proc.wait()
            for name, proc in procs:
                self.records[name]["exit_code"] = proc.returncode
                self.procs.pop(name, None)

    def run(self, stop: StopSignal, on_ready: Callable[[dict[str, Any]], None] | None = None) -> int:
        """Start everything, serve until a stop signal, stop everything. 0 after a stop signal."""
        self.data["supervisor"].update(pid=os.getpid(), start_time=st.start_time(os.getpid()))
        self.phase("starting")
        try:
            if not self.start_all(stop):
                return 0
            self.phase("ready")
            if on_ready is not None:
                on_ready(self.data)
            while not stop.received:
                self.reap()
                self.serve_requests()
                time.sleep(POLL)
            return 0
        except (StartupFailed, OSError) as exc:
            self.say(str(exc))
            self.data["supervisor"]["error"] = str(exc)
            self.data["supervisor"]["phase"] = "failed"
            return 1
        finally:
            failed = self.data["supervisor"]["phase"] == "failed"
            if not failed:
                self.data["supervisor"]["phase"] = "stopping"
            self.save()
            self.stop_all()
            self.data["supervisor"]["phase"] = "failed" if failed else "stopped"
            self.save()


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def create_streams(env: dict[str, str]) -> str:
    """Connect once: `open_bus` creates the streams and the well-known durables. Returns a note."""
    import trio

    from cordum.infra.aio import run_with_bridge
    from cordum.infra.bus import open_bus
    from cordum.infra.config import load_settings
    from cordum.runtime import log as logging

    settings = load_settings(env)
    if not settings.nats_use_jetstream:
        return "not used (NATS_USE_JETSTREAM=false)"
    shown = logging.redact("url", settings.nats_url)

    async def create() -> None:
        with trio.fail_after(STREAMS_TIMEOUT):
            async with open_bus(settings, name=PROG):
                pass

    try:
        run_with_bridge(create)
    except trio.TooSlowError:
        raise StartupFailed(f"no JetStream answer from NATS_URL={shown} within {STREAMS_TIMEOUT:.0f} s") from None
    except Exception as exc:  # trio may wrap the cause in an ExceptionGroup
        raise StartupFailed(f"could not create the JetStream streams on {shown}: {exc!r}") from None
    return "CORDUM_SYS, CORDUM_JOBS ready"


def main(argv: Sequence[str] | None = None) -> int:
    """The detached supervisor: `python -m cordum.dev.supervisor --state-dir DIR`."""
    parser = argparse.ArgumentParser(prog="python -m cordum.dev.supervisor")
    parser.add_argument("--state-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    data = st.load(args.state_dir)
    if data is None:
        print(f"{PROG}: no plan in {args.state_dir / st.STATE_FILE}", file=sys.stderr)
        return 2
    stop = StopSignal()
    sup = Supervisor(data, args.state_dir)
    return sup.run(stop, on_ready=lambda _: sup.say("all replicas healthy; running in the background"))


if __name__ == "__main__":
    sys.exit(main())
