"""The workflow figure of scripts/bench (issue 9): runs/s and step-to-step overhead of a 5-step chain
and a fan-out of 10 + join, ours side by side with Celery (chain, chord) and Dramatiq (pipeline,
group + completion callback), in one run.

    scripts/bench --workflows-only [--wf-runs 100] [--wf-idle-runs 20] [--wf-clients 8] [--json]

Runs in the bench venv as part of scripts/bench_driver.py (never imports `cordum`).

The workload, the same on every system:
  - chain5: steps a→b→c→d→e; fanout10: 10 parallel steps fan[0..9], then `join` once all ended.
    Every step is a no-op that records when it started and ended, as the work saw it (one RPUSH
    of `<run> <step> <start µs> <end µs>`); the last step also pushes the run id to the key its
    client waits on. Ours: a `for_each` over 10 items and worker steps on topic job.default, run by
    scripts/bench_workflow_worker.py; peers: scripts/bench_workflow_peers.py.
  - idle: M runs one at a time; load: N runs from C clients, each client starting its next run when
    its last one's final step ended (C runs in flight, closed loop). Ours: runs are started through
    the gateway (POST /api/v1/workflows/{id}/runs, keep-alive connections); the definitions are
    created through POST /api/v1/workflows.

Figures per system, shape and phase:
  - runs/s = complete runs / (first submit → last run done); steps/s likewise. A run is done when
    the system says so: ours, the run document's `completed_at` (the engine applied the last
    result); peers, the end of the last step (nothing of theirs comes later that a caller waits for).
  - step-to-step overhead ("gap") = the next step's start − the previous step's end, as the workers
    recorded them: chain5 has 4 per run; fanout10 has one, the last of the 10 to end → join's start
    (the fan-in). The budget (DESIGN.md §8, issue 9): p50 ≤ 10 ms idle, ours.
  - start = submit → the first step's start; spread (fanout10) = last child start − first child start;
    run = submit → done.
  - CPU ms per step: the serving side (ours: every service process incl. redis, nats and the step
    workers; peers: their worker processes and redis-server), clients not included.
  - Redis commands per step (commandstats, less the clients' own BLPOPs).
  - ours only, where a gap goes (p50 of each part): result→engine (previous step's end → the engine
    applied its result: run doc `steps.<prev>.completed_at`), engine (→ the next step's job record
    created: its PENDING event), scheduler (→ DISPATCHED event: submit consumed, policy checked,
    dispatch recorded), to worker (→ the next step's start: delivery and context read).
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_driver as jb  # noqa: E402  (the job-path bench: stats, table, topology, processes)

ROOT = Path(__file__).resolve().parents[1]
RECORDS_KEY = "bench:wf:steps"
CHAIN = ("a", "b", "c", "d", "e")
FAN = tuple(f"fan[{i}]" for i in range(10))
JOIN = "join"
SHAPES: dict[str, tuple[str, ...]] = {"chain5": CHAIN, "fanout10": FAN + (JOIN,)}
BUDGET_GAP_P50_MS = 10.0
SEGMENTS = ("result→engine", "engine", "scheduler", "to worker")
WORKFLOW_IDS = {"chain5": "bench-chain5", "fanout10": "bench-fanout10"}


# ==== pure report math (tests/unit/test_bench_report.py) =========================================


def definitions() -> dict[str, dict[str, Any]]:
    """Our definitions of the two shapes. Every step has its own input (a step without one gets
    the run input, `notify` included); only the last step has `notify`."""
    chain: dict[str, Any] = {}
    for k, name in enumerate(CHAIN):
        step: dict[str, Any] = {"type": "worker", "topic": "job.default", "input": {"step": name}}
        if k:
            step["depends_on"] = [CHAIN[k - 1]]
        if name == CHAIN[-1]:
            step["input"]["notify"] = "${input.notify}"
        chain[name] = step
    fan = {
        "fan": {"type": "worker", "topic": "job.default", "for_each": "input.items", "max_parallel": len(FAN),
                "input": {"item": "${item}"}},
        JOIN: {"type": "worker", "topic": "job.default", "depends_on": ["fan"],
               "input": {"step": JOIN, "notify": "${input.notify}"}},
    }
    return {"chain5": {"id": WORKFLOW_IDS["chain5"], "name": "bench: 5-step chain", "steps": chain},
            "fanout10": {"id": WORKFLOW_IDS["fanout10"], "name": "bench: fan-out of 10 + join", "steps": fan}}


def run_input(shape: str, notify: str) -> dict[str, Any]:
    return {"notify": notify, "items": list(range(len(FAN)))} if shape == "fanout10" else {"notify": notify}


def parse_records(lines: Iterable[str]) -> tuple[dict[str, dict[str, tuple[int, int]]], int]:
    """`<run> <step> <start µs> <end µs>` lines → {run: {step: (start, end)}} keeping a step's first
    record, and how many records repeated a step already seen (a step executed twice)."""
    spans: dict[str, dict[str, tuple[int, int]]] = {}
    repeats = 0
    for line in lines:
        parts = line.split()
        if len(parts) != 4:
            continue
        run, step, start, end = parts
        try:
            span = (int(start), int(end))
        except ValueError:
            continue
        steps = spans.setdefault(run, {})
        if step in steps:
            repeats += 1
        else:
            steps[step] = span
    return spans, repeats


def gap_pairs(shape: str, steps: Mapping[str, tuple[int, int]]) -> list[tuple[str, str]]:
    """(previous, next) step pairs whose gap counts: chain5 each consecutive pair present;
    fanout10 (the last child to end, join) once all 10 children and join ran."""
    if shape == "chain5":
        return [(p, n) for p, n in zip(CHAIN, CHAIN[1:]) if p in steps and n in steps]
    if JOIN in steps and all(c in steps for c in FAN):
        return [(max(FAN, key=lambda c: steps[c][1]), JOIN)]
    return []


def run_figures(shape: str, runs: Sequence[Mapping[str, Any]], spans: Mapping[str, Mapping[str, tuple[int, int]]],
                done_us: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """Latency lists (ms) and the span of one phase. `runs`: {"run", "submit_us"} per submitted
    run; `spans` from parse_records; `done_us`: when each run was done if the system says so (ours:
    the run document), else the end of its last step. A run is complete when every step of its
    shape ran (and it is done)."""
    expected = SHAPES[shape]
    out: dict[str, Any] = {"run_ms": [], "start_ms": [], "gap_ms": [], "spread_ms": [], "complete": 0,
                           "incomplete": 0, "first_submit_us": None, "last_done_us": None}
    for run in runs:
        submit = run["submit_us"]
        out["first_submit_us"] = submit if out["first_submit_us"] is None else min(out["first_submit_us"], submit)
        steps = spans.get(run["run"], {})
        if done_us is not None:
            done = done_us.get(run["run"])
        else:
            done = steps[expected[-1]][1] if expected[-1] in steps else None
        if done is None or not all(s in steps for s in expected):
            out["incomplete"] += 1
            continue
        out["complete"] += 1
        out["last_done_us"] = done if out["last_done_us"] is None else max(out["last_done_us"], done)
        out["run_ms"].append((done - submit) / 1000.0)
        out["start_ms"].append((min(s for s, _ in steps.values()) - submit) / 1000.0)
        out["gap_ms"] += [(steps[n][0] - steps[p][1]) / 1000.0 for p, n in gap_pairs(shape, steps)]
        if shape == "fanout10":
            starts = [steps[c][0] for c in FAN]
            out["spread_ms"].append((max(starts) - min(starts)) / 1000.0)
    return out


def phase_figures(shape: str, fig: Mapping[str, Any]) -> dict[str, Any]:
    """The reported figures of one phase from run_figures' lists."""
    complete = fig["complete"]
    span = None
    if fig["first_submit_us"] is not None and fig["last_done_us"] is not None:
        span = (fig["first_submit_us"] / 1e6, fig["last_done_us"] / 1e6)
    runs_per_s = jb.throughput(complete, *span) if span and complete else None
    out = {"complete": complete, "incomplete": fig["incomplete"], "runs_per_s": runs_per_s,
           "steps_per_s": runs_per_s * len(SHAPES[shape]) if runs_per_s else None,
           "wall_seconds": span[1] - span[0] if span else None,
           "run_ms": jb.summarize(fig["run_ms"]), "start_ms": jb.summarize(fig["start_ms"]),
           "gap_ms": jb.summarize(fig["gap_ms"])}
    if shape == "fanout10":
        out["spread_ms"] = jb.summarize(fig["spread_ms"])
    return out


def gap_breakdown(shape: str, spans: Mapping[str, Mapping[str, tuple[int, int]]],
                  docs: Mapping[str, Mapping[str, Any]], events: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """Where each of our gaps went (ms per part, SEGMENTS): `docs` run id → run document (unix s),
    `events` job id → job_timeline (µs: `submit` = PENDING, `dispatch` = DISPATCHED). A pair with a
    time missing is left out."""
    out: dict[str, list[float]] = {name: [] for name in SEGMENTS}
    for run, steps in spans.items():
        doc_steps = (docs.get(run) or {}).get("steps") or {}
        for prev, nxt in gap_pairs(shape, steps):
            # the engine moves on after the LAST result it applied of the steps `nxt` waits for
            waited = FAN if shape == "fanout10" else (prev,)
            applied = max(((doc_steps.get(s) or {}).get("completed_at") for s in waited),
                          key=lambda t: t if isinstance(t, (int, float)) else float("-inf"))
            timeline = events.get((doc_steps.get(nxt) or {}).get("job_id", "")) or {}
            created, dispatched = timeline.get("submit"), timeline.get("dispatch")
            if not isinstance(applied, (int, float)) or created is None or dispatched is None:
                continue
            marks = [steps[prev][1], applied * 1e6, created, dispatched, steps[nxt][0]]
            for name, a, b in zip(SEGMENTS, marks, marks[1:]):
                out[name].append((b - a) / 1000.0)
    return out


def budget(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue-9 budget on ours: step-to-step overhead p50 ≤ 10 ms idle (chain5; fanout10's
    fan-in shown beside it)."""
    ours = (systems.get("cordum") or {}).get("shapes") or {}
    chain = (((ours.get("chain5") or {}).get("idle") or {}).get("gap_ms") or {}).get("p50")
    fan = (((ours.get("fanout10") or {}).get("idle") or {}).get("gap_ms") or {}).get("p50")
    return {"gap_p50_ms_max": BUDGET_GAP_P50_MS, "chain5_idle_gap_p50_ms": chain, "fanout10_idle_gap_p50_ms": fan,
            "met": None if chain is None else chain <= BUDGET_GAP_P50_MS}


def ratios(systems: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Ours / each peer's runs/s under load, per shape (`<shape>/<peer>`; > 1 = ours faster)."""
    ours = (systems.get("cordum") or {}).get("shapes") or {}
    out = {}
    for peer, result in systems.items():
        if peer == "cordum" or "error" in result:
            continue
        for shape, phases in (result.get("shapes") or {}).items():
            theirs = (phases.get("load") or {}).get("runs_per_s")
            out[f"{shape}/{peer}"] = jb.ratio(((ours.get(shape) or {}).get("load") or {}).get("runs_per_s"), theirs)
    return out


def report_lines(wf: Mapping[str, Any]) -> list[str]:
    """The workflow section of the text report."""
    s = wf["settings"]
    out = ["", f"workflows: chain5 = a→b→c→d→e, fanout10 = 10 parallel steps + join; load = {s['runs']} runs from "
           f"{s['clients']} clients (each waits for its run: {s['clients']} in flight), idle = {s['idle_runs']} runs "
           "one at a time"]
    rows = []
    for system, result in wf["systems"].items():
        if "error" in result:
            rows.append([system, "error: " + str(result["error"])[:70]] + [""] * 10)
            continue
        for shape, phases in result["shapes"].items():
            load, idle = phases.get("load") or {}, phases.get("idle") or {}
            rows.append([system, shape, load.get("runs_per_s"), load.get("steps_per_s"),
                         _p(load, "run_ms", "p50"), _p(load, "run_ms", "p99"), _p(load, "gap_ms", "p50"),
                         _p(load, "gap_ms", "p99"), load.get("cpu_ms_per_step"), _p(idle, "run_ms", "p50"),
                         _p(idle, "gap_ms", "p50"), _p(idle, "gap_ms", "p95")])
    out.append(jb.table(["system", "shape", "runs/s", "steps/s", "run p50", "run p99", "gap p50", "gap p99",
                         "CPU ms/step", "idle run p50", "idle gap p50", "idle gap p95"], rows))
    out.append("  (ms; gap = step-to-step overhead: a step's end → the next step's start as the workers saw them; "
               "fanout10: the last child's end → join's start; CPU = serving side)")
    for system, result in wf["systems"].items():
        for shape, phases in (result.get("shapes") or {}).items():
            for phase in ("idle", "load"):
                f = phases.get(phase)
                if not f:
                    continue
                extra = ""
                if f.get("spread_ms"):
                    extra = f", children start spread p50 {jb.fmt(_p(f, 'spread_ms', 'p50'), 2)}"
                parts = ", ".join(f"{k} {jb.fmt(v.get('p50'), 2)}" for k, v in (f.get("breakdown_ms") or {}).items())
                out.append(f"  {system} {shape} {phase}: {f['complete']} runs complete ({f.get('incomplete', 0)} not, "
                           f"{f.get('timeouts', 0)} client timeouts, {f.get('submit_errors', 0)} submit errors, "
                           f"{f.get('repeated_steps', 0)} steps run twice); submit→first step p50 "
                           f"{jb.fmt(_p(f, 'start_ms', 'p50'), 2)}{extra}" + (f"; gap parts p50: {parts}" if parts else ""))
                if phase == "load" and f.get("redis_commands_per_step") is not None:
                    top = ", ".join(f"{k} {v:.1f}" for k, v in (f.get("redis_by_command_per_step") or {}).items())
                    out.append(f"    Redis {jb.fmt(f['redis_commands_per_step'])} commands/step (commandstats, "
                               f"inside Lua included): {top}")
    if wf.get("ratios"):
        out.append("  ratios ours/peer (runs/s under load; >1 = ours faster): " + "; ".join(
            f"{k.replace('/', ' vs ')} {jb.fmt(v, 3)}" for k, v in wf["ratios"].items()))
    b = wf.get("budget") or {}
    if b.get("chain5_idle_gap_p50_ms") is not None:
        verdict = "met" if b["met"] else "NOT met"
        out.append(f"budget: step-to-step overhead p50 ≤ {b['gap_p50_ms_max']:g} ms idle: cordum chain5 "
                   f"{jb.fmt(b['chain5_idle_gap_p50_ms'], 2)} ms ({verdict}); fanout10 fan-in "
                   f"{jb.fmt(b['fanout10_idle_gap_p50_ms'], 2)} ms")
    for system, result in wf["systems"].items():
        if result.get("worker"):
            out.append(f"  {system}: {result['worker']}")
    out.append(f"workflow figure time {wf.get('seconds', 0):.0f} s")
    return out


def _p(figures: Mapping[str, Any], name: str, q: str) -> float | None:
    return (figures.get(name) or {}).get(q)


# ==== clients ====================================================================================


def closed_loop(runs: int, clients: int, open_client: Callable[[int], Callable[[str, str], str]], redis_url: str,
                timeout: float, *, prefix: str) -> dict[str, Any]:
    """Start `runs` runs from `clients` threads, each starting its next run once the last step of
    its previous one pushed the run id to the thread's own key (BLPOP, up to `timeout` s).
    `open_client(k)` gives thread k its `send(tag, notify_key) -> run id`. Returns per run
    {"run", "submit_us"} (client clock before the send), and errors, timeouts and BLPOP calls."""
    import redis

    lock = threading.Lock()
    todo = iter(range(runs))
    state: dict[str, Any] = {"runs": [], "clients": clients, "errors": 0, "error_samples": [], "timeouts": 0,
                             "blpops": 0}

    def client(k: int) -> None:
        send = open_client(k)
        conn = redis.Redis.from_url(redis_url, decode_responses=True)
        notify = f"bench:wf:done:{prefix}:{k}"
        conn.delete(notify)
        mine, blpops, timeouts = [], 0, 0
        try:
            while True:
                with lock:
                    idx = next(todo, None)
                if idx is None:
                    return
                submit_us = time.time_ns() // 1000
                try:
                    run_id = send(f"{prefix}-{idx}", notify)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        state["errors"] += 1
                        if len(state["error_samples"]) < 5:
                            state["error_samples"].append(repr(exc)[:300])
                    continue
                mine.append({"run": run_id, "submit_us": submit_us})
                deadline = time.monotonic() + timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        timeouts += 1
                        break
                    blpops += 1
                    got = conn.blpop([notify], timeout=min(left, 5.0))
                    if got is not None and got[1] == run_id:
                        break
        finally:
            conn.close()
            with lock:
                state["runs"] += mine
                state["blpops"] += blpops + 1  # and the DEL
                state["timeouts"] += timeouts

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return state


def gateway_sender(gateway: str, api_key: str, workflow_id: str, shape: str) -> Callable[[int], Callable[[str, str], str]]:
    """open_client for ours: a keep-alive connection per client; POST the run, retrying a refused
    start (409 busy, 429, 5xx) a few times."""
    port = urlsplit(gateway).port or 80
    headers = {"X-API-Key": api_key, "Content-Type": "application/json"}

    def open_client(k: int) -> Callable[[str, str], str]:
        conn = [http.client.HTTPConnection("127.0.0.1", port, timeout=30)]

        def send(tag: str, notify: str) -> str:
            body = json.dumps(run_input(shape, notify)).encode()
            last = ""
            for attempt in range(5):
                try:
                    conn[0].request("POST", f"/api/v1/workflows/{workflow_id}/runs", body=body, headers=headers)
                    response = conn[0].getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException) as exc:
                    conn[0].close()
                    conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    last = repr(exc)
                    continue
                if response.status in (200, 201, 202):
                    return json.loads(payload)["run_id"]
                last = f"HTTP {response.status}: {payload[:200]!r}"
                time.sleep(0.05 * (attempt + 1))
            raise RuntimeError(f"starting a run failed: {last}")

        return send

    return open_client


def http_post_json(gateway: str, api_key: str, path: str, doc: Any) -> tuple[int, Any]:
    parts = urlsplit(gateway)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(doc).encode(),
                     headers={"X-API-Key": api_key, "Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        try:
            return response.status, json.loads(body)
        except ValueError:
            return response.status, body.decode(errors="replace")
    finally:
        conn.close()


# ==== ours ========================================================================================


class StepWorkers:
    """The step workers (scripts/bench_workflow_worker.py) of our topology, started by the bench."""

    def __init__(self, topo: jb.Topology, count: int) -> None:
        self.topo = topo
        self.count = count
        self.procs: list[subprocess.Popen] = []
        self.ids = [f"bench-worker-{i}" for i in range(1, count + 1)]

    def start(self) -> None:
        args = self.topo.args
        logs = self.topo.dir / "logs"
        logs.mkdir(exist_ok=True)
        for worker_id in self.ids:
            env = {**self.topo.env, "REDIS_URL": self.topo.state["redis_url"], "NATS_URL": self.topo.state["nats_url"],
                   "CORDUM_ENV": "dev", "CORDUM_INSTANCE_ID": worker_id, "WORKER_ID": worker_id}
            sink = (logs / f"{worker_id}.log").open("ab")
            self.procs.append(subprocess.Popen(
                [args.project_python, str(ROOT / "scripts" / "bench_workflow_worker.py")], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True))
        gateway = self.topo.state["gateways"][0]
        deadline = time.monotonic() + 60
        while True:
            items = (jb.http_json(gateway + "/api/v1/workers", self.topo.api_key) or {}).get("items") or []
            if set(self.ids) <= {w.get("worker_id") for w in items}:
                return
            if any(p.poll() is not None for p in self.procs) or time.monotonic() > deadline:
                raise RuntimeError(f"the bench step workers did not show in {gateway}/api/v1/workers "
                                   f"(logs in {logs}, use --keep)")
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs:
            jb.stop_process(proc, timeout=20)


def cpu_seconds(pids: Iterable[int]) -> float:
    return sum((jb.proc_sample(pid) or {}).get("cpu_s", 0.0) for pid in pids)


def read_docs(client, run_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    pipe = client.pipeline(transaction=False)
    for run_id in run_ids:
        pipe.hget(f"wf:run:{run_id}", "doc")
    docs = {}
    for run_id, raw in zip(run_ids, pipe.execute()):
        if raw:
            docs[run_id] = json.loads(raw)
    return docs


def wait_docs(client, run_ids: Sequence[str], timeout: float) -> dict[str, dict[str, Any]]:
    """The run documents, once every run is terminal (or after `timeout` s without progress)."""
    terminal = {"succeeded", "failed", "denied", "cancelled", "timed_out"}
    last, since = -1, time.monotonic()
    while True:
        docs = read_docs(client, run_ids)
        done = sum(1 for d in docs.values() if d.get("status") in terminal)
        if done == len(run_ids):
            return docs
        if done != last:
            last, since = done, time.monotonic()
        elif time.monotonic() - since > timeout:
            return docs
        time.sleep(0.05)


def ours_phase(args: argparse.Namespace, topo: jb.Topology, workers: StepWorkers, client, shape: str, runs: int,
               clients: int, prefix: str) -> dict[str, Any]:
    """One phase of ours: the closed loop, then the run documents, step records and job events."""
    pids = [r["pid"] for r in topo.services] + [p.pid for p in workers.procs]
    senders = [gateway_sender(g, topo.api_key, WORKFLOW_IDS[shape], shape) for g in topo.state["gateways"]]

    def sender(k: int) -> Callable[[str, str], str]:  # the clients spread over the gateways
        return senders[k % len(senders)](k)

    client.delete(RECORDS_KEY)
    stats0, cpu0 = jb.commandstats(client), cpu_seconds(pids)
    loop = closed_loop(runs, clients, sender, topo.state["redis_url"], args.stall_timeout, prefix=prefix)
    ids = [r["run"] for r in loop["runs"]]
    docs = wait_docs(client, ids, args.stall_timeout)
    cpu1, stats1 = cpu_seconds(pids), jb.commandstats(client)
    spans, repeats = parse_records(x.decode() for x in client.lrange(RECORDS_KEY, 0, -1))
    done = {run_id: _us(doc.get("completed_at")) for run_id, doc in docs.items() if doc.get("status") == "succeeded"}
    fig = run_figures(shape, loop["runs"], spans, done)
    out = phase_figures(shape, fig)
    job_ids = [s["job_id"] for d in docs.values() for s in (d.get("steps") or {}).values() if s.get("job_id")]
    events = dict(zip(job_ids, jb.read_timelines(client, job_ids)))
    out["breakdown_ms"] = {k: jb.summarize(v) for k, v in gap_breakdown(shape, spans, docs, events).items()}
    statuses: dict[str, int] = {}
    for doc in docs.values():
        statuses[doc.get("status", "?")] = statuses.get(doc.get("status", "?"), 0) + 1
    return _finish(out, loop, repeats, runs, clients, cpu1 - cpu0,
                   jb.commands_delta(stats0, stats1, {"blpop": loop["blpops"]}), shape, statuses=statuses)


def _finish(out: dict[str, Any], loop: Mapping[str, Any], repeats: int, runs: int, clients: int, cpu_s: float,
            delta: Mapping[str, Mapping[str, float]], shape: str, **extra: Any) -> dict[str, Any]:
    steps = out["complete"] * len(SHAPES[shape])
    redis = jb.redis_per_job(delta, steps) if steps else {}
    out.update({"runs": runs, "clients": clients, "submit_errors": loop["errors"],
                "submit_error_samples": loop["error_samples"], "timeouts": loop["timeouts"],
                "repeated_steps": repeats, "cpu_ms_per_step": jb.per_job(cpu_s * 1000, steps),
                "redis_commands_per_step": redis.get("commands_per_job"),
                "redis_by_command_per_step": dict(list((redis.get("by_command_per_job") or {}).items())[:8]),
                **extra})
    return out


def _us(seconds: Any) -> int | None:
    return int(seconds * 1e6) if isinstance(seconds, (int, float)) else None


def run_ours(args: argparse.Namespace, replicas: int) -> dict[str, Any]:
    import redis

    topo_args = argparse.Namespace(**{**vars(args), "workers": 0})  # the bench's own step workers instead
    topo = jb.Topology(topo_args, replicas)
    jb.say(f"workflows, ours, {replicas} replica(s): starting the topology in {topo.dir}")
    topo.up()
    workers = StepWorkers(topo, max(args.workers, 1))
    try:
        if not any(r["kind"] == "workflow-engine" for r in topo.services):
            raise RuntimeError("the topology has no workflow engine (cordumctl up did not start one)")
        workers.start()
        gateway = topo.state["gateways"][0]
        for shape, doc in definitions().items():
            status, body = http_post_json(gateway, topo.api_key, "/api/v1/workflows", doc)
            if status not in (200, 201):
                raise RuntimeError(f"POST /api/v1/workflows {doc['id']}: HTTP {status}: {str(body)[:300]}")
        client = redis.Redis.from_url(topo.state["redis_url"])
        out: dict[str, Any] = {"replicas": replicas, "worker": f"{len(workers.ids)} step worker(s) "
                               f"(scripts/bench_workflow_worker.py), WORKER_MAX_PARALLEL "
                               f"{args.worker_parallel or 'default'}", "shapes": {}}
        for shape in SHAPES:
            warm = closed_loop(3, 1, gateway_sender(gateway, topo.api_key, WORKFLOW_IDS[shape], shape),
                               topo.state["redis_url"], 60, prefix=f"ours-{shape}-warm")
            if warm["timeouts"] or warm["errors"] or len(warm["runs"]) < 3:
                raise RuntimeError(f"{shape}: warm-up runs did not finish: {warm['error_samples']} "
                                   f"(logs in {topo.dir}/logs, use --keep)")
            phases = out["shapes"][shape] = {}
            for phase, runs, clients in (("idle", args.wf_idle_runs, 1), ("load", args.wf_runs, args.wf_clients)):
                if runs > 0:
                    jb.say(f"workflows, ours: {shape} {phase}: {runs} runs from {clients} client(s)")
                    time.sleep(0.3)
                    phases[phase] = ours_phase(args, topo, workers, client, shape, runs, clients,
                                                   f"ours-{shape}-{phase}")
        return out
    finally:
        workers.stop()
        topo.down()


# ==== peers =======================================================================================


def run_peer(args: argparse.Namespace, peer: str, workdir: Path) -> dict[str, Any]:
    server, port = jb.start_redis(workdir)
    try:
        jb.say(f"workflows, {peer}: {args.wf_idle_runs} idle and {args.wf_runs} runs from {args.wf_clients} clients "
               "per shape")
        argv = [sys.executable, str(ROOT / "scripts" / "bench_workflow_peers.py"), "--peer", peer,
                "--runs", str(args.wf_runs), "--idle-runs", str(args.wf_idle_runs), "--clients", str(args.wf_clients),
                "--redis-url", f"redis://127.0.0.1:{port}/0", "--redis-pid", str(server.pid),
                "--timeout", str(args.stall_timeout), "--log", str(workdir / f"wf-{peer}.log")]
        if peer == "dramatiq":
            argv += ["--procs", str(args.dramatiq_processes), "--threads", str(args.dramatiq_threads)]
        else:
            argv += ["--procs", str(args.celery_concurrency)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=4 * args.stall_timeout + 600,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return {"error": (done.stderr or done.stdout)[-1500:]}
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        jb.stop_process(server)
    return peer_figures(raw)


def peer_figures(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a peer from the runner's raw output (bench_workflow_peers.run)."""
    out: dict[str, Any] = {"worker": raw["worker"], "shapes": {}}
    for shape, phases in raw["shapes"].items():
        figures = out["shapes"][shape] = {}
        for phase, p in phases.items():
            spans, repeats = parse_records(p["records"])
            fig = phase_figures(shape, run_figures(shape, p["runs"], spans))
            cpu = p["cpu_seconds"]["workers"] + p["cpu_seconds"]["redis"]
            delta = jb.commands_delta(p["commandstats_before"], p["commandstats_after"], {"blpop": p["blpops"]})
            figures[phase] = _finish(fig, p, repeats, len(p["runs"]) + p["errors"], p["clients"], cpu, delta, shape)
    return out


# ==== the figure ==================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workflow figure (issue 9)")
    group.add_argument("--workflows-only", action="store_true",
                       help="run only the workflow figure (no job-path runs, no ceiling)")
    group.add_argument("--no-workflows", action="store_true", help="skip the workflow figure")
    group.add_argument("--wf-runs", type=int, default=100, help="runs per shape and system under load "
                       "(default %(default)s)")
    group.add_argument("--wf-idle-runs", type=int, default=20, help="runs per shape and system one at a time "
                       "(default %(default)s)")
    group.add_argument("--wf-clients", type=int, default=8, help="runs in flight under load (default %(default)s)")
    group.add_argument("--wf-replicas", type=int, default=1, help="replicas per service of ours (default %(default)s)")


def run_figure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The whole workflow figure: ours, then each peer (unless --no-peers)."""
    started = time.monotonic()
    systems: dict[str, Any] = {}
    try:
        systems["cordum"] = run_ours(args, args.wf_replicas)
    except Exception as exc:  # noqa: BLE001 - reported, the rest of the run goes on
        jb.say(f"workflows, ours failed: {exc!r}")
        systems["cordum"] = {"error": repr(exc)}
    if not args.no_peers:
        for peer in [p.strip() for p in args.peers.split(",") if p.strip()]:
            try:
                systems[peer] = run_peer(args, peer, workdir)
            except Exception as exc:  # noqa: BLE001
                systems[peer] = {"error": repr(exc)}
    return {"settings": {"runs": args.wf_runs, "idle_runs": args.wf_idle_runs, "clients": args.wf_clients,
                         "replicas": args.wf_replicas, "shapes": {k: list(v) for k, v in SHAPES.items()}},
            "systems": systems, "ratios": ratios(systems), "budget": budget(systems),
            "seconds": time.monotonic() - started}
