"""The peers of the workflow figure: a 5-step chain and a fan-out of 10 + join on Celery (chain,
chord) and Dramatiq (pipeline, group + completion callback).

Two roles in one file, as scripts/bench_peers.py:

- the task module the peers' worker CLIs import (`celery -A bench_workflow_peers worker ...`,
  `dramatiq bench_workflow_peers ...`), chosen by env BENCH_WF_PEER=celery|dramatiq, broker env
  BENCH_REDIS_URL. One no-op task `step(run, step, notify)` records `<run> <step> <start µs>
  <end µs>` with one RPUSH to `bench:wf:steps` (and the run to `notify` when given, the last step),
  exactly as our step worker (scripts/bench_workflow_worker.py) does;
- the runner the driver starts in its own process (bench venv, DESIGN.md §4.7):

    python scripts/bench_workflow_peers.py --peer celery --runs N --idle-runs M --clients C --redis-url URL

  It starts the peer's workers, warms them up, and for each shape runs M runs one at a time (idle)
  then N runs from C clients, each client waiting for its run's last step before starting the next
  (closed loop, bench_workflows.closed_loop); prints one JSON object with the raw records.

Both peers keep each step's result, as our engine keeps each step's output in the run: Celery with
its Redis result backend (a chord needs it), Dramatiq with its Results middleware (Redis). Dramatiq's
group callback needs its GroupCallbacks middleware (a Redis barrier); its pipeline does not pass
results on (`pipe_ignore`), nor does Celery's chain (immutable signatures). Worker shapes as in the
job-path bench: Celery prefork, concurrency 2; Dramatiq 2 processes x 4 threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = os.environ.get("BENCH_WF_PEER", "")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
RECORDS_KEY = "bench:wf:steps"
QUEUE = "bench-wf"
CHAIN = ("a", "b", "c", "d", "e")
FAN = 10

def record(run: str, step: str, started: int, notify: str) -> None:
    import bench_peers  # its per-process client on the broker's Redis (BENCH_REDIS_URL)

    ended = time.time_ns() // 1000
    pipe = bench_peers.redis_client().pipeline(transaction=False)
    pipe.rpush(RECORDS_KEY, f"{run} {step} {started} {ended}")
    if notify:
        pipe.rpush(notify, run)
    pipe.execute()


# ---- the task modules (imported by the workers) -----------------------------------------------

if PEER == "celery":
    from celery import Celery, chain, chord, group

    app = Celery("bench_workflow_peers", broker=REDIS_URL, backend=REDIS_URL)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )

    @app.task(name="wf.step")
    def step(run: str, name: str, notify: str = "") -> str:
        record(run, name, time.time_ns() // 1000, notify)
        return name

    @app.task(name="wf.join")
    def join(results: list, run: str, name: str, notify: str = "") -> str:
        record(run, name, time.time_ns() // 1000, notify)
        return name

    def submit_chain(run: str, notify: str) -> None:
        chain(*[step.si(run, name, notify if name == CHAIN[-1] else "") for name in CHAIN]).apply_async()

    def submit_fanout(run: str, notify: str) -> None:
        chord(group(step.si(run, f"fan[{i}]") for i in range(FAN)), join.s(run, "join", notify)).apply_async()

elif PEER == "dramatiq":
    import dramatiq
    from dramatiq import group, pipeline
    from dramatiq.brokers.redis import RedisBroker
    from dramatiq.middleware import GroupCallbacks
    from dramatiq.rate_limits.backends import RedisBackend as BarrierBackend
    from dramatiq.results import Results
    from dramatiq.results.backends import RedisBackend as ResultsBackend

    broker = RedisBroker(url=REDIS_URL)
    broker.add_middleware(Results(backend=ResultsBackend(url=REDIS_URL)))
    broker.add_middleware(GroupCallbacks(BarrierBackend(url=REDIS_URL)))
    dramatiq.set_broker(broker)

    @dramatiq.actor(queue_name=QUEUE, max_retries=0, store_results=True)
    def step(run: str, name: str, notify: str = "") -> str:
        record(run, name, time.time_ns() // 1000, notify)
        return name

    def submit_chain(run: str, notify: str) -> None:
        pipeline(step.message_with_options(args=(run, name, notify if name == CHAIN[-1] else ""), pipe_ignore=True)
                 for name in CHAIN).run()

    def submit_fanout(run: str, notify: str) -> None:
        fan = group(step.message(run, f"fan[{i}]") for i in range(FAN))
        fan.add_completion_callback(step.message(run, "join", notify))
        fan.run()


# ---- the runner -----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    import importlib

    import redis

    sys.path.insert(0, str(HERE))
    os.environ["BENCH_WF_PEER"] = args.peer
    os.environ["BENCH_REDIS_URL"] = args.redis_url
    global REDIS_URL
    REDIS_URL = args.redis_url
    module = importlib.import_module("bench_workflow_peers")  # the task module, as the workers import it
    import bench_peers
    import bench_workflows as wf

    client = redis.Redis.from_url(args.redis_url, decode_responses=True)
    client.delete(RECORDS_KEY)
    argv = bench_peers.worker_argv(args.peer, sys.executable, args.procs, args.threads, module="bench_workflow_peers",
                                   queue=QUEUE)
    proc = bench_peers.start_workers(argv, args.log)
    submitters = {"chain5": module.submit_chain, "fanout10": module.submit_fanout}
    out: dict = {"peer": args.peer, "worker": " ".join([args.peer] + argv[1:]), "shapes": {}}
    try:
        def opener(submit):
            def open_client(k: int):
                def send(tag: str, notify: str) -> str:
                    submit(tag, notify)
                    return tag
                return send
            return open_client

        for shape, submit in submitters.items():
            # Warm-up: the workers are up, connected and have imported everything.
            warm = wf.closed_loop(3, 1, opener(submit), args.redis_url, 120, prefix=f"{args.peer}-{shape}-warm")
            if warm["timeouts"] or warm["errors"]:
                raise RuntimeError(f"{args.peer} {shape}: warm-up runs did not finish: {warm['error_samples']}")
            phases = {}
            for phase, runs, clients in (("idle", args.idle_runs, 1), ("load", args.runs, args.clients)):
                if runs <= 0:
                    continue
                client.delete(RECORDS_KEY)
                stats0 = bench_peers.commandstats(client)
                cpu0 = (bench_peers.tree_cpu(proc.pid), bench_peers.pid_cpu(args.redis_pid) if args.redis_pid else 0.0)
                loop = wf.closed_loop(runs, clients, opener(submit), args.redis_url, args.timeout,
                                      prefix=f"{args.peer}-{shape}-{phase}")
                time.sleep(0.05)  # a step recorded after its run's last one (none expected) still counts
                cpu1 = (bench_peers.tree_cpu(proc.pid), bench_peers.pid_cpu(args.redis_pid) if args.redis_pid else 0.0)
                stats1 = bench_peers.commandstats(client)
                phases[phase] = {**loop, "records": client.lrange(RECORDS_KEY, 0, -1),
                                 "cpu_seconds": {"workers": cpu1[0] - cpu0[0], "redis": cpu1[1] - cpu0[1]},
                                 "commandstats_before": stats0, "commandstats_after": stats1}
            out["shapes"][shape] = phases
    finally:
        bench_peers.stop_workers(proc)
    return out


def main(argv: list[str] | None = None) -> int:
    import bench_peers

    parser = bench_peers.runner_parser(__doc__.split("\n\n")[0], 60)  # --timeout: s a client waits for a run
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--idle-runs", type=int, default=20)
    args = parser.parse_args(argv)
    json.dump(run(args), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
