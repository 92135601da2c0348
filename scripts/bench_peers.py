"""The peers of the job-path benchmark: the same no-op workload on Celery and on Dramatiq.

Two roles in one file:

- the task module the peers' worker CLIs import (`celery -A bench_peers worker ...`,
  `dramatiq bench_peers ...`), chosen by env BENCH_PEER=celery|dramatiq, broker env BENCH_REDIS_URL.
  The task is a no-op that records `<idx> <enqueue µs> <done µs>` with one RPUSH to `bench:done`
  on the same Redis, so latency is enqueue → done as the task itself saw it.
- the runner the driver (scripts/bench_driver.py) starts as its own process (pure sync Python, in
  the bench venv, DESIGN.md §4.7):

    python scripts/bench_peers.py --peer celery --jobs N --clients C --redis-url URL --redis-pid P

  It starts the peer's workers (their own process group), warms them up with a few jobs, enqueues N
  jobs from C producer threads (closed loop: each thread enqueues its next job as soon as the broker
  accepted the last), waits until N records arrived, stops the workers and prints one JSON object:
  jobs/s (first enqueue → last done), latency p50/p95/p99, CPU s per job of the worker processes
  (the whole process tree) and of redis-server, Redis commands per job.

Worker shapes (2 cores): Celery `worker --pool prefork --concurrency 2` (one child per core, the
default prefetch of 4, gossip/mingle/heartbeat off, results ignored); Dramatiq `--processes 2
--threads 4` (two processes like Celery's children). Both ack with their defaults (Celery early,
Dramatiq after the task).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = os.environ.get("BENCH_PEER", "")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DONE_KEY = "bench:done"
QUEUE = "bench"

_client = None
_client_lock = threading.Lock()


def redis_client():
    """This process's Redis client on the broker's Redis (BENCH_REDIS_URL), made on first use."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                import redis

                _client = redis.Redis.from_url(REDIS_URL)
    return _client


def record_done(idx: int, enqueued_us: int) -> None:
    redis_client().rpush(DONE_KEY, f"{idx} {enqueued_us} {time.time_ns() // 1000}")


# ---- the task modules (imported by the workers) -----------------------------------------------

if PEER == "celery":
    from celery import Celery

    app = Celery("bench_peers", broker=REDIS_URL)
    app.conf.update(
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name="bench.noop", ignore_result=True)
    def noop(idx: int, enqueued_us: int) -> None:
        record_done(idx, enqueued_us)

    def enqueue(idx: int) -> None:
        noop.apply_async((idx, time.time_ns() // 1000))

elif PEER == "dramatiq":
    import dramatiq
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL)
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=QUEUE, max_retries=0)
    def noop(idx: int, enqueued_us: int) -> None:
        record_done(idx, enqueued_us)

    def enqueue(idx: int) -> None:
        noop.send(idx, time.time_ns() // 1000)


# ---- the runner -----------------------------------------------------------------------------------


def worker_argv(peer: str, python: str, procs: int, threads: int, *, module: str = "bench_peers",
                queue: str = QUEUE) -> list[str]:
    """The peer's worker command line for the task module `module` (the workflow figure has its own)."""
    bindir = Path(python).parent
    if peer == "celery":
        return [str(bindir / "celery"), "-A", module, "worker", "--pool", "prefork",
                "--concurrency", str(procs), "-Q", queue, "--without-gossip", "--without-mingle",
                "--without-heartbeat", "--loglevel", "WARNING"]
    return [str(bindir / "dramatiq"), module, "--processes", str(procs), "--threads", str(threads),
            "--queues", queue]


def start_workers(argv: list[str], log: str) -> subprocess.Popen:
    """The peer's worker CLI in its own process group, importing the task modules from here."""
    env = {**os.environ, "PYTHONPATH": str(HERE), "PYTHONUNBUFFERED": "1"}
    sink = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(argv, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop_workers(proc: subprocess.Popen) -> None:
    """SIGTERM the worker's process group, SIGKILL it after 20 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def tree_cpu(root_pid: int) -> float:
    """CPU seconds (utime+stime, with reaped children) of a process and all its descendants."""
    tck = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text[text.rfind(")") + 2:].split()
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = sum(int(x) for x in fields[11:15]) / tck  # utime stime cutime cstime
    wanted = {root_pid}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in wanted and pid not in wanted:
                wanted.add(pid)
                changed = True
    return sum(cpu.get(pid, 0.0) for pid in wanted)


def pid_cpu(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def commandstats(client) -> dict[str, dict[str, float]]:
    raw = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): dict(value) for name, value in raw.items()}


def wait_done(client, n: int, timeout: float) -> int:
    polls = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        polls += 1
        if client.llen(DONE_KEY) >= n:
            return polls
        time.sleep(0.01)
    raise TimeoutError(f"only {client.llen(DONE_KEY)} of {n} jobs done after {timeout:.0f} s")


def produce(n: int, clients: int, enqueue_fn) -> tuple[float, int]:
    """Enqueue jobs 0..n-1 from `clients` threads; (first enqueue time, errors)."""
    counter = iter(range(n))
    lock = threading.Lock()
    errors = [0]
    first = [None]

    def run() -> None:
        while True:
            with lock:
                idx = next(counter, None)
                if first[0] is None:
                    first[0] = time.time()
            if idx is None:
                return
            try:
                enqueue_fn(idx)
            except Exception:  # noqa: BLE001 - counted and reported
                errors[0] += 1

    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return first[0] or time.time(), errors[0]


def run(args: argparse.Namespace) -> dict:
    os.environ["BENCH_PEER"] = args.peer
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    sys.path.insert(0, str(HERE))
    import importlib

    module = importlib.import_module("bench_peers")  # the task module, as the workers import it
    global REDIS_URL
    REDIS_URL = args.redis_url
    import redis

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    client.delete(DONE_KEY)
    proc = start_workers(worker_argv(args.peer, sys.executable, args.procs, args.threads), args.log)
    try:
        # Warm-up: the workers are up, connected and have imported everything.
        warm = 20
        for i in range(warm):
            module.enqueue(-1 - i)
        wait_done(client, warm, 120)
        time.sleep(0.2)
        client.delete(DONE_KEY)

        stats0 = commandstats(client)
        cpu_workers0, cpu_redis0 = tree_cpu(proc.pid), pid_cpu(args.redis_pid) if args.redis_pid else 0.0
        self0 = time.process_time()
        first, errors = produce(args.jobs, args.clients, module.enqueue)
        enqueued = time.time()
        polls = wait_done(client, args.jobs - errors, args.timeout)
        self1 = time.process_time()
        cpu_workers1, cpu_redis1 = tree_cpu(proc.pid), pid_cpu(args.redis_pid) if args.redis_pid else 0.0
        stats1 = commandstats(client)
        records = client.lrange(DONE_KEY, 0, -1)
    finally:
        stop_workers(proc)
    rows = [line.split() for line in records]
    latencies_ms = [(int(done) - int(enq)) / 1000.0 for _, enq, done in rows]
    last_done = max(int(done) for _, _, done in rows) / 1e6
    return {
        "peer": args.peer,
        "worker": " ".join([args.peer] + worker_argv(args.peer, sys.executable, args.procs, args.threads)[1:]),
        "jobs": args.jobs,
        "clients": args.clients,
        "errors": errors,
        "done": len(rows),
        "first_enqueue": first,
        "enqueue_seconds": enqueued - first,
        "last_done": last_done,
        "latencies_ms": latencies_ms,
        "done_us": [int(done) for _, _, done in rows],
        "cpu_seconds": {"workers": cpu_workers1 - cpu_workers0, "redis": cpu_redis1 - cpu_redis0,
                        "producers": self1 - self0},
        "commandstats_before": stats0,
        "commandstats_after": stats1,
        "own_commands": {"llen": polls, "lrange": 0},
    }


def runner_parser(description: str, timeout: float) -> argparse.ArgumentParser:
    """The options of a peer runner (this one and the workflow figure's, bench_workflow_peers.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--peer", choices=("celery", "dramatiq"), required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--redis-pid", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=timeout)
    parser.add_argument("--log", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = runner_parser(__doc__.split("\n\n")[0], 600)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args(argv)
    json.dump(run(args), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
