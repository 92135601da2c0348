"""The job-path benchmark driver (issue 5); `scripts/bench` installs what it needs and runs it.

    scripts/bench [--jobs N] [--clients C] [--replicas 1,2] [--json] [--no-peers] [--profile] ...

A plain sync program in its own venv (.cordum/bench-venv: redis-py, nats-py, celery, dramatiq,
py-spy), a separate process from every service it measures; it never imports `cordum`'s runtime
(its Trio/asyncio bridge changes how asyncio runs in a process, DESIGN.md §4.7).

Ours, for each replica count R:
  - `python -m cordum.cli.main up --replicas R --workers K --detach --base-port B` in a temporary
    CORDUM_DEV_DIR on a free port block (API_RATE_LIMIT_RPS/BURST 1e6, WORKER_MAX_PARALLEL as given);
    wait until the workers show in GET /api/v1/workers; a warm-up of 200 jobs, not counted.
  - --repeat K passes (default 3) of N no-op jobs (POST /api/v1/jobs {prompt, context: {}}) from C client threads, each with its own
    keep-alive http.client connection, spread round-robin over the gateways, closed loop.
  - done when the terminal state indexes (ZCARD job:index:<terminal>, one pipeline every 20 ms)
    have grown by N; then every job's events (job:events:<id>) are read in pipelines.
  - jobs/s = the median over the passes of each pass's steady-state rate: the jobs that ended between
    the 10th and 90th percentile of the pass's end times, over that span (so a 500-job and a 2,000-job
    run agree); also the whole-run rate N / (first submit sent → last terminal event). Latencies from
    each job's own events (all passes):
    submit = PENDING ts, dispatch = DISPATCHED ts, terminal = terminal state ts.
  - CPU s per job: utime+stime from /proc/<pid>/stat of every replica (redis and nats included),
    after − before (all passes), / K·N; peak RSS = VmHWM of /proc/<pid>/status (since the replica started).
  - Redis commands per job: INFO commandstats calls, after − before, less the driver's own polling,
    / N (commands run inside Lua scripts count too; EVALSHA is one of them). usec per job likewise.
  - NATS messages per job: a tap subscribed to `>` on the topology's nats-server counts every
    message the server routes in the account while --nats-tap-jobs more jobs run after the
    measured passes (its CPU is not the jobs'; client publishes, JetStream
    deliveries and acks, JS API requests and replies, advisories), by subject family; also
    JetStream messages stored per job (last_seq delta of the streams). The topology's nats-server
    has no monitoring port, so server-internal traffic not routed to subscribers is not seen.
  - log lines per job per replica (lines appended to its log), scheduler dispatch latency (the
    scheduler's own histogram: mean).
Floor (scripts/bench_floor.py, --no-floor skips it), for each replica count R: R of each of four
processes of the project's Python doing per job only the guide's messages on our stack (HTTP
submit through hypercorn, a Redis write per hop, JetStream publishes with acks and acked pull
consumers, the workflow engine's queue on sys.job.result), nothing else; same clients, warm-up and
passes; end times from a sorted set. Its CPU per job is what ours could come down to without
leaving the stack or the guide; floor r=2 against floor r=1 is what two replicas of everything on
this machine cost the stack itself. --floor-with store,lock,packets puts those parts of ours back
into it (the job store, the scheduler's job lock, protobuf packets) to measure what each costs.
Peers (scripts/bench_peers.py): Celery and Dramatiq on a fresh redis-server, same N and C.
Ceiling: redis-benchmark (-q -n 100000 -P 1, 50 clients) for the commands one job uses plus an EVAL
like a state transition, on a fresh redis-server; NATS core publish/consume and JetStream publish
(acked) / pull-consume rates with nats-py against a fresh nats-server.
--profile: a separate pass after the measured one: py-spy record (raw, nonblocking, 100 Hz) on the
first gateway and scheduler replica while clients submit for --profile-seconds; top functions by
own time.
Workflows (scripts/bench_workflows.py, after the job-path peers; --workflows-only runs just this,
--no-workflows skips it): a 5-step chain and a fan-out of 10 + join on ours, Celery and Dramatiq.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import math
import os
import platform
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
# This driver runs in the bench venv, without our package installed; these two modules of it are
# standard library only, so they are imported from the checkout instead of copied here.
sys.path.insert(0, str(ROOT))
from cordum.dev.servers import free_block, free_port  # noqa: E402
from cordum.dev.topology import BLOCK_SIZE  # noqa: E402  (every port of a topology lives in B..B+BLOCK_SIZE-1)

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED", "OUTPUT_QUARANTINED")
WARMUP_JOBS = 200  # not counted: connection pools, caches and the allocator settle first
STEADY = (0.1, 0.9)  # steady state: the jobs that ended between the 10th and 90th percentile of end times
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ==== pure report math (tests/unit/test_bench_report.py) =========================================


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default); None for no values."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p95, p99, mean and max of a list of latencies (same unit in and out)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": (sum(values) / len(values)) if values else None,
        "max": max(values) if values else None,
    }


def job_timeline(events: Iterable[Mapping[str, Any]]) -> dict[str, int | str | None]:
    """submit (first PENDING), dispatch (first DISPATCHED), terminal (first terminal state) event
    timestamps in µs and the final state, from one job's event list."""
    submit = dispatch = terminal = None
    final = None
    for event in events:
        state, ts = event.get("state"), event.get("ts")
        if not isinstance(ts, int):
            continue
        if state == "PENDING" and submit is None:
            submit = ts
        elif state == "DISPATCHED" and dispatch is None:
            dispatch = ts
        elif state in TERMINAL and terminal is None:
            terminal = ts
            final = state
    return {"submit": submit, "dispatch": dispatch, "terminal": terminal, "state": final}


def job_latencies(timelines: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Latency lists (ms) and span figures from job timelines (µs): submit→dispatch,
    submit→terminal, the first submit and last terminal event, and the final states counted."""
    to_dispatch: list[float] = []
    to_terminal: list[float] = []
    states: collections.Counter[str] = collections.Counter()
    first_submit = last_terminal = None
    for tl in timelines:
        states[tl.get("state") or "NOT_TERMINAL"] += 1
        submit, dispatch, terminal = tl.get("submit"), tl.get("dispatch"), tl.get("terminal")
        if submit is not None:
            first_submit = submit if first_submit is None else min(first_submit, submit)
            if dispatch is not None:
                to_dispatch.append((dispatch - submit) / 1000.0)
            if terminal is not None:
                to_terminal.append((terminal - submit) / 1000.0)
        if terminal is not None:
            last_terminal = terminal if last_terminal is None else max(last_terminal, terminal)
    return {"submit_to_dispatch_ms": to_dispatch, "submit_to_terminal_ms": to_terminal, "states": dict(states),
            "first_submit_us": first_submit, "last_terminal_us": last_terminal,
            "terminal_s": [tl["terminal"] / 1e6 for tl in timelines if tl.get("terminal") is not None]}


def steady_throughput(end_times_s: Sequence[float], window: tuple[float, float] = STEADY) -> float | None:
    """Jobs per second in the steady part of a run: the jobs that ended between the `window`
    percentiles of all end times, over that span. The ramp-up (clients connecting, first batches)
    and the drain (the last few jobs with nothing queued behind them) are left out, so a short
    and a long run of the same system agree."""
    times = sorted(end_times_s)
    if len(times) < 10:
        return None
    lo = int(window[0] * (len(times) - 1))
    hi = int(math.ceil(window[1] * (len(times) - 1)))
    span = times[hi] - times[lo]
    return (hi - lo) / span if span > 0 else None


def median_pass(passes: Sequence[Mapping[str, Any]], key: str = "jobs_per_s") -> dict[str, Any]:
    """The median of repeated passes' figure `key`, and how far the passes spread around it."""
    values = sorted(p[key] for p in passes if p.get(key) is not None)
    if not values:
        return {"median": None, "spread": None, "values": []}
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return {"median": median, "spread": (values[-1] - values[0]) / median if median else None,
            "values": [p.get(key) for p in passes]}


PEERS = ("celery", "dramatiq")


def paired_ratios(ours: Sequence[float | None], peer: Sequence[float | None]) -> list[float | None]:
    """Ours against a peer, pass by pass, when the passes alternate peer, ours, peer, ..., peer
    (`peer` one longer than `ours`): each pass of ours against the mean of the peer's passes just
    before and just after it. The machine's speed drifts by a third within minutes here; a drift
    that is steady over the minute around a pass cancels out of its ratio."""
    if len(peer) != len(ours) + 1:
        raise ValueError(f"{len(ours)} passes of ours need {len(ours) + 1} of the peer around them, not {len(peer)}")
    out: list[float | None] = []
    for k, rate in enumerate(ours):
        before, after = peer[k], peer[k + 1]
        out.append(ratio(rate, (before + after) / 2) if before and after else None)
    return out


def throughput(n: int, start_s: float, end_s: float) -> float | None:
    """Jobs per second over [start, end] (seconds); None when the span is not positive."""
    span = end_s - start_s
    return n / span if span > 0 else None


def ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or not theirs:
        return None
    return ours / theirs


def per_job(value: float | None, n: int) -> float | None:
    return None if value is None or n <= 0 else value / n


def parse_proc_stat(text: str) -> dict[str, float]:
    """utime+stime (s) and start time (ticks) from the text of /proc/<pid>/stat."""
    fields = text[text.rfind(")") + 2:].split()
    return {"cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK, "start_time": int(fields[19])}


def parse_proc_status(text: str) -> dict[str, int]:
    """VmHWM and VmRSS (bytes) from the text of /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmHWM", "VmRSS"):
            out[name] = int(rest.split()[0]) * 1024
    return out


def parse_commandstats(text: str) -> dict[str, dict[str, float]]:
    """`INFO commandstats` text → {command: {"calls": .., "usec": ..}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, rest = line.partition(":")
        fields = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        out[name.removeprefix("cmdstat_")] = {k: float(v) for k, v in fields.items()}
    return out


def commands_delta(before: Mapping[str, Mapping[str, float]], after: Mapping[str, Mapping[str, float]],
                   own: Mapping[str, int] | None = None, ignore: Iterable[str] = ("info",)) -> dict[str, dict[str, float]]:
    """Calls and usec per command between two commandstats snapshots, less the calls the bench
    itself made (`own`, by command), leaving out `ignore`d commands and commands with no calls."""
    own = own or {}
    skip = set(ignore)
    out: dict[str, dict[str, float]] = {}
    for name, stats in after.items():
        if name in skip:
            continue
        prev = before.get(name, {})
        calls = stats.get("calls", 0) - prev.get("calls", 0) - own.get(name, 0)
        usec = stats.get("usec", 0) - prev.get("usec", 0)
        if calls > 0:
            out[name] = {"calls": calls, "usec": usec}
    return out


def redis_per_job(delta: Mapping[str, Mapping[str, float]], n: int) -> dict[str, Any]:
    """Total commands and server µs per job, and the per-command calls per job, largest first."""
    calls = sum(v["calls"] for v in delta.values())
    usec = sum(v["usec"] for v in delta.values())
    by_command = sorted(((k, v["calls"] / n) for k, v in delta.items()), key=lambda kv: (-kv[1], kv[0])) if n else []
    return {"commands_per_job": per_job(calls, n), "usec_per_job": per_job(usec, n),
            "by_command_per_job": dict(by_command)}


def subject_family(subject: str, reply: str = "") -> str:
    """The family a NATS message is counted under. A JetStream delivery (reply subject `$JS.ACK...`,
    pushed or pulled; it carries the stream's subject) is `deliver <subject family>`; acks are
    `$JS.ACK <stream>.<consumer>`; API requests `$JS.API.<kind>` (e.g. CONSUMER.MSG.NEXT = pull
    fetches); advisories `$JS.EVENT.ADVISORY.<kind>`; `_INBOX` replies (JetStream publish acks, API
    replies, fetch status); otherwise the first two tokens (three for `sys.*`), workers' own subjects
    as `worker.*.<last>`."""
    tokens = subject.split(".")
    if tokens[0] == "_INBOX":
        return "_INBOX"
    if tokens[0] == "$JS":
        if len(tokens) > 1 and tokens[1] == "ACK":
            consumer = tokens[3].split("__")[0] if len(tokens) > 3 else ""
            return f"$JS.ACK {tokens[2] if len(tokens) > 2 else ''}/{consumer}"
        if len(tokens) > 1 and tokens[1] == "API":
            kind = [t for t in tokens[2:] if t.isupper()]
            return "$JS.API." + ".".join(kind[:3])
        if tokens[1:3] == ["EVENT", "ADVISORY"]:
            return "$JS.EVENT.ADVISORY." + ".".join(tokens[3:5])
        return ".".join(tokens[:3])
    if tokens[0] == "worker":
        family = "worker.*." + tokens[-1] if len(tokens) > 2 else "worker.*"
    elif tokens[0] == "sys":
        family = ".".join(tokens[:3])
    else:
        family = ".".join(tokens[:2])
    return ("deliver " + family) if reply.startswith("$JS.ACK") else family


def mix_ceiling(per_command_per_job: Mapping[str, float], ops_per_s: Mapping[str, float],
                fallback: str = "set") -> dict[str, float | None]:
    """Redis ops/s of a job's command mix (each command weighted by its calls per job; a command
    redis-benchmark did not measure counts at the `fallback` command's rate) and the jobs/s that
    Redis alone could carry at that rate: jobs/s = 1 / Σ calls_c / ops_c."""
    seconds_per_job = 0.0
    commands = 0.0
    for name, calls in per_command_per_job.items():
        rate = ops_per_s.get(name) or ops_per_s.get(fallback)
        if not rate:
            continue
        seconds_per_job += calls / rate
        commands += calls
    if seconds_per_job <= 0:
        return {"mix_ops_per_s": None, "jobs_per_s": None}
    return {"mix_ops_per_s": commands / seconds_per_job, "jobs_per_s": 1.0 / seconds_per_job}


def parse_pyspy_raw(text: str, top: int = 15) -> list[dict[str, Any]]:
    """py-spy `--format raw` (collapsed stacks, `frame;frame;... count`) → the top functions by own
    time (the innermost frame of each sample), with total (inclusive) samples, percent of all."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count
    return [{"function": name, "own_samples": n, "own_pct": 100.0 * n / samples,
             "total_pct": 100.0 * total[name] / samples} for name, n in own.most_common(top)]


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` → `func (file.py)` with the path shortened to its last two parts."""
    match = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame.strip())
    if not match:
        return frame.strip()
    func, path = match.groups()
    parts = path.replace("\\", "/").split("/")
    short = "/".join(parts[-2:]) if "site-packages" not in parts else "/".join(
        parts[parts.index("site-packages") + 1:][:1] + parts[-1:])
    return f"{func} ({short})"


def scrape_histogram(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram summed over its label sets."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(name + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def scrape_counter(text: str, name: str) -> float | None:
    """A Prometheus counter summed over its label sets; None when the text has none of it."""
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name + "{") or line.startswith(name + " ")]
    return sum(values) if values else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100 or digits == 0:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ==== processes, ports, machine ====================================================================


def say(*parts: Any) -> None:
    print("bench:", *parts, file=sys.stderr, flush=True)


def proc_sample(pid: int) -> dict[str, float] | None:
    try:
        sample = parse_proc_stat(Path(f"/proc/{pid}/stat").read_text())
        sample.update(parse_proc_status(Path(f"/proc/{pid}/status").read_text()))
        return sample
    except (OSError, ValueError, IndexError):
        return None


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    except (OSError, IndexError):
        redis_version = None
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "redis": redis_version, "loadavg_at_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def start_server(argv: list[str], port: int, log: Path, timeout: float = 20,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen:
    sink = log.open("ab")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                            start_new_session=True, env=None if env is None else dict(env))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    stop_process(proc)
    raise RuntimeError(f"{argv[0]} did not come up on :{port} (log {log})")


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]
    return start_server(argv, port, workdir / f"redis-{port}.log"), port


def nats_server_binary(project_python: str) -> str:
    candidate = Path(project_python).parent / "nats-server"
    return str(candidate) if candidate.exists() else (shutil.which("nats-server") or "nats-server")


def start_nats(workdir: Path, project_python: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    store = workdir / f"nats-{port}"
    argv = [nats_server_binary(project_python), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)]
    return start_server(argv, port, workdir / f"nats-{port}.log"), port


# ==== our control plane ===========================================================================


class Clients:
    """C threads, each with one keep-alive HTTP connection to one gateway, submitting jobs closed loop."""

    def __init__(self, gateways: Sequence[str], api_key: str, clients: int) -> None:
        self.targets = [(urlsplit(g).port or 80) for g in gateways]
        self.api_key = api_key
        self.clients = clients
        self.body = json.dumps({"prompt": "bench no-op", "context": {}}).encode()

    def run(self, *, count: int | None = None, until: float | None = None, rate: float | None = None) -> dict[str, Any]:
        """Submit `count` jobs (or until time.monotonic() passes `until`): closed loop, or open loop
        at `rate` jobs/s over all clients (job k is due at start + k/rate). Job ids, first send time
        (wall clock), HTTP latencies (ms) and errors."""
        lock = threading.Lock()
        state = {"left": count, "first": None, "errors": 0, "error_samples": [], "k": 0, "t0": None}
        ids: list[str] = []
        http_ms: list[float] = []

        def take() -> bool:
            with lock:
                if state["first"] is None:
                    state["first"] = time.time()
                    state["t0"] = time.monotonic()
                if until is not None and time.monotonic() >= until:
                    return False
                if until is None:
                    if state["left"] <= 0:
                        return False
                    state["left"] -= 1
                due = state["t0"] + state["k"] / rate if rate else None
                state["k"] += 1
            if due is not None:
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            return True

        def worker(k: int) -> None:
            port = self.targets[k % len(self.targets)]
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            headers = {"X-API-Key": self.api_key, "Content-Type": "application/json"}
            mine_ids, mine_ms = [], []
            try:
                while take():
                    for attempt in range(5):
                        t0 = time.perf_counter()
                        try:
                            conn.request("POST", "/api/v1/jobs", body=self.body, headers=headers)
                            response = conn.getresponse()
                            payload = response.read()
                        except (OSError, http.client.HTTPException) as exc:
                            conn.close()
                            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                            self._error(lock, state, repr(exc))
                            continue
                        if response.status in (200, 201, 202):
                            mine_ms.append((time.perf_counter() - t0) * 1000)
                            mine_ids.append(json.loads(payload)["job_id"])
                            break
                        self._error(lock, state, f"HTTP {response.status}: {payload[:200]!r}")
                        time.sleep(0.05 * (attempt + 1))
            finally:
                conn.close()
                with lock:
                    ids.extend(mine_ids)
                    http_ms.extend(mine_ms)

        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(self.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return {"ids": ids, "first_send": state["first"], "http_ms": http_ms, "errors": state["errors"],
                "error_samples": state["error_samples"], "done_sending": time.time()}

    @staticmethod
    def _error(lock: threading.Lock, state: dict, text: str) -> None:
        with lock:
            state["errors"] += 1
            if len(state["error_samples"]) < 5:
                state["error_samples"].append(text)


class NatsTap:
    """Counts every message the nats-server routes (a `>` subscription), by subject family, from
    its own thread and asyncio loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.counts: collections.Counter[str] = collections.Counter()
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.error: str | None = None

    def start(self) -> "NatsTap":
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> collections.Counter[str]:
        self._stop.set()
        self._thread.join(10)
        return self.counts

    def _main(self) -> None:
        import asyncio

        async def run() -> None:
            import nats

            nc = await nats.connect(self.url, pending_size=256 * 1024 * 1024)
            counts = self.counts

            async def on_message(msg) -> None:
                counts[subject_family(msg.subject, msg.reply or "")] += 1

            await nc.subscribe(">", cb=on_message, pending_msgs_limit=10_000_000, pending_bytes_limit=-1)
            await nc.flush()
            self._ready.set()
            while not self._stop.is_set():
                await asyncio.sleep(0.05)
            await nc.flush()
            await asyncio.sleep(0.2)
            await nc.drain()

        try:
            asyncio.run(run())
        except Exception as exc:  # noqa: BLE001 - reported, the run goes on without NATS counts
            self.error = repr(exc)
            self._ready.set()


def stream_seqs(url: str, streams: Sequence[str] = ("CORDUM_SYS", "CORDUM_JOBS")) -> dict[str, int]:
    import asyncio

    async def run() -> dict[str, int]:
        import nats

        nc = await nats.connect(url)
        js = nc.jetstream()
        out = {}
        for name in streams:
            try:
                out[name] = (await js.stream_info(name)).state.last_seq
            except Exception:  # noqa: BLE001 - a stream we do not know; left out
                pass
        await nc.close()
        return out

    return asyncio.run(run())


def http_json(url: str, api_key: str, timeout: float = 5) -> Any:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers={"X-API-Key": api_key})
        response = conn.getresponse()
        body = response.read()
        return json.loads(body) if response.status == 200 else None
    finally:
        conn.close()


def http_text(url: str, timeout: float = 5) -> str:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
    try:
        conn.request("GET", parts.path)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# The "+output-rules" run: the packaged policy plus output rules that scan every job's output
# (a secret quarantines, an email is redacted); the echo jobs' outputs match neither.
OUTPUT_RULES = """
output_policy:
  enabled: true
output_rules:
  - id: bench-no-secrets
    match: {scanners: [secret]}
    decision: quarantine
  - id: bench-redact-pii
    match: {detectors: [email]}
    decision: redact
"""


class Topology:
    """One local topology started with `cordumctl up --detach` in a temporary state directory."""

    def __init__(self, args: argparse.Namespace, replicas: int, bridge: str = "", output_rules: bool = False) -> None:
        self.args = args
        self.replicas = replicas
        self.dir = Path(tempfile.mkdtemp(prefix=f"cordum-bench-r{replicas}-"))
        self.api_key = secrets.token_urlsafe(18)
        self.env = {**os.environ, "CORDUM_DEV_DIR": str(self.dir), "CORDUM_API_KEY": self.api_key,
                    "API_RATE_LIMIT_RPS": "1000000", "API_RATE_LIMIT_BURST": "1000000", "PYTHONUNBUFFERED": "1"}
        if args.worker_parallel:
            self.env["WORKER_MAX_PARALLEL"] = str(args.worker_parallel)
        if args.worker_heartbeat:
            self.env["WORKER_HEARTBEAT_INTERVAL"] = args.worker_heartbeat
        for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID", "VIRTUAL_ENV"):
            self.env.pop(name, None)
        if bridge:
            self.env["CORDUM_BRIDGE"] = bridge
        if output_rules:
            policy = self.dir / "safety-with-output-rules.yaml"
            packaged = ROOT / "cordum" / "safety" / "default_policy.yaml"
            policy.write_text(packaged.read_text() + OUTPUT_RULES)
            self.env["SAFETY_POLICY_PATH"] = str(policy)
        # The echo handler does no work of its own, like the peers' no-op task: it does not count
        # its runs in Redis (the dev topology's default, for the HA gate's exactly-once check).
        self.env["ECHO_EXECUTIONS_KEY"] = ""
        self.state: dict[str, Any] = {}

    def cordumctl(self, *argv: str, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([self.args.project_python, "-m", "cordum.cli.main", *argv], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def up(self) -> None:
        base = free_block(BLOCK_SIZE)
        started = time.monotonic()
        result = self.cordumctl("up", "--replicas", str(self.replicas), "--workers", str(self.args.workers),
                                "--detach", "--base-port", str(base), timeout=330)
        if result.returncode != 0:
            raise RuntimeError(f"cordumctl up failed ({result.returncode}): {result.stdout[-2000:]} {result.stderr[-2000:]}")
        self.state = json.loads((self.dir / "state.json").read_text())
        self.up_seconds = time.monotonic() - started
        gateway = self.state["gateways"][0]
        deadline = time.monotonic() + 60
        while True:
            try:
                items = (http_json(gateway + "/api/v1/workers", self.api_key) or {}).get("items") or []
            except OSError:
                items = []
            if len(items) >= self.args.workers:
                self.workers_seen = items
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not show in {gateway}/api/v1/workers within 60 s")
            time.sleep(0.2)

    def down(self) -> None:
        try:
            result = self.cordumctl("dev", "down", timeout=200)
            if result.returncode != 0:
                say(f"dev down failed: {result.stdout[-500:]} {result.stderr[-500:]}")
        except subprocess.TimeoutExpired:
            say("dev down timed out")
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def services(self) -> list[dict[str, Any]]:
        return [r for r in self.state["replicas"] if r.get("pid")]

    def first(self, kind: str) -> dict[str, Any] | None:
        return next((r for r in self.services if r["kind"] == kind), None)


def log_lines(path: str) -> int:
    try:
        with open(path, "rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return 0


def snapshot(topo: Topology, redis_client) -> dict[str, Any]:
    procs = {r["name"]: proc_sample(r["pid"]) for r in topo.services}
    logs = {r["name"]: log_lines(r["log"]) for r in topo.services if r["kind"] not in ("redis", "nats")}
    metrics, bridge = {}, {}
    for r in topo.services:
        if not str(r.get("health", "")).startswith("http"):
            continue  # (the echo workers serve no metrics)
        try:
            text = http_text(r["health"].rsplit("/", 1)[0] + "/metrics")
        except OSError:
            continue
        if r["kind"] == "scheduler":
            metrics[r["name"]] = scrape_histogram(text, "cordum_scheduler_dispatch_latency_seconds")
        bridge[r["name"]] = (scrape_counter(text, "cordum_bridge_crossings_total"),
                             scrape_counter(text, "cordum_bridge_wakeups_total"))
    return {"procs": procs, "logs": logs, "commandstats": commandstats(redis_client), "metrics": metrics,
            "bridge": bridge, "time": time.time()}


def commandstats(redis_client) -> dict[str, dict[str, float]]:
    """INFO commandstats through redis-py (which parses it into {"cmdstat_x": {...}})."""
    raw = redis_client.info("commandstats")
    return {name.removeprefix("cmdstat_"): {k: float(v) for k, v in value.items() if isinstance(v, (int, float))}
            for name, value in raw.items()}


class TerminalWatch:
    """Counts terminal jobs from the state indexes: one pipeline of ZCARDs per poll."""

    def __init__(self, redis_client) -> None:
        self.redis = redis_client
        self.zcards = 0
        self.base = self.count()

    def count(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for state in TERMINAL:
            pipe.zcard(f"job:index:{state.lower()}")
        self.zcards += len(TERMINAL)
        return sum(pipe.execute())

    def wait(self, n: int, timeout: float, interval: float = 0.02) -> int:
        """Wait until n more jobs than at the start are terminal (or no progress for `timeout` s)."""
        last, last_change = -1, time.monotonic()
        while True:
            done = self.count() - self.base
            if done >= n:
                return done
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > timeout:
                return done
            time.sleep(interval)


def read_timelines(redis_client, ids: Sequence[str], chunk: int = 500) -> list[dict[str, Any]]:
    out = []
    for k in range(0, len(ids), chunk):
        pipe = redis_client.pipeline(transaction=False)
        for job_id in ids[k:k + chunk]:
            pipe.lrange(f"job:events:{job_id}", 0, -1)
        for raw in pipe.execute():
            events = []
            for item in raw:
                try:
                    events.append(json.loads(item))
                except ValueError:
                    pass
            out.append(job_timeline(events))
    return out


def idle_probe(clients: Clients, redis_client, jobs: int) -> dict[str, Any]:
    """Jobs one at a time on an idle system (each waited for until terminal): the idle latencies."""
    ids, http_ms = [], []
    single = Clients([f"http://127.0.0.1:{clients.targets[0]}"], clients.api_key, 1)
    for _ in range(jobs):
        sent = single.run(count=1)
        if not sent["ids"]:
            continue
        ids += sent["ids"]
        http_ms += sent["http_ms"]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            state = redis_client.hget(f"job:meta:{sent['ids'][0]}", "state")
            if state and state.decode() in TERMINAL:
                break
            time.sleep(0.002)
        time.sleep(0.02)
    lat = job_latencies(read_timelines(redis_client, ids))
    return {"jobs": len(ids), "http_submit_ms": summarize(http_ms),
            "submit_to_dispatch_ms": summarize(lat["submit_to_dispatch_ms"]),
            "submit_to_terminal_ms": summarize(lat["submit_to_terminal_ms"])}


def nats_tap_pass(clients: Clients, redis_client, nats_url: str, jobs: int, stall_timeout: float) -> dict[str, Any]:
    """NATS messages per job, counted by a tap on `>` while `jobs` more jobs run. The tap costs CPU
    on the same cores and makes the server route every message twice, so it runs in a pass of its
    own after the measured ones, as MONITOR does for Redis."""
    tap = NatsTap(nats_url).start()
    time.sleep(0.2)
    watch = TerminalWatch(redis_client)
    sent = clients.run(count=jobs)
    watch.wait(len(sent["ids"]), stall_timeout)
    time.sleep(0.2)  # the last acks
    counts = tap.stop()
    if tap.error:
        return {"tap_error": tap.error}
    n = len(sent["ids"])
    return {"tap_jobs": n, "messages_per_job": per_job(sum(counts.values()), n),
            "by_family_per_job": {k: v / n for k, v in counts.most_common()},
            "covers": ("every message the server routed to subscribers in the account (tap on `>`, a pass of "
                       f"{n} jobs of its own): publishes, JetStream deliveries/acks, JS API requests+replies, "
                       "advisories, heartbeats")}


def monitor_pass(clients: Clients, redis_client, jobs: int, stall_timeout: float) -> dict[str, Any]:
    """Redis MONITOR while `jobs` more jobs run: commands per job sent by clients (top level) vs run
    inside Lua scripts (MONITOR marks those `lua`), by command. MONITOR slows Redis down, so this is
    a separate pass; its throughput is not reported."""
    top: collections.Counter[str] = collections.Counter()
    lua: collections.Counter[str] = collections.Counter()
    marker = "cordum-bench-monitor-stop"
    monitor = redis_client.monitor()
    ready = threading.Event()

    def read() -> None:
        with monitor as m:
            ready.set()
            while True:
                try:
                    item = m.next_command()
                except Exception:  # noqa: BLE001 - connection closed: stop
                    return
                words = str(item.get("command", "")).split()
                if not words:
                    continue
                if marker in words[-1]:
                    return
                name = words[0].lower()
                (lua if item.get("client_type") == "lua" else top)[name] += 1

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    ready.wait(5)
    time.sleep(0.2)
    watch = TerminalWatch(redis_client)
    sent = clients.run(count=jobs)
    watch.wait(len(sent["ids"]), stall_timeout)
    redis_client.echo(marker)
    thread.join(10)
    n = len(sent["ids"])
    top["zcard"] -= watch.zcards + len(TERMINAL)  # the watch's own polling (and its first count)
    for name in ("echo", "monitor"):
        top.pop(name, None)
    top = collections.Counter({k: v for k, v in top.items() if v > 0})
    return {"jobs": n, "top_level_per_job": per_job(sum(top.values()), n),
            "in_lua_per_job": per_job(sum(lua.values()), n),
            "top_level_by_command_per_job": {k: v / n for k, v in top.most_common()},
            "in_lua_by_command_per_job": {k: v / n for k, v in lua.most_common()},
            "note": "top level = commands a client sent (a pipeline of k is k commands, one round trip); "
                    "MONITOR cannot see round trips"}


def ours_label(r: Mapping[str, Any]) -> str:
    """How a run of ours is named in tables and ratios: r=<replicas>, plus the bridge if chosen, and
    `+output-rules` for the run whose policy scans outputs."""
    return (f"r={r['replicas']}" + (f" {r['bridge']}" if r.get("bridge") else "")
            + (" +output-rules" if r.get("output_rules") else ""))


def warmed_up(args: argparse.Namespace, topo: Topology) -> tuple[Any, Clients]:
    """A Redis client on the topology's Redis and the submitting clients, after the warm-up jobs
    (not counted) have finished."""
    import redis

    client = redis.Redis.from_url(topo.state["redis_url"])
    clients = Clients(topo.state["gateways"], topo.api_key, args.clients)
    watch = TerminalWatch(client)
    clients.run(count=WARMUP_JOBS)
    if watch.wait(WARMUP_JOBS, 60) < WARMUP_JOBS:
        raise RuntimeError(f"warm-up jobs did not finish; logs in {topo.dir}/logs (use --keep)")
    return client, clients


def run_ours(args: argparse.Namespace, replicas: int, bridge: str = "", output_rules: bool = False) -> dict[str, Any]:
    topo = Topology(args, replicas, bridge, output_rules)
    say(f"ours, {replicas} replica(s){' on ' + bridge if bridge else ''}{' with output rules' if output_rules else ''}: "
        f"starting the topology in {topo.dir}")
    topo.up()
    result: dict[str, Any] = {"replicas": replicas, "bridge": bridge, "workers": args.workers, "up_seconds": topo.up_seconds,
                              "output_rules": output_rules,
                              "worker_max_parallel": args.worker_parallel or "default",
                              "worker_heartbeat": args.worker_heartbeat or "default",
                              "workers_seen": [{k: w.get(k) for k in ("worker_id", "max_parallel_jobs", "pool")}
                                               for w in topo.workers_seen]}
    try:
        client, clients = warmed_up(args, topo)
        time.sleep(0.3)
        if args.idle_jobs:
            result["idle"] = idle_probe(clients, client, args.idle_jobs)
        say(f"ours, {replicas} replica(s): {args.jobs} jobs from {args.clients} clients over "
            f"{len(topo.state['gateways'])} gateway(s)" + (f" at {args.rate:g} jobs/s" if args.rate else ""))
        seqs0 = stream_seqs(topo.state["nats_url"])
        watch = TerminalWatch(client)
        before = snapshot(topo, client)
        self0 = time.process_time()
        sends, done = [], 0
        for _ in range(args.repeat):
            sends.append(clients.run(count=args.jobs, rate=args.rate))
            done = watch.wait(sum(len(sent["ids"]) for sent in sends), args.stall_timeout)
        self1 = time.process_time()
        after = snapshot(topo, client)
        own_polls = {"zcard": watch.zcards}
        seqs1 = stream_seqs(topo.state["nats_url"])
        passes, timelines, http_ms, errors, samples = [], [], [], 0, []
        for k, sent in enumerate(sends):  # read after the measured window: the reads are not the jobs' cost
            own = read_timelines(client, sent["ids"])
            lat_k = job_latencies(own)
            end_k = (lat_k["last_terminal_us"] / 1e6) if lat_k["last_terminal_us"] else time.time()
            passes.append({"submitted": len(sent["ids"]), "wall_seconds": end_k - sent["first_send"],
                           "jobs_per_s_whole": throughput(len(sent["ids"]), sent["first_send"], end_k),
                           "jobs_per_s": steady_throughput(lat_k["terminal_s"]),
                           "submit_seconds": sent["done_sending"] - sent["first_send"]})
            say(f"ours, {replicas} replica(s): pass {k + 1}/{args.repeat}: steady {fmt(passes[-1]['jobs_per_s'])} "
                f"jobs/s, whole run {fmt(passes[-1]['jobs_per_s_whole'])}")
            timelines += own
            http_ms += sent["http_ms"]
            errors += sent["errors"]
            samples += sent["error_samples"]
        n = len(timelines)
        lat = job_latencies(timelines)
        steady, whole = median_pass(passes), median_pass(passes, "jobs_per_s_whole")
        wall_total = sum(p["wall_seconds"] for p in passes)
        result.update({
            "jobs": args.jobs, "repeat": args.repeat, "submitted": n, "terminal": done, "submit_errors": errors,
            "submit_error_samples": samples[:5], "states": lat["states"],
            "clients": args.clients, "gateways": len(topo.state["gateways"]),
            "wall_seconds": wall_total,
            "submit_seconds": sum(p["submit_seconds"] for p in passes),
            "jobs_per_s": steady["median"], "jobs_per_s_spread": steady["spread"],
            "jobs_per_s_whole_run": whole["median"], "passes": passes,
            "submit_rate_per_s": throughput(n, 0, sum(p["submit_seconds"] for p in passes)),
            "http_submit_ms": summarize(http_ms),
            "submit_to_dispatch_ms": summarize(lat["submit_to_dispatch_ms"]),
            "submit_to_terminal_ms": summarize(lat["submit_to_terminal_ms"]),
            "bench_driver_cpu_s_per_job": per_job(self1 - self0, n),
        })
        wall = result["wall_seconds"]
        per_replica = {}
        per_kind: dict[str, dict[str, float]] = {}
        for r in topo.services:
            b, a = before["procs"].get(r["name"]), after["procs"].get(r["name"])
            if not b or not a:
                per_replica[r["name"]] = {"kind": r["kind"], "error": "process gone"}
                continue
            cpu = a["cpu_s"] - b["cpu_s"]
            lines = after["logs"].get(r["name"], 0) - before["logs"].get(r["name"], 0)
            per_replica[r["name"]] = {"kind": r["kind"], "cpu_s": cpu, "cpu_ms_per_job": per_job(cpu * 1000, n),
                                      "cpu_utilisation": cpu / wall if wall > 0 else None,
                                      "peak_rss_mb": a.get("VmHWM", 0) / 2**20, "rss_mb": a.get("VmRSS", 0) / 2**20,
                                      "log_lines_per_job": per_job(lines, n) if r["kind"] not in ("redis", "nats") else None}
            counts0, counts1 = before.get("bridge", {}).get(r["name"]), after.get("bridge", {}).get(r["name"])
            if counts0 and counts1 and None not in (*counts0, *counts1):
                # Trio→asyncio calls and wake-ups of an idle Trio, per job: what its CPU follows
                per_replica[r["name"]]["bridge_crossings_per_job"] = per_job(counts1[0] - counts0[0], n)
                per_replica[r["name"]]["bridge_wakeups_per_job"] = per_job(counts1[1] - counts0[1], n)
            kind = per_kind.setdefault(r["kind"], {"replicas": 0, "cpu_s": 0.0, "peak_rss_mb_max": 0.0})
            kind["replicas"] += 1
            kind["cpu_s"] += cpu
            kind["peak_rss_mb_max"] = max(kind["peak_rss_mb_max"], a.get("VmHWM", 0) / 2**20)
        for kind in per_kind.values():
            kind["cpu_ms_per_job"] = per_job(kind["cpu_s"] * 1000, n)
        total_cpu = sum(k["cpu_s"] for k in per_kind.values())
        result["per_replica"] = per_replica
        result["per_kind"] = per_kind
        result["cpu_ms_per_job_all"] = per_job(total_cpu * 1000, n)
        delta = commands_delta(before["commandstats"], after["commandstats"], own_polls)
        result["redis"] = redis_per_job(delta, n)
        result["redis"]["commands_per_s"] = per_job(sum(v["calls"] for v in delta.values()), 1) / wall if wall > 0 else None
        dispatch_mean = {}
        for name, (s1, c1) in after["metrics"].items():
            s0, c0 = before["metrics"].get(name, (0.0, 0.0))
            if c1 > c0:
                dispatch_mean[name] = (s1 - s0) / (c1 - c0) * 1000
        result["scheduler_dispatch_latency_mean_ms"] = dispatch_mean
        nats: dict[str, Any] = {"jetstream_stored_per_job": {
            k: per_job(seqs1.get(k, 0) - seqs0.get(k, 0), n) for k in seqs1}}
        result["nats"] = nats
        incomplete = n - sum(v for k, v in lat["states"].items() if k in TERMINAL)
        if incomplete:
            result["incomplete"] = incomplete
            say(f"ours, {replicas} replica(s): {incomplete} jobs not terminal after the stall timeout")
        if args.nats_tap:
            time.sleep(0.3)
            nats.update(nats_tap_pass(clients, client, topo.state["nats_url"], args.nats_tap_jobs, args.stall_timeout))
        if args.monitor_jobs:
            time.sleep(0.3)
            result["redis_monitor"] = monitor_pass(clients, client, args.monitor_jobs, args.stall_timeout)
        if args.profile:
            result["profile"] = profile_pass(args, topo, clients, client)
    finally:
        topo.down()
    return result


def profile_pass(args: argparse.Namespace, topo: Topology, clients: Clients, client) -> dict[str, Any]:
    """py-spy on the first gateway and scheduler while clients submit for --profile-seconds."""
    pyspy = Path(sys.executable).parent / "py-spy"
    targets = [topo.first(kind) for kind in args.profile_targets.split(",")]
    targets = [t for t in targets if t]
    seconds = args.profile_seconds
    out_dir = topo.dir / "profile"
    out_dir.mkdir(exist_ok=True)
    say(f"profile: py-spy on {', '.join(t['name'] for t in targets)} for {seconds:.0f} s under load")
    procs = []
    for t in targets:
        out = out_dir / f"{t['name']}.txt"
        argv = [str(pyspy), "record", "--pid", str(t["pid"]), "--duration", str(int(seconds) + 1), "--rate", "100", "--gil",
                "--nonblocking", "--format", "raw", "--output", str(out)]
        procs.append((t, out, subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.PIPE, text=True)))
    time.sleep(0.5)
    watch = TerminalWatch(client)
    sent = clients.run(until=time.monotonic() + seconds)
    watch.wait(len(sent["ids"]), args.stall_timeout)
    result: dict[str, Any] = {"seconds": seconds, "jobs": len(sent["ids"]), "targets": {}}
    for t, out, proc in procs:
        try:
            _, err = proc.communicate(timeout=seconds + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            result["targets"][t["name"]] = {"error": (err or "").strip()[-500:] or f"py-spy exit {proc.returncode}"}
            continue
        result["targets"][t["name"]] = {"top_own": parse_pyspy_raw(out.read_text(), args.profile_top)}
    return result


# ==== peers and ceiling ===========================================================================


FLOOR_DONE = "floor:done"  # scripts/bench_floor.py: job id -> end time (s)
FLOOR_READY, FLOOR_CONSUMERS = "floor:ready", 4  # its consumers, once they exist
FLOOR_PARTS = ("store", "lock", "packets")  # what --floor-with may put back in (bench_floor.PARTS)


def floor_label(f: Mapping[str, Any]) -> str:
    return f"floor r={f['replicas']}" + (f" +{f['with']}" if f.get("with") else "")


def run_floor(args: argparse.Namespace, workdir: Path, replicas: int = 1) -> dict[str, Any]:
    """The floor (scripts/bench_floor.py) with `replicas` of each role: the guide's messages alone
    on our stack, with the same clients, warm-up and passes as ours; CPU per job per process."""
    import redis

    run_dir = Path(tempfile.mkdtemp(prefix="floor-", dir=workdir))
    procs: dict[str, subprocess.Popen] = {}
    say(f"floor, {replicas} replica(s): starting in {run_dir}")
    try:
        procs["redis"], redis_port = start_redis(run_dir)
        procs["nats"], nats_port = start_nats(run_dir, args.project_python)
        env = {**os.environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
               "NATS_URL": f"nats://127.0.0.1:{nats_port}", "PYTHONPATH": str(ROOT), "FLOOR_WITH": args.floor_with}
        script = str(ROOT / "scripts" / "bench_floor.py")
        for k in range(1, replicas + 1):
            for role in ("scheduler", "worker", "engine"):
                with (run_dir / f"{role}-{k}.log").open("ab") as sink:
                    procs[f"{role}-{k}"] = subprocess.Popen(
                        [args.project_python, script, role], env=env, stdin=subprocess.DEVNULL, stdout=sink,
                        stderr=subprocess.STDOUT, start_new_session=True)
        ports = [free_port() for _ in range(replicas)]
        for k, port in enumerate(ports, 1):
            procs[f"gateway-{k}"] = start_server([args.project_python, script, "gateway"], port,
                                                 run_dir / f"gateway-{k}.log", timeout=60,
                                                 env={**env, "FLOOR_PORT": str(port)})
        client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_port}/0")
        clients = Clients([f"http://127.0.0.1:{port}" for port in ports], "floor", args.clients)
        deadline = time.monotonic() + 60
        while client.scard(FLOOR_READY) < FLOOR_CONSUMERS * replicas:  # their consumers take new messages only
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs.values()):
                raise RuntimeError(f"the floor's consumers did not start (logs in {run_dir})")
            time.sleep(0.05)

        def wait(n: int) -> int:
            last, since = -1, time.monotonic()
            while True:
                done = client.zcard(FLOOR_DONE)
                if done >= n:
                    return done
                if done != last:
                    last, since = done, time.monotonic()
                elif time.monotonic() - since > args.stall_timeout:
                    return done
                time.sleep(0.02)

        clients.run(count=WARMUP_JOBS)
        if wait(WARMUP_JOBS) < WARMUP_JOBS:
            raise RuntimeError(f"the floor's warm-up jobs did not finish (logs in {run_dir})")
        time.sleep(0.3)
        before = {name: proc_sample(proc.pid) for name, proc in procs.items()}
        passes, total = [], WARMUP_JOBS
        for k in range(args.repeat):
            sent = clients.run(count=args.jobs)
            total += len(sent["ids"])
            wait(total)
            ends = [e for e in client.zmscore(FLOOR_DONE, sent["ids"]) if e is not None] if sent["ids"] else []
            end = max(ends) if ends else time.time()
            passes.append({"submitted": len(sent["ids"]), "finished": len(ends),
                           "jobs_per_s": steady_throughput(ends),
                           "jobs_per_s_whole": throughput(len(sent["ids"]), sent["first_send"], end)})
            say(f"floor, {replicas} replica(s): pass {k + 1}/{args.repeat}: steady "
                f"{fmt(passes[-1]['jobs_per_s'])} jobs/s")
        after = {name: proc_sample(proc.pid) for name, proc in procs.items()}
        n = sum(p["submitted"] for p in passes)
        per_kind: dict[str, dict[str, float]] = {}
        for name in procs:
            b, a = before.get(name), after.get(name)
            if b and a:  # the replicas of a role together (`scheduler-1`, `scheduler-2` → scheduler)
                kind = per_kind.setdefault(name.split("-")[0], {"cpu_s": 0.0, "peak_rss_mb_max": 0.0})
                kind["cpu_s"] += a["cpu_s"] - b["cpu_s"]
                kind["peak_rss_mb_max"] = max(kind["peak_rss_mb_max"], a.get("VmHWM", 0) / 2**20)
        for kind in per_kind.values():
            kind["cpu_ms_per_job"] = per_job(kind.pop("cpu_s") * 1000, n)
        steady = median_pass(passes)
        return {"replicas": replicas, "with": args.floor_with, "jobs": args.jobs, "repeat": args.repeat, "submitted": n,
                "finished": sum(p["finished"] for p in passes), "jobs_per_s": steady["median"],
                "jobs_per_s_spread": steady["spread"], "passes": passes, "per_kind": per_kind,
                "jobs_per_s_whole_run": median_pass(passes, "jobs_per_s_whole")["median"],
                "cpu_ms_per_job_all": sum(k["cpu_ms_per_job"] or 0 for k in per_kind.values())}
    finally:
        for proc in procs.values():
            stop_process(proc)
        if not args.keep:
            shutil.rmtree(run_dir, ignore_errors=True)


def run_peer_passes(args: argparse.Namespace, peer: str, workdir: Path) -> dict[str, Any]:
    """--repeat runs of a peer (each on a fresh Redis, after its warm-up); the run with the median
    steady-state rate is reported, with every run's figures."""
    runs = [run_peer(args, peer, workdir) for _ in range(args.repeat)]
    failed = next((r for r in runs if "error" in r), None)
    if failed:
        return failed
    steady = median_pass(runs)
    chosen = dict(min(runs, key=lambda r: abs((r["jobs_per_s"] or 0) - (steady["median"] or 0))))
    chosen.update(jobs_per_s=steady["median"], jobs_per_s_spread=steady["spread"],
                  jobs_per_s_whole_run=median_pass(runs, "jobs_per_s_whole_run")["median"],
                  passes=[{"jobs_per_s": r["jobs_per_s"], "jobs_per_s_whole": r["jobs_per_s_whole_run"]} for r in runs])
    return chosen


def run_peer(args: argparse.Namespace, peer: str, workdir: Path) -> dict[str, Any]:
    server, port = start_redis(workdir)
    try:
        say(f"{peer}: {args.jobs} jobs from {args.clients} clients")
        argv = [sys.executable, str(ROOT / "scripts" / "bench_peers.py"), "--peer", peer, "--jobs", str(args.jobs),
                "--clients", str(args.clients), "--redis-url", f"redis://127.0.0.1:{port}/0",
                "--redis-pid", str(server.pid), "--log", str(workdir / f"{peer}.log")]
        if peer == "dramatiq":
            argv += ["--procs", str(args.dramatiq_processes), "--threads", str(args.dramatiq_threads)]
        else:
            argv += ["--procs", str(args.celery_concurrency)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=args.stall_timeout + 300,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return {"peer": peer, "error": (done.stderr or done.stdout)[-1500:]}
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        stop_process(server)
    n = raw["done"]
    delta = commands_delta(raw["commandstats_before"], raw["commandstats_after"], raw["own_commands"])
    return {
        "peer": peer, "worker": raw["worker"], "jobs": raw["jobs"], "done": n, "errors": raw["errors"],
        "wall_seconds": raw["last_done"] - raw["first_enqueue"],
        "jobs_per_s": steady_throughput([us / 1e6 for us in raw.get("done_us", [])]),
        "jobs_per_s_whole_run": throughput(n, raw["first_enqueue"], raw["last_done"]),
        "enqueue_rate_per_s": throughput(n, 0, raw["enqueue_seconds"]),
        "enqueue_to_done_ms": summarize(raw["latencies_ms"]),
        "cpu_ms_per_job": {k: per_job(v * 1000, n) for k, v in raw["cpu_seconds"].items()},
        "redis": redis_per_job(delta, n),
    }


def run_paired(args: argparse.Namespace, peer: str, workdir: Path) -> dict[str, Any]:
    """Ours (1 replica) and a peer in alternating passes, peer first and last, ours' topology kept
    up (idle) through the peer's passes: the ratio of each pass of ours to the peer's passes around
    it (`paired_ratios`), and their median. Throughput only: the CPU and latency figures come
    from the runs above."""
    topo = Topology(args, 1)
    say(f"paired with {peer}: starting ours (1 replica) in {topo.dir}")
    topo.up()
    try:
        client, clients = warmed_up(args, topo)
        peer_runs, ours_rates = [run_peer(args, peer, workdir)], []
        for k in range(args.repeat):
            if "error" in peer_runs[-1]:
                break  # no ratio can come of the passes left: reported below
            watch = TerminalWatch(client)
            sent = clients.run(count=args.jobs)
            if watch.wait(len(sent["ids"]), args.stall_timeout) < len(sent["ids"]):
                raise RuntimeError(f"paired pass {k + 1}: not every job finished; logs in {topo.dir}/logs (use --keep)")
            ours_rates.append(steady_throughput(job_latencies(read_timelines(client, sent["ids"]))["terminal_s"]))
            peer_runs.append(run_peer(args, peer, workdir))
            say(f"paired with {peer}: pass {k + 1}/{args.repeat}: ours {fmt(ours_rates[-1])} jobs/s between "
                f"{peer}'s {fmt(peer_runs[-2].get('jobs_per_s'))} and {fmt(peer_runs[-1].get('jobs_per_s'))}")
    finally:
        topo.down()
    failed = next((r for r in peer_runs if "error" in r), None)
    if failed:
        return {"peer": peer, "error": failed["error"]}
    peer_rates = [r["jobs_per_s"] for r in peer_runs]
    ratios = paired_ratios(ours_rates, peer_rates)
    return {"peer": peer, "ours_jobs_per_s": ours_rates, "peer_jobs_per_s": peer_rates, "ratios": ratios,
            "ratio": percentile([r for r in ratios if r is not None], 50)}


def paired_text(paired: Mapping[str, Any]) -> str:
    if "error" in paired:
        return f"paired with {paired['peer']} failed: {paired['error'][-400:]}"
    return (f"paired passes, ours r=1 vs {paired['peer']} (alternating, {paired['peer']} first and last): median "
            f"ratio {fmt(paired['ratio'], 2)}; per pass " + ", ".join(fmt(v, 2) for v in paired["ratios"])
            + f" (ours {', '.join(fmt(v) for v in paired['ours_jobs_per_s'])} jobs/s; {paired['peer']} "
            + ", ".join(fmt(v) for v in paired["peer_jobs_per_s"]) + ")")


REDIS_TESTS = "set,get,hset,zadd,lpush,rpush,sadd,incr"
TRANSITION_LUA = ("local c = redis.call('HGET', KEYS[1], 'state') or '' "
                  "redis.call('HSET', KEYS[1], 'state', ARGV[1], 'updated_at', ARGV[2]) return c")


def redis_ceiling(workdir: Path, n: int) -> dict[str, Any]:
    server, port = start_redis(workdir)
    try:
        base = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-q", "-n", str(n), "-P", "1", "--csv"]
        out: dict[str, float] = {}
        runs = [base + ["-t", REDIS_TESTS],
                base + ["-r", "100000", "EVAL", TRANSITION_LUA, "1", "job:meta:__rand_int__", "RUNNING", "1"]]
        for argv in runs:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
            for line in done.stdout.splitlines():
                cells = [c.strip('"') for c in line.split('","')]
                if len(cells) >= 2 and cells[0] != "test":
                    try:
                        rps = float(cells[1])
                    except ValueError:
                        continue
                    name = cells[0].split()[0].lower()
                    name = "evalsha" if name == "eval" else name  # the job path runs its scripts by EVALSHA
                    out[name] = rps
        return {"ops_per_s": out, "settings": f"redis-benchmark -n {n} -P 1 -c 50 (no pipelining), "
                "EVAL = HGET+HSET like a state transition"}
    finally:
        stop_process(server)


def nats_ceiling(workdir: Path, project_python: str, n: int) -> dict[str, Any]:
    import asyncio

    server, port = start_nats(workdir, project_python)

    async def run() -> dict[str, Any]:
        import nats

        url = f"nats://127.0.0.1:{port}"
        pub = await nats.connect(url)
        sub = await nats.connect(url)
        payload = b"x" * 256
        received = 0
        done = asyncio.get_running_loop().create_future()

        async def on_message(msg) -> None:
            nonlocal received
            received += 1
            if received == n and not done.done():
                done.set_result(time.perf_counter())

        await sub.subscribe("bench.core", cb=on_message, pending_msgs_limit=n * 2, pending_bytes_limit=-1)
        await sub.flush()
        t0 = time.perf_counter()
        for _ in range(n):
            await pub.publish("bench.core", payload)
        await pub.flush()
        t1 = time.perf_counter()
        try:
            t2 = await asyncio.wait_for(done, 60)
        except asyncio.TimeoutError:
            t2 = None
        core = {"publish_per_s": n / (t1 - t0), "delivered_per_s": (n / (t2 - t0)) if t2 else None,
                "received": received}
        # JetStream: acked publishes, 256 in flight, then pull-consume with acks.
        js = pub.jetstream()
        await js.add_stream(name="BENCH", subjects=["bench.js"])
        m = max(n // 10, 1000)
        t0 = time.perf_counter()
        window = 256
        for k in range(0, m, window):
            await asyncio.gather(*(js.publish("bench.js", payload) for _ in range(min(window, m - k))))
        t1 = time.perf_counter()
        psub = await sub.jetstream().pull_subscribe("bench.js", durable="bench")
        got = 0
        t2 = time.perf_counter()
        while got < m:
            try:
                msgs = await psub.fetch(min(256, m - got), timeout=5)
            except (TimeoutError, asyncio.TimeoutError):
                break
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        t3 = time.perf_counter()
        await pub.close()
        await sub.close()
        return {"core": core, "jetstream": {"messages": m, "publish_acked_per_s": m / (t1 - t0),
                                            "pull_consume_acked_per_s": got / (t3 - t2) if got else None},
                "settings": f"nats-py, 256-byte payloads, core: {n} publishes then flush, one subscriber; "
                            f"JetStream: file store, 256 publishes in flight, pull fetch 256 with acks"}

    try:
        return asyncio.run(run())
    finally:
        stop_process(server)


# ==== main =========================================================================================


def report_text(data: Mapping[str, Any]) -> str:
    out = []
    m = data["machine"]
    out.append(f"Cordum job-path benchmark  {m['date']}")
    out.append(f"machine: {m['nproc']} CPU ({m['cpu_model']}), {m['memory_bytes'] / 2**30:.1f} GiB, Linux "
               f"{m['kernel']}, Python {m['python']}, Redis {m['redis']}, load at start {m['loadavg_at_start'][0]:.2f}")
    loop = f"open loop at {data['rate']:g} jobs/s" if data.get("rate") else "closed loop"
    if data.get("ours") or data.get("peers"):
        out.append(f"workload: {data['jobs']} no-op jobs, {data['clients']} concurrent clients ({loop})")
    ours = data.get("ours", [])
    rows = []
    for r in ours:
        if "error" in r:
            rows.append([f"cordum {ours_label(r)}", "error: " + r["error"][:60]] + [""] * 7)
            continue
        rows.append([f"cordum {ours_label(r)}", r["jobs_per_s"], r["submit_to_dispatch_ms"]["p50"],
                     r["submit_to_dispatch_ms"]["p95"], r["submit_to_dispatch_ms"]["p99"],
                     r["submit_to_terminal_ms"]["p50"], r["submit_to_terminal_ms"]["p95"],
                     r["submit_to_terminal_ms"]["p99"], r["cpu_ms_per_job_all"]])
    for floor in data.get("floor") or []:
        label = floor_label(floor)
        rows.append([label, "error: " + floor["error"][:60]] + [""] * 7 if "error" in floor else
                    [label, floor["jobs_per_s"], "", "", "", "", "", "", floor["cpu_ms_per_job_all"]])
    for p in data.get("peers", []):
        if "error" in p:
            rows.append([p["peer"], "error"] + [""] * 7)
            continue
        lat = p["enqueue_to_done_ms"]
        cpu = (p["cpu_ms_per_job"].get("workers") or 0) + (p["cpu_ms_per_job"].get("redis") or 0)
        rows.append([p["peer"], p["jobs_per_s"], "", "", "", lat["p50"], lat["p95"], lat["p99"], cpu])
    if rows:
        out.append("")
        out.append(table(["system", "jobs/s", "disp p50", "disp p95", "disp p99", "end p50", "end p95", "end p99",
                          "CPU ms/job"], rows))
        out.append("  (ms; disp = submit→dispatch, end = submit→terminal for ours, enqueue→done for peers; CPU = the "
                   "serving side: all our service processes incl. redis and nats / the peer's worker processes and "
                   "redis; clients and producers not included)")
    for floor in data.get("floor") or []:
        if "error" in floor:
            continue
        out.append("")
        alone = f"with ours: {floor['with']}" if floor.get("with") else "no policy, checks, audit or metrics"
        out.append(f"{floor_label(floor)} (scripts/bench_floor.py: the guide's messages alone, {alone}; "
                   f"{floor['replicas']} replica(s) per role): {floor['submitted']} jobs in "
                   f"{floor['repeat']} passes; {passes_text(floor)}; CPU ms/job "
                   + ", ".join(f"{name} {fmt(v['cpu_ms_per_job'], 2)}" for name, v in floor["per_kind"].items())
                   + "; peak RSS MB " + ", ".join(f"{name} {fmt(v['peak_rss_mb_max'])}"
                                                  for name, v in floor["per_kind"].items()))
    for r in ours:
        if "error" in r:
            continue
        out.append("")
        out.append(f"cordum {ours_label(r)}, {r['replicas']} replica(s) per service, {r['workers']} worker(s): {r['submitted']} jobs in "
                   f"{r.get('repeat', 1)} passes, {r['wall_seconds']:.2f} s; {passes_text(r)}; submit rate {fmt(r['submit_rate_per_s'])}/s; "
                   f"HTTP submit p50 {fmt(r['http_submit_ms']['p50'])} ms p99 {fmt(r['http_submit_ms']['p99'])} ms; "
                   f"states {r['states']}; submit errors {r['submit_errors']}; bench client CPU "
                   f"{fmt(r['bench_driver_cpu_s_per_job'] * 1000 if r.get('bench_driver_cpu_s_per_job') else None, 2)} ms/job")
        idle = r.get("idle")
        if idle:
            out.append(f"  idle (one job at a time, {idle['jobs']} jobs): submit→dispatch p50 "
                       f"{fmt(idle['submit_to_dispatch_ms']['p50'], 2)} p95 {fmt(idle['submit_to_dispatch_ms']['p95'], 2)} ms; "
                       f"submit→terminal p50 {fmt(idle['submit_to_terminal_ms']['p50'], 2)} p95 "
                       f"{fmt(idle['submit_to_terminal_ms']['p95'], 2)} ms; HTTP submit p50 {fmt(idle['http_submit_ms']['p50'], 2)} ms")
        rows = [[name, v.get("kind"), v.get("cpu_ms_per_job"), (v.get("cpu_utilisation") or 0) * 100,
                 v.get("peak_rss_mb"), v.get("log_lines_per_job"), v.get("bridge_wakeups_per_job"),
                 v.get("bridge_crossings_per_job")]
                for name, v in r["per_replica"].items() if "error" not in v]
        rows.append(["all", "", r["cpu_ms_per_job_all"], "", "", "", "", ""])
        out.append(table(["replica", "kind", "CPU ms/job", "CPU %", "peak RSS MB", "log lines/job", "wake-ups/job",
                          "crossings/job"], rows))
        red = r["redis"]
        top = ", ".join(f"{k} {v:.2f}" for k, v in list(red["by_command_per_job"].items())[:12])
        out.append(f"  Redis: {fmt(red['commands_per_job'])} commands/job ({fmt(red['usec_per_job'])} µs server time/job, "
                   f"{fmt(red['commands_per_s'])} commands/s): {top}")
        mon = r.get("redis_monitor")
        if mon:
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(mon["top_level_by_command_per_job"].items())[:12])
            out.append(f"  Redis under MONITOR ({mon['jobs']} jobs): {fmt(mon['top_level_per_job'])} client-sent commands/job "
                       f"+ {fmt(mon['in_lua_per_job'])} inside Lua; client-sent: {top}")
        nats = r["nats"]
        if "messages_per_job" in nats:
            fam = ", ".join(f"{k} {v:.2f}" for k, v in list(nats["by_family_per_job"].items())[:10])
            tapped = f", a pass of {nats['tap_jobs']} jobs" if "tap_jobs" in nats else ""
            out.append(f"  NATS: {fmt(nats['messages_per_job'])} messages/job routed (tap on `>`{tapped}): {fam}")
        elif "tap_error" in nats:
            out.append(f"  NATS: tap failed: {nats['tap_error']}")
        out.append("  JetStream stored/job: " + ", ".join(f"{k} {fmt(v, 2)}" for k, v in nats["jetstream_stored_per_job"].items()))
        if r.get("scheduler_dispatch_latency_mean_ms"):
            out.append("  scheduler dispatch latency (own histogram, mean ms): " + ", ".join(
                f"{k} {fmt(v, 2)}" for k, v in r["scheduler_dispatch_latency_mean_ms"].items()))
        if r.get("profile"):
            prof = r["profile"]
            out.append(f"  profile: py-spy, {prof['seconds']:.0f} s, {prof['jobs']} jobs under load")
            for name, target in prof["targets"].items():
                if "error" in target:
                    out.append(f"    {name}: py-spy failed: {target['error']}")
                    continue
                out.append(f"    {name}: top functions by own time")
                out.append(_indent(table(["function", "own %", "total %"],
                                         [[t["function"][:90], t["own_pct"], t["total_pct"]] for t in target["top_own"]]), 6))
    peers = [p for p in data.get("peers", []) if "error" not in p]
    if peers:
        out.append("")
        rows = []
        for p in peers:
            rows.append([p["peer"], p["jobs_per_s"], p["enqueue_to_done_ms"]["p50"], p["enqueue_to_done_ms"]["p99"],
                         p["cpu_ms_per_job"]["workers"], p["cpu_ms_per_job"]["redis"], p["cpu_ms_per_job"]["producers"],
                         p["redis"]["commands_per_job"]])
        out.append(table(["peer", "jobs/s", "p50 ms", "p99 ms", "worker CPU ms/job", "redis CPU ms/job",
                          "producer CPU ms/job", "Redis cmds/job"], rows))
        for p in peers:
            out.append(f"  {p['peer']}: {p['worker']}; {passes_text(p)}")
    for p in data.get("peers", []):
        if "error" in p:
            out.append(f"  {p['peer']} failed: {p['error'][-400:]}")
    if data.get("ratios"):
        out.append("")
        out.append("ratios ours/peer (jobs/s; >1 = ours faster):  " + "; ".join(
            f"{k} {fmt(v, 2)}" for k, v in data["ratios"].items()))
    if data.get("paired"):
        out.append(paired_text(data["paired"]))
    ceiling = data.get("ceiling") or {}
    if ceiling.get("redis"):
        c = ceiling["redis"]
        out.append("")
        out.append("ceiling: redis-benchmark ops/s  " + ", ".join(f"{k} {fmt(v)}" for k, v in c["ops_per_s"].items())
                   + f"  ({c['settings']})")
        for k, v in (c.get("job_mix") or {}).items():
            out.append(f"  cordum {k}: job command mix ({v.get('from')}) {fmt(v['mix_ops_per_s'])} ops/s → Redis alone "
                       f"could carry {fmt(v['jobs_per_s'])} jobs/s; measured {fmt(v['measured_jobs_per_s'])} "
                       f"({fmt(v['fraction'] * 100 if v['fraction'] else None)}% of it)")
        for r in data.get("ours", []):
            red = (r.get("per_kind") or {}).get("redis")
            if red and red.get("cpu_ms_per_job"):
                out.append(f"  cordum {ours_label(r)}: redis-server CPU {fmt(red['cpu_ms_per_job'], 2)} ms/job → one core "
                           f"of Redis would saturate at ≈ {fmt(1000 / red['cpu_ms_per_job'])} jobs/s")
    if ceiling.get("nats"):
        c = ceiling["nats"]
        if "error" in c:
            out.append(f"ceiling: NATS failed: {c['error']}")
        else:
            out.append(f"ceiling: NATS core publish {fmt(c['core']['publish_per_s'])}/s, delivered "
                       f"{fmt(c['core']['delivered_per_s'])}/s; JetStream publish (acked) "
                       f"{fmt(c['jetstream']['publish_acked_per_s'])}/s, pull consume (acked) "
                       f"{fmt(c['jetstream']['pull_consume_acked_per_s'])}/s  ({c['settings']})")
            js_rate = c["jetstream"].get("publish_acked_per_s")
            for r in ours:
                stored = sum(v or 0 for v in ((r.get("nats") or {}).get("jetstream_stored_per_job") or {}).values())
                if js_rate and stored:
                    out.append(f"  cordum {ours_label(r)}: {fmt(stored, 2)} JetStream messages stored/job → acked "
                               f"JetStream publishing alone could carry {fmt(js_rate / stored)} jobs/s")
            for r in ours:
                per = (r.get("nats") or {}).get("messages_per_job")
                if per and c["core"].get("delivered_per_s"):
                    out.append(f"  cordum {ours_label(r)}: {fmt(per)} messages/job → NATS core delivery alone could "
                               f"carry {fmt(c['core']['delivered_per_s'] / per)} jobs/s")
    if data.get("workflows"):
        out += workflows().report_lines(data["workflows"])
    out.append("")
    out.append(f"total benchmark time {data['bench_seconds']:.0f} s")
    return "\n".join(out)


def passes_text(r: Mapping[str, Any]) -> str:
    """`jobs/s 201 (median steady state of 3 passes: 195, 201, 210; spread 7%; whole runs 190)`."""
    passes = r.get("passes") or []
    if not passes:
        return f"{fmt(r.get('jobs_per_s'))} jobs/s"
    each = ", ".join(fmt(p.get("jobs_per_s")) for p in passes)
    spread = r.get("jobs_per_s_spread")
    return (f"{fmt(r.get('jobs_per_s'))} jobs/s (median steady state of {len(passes)} passes: {each}; spread "
            f"{fmt(spread * 100 if spread is not None else None)}%; whole runs {fmt(r.get('jobs_per_s_whole_run'))})")


def _indent(text: str, n: int) -> str:
    return "\n".join(" " * n + line for line in text.splitlines())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description="The job-path benchmark: ours (1 and 2 "
                                     "replicas) vs Celery and Dramatiq, and the Redis/NATS ceiling, in one run.")
    parser.add_argument("--jobs", type=int, default=2000, help="no-op jobs per pass and system (default %(default)s)")
    parser.add_argument("--repeat", type=int, default=3, help="measured passes per system, after a warm-up of "
                        f"{WARMUP_JOBS} jobs; jobs/s is the median of their steady-state figures (default %(default)s)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent submitting clients (default %(default)s)")
    parser.add_argument("--replicas", default="1,2", help="replica counts to run ours with (default %(default)s)")
    parser.add_argument("--bridges", default="", help="run ours once per Trio/asyncio runtime named (CORDUM_BRIDGE: "
                        "uvloop, asyncio, trio-asyncio), e.g. trio-asyncio,uvloop; default: the project's default")
    parser.add_argument("--output-rules", choices=("on", "off"), default="on",
                        help="on: also run ours at the first replica count with output rules that scan every "
                             "job's output, to show what output checks cost (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="echo worker processes (default %(default)s)")
    parser.add_argument("--worker-parallel", type=int, default=100000,
                        help="WORKER_MAX_PARALLEL of each echo worker (default %(default)s; 0 = the worker's "
                        "default, 4). High on purpose: the scheduler counts dispatches since a worker's last "
                        "heartbeat (5 s) as active and routes nothing to a worker at >= 90%% of its slots, so a "
                        "small value caps throughput at ~0.9 x slots per heartbeat interval (see the report)")
    parser.add_argument("--worker-heartbeat", default="",
                        help="WORKER_HEARTBEAT_INTERVAL of the echo workers (default: theirs, 5s)")
    parser.add_argument("--rate", type=float, default=0,
                        help="open loop: submit at this many jobs/s in total (default: closed loop, as fast as "
                        "the clients get answers)")
    parser.add_argument("--idle-jobs", type=int, default=30,
                        help="jobs run one at a time before the load, for idle latencies (default %(default)s; 0 = none)")
    parser.add_argument("--nats-tap-jobs", type=int, default=300,
                        help="jobs in the pass that counts NATS messages per job (a tap on `>`)")
    parser.add_argument("--monitor-jobs", type=int, default=100,
                        help="jobs run under Redis MONITOR after the load, to split commands into client-sent "
                        "and inside-Lua (default %(default)s; 0 = none)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--no-peers", action="store_true", help="skip Celery and Dramatiq")
    parser.add_argument("--peers", default="celery,dramatiq", help="which peers (default %(default)s)")
    parser.add_argument("--paired", default="celery",
                        help="a peer to run in alternating passes with ours (1 replica), for a ratio the machine's "
                             "drifting speed does not move: 'off' to skip (default %(default)s; not with --no-peers)")
    parser.add_argument("--no-ceiling", action="store_true", help="skip redis-benchmark and the NATS rates")
    parser.add_argument("--no-floor", dest="floor", action="store_false",
                        help="skip the floor (scripts/bench_floor.py: the guide's messages alone on our stack)")
    parser.add_argument("--floor-with", default="",
                        help=f"put parts of ours back into the floor, comma separated: {', '.join(FLOOR_PARTS)} "
                             "(lock needs store), to measure what each costs")
    parser.add_argument("--no-nats-tap", dest="nats_tap", action="store_false",
                        help="skip the pass that counts NATS messages with a `>` subscriber")
    parser.add_argument("--celery-concurrency", type=int, default=2)
    parser.add_argument("--dramatiq-processes", type=int, default=2)
    parser.add_argument("--dramatiq-threads", type=int, default=4)
    parser.add_argument("--redis-benchmark-n", type=int, default=100000)
    parser.add_argument("--nats-n", type=int, default=200000)
    parser.add_argument("--profile", action="store_true", help="a py-spy pass after each measured run of ours")
    parser.add_argument("--profile-seconds", type=float, default=10)
    parser.add_argument("--profile-targets", default="api-gateway,scheduler",
                        help="replica kinds to profile (first replica of each; default %(default)s)")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--stall-timeout", type=float, default=120,
                        help="give up waiting for jobs after this long without progress (s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary state directories (logs)")
    parser.add_argument("--project-python", default=str(ROOT / ".venv" / "bin" / "python"))
    workflows().add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        args.replica_counts = [int(x) for x in args.replicas.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--replicas: not a list of integers: {args.replicas!r}")
    args.bridge_list = [b.strip() for b in args.bridges.split(",") if b.strip()] or [""]
    unknown = [b for b in args.bridge_list if b and b not in ("uvloop", "asyncio", "trio-asyncio")]
    if unknown:
        parser.error(f"--bridges: unknown runtime(s) {', '.join(unknown)} (uvloop, asyncio, trio-asyncio)")
    if args.jobs <= 0 or args.clients <= 0 or args.repeat <= 0:
        parser.error("--jobs, --clients and --repeat must be > 0")
    if args.wf_runs < 0 or args.wf_idle_runs < 0 or args.wf_clients <= 0 or args.wf_replicas <= 0:
        parser.error("--wf-runs and --wf-idle-runs must be >= 0, --wf-clients and --wf-replicas > 0")
    if args.workflows_only and args.no_workflows:
        parser.error("--workflows-only and --no-workflows exclude each other")
    parts = [p.strip() for p in args.floor_with.split(",") if p.strip()]
    unknown = [p for p in parts if p not in FLOOR_PARTS]
    if unknown:
        parser.error(f"--floor-with: unknown part(s) {', '.join(unknown)} ({', '.join(FLOOR_PARTS)})")
    if "lock" in parts and "store" not in parts:
        parser.error("--floor-with: lock needs store (the lock fences the store's writes)")
    args.paired = args.paired.strip().lower()
    if args.paired not in ("off", "", *PEERS):
        parser.error(f"--paired: {args.paired!r} is not one of {', '.join(PEERS)} or off")
    args.floor_with = ",".join(parts)
    return args


def workflows():
    """The workflow figure's module (scripts/bench_workflows.py), imported when needed: it imports
    this one."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_workflows

    return bench_workflows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    data: dict[str, Any] = {"machine": machine_info(), "jobs": args.jobs, "clients": args.clients,
                            "rate": args.rate or None, "ours": [],
                            "peers": [], "ratios": {}, "ceiling": {}, "floor": []}
    work = Path(tempfile.mkdtemp(prefix="cordum-bench-"))
    try:
        for bridge in args.bridge_list:
            runs = [(replicas, False) for replicas in args.replica_counts]
            if args.output_rules == "on":
                runs.insert(1, (args.replica_counts[0], True))
            for replicas, output_rules in ([] if args.workflows_only else runs):
                try:
                    data["ours"].append(run_ours(args, replicas, bridge, output_rules))
                except Exception as exc:  # noqa: BLE001 - reported, the rest of the run goes on
                    say(f"ours, {replicas} replica(s) failed: {exc!r}")
                    data["ours"].append({"replicas": replicas, "bridge": bridge, "output_rules": output_rules,
                                         "error": repr(exc)})
        for replicas in (args.replica_counts if args.floor and not args.workflows_only else []):
            try:
                data["floor"].append(run_floor(args, work, replicas))
            except Exception as exc:  # noqa: BLE001 - reported, the rest of the run goes on
                say(f"floor, {replicas} replica(s) failed: {exc!r}")
                data["floor"].append({"replicas": replicas, "with": args.floor_with, "error": repr(exc)})
        if not args.no_peers and not args.workflows_only:
            for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
                try:
                    data["peers"].append(run_peer_passes(args, peer, work))
                except Exception as exc:  # noqa: BLE001
                    data["peers"].append({"peer": peer, "error": repr(exc)})
        if not args.no_peers and not args.workflows_only and args.paired not in ("", "off"):
            try:
                data["paired"] = run_paired(args, args.paired, work)
            except Exception as exc:  # noqa: BLE001
                data["paired"] = {"peer": args.paired, "error": repr(exc)}
        for r in data["ours"]:
            for p in data["peers"]:
                if "error" not in r and "error" not in p:
                    data["ratios"][f"{ours_label(r)} vs {p['peer']}"] = ratio(r["jobs_per_s"], p["jobs_per_s"])
        floors = {f["replicas"]: f for f in data["floor"] if "error" not in f}
        for f in floors.values():
            for p in data["peers"]:
                if "error" not in p:
                    data["ratios"][f"{floor_label(f)} vs {p['peer']}"] = ratio(f["jobs_per_s"], p["jobs_per_s"])
        if 1 in floors and 2 in floors:
            data["ratios"][f"{floor_label(floors[2])} vs {floor_label(floors[1])}"] = ratio(
                floors[2]["jobs_per_s"], floors[1]["jobs_per_s"])
        for r in data["ours"]:
            if "error" not in r and r["replicas"] in floors and not r.get("bridge") and not r.get("output_rules"):
                data["ratios"][f"{ours_label(r)} vs {floor_label(floors[r['replicas']])}"] = ratio(
                    r["jobs_per_s"], floors[r["replicas"]]["jobs_per_s"])
        if not args.no_workflows:
            data["workflows"] = workflows().run_figure(args, work)
        if not args.no_ceiling and not args.workflows_only:
            say("ceiling: redis-benchmark")
            try:
                redis = redis_ceiling(work, args.redis_benchmark_n)
                redis["job_mix"] = {}
                for r in data["ours"]:
                    if "error" in r:
                        continue
                    # Client-sent commands only when MONITOR split them out (commandstats also counts
                    # the commands a script runs, which redis-benchmark's EVAL already includes).
                    mon = r.get("redis_monitor")
                    source = mon["top_level_by_command_per_job"] if mon else r["redis"]["by_command_per_job"]
                    mix = mix_ceiling(source, redis["ops_per_s"])
                    mix["from"] = "client-sent commands (MONITOR pass)" if mon else "commandstats (incl. inside Lua)"
                    mix["measured_jobs_per_s"] = r["jobs_per_s"]
                    mix["fraction"] = ratio(r["jobs_per_s"], mix["jobs_per_s"])
                    redis["job_mix"][ours_label(r)] = mix
                data["ceiling"]["redis"] = redis
            except Exception as exc:  # noqa: BLE001
                data["ceiling"]["redis"] = {"error": repr(exc), "ops_per_s": {}, "settings": ""}
            say("ceiling: NATS")
            try:
                data["ceiling"]["nats"] = nats_ceiling(work, args.project_python, args.nats_n)
            except Exception as exc:  # noqa: BLE001
                data["ceiling"]["nats"] = {"error": repr(exc)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    data["bench_seconds"] = time.monotonic() - started
    if args.json:
        print(json.dumps(data, indent=None, sort_keys=False, default=str))
    else:
        print(report_text(data))
    failed = any("error" in r for r in data["ours"]) or "error" in ((data.get("workflows") or {}).get("systems") or {}).get("cordum", {})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
