"""`cordumctl dev ps|stop|start|kill|pause|resume|down`: act on the replicas of a running local
topology (`cordumctl up`), by pid, from the state directory (`cordum.dev.state`).

    ps [--json]   name, pid, state (running | paused | stopped | exited), ports, log of every replica
    stop NAME     SIGTERM (and SIGCONT, so a paused replica acts on it), wait up to 15 s, then SIGKILL;
                  shows as "stopped" (an exit on purpose, not reported by the supervisor)
    start NAME    start that replica again with the same argv, env and ports, and wait until healthy
    kill NAME     SIGKILL; shows as "exited" (like a crash)
    pause NAME    SIGSTOP;  resume NAME  SIGCONT
    down          stop the whole topology in order, supervisor included

`dev start` asks the supervisor (foreground `cordumctl up` or the detached one) to start the replica:
it writes `requests/<n>-start-<NAME>` to the state directory, the supervisor (polling every 0.2 s)
spawns it as its own child, so the new process still dies with the supervisor, and records the
new pid; this command then waits for the new pid and for the replica's health check. Without a
live supervisor `dev start` fails: run `cordumctl up` again.

Exit codes: 0 done, 1 failed (no topology, the replica did not stop/start), 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from cordum.dev import state as st
from cordum.dev.supervisor import ALIVE_SECONDS, STARTUP_TIMEOUT, STOP_TIMEOUT, healthy, log_tail, rel

PROG = "cordumctl dev"
STATES = ("running", "paused", "stopped", "exited")


class DevError(Exception):
    """The command could not do what it was asked; the message says why (exit 1)."""


def replica_state(data: Mapping[str, Any], record: Mapping[str, Any], sdir: Path) -> str:
    """running | paused | stopped | exited."""
    proc = st.process_state(record.get("pid"), record.get("start_time"))
    if proc != "gone":
        return proc
    phase = (data.get("supervisor") or {}).get("phase")
    if not record.get("pid") or st.is_marked_stopped(sdir, record["name"]) or phase == "stopped":
        return "stopped"
    return "exited"


def snapshot(data: Mapping[str, Any], sdir: Path) -> dict[str, Any]:
    """What `dev ps --json` prints."""
    sup = data.get("supervisor") or {}
    return {
        "state_dir": str(sdir),
        "supervisor": {"pid": sup.get("pid"), "mode": sup.get("mode"), "phase": sup.get("phase"),
                       "state": "running" if st.supervisor_alive(data) else "exited", "log": sup.get("log")},
        "gateways": data.get("gateways") or [],
        "redis_url": data.get("redis_url"),
        "nats_url": data.get("nats_url"),
        "replicas": [
            {"name": r["name"], "kind": r["kind"], "pid": r.get("pid"), "state": replica_state(data, r, sdir),
             "instance_id": (r.get("env") or {}).get("CORDUM_INSTANCE_ID", r["name"]),
             "ports": r.get("ports") or {}, "log": r.get("log"), "exit_code": r.get("exit_code"),
             "starts": r.get("starts", 0)}
            for r in data.get("replicas") or []
        ],
    }


# ---- commands --------------------------------------------------------------------------------


def cmd_ps(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    snap = snapshot(data, sdir)
    if args.json:
        print(json.dumps(snap, indent=1))
        return 0
    sup = snap["supervisor"]
    print(f"supervisor pid {sup['pid']} ({sup['mode']}, {sup['phase']}, {sup['state']}); state {rel(sdir)}")
    rows = [("NAME", "PID", "STATE", "PORTS", "LOG")]
    for r in snap["replicas"]:
        ports = ",".join(f"{k}:{v}" for k, v in r["ports"].items()) or "-"
        rows.append((r["name"], str(r["pid"] or "-"), r["state"], ports, rel(r["log"] or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def _signal(record: Mapping[str, Any], signum: int) -> bool:
    """Send a signal to a live replica; False if it is not running."""
    if st.process_state(record.get("pid"), record.get("start_time")) == "gone":
        return False
    try:
        os.kill(record["pid"], signum)
    except ProcessLookupError:
        return False
    return True


def _wait(predicate: Any, timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(step)


def _gone(record: Mapping[str, Any]) -> bool:
    return st.process_state(record.get("pid"), record.get("start_time")) == "gone"


def stop_replica(record: Mapping[str, Any], timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM (+SIGCONT), wait up to `timeout`, then SIGKILL. False if it was not running."""
    if not _signal(record, signal.SIGTERM):
        return False
    _signal(record, signal.SIGCONT)
    if not _wait(lambda: _gone(record), timeout):
        print(f"{PROG}: {record['name']} still running after {timeout:.0f} s: killing it", flush=True)
        _signal(record, signal.SIGKILL)
        _wait(lambda: _gone(record), 10)
    return True


def cmd_stop(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    record = _record(data, args.name)
    st.mark_stopped(sdir, record["name"])
    if not stop_replica(record):
        print(f"{record['name']} is not running ({replica_state(data, record, sdir)})")
        return 0
    if not _gone(record):
        raise DevError(f"{record['name']} (pid {record['pid']}) did not stop")
    print(f"{record['name']} stopped (pid {record['pid']})")
    return 0


def cmd_kill(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    record = _record(data, args.name)
    if not _signal(record, signal.SIGKILL):
        print(f"{record['name']} is not running ({replica_state(data, record, sdir)})")
        return 0
    if not _wait(lambda: _gone(record), 10):
        raise DevError(f"{record['name']} (pid {record['pid']}) survived SIGKILL")
    print(f"{record['name']} killed (pid {record['pid']})")
    return 0


def cmd_pause(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    return _pause_resume(data, sdir, args.name, signal.SIGSTOP, "paused")


def cmd_resume(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    return _pause_resume(data, sdir, args.name, signal.SIGCONT, "running")


def _pause_resume(data: dict[str, Any], sdir: Path, name: str, signum: int, want: str) -> int:
    record = _record(data, name)
    if not _signal(record, signum):
        raise DevError(f"{name} is not running ({replica_state(data, record, sdir)})")
    if not _wait(lambda: st.process_state(record["pid"], record.get("start_time")) in (want, "gone"), 5):
        raise DevError(f"{name} (pid {record['pid']}) is not {want} after {signal.Signals(signum).name}")
    print(f"{name} {want} (pid {record['pid']})")
    return 0


def cmd_start(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    record = _record(data, args.name)
    name = record["name"]
    if st.process_state(record.get("pid"), record.get("start_time")) != "gone":
        print(f"{name} is already {replica_state(data, record, sdir)} (pid {record['pid']})")
        return 0
    if not st.supervisor_alive(data):
        raise DevError(f"no supervisor is running for {rel(sdir)}: start the topology with `cordumctl up`")
    old = (record.get("pid"), record.get("start_time"), record.get("starts"))
    st.request_start(sdir, name)
    fresh: dict[str, Any] = {}

    def started() -> bool:
        current = st.load(sdir) or {}
        now = st.replica(current, name) or {}
        if (now.get("pid"), now.get("start_time"), now.get("starts")) != old and now.get("pid"):
            fresh.update(now)
            return True
        return not st.supervisor_alive(current)

    if not _wait(started, 30, 0.1) or not fresh:
        raise DevError(f"the supervisor did not start {name} (log {rel((data['supervisor'] or {}).get('log') or '-')})")
    since = time.monotonic()
    deadline = since + STARTUP_TIMEOUT
    while not healthy(fresh, since):
        if _gone(fresh):
            raise DevError(f"{name} exited while starting (log {rel(fresh['log'])}):\n{log_tail(fresh['log'])}")
        if time.monotonic() > deadline:
            raise DevError(f"{name} (pid {fresh['pid']}) not healthy after {STARTUP_TIMEOUT:.0f} s "
                           f"(log {rel(fresh['log'])})")
        time.sleep(min(0.2, ALIVE_SECONDS))
    print(f"{name} started (pid {fresh['pid']})")
    return 0


def cmd_down(data: dict[str, Any], sdir: Path, args: argparse.Namespace) -> int:
    sup = data.get("supervisor") or {}
    records = list(data.get("replicas") or [])
    anything = st.supervisor_alive(data) or any(not _gone(r) for r in records)
    if not anything:
        print(f"no topology running from {rel(sdir)}")
        return 0
    if st.supervisor_alive(data):
        os.kill(sup["pid"], signal.SIGCONT)
        os.kill(sup["pid"], signal.SIGTERM)
        # it stops the replicas a tier at a time, each tier within STOP_TIMEOUT
        tiers = len({r.get("tier") or r["kind"] for r in records}) or 1
        if not _wait(lambda: not st.supervisor_alive(data), STOP_TIMEOUT * tiers + 15, 0.1):
            print(f"{PROG}: supervisor pid {sup['pid']} still running: killing it", flush=True)
            os.kill(sup["pid"], signal.SIGKILL)
            _wait(lambda: not st.supervisor_alive(data), 10)
    # Left-overs (a supervisor that was killed, a replica that ignored it): stop them ourselves, in order.
    for record in reversed(records):
        if not _gone(record):
            stop_replica(record)
    left = [r["name"] for r in records if not _gone(r)]
    if left:
        raise DevError("still running: " + ", ".join(left))
    print(f"topology stopped ({len(records)} replicas, supervisor pid {sup.get('pid')})")
    return 0


def _record(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    record = st.replica(data, name)
    if record is None:
        names = ", ".join(r["name"] for r in data.get("replicas") or [])
        raise UsageError(f"no replica named {name!r}; the topology has: {names}")
    return record


class UsageError(Exception):
    pass


COMMANDS = {"ps": cmd_ps, "stop": cmd_stop, "start": cmd_start, "kill": cmd_kill, "pause": cmd_pause,
            "resume": cmd_resume, "down": cmd_down}


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Act on the replicas of a local topology started by `cordumctl up` "
        "(state under .cordum/dev/, env CORDUM_DEV_DIR).",
        epilog="names: redis, nats, safety-kernel-N, context-engine-N, scheduler-N, workflow-engine-N, "
        "api-gateway-N, mcp-N, worker-N (see `ps`)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("ps", help="list the replicas: name, pid, state, ports, log")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    for verb, text in (("stop", "SIGTERM a replica and wait for it to exit (15 s, then SIGKILL)"),
                       ("start", "start a stopped or exited replica again (same env and ports)"),
                       ("kill", "SIGKILL a replica"), ("pause", "SIGSTOP a replica"),
                       ("resume", "SIGCONT a paused replica")):
        sub.add_parser(verb, help=text).add_argument("name", metavar="NAME")
    sub.add_parser("down", help="stop the whole topology in order, supervisor included")
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str = "cordumctl dev") -> int:
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int) else 2
    sdir = st.state_dir()
    data = st.load(sdir)
    if data is None:
        if args.command == "down":
            print(f"no topology running from {rel(sdir)}")
            return 0
        print(f"{PROG}: no topology state in {rel(sdir)}: start one with `cordumctl up`", file=sys.stderr)
        return 1
    try:
        return COMMANDS[args.command](data, sdir, args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except (DevError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
