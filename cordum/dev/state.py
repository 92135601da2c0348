"""The state directory of a local topology: `.cordum/dev/` in the working tree (git-ignored through
`.cordum/`), or `$CORDUM_DEV_DIR`.

    state.json        written by the supervisor only (atomically, mode 0600: it holds the API key)
    logs/<name>.log   one log per replica (appended across restarts), logs/supervisor.log
    data/redis, data/nats   the Redis data and JetStream store of the servers it starts
    stopped/<name>    marker: the replica was stopped on purpose (`dev stop`), so it shows as
                      "stopped" rather than "exited" and its exit is not reported as unexpected
    requests/<n>-start-<name>   a `dev start` request; the supervisor polls this directory

state.json (version 1):

    {"version": 1, "root": ..., "replicas_per_service": N, "workers": K, "base_port": B|null,
     "redis_url": ..., "nats_url": ..., "gateways": ["http://localhost:8081", ...],
     "api_key": ..., "api_key_generated": bool, "notes": {...},
     "supervisor": {"pid": P, "start_time": T, "mode": "foreground"|"detached",
                    "phase": "starting"|"ready"|"stopping"|"stopped"|"failed", "error": str|null,
                    "log": path|null},
     "replicas": [{"name", "kind", "index", "pid", "start_time", "argv", "env", "ports", "health",
                   "log", "started_at", "exit_code", "starts"}, ...]}   # in start order

`start_time` is the kernel's start time of the process (/proc/PID/stat field 22): a pid is only
trusted while the process holding it started at that time (pids get reused).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DIR = ROOT / ".cordum" / "dev"
STATE_FILE = "state.json"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    override = env.get("CORDUM_DEV_DIR", "").strip()
    return Path(override).resolve() if override else DEFAULT_DIR


def log_path(sdir: Path, name: str) -> Path:
    return sdir / "logs" / f"{name}.log"


def load(sdir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((sdir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save(sdir: Path, data: Mapping[str, Any]) -> None:
    sdir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".state-", dir=sdir)  # mode 0600
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=False)
        os.replace(tmp, sdir / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replica(data: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    for item in data.get("replicas") or []:
        if item.get("name") == name:
            return item
    return None


# ---- markers and requests ---------------------------------------------------------------------


def mark_stopped(sdir: Path, name: str) -> None:
    (sdir / "stopped").mkdir(parents=True, exist_ok=True)
    (sdir / "stopped" / name).touch()


def unmark_stopped(sdir: Path, name: str) -> None:
    (sdir / "stopped" / name).unlink(missing_ok=True)


def is_marked_stopped(sdir: Path, name: str) -> bool:
    return (sdir / "stopped" / name).exists()


def clear_markers(sdir: Path) -> None:
    for sub in ("stopped", "requests"):
        folder = sdir / sub
        if folder.is_dir():
            for item in folder.iterdir():
                item.unlink(missing_ok=True)


def request_start(sdir: Path, name: str) -> Path:
    folder = sdir / "requests"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{time.time_ns()}-start-{name}"
    path.touch()
    return path


def take_requests(sdir: Path) -> list[tuple[str, str]]:
    """(verb, replica name) of the pending requests, oldest first; each is consumed."""
    folder = sdir / "requests"
    if not folder.is_dir():
        return []
    out: list[tuple[str, str]] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        _, _, rest = path.name.partition("-")
        verb, _, name = rest.partition("-")
        path.unlink(missing_ok=True)
        if verb and name:
            out.append((verb, name))
    return out


# ---- processes by pid -------------------------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a process, None when there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def start_time(pid: int) -> int | None:
    stat = proc_stat(pid)
    return stat[1] if stat else None


def process_state(pid: int | None, started: int | None) -> str:
    """"running", "paused" (SIGSTOPped) or "gone" (no such process, a zombie, or a reused pid)."""
    if not pid:
        return "gone"
    stat = proc_stat(pid)
    if stat is None or (started is not None and stat[1] != started) or stat[0] in ("Z", "X", "x"):
        return "gone"
    return "paused" if stat[0] in ("T", "t") else "running"


def alive(pid: int | None, started: int | None) -> bool:
    return process_state(pid, started) != "gone"


def supervisor_alive(data: Mapping[str, Any] | None) -> bool:
    sup = (data or {}).get("supervisor") or {}
    return alive(sup.get("pid"), sup.get("start_time"))
