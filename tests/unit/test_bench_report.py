"""The pure report math of the job-path benchmark (scripts/bench_driver.py): percentiles, per-job
timelines and latencies, throughput, ratios, per-job figures, Redis/NATS/proc/py-spy parsing; and of
its workflow figure (scripts/bench_workflows.py): definitions, step records, gaps and their parts,
the budget, the report, and the closed-loop clients (against the session's redis-server)."""

from __future__ import annotations

import importlib.util
import threading
import time
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "scripts" / "bench_driver.py"
_spec = importlib.util.spec_from_file_location("bench_driver", PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # imports only the standard library at module level


def test_percentile_interpolates_between_ranks_like_numpy() -> None:
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert bench.percentile(values, 50) == pytest.approx(5.5)
    assert bench.percentile(values, 0) == 1
    assert bench.percentile(values, 100) == 10
    assert bench.percentile(values, 95) == pytest.approx(9.55)
    assert bench.percentile(values, 99) == pytest.approx(9.91)
    assert bench.percentile(list(reversed(values)), 50) == pytest.approx(5.5)  # order does not matter
    assert bench.percentile([7.0], 99) == 7.0
    assert bench.percentile([], 50) is None


def test_summarize() -> None:
    out = bench.summarize([10.0, 20.0, 30.0, 40.0])
    assert out["n"] == 4
    assert out["p50"] == pytest.approx(25.0)
    assert out["mean"] == pytest.approx(25.0)
    assert out["max"] == 40.0
    assert bench.summarize([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "mean": None, "max": None}


def test_job_timeline_takes_first_pending_dispatched_and_terminal_event() -> None:
    events = [
        {"ts": 1_000, "state": "PENDING"},
        {"ts": 1_500, "state": "SCHEDULED"},
        {"ts": 2_000, "state": "DISPATCHED"},
        {"ts": 2_500, "state": "RETRYING"},
        {"ts": 3_000, "state": "DISPATCHED"},  # a redispatch does not move the first dispatch
        {"ts": 4_000, "state": "RUNNING"},
        {"ts": 5_000, "state": "SUCCEEDED"},
        {"ts": "junk", "state": "PENDING"},
    ]
    assert bench.job_timeline(events) == {"submit": 1_000, "dispatch": 2_000, "terminal": 5_000, "state": "SUCCEEDED"}
    assert bench.job_timeline([{"ts": 7, "state": "PENDING"}]) == {
        "submit": 7, "dispatch": None, "terminal": None, "state": None}
    denied = bench.job_timeline([{"ts": 1, "state": "PENDING"}, {"ts": 4, "state": "DENIED"}])
    assert denied["state"] == "DENIED" and denied["terminal"] == 4


def test_job_latencies_in_ms_and_span() -> None:
    timelines = [
        {"submit": 1_000_000, "dispatch": 1_002_000, "terminal": 1_010_000, "state": "SUCCEEDED"},
        {"submit": 1_001_000, "dispatch": 1_005_000, "terminal": 1_030_000, "state": "SUCCEEDED"},
        {"submit": 1_002_000, "dispatch": None, "terminal": None, "state": None},
    ]
    lat = bench.job_latencies(timelines)
    assert lat["submit_to_dispatch_ms"] == [2.0, 4.0]
    assert lat["submit_to_terminal_ms"] == [10.0, 29.0]
    assert lat["first_submit_us"] == 1_000_000
    assert lat["last_terminal_us"] == 1_030_000
    assert lat["states"] == {"SUCCEEDED": 2, "NOT_TERMINAL": 1}


def test_throughput_ratio_and_per_job() -> None:
    assert bench.throughput(2000, 10.0, 11.0) == pytest.approx(2000.0)
    assert bench.throughput(2000, 10.0, 14.0) == pytest.approx(500.0)
    assert bench.throughput(5, 3.0, 3.0) is None
    assert bench.ratio(520.0, 2600.0) == pytest.approx(0.2)
    assert bench.ratio(None, 10.0) is None
    assert bench.ratio(10.0, 0) is None
    assert bench.per_job(3.0, 2000) == pytest.approx(0.0015)
    assert bench.per_job(3.0, 0) is None
    assert bench.per_job(None, 10) is None


def test_proc_parsing() -> None:
    # comm with spaces and parentheses; utime 250, stime 50 ticks; starttime 12345
    stat = ("4242 (python (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 12345 "
            "1000000 5000 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0")
    parsed = bench.parse_proc_stat(stat)
    assert parsed["cpu_s"] == pytest.approx(300 / bench.CLK_TCK)
    assert parsed["start_time"] == 12345
    status = "Name:\tpython\nVmPeak:\t  200000 kB\nVmHWM:\t   61440 kB\nVmRSS:\t   51200 kB\nThreads:\t3\n"
    assert bench.parse_proc_status(status) == {"VmHWM": 61440 * 1024, "VmRSS": 51200 * 1024}


def test_commandstats_delta_subtracts_own_commands_and_ignores_info() -> None:
    text = ("# Commandstats\r\n"
            "cmdstat_get:calls=10,usec=20,usec_per_call=2.00,rejected_calls=0,failed_calls=0\r\n"
            "cmdstat_evalsha:calls=5,usec=100,usec_per_call=20.00\r\n"
            "cmdstat_client|setname:calls=1,usec=1,usec_per_call=1.00\r\n")
    before = bench.parse_commandstats(text)
    assert before["get"]["calls"] == 10 and before["client|setname"]["usec"] == 1
    after = {"get": {"calls": 4010, "usec": 8020}, "evalsha": {"calls": 2005, "usec": 40100},
             "zcard": {"calls": 606, "usec": 600}, "info": {"calls": 3, "usec": 30},
             "client|setname": {"calls": 1, "usec": 1}}
    delta = bench.commands_delta(before, after, own={"zcard": 606})
    assert delta == {"get": {"calls": 4000, "usec": 8000}, "evalsha": {"calls": 2000, "usec": 40000}}
    per = bench.redis_per_job(delta, 2000)
    assert per["commands_per_job"] == pytest.approx(3.0)
    assert per["usec_per_job"] == pytest.approx(24.0)
    assert list(per["by_command_per_job"]) == ["get", "evalsha"]  # largest first
    assert per["by_command_per_job"]["evalsha"] == pytest.approx(1.0)


def test_subject_families() -> None:
    fam = bench.subject_family
    assert fam("sys.job.submit") == "sys.job.submit"
    assert fam("sys.job.submit", "$JS.ACK.CORDUM_SYS.c.1.2.3.4.5") == "deliver sys.job.submit"
    assert fam("sys.job.submit", "_INBOX.abc") == "sys.job.submit"  # a JetStream publish awaiting its ack
    assert fam("worker.worker-1.jobs") == "worker.*.jobs"
    assert fam("job.default") == "job.default"
    assert fam("_INBOX.x7Yz.42") == "_INBOX"
    assert fam("$JS.API.CONSUMER.MSG.NEXT.CORDUM_SYS.dur_x") == "$JS.API.CONSUMER.MSG.NEXT"
    assert fam("$JS.API.STREAM.INFO.CORDUM_JOBS") == "$JS.API.STREAM.INFO.CORDUM_JOBS"
    assert fam("$JS.ACK.CORDUM_SYS.dur_cordum-scheduler__sys_job_submit.1.2.3.4.5") == \
        "$JS.ACK CORDUM_SYS/dur_cordum-scheduler"
    assert fam("$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED.S.C") == "$JS.EVENT.ADVISORY.CONSUMER.MSG_NAKED"


def test_mix_ceiling_weights_each_command_by_its_calls() -> None:
    # 2 SET at 100k/s + 1 EVALSHA at 50k/s = 40 µs per job -> 25,000 jobs/s, 3 commands in 40 µs
    out = bench.mix_ceiling({"set": 2, "evalsha": 1}, {"set": 100_000, "evalsha": 50_000})
    assert out["jobs_per_s"] == pytest.approx(25_000)
    assert out["mix_ops_per_s"] == pytest.approx(75_000)
    # an unmeasured command counts at the fallback's rate
    assert bench.mix_ceiling({"expire": 1}, {"set": 10_000})["jobs_per_s"] == pytest.approx(10_000)
    assert bench.mix_ceiling({}, {"set": 1.0}) == {"mix_ops_per_s": None, "jobs_per_s": None}


def test_parse_pyspy_raw_counts_own_time_at_the_innermost_frame() -> None:
    raw = "\n".join([
        "process 1:\"python\";thread (0x1):\"MainThread\";run (trio/_core/_run.py:2000);"
        "handle (cordum/scheduler/engine.py:120);write (asyncio/selector_events.py:1070) 6",
        "run (trio/_core/_run.py:2000);handle (cordum/scheduler/engine.py:130) 3",
        "run (trio/_core/_run.py:2001) 1",
        "garbage line",
    ])
    top = bench.parse_pyspy_raw(raw, top=2)
    assert [t["function"] for t in top] == ["write (asyncio/selector_events.py)", "handle (scheduler/engine.py)"]
    assert top[0]["own_samples"] == 6 and top[0]["own_pct"] == pytest.approx(60.0)
    assert top[1]["own_pct"] == pytest.approx(30.0)
    assert top[1]["total_pct"] == pytest.approx(90.0)  # lines 120 and 130 are one function


def test_scrape_histogram_sums_label_sets() -> None:
    text = ("# HELP x\n"
            'cordum_scheduler_dispatch_latency_seconds_bucket{le="0.001"} 1.0\n'
            'cordum_scheduler_dispatch_latency_seconds_count{topic="a"} 3.0\n'
            'cordum_scheduler_dispatch_latency_seconds_sum{topic="a"} 0.5\n'
            'cordum_scheduler_dispatch_latency_seconds_count{topic="b"} 1.0\n'
            'cordum_scheduler_dispatch_latency_seconds_sum{topic="b"} 0.25\n')
    assert bench.scrape_histogram(text, "cordum_scheduler_dispatch_latency_seconds") == (0.75, 4.0)


def test_table_and_fmt() -> None:
    assert bench.fmt(None) == "-"
    assert bench.fmt(1234.5) == "1,234"
    assert bench.fmt(1.234) == "1.2"
    assert bench.fmt(1.234, 2) == "1.23"
    text = bench.table(["system", "jobs/s"], [["cordum", 73.1], ["dramatiq", 1813.0]])
    lines = text.splitlines()
    assert lines[0].split() == ["system", "jobs/s"]
    assert lines[2].split() == ["cordum", "73.1"] and lines[3].split() == ["dramatiq", "1,813"]
    assert len({len(line) for line in lines}) == 1  # aligned


def test_report_text_renders_a_minimal_run() -> None:
    summary = bench.summarize([1.0, 2.0])
    data = {
        "machine": {"date": "d", "nproc": 2, "cpu_model": "cpu", "memory_bytes": 2**30, "kernel": "k",
                    "python": "3.11", "redis": "7", "loadavg_at_start": (0.1, 0, 0)},
        "jobs": 2, "clients": 1, "bench_seconds": 1.0, "ratios": {"r=1 vs celery": 0.5},
        "ours": [{"replicas": 1, "workers": 1, "submitted": 2, "wall_seconds": 1.0, "jobs_per_s": 2.0,
                  "submit_rate_per_s": 4.0, "http_submit_ms": summary, "states": {"SUCCEEDED": 2},
                  "submit_errors": 0, "submit_to_dispatch_ms": summary, "submit_to_terminal_ms": summary,
                  "cpu_ms_per_job_all": 3.0,
                  "per_replica": {"scheduler-1": {"kind": "scheduler", "cpu_ms_per_job": 2.0, "cpu_utilisation": 0.5,
                                                  "peak_rss_mb": 60.0, "log_lines_per_job": 0.0}},
                  "per_kind": {"scheduler": {"cpu_ms_per_job": 2.0}},
                  "redis": {"commands_per_job": 10.0, "usec_per_job": 5.0, "commands_per_s": 20.0,
                            "by_command_per_job": {"evalsha": 3.0}},
                  "nats": {"jetstream_stored_per_job": {"CORDUM_SYS": 2.0}, "messages_per_job": 14.0,
                           "by_family_per_job": {"sys.job.submit": 1.0}}}],
        "peers": [{"peer": "celery", "worker": "celery ...", "jobs_per_s": 4.0, "enqueue_to_done_ms": summary,
                   "cpu_ms_per_job": {"workers": 1.0, "redis": 0.1, "producers": 0.5},
                   "redis": {"commands_per_job": 11.0}}],
        "ceiling": {},
    }
    text = bench.report_text(data)
    assert "cordum r=1" in text and "celery" in text and "r=1 vs celery 0.50" in text
    assert "floor" not in text
    data["floor"] = [{"replicas": 1, "submitted": 4, "repeat": 2, "jobs_per_s": 8.0, "cpu_ms_per_job_all": 1.25,
                     "passes": [{"jobs_per_s": 7.0}, {"jobs_per_s": 9.0}], "jobs_per_s_spread": 0.25,
                     "per_kind": {"gateway": {"cpu_ms_per_job": 0.75, "peak_rss_mb_max": 50.0},
                                  "nats": {"cpu_ms_per_job": 0.5, "peak_rss_mb_max": 30.0}}},
                     {"replicas": 2, "error": "RuntimeError('no gateway')"}]
    text = bench.report_text(data)
    row = next(line for line in text.splitlines() if line.lstrip("| ").startswith("floor r=1 "))
    assert "8" in row and "1.2" in row  # jobs/s and CPU ms/job in the systems table
    assert "CPU ms/job gateway 0.75, nats 0.50" in text and "passes: 7.0, 9.0" in text
    assert "error: RuntimeError('no gateway')" in text  # the failed r=2 run, in its row
    data["paired"] = {"peer": "celery", "ours_jobs_per_s": [3.0], "peer_jobs_per_s": [5.0, 7.0], "ratios": [0.5],
                      "ratio": 0.5}
    assert "paired passes, ours r=1 vs celery" in bench.report_text(data)


# ---- the workflow figure (scripts/bench_workflows.py) -------------------------------------------

_wf_spec = importlib.util.spec_from_file_location("bench_workflows", PATH.parent / "bench_workflows.py")
wf = importlib.util.module_from_spec(_wf_spec)
_wf_spec.loader.exec_module(wf)  # the standard library and bench_driver only


def test_workflow_definitions_parse_and_only_the_last_step_notifies() -> None:
    from cordum.workflow.definition import parse_workflow

    defs = wf.definitions()
    chain = parse_workflow(defs["chain5"])
    assert list(chain.steps) == list(wf.CHAIN)
    assert [tuple(chain.steps[s].depends_on) for s in wf.CHAIN] == [(), ("a",), ("b",), ("c",), ("d",)]
    assert [s for s in wf.CHAIN if "notify" in chain.steps[s].input] == ["e"]
    assert all(chain.steps[s].topic == "job.default" for s in wf.CHAIN)
    fan = parse_workflow(defs["fanout10"])
    assert fan.steps["fan"].for_each == "input.items" and fan.steps["fan"].max_parallel == 10
    assert "notify" not in fan.steps["fan"].input and fan.steps["join"].input["notify"] == "${input.notify}"
    assert tuple(fan.steps["join"].depends_on) == ("fan",)
    assert wf.run_input("fanout10", "k") == {"notify": "k", "items": list(range(10))}
    assert wf.run_input("chain5", "k") == {"notify": "k"}


def test_step_of_a_workflow_job_id() -> None:
    spec = importlib.util.spec_from_file_location("bench_workflow_worker", PATH.parent / "bench_workflow_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    assert worker.step_of("3f2a-9c:fan[3]@2") == ("3f2a-9c", "fan[3]")
    assert worker.step_of("r1:a@1") == ("r1", "a")
    assert worker.step_of("r1:odd") == ("r1", "odd")


def test_parse_records_keeps_a_steps_first_record_and_counts_repeats() -> None:
    spans, repeats = wf.parse_records(["r1 a 100 200", "r1 b 300 350", "r1 a 900 950", "junk", "r2 a x 1",
                                       "r2 a 5 6"])
    assert spans == {"r1": {"a": (100, 200), "b": (300, 350)}, "r2": {"a": (5, 6)}}
    assert repeats == 1


def _chain(start: int, gaps_us: tuple[int, ...], work_us: int = 100) -> dict[str, tuple[int, int]]:
    steps, t = {}, start
    for name, gap in zip(wf.CHAIN, (0,) + gaps_us):
        t += gap
        steps[name] = (t, t + work_us)
        t += work_us
    return steps


def test_gap_pairs_chain_and_fan_in() -> None:
    assert wf.gap_pairs("chain5", _chain(0, (1, 1, 1, 1))) == [("a", "b"), ("b", "c"), ("c", "d"), ("d", "e")]
    assert wf.gap_pairs("chain5", {"a": (0, 1), "c": (5, 6), "d": (7, 8)}) == [("c", "d")]
    fan = {c: (10, 20 + k) for k, c in enumerate(wf.FAN)}
    fan["fan[4]"] = (10, 99)  # ends last
    fan["join"] = (120, 130)
    assert wf.gap_pairs("fanout10", fan) == [("fan[4]", "join")]
    del fan["fan[7]"]
    assert wf.gap_pairs("fanout10", fan) == []  # not every child ran: no fan-in gap


def test_run_figures_chain_gaps_run_and_start_latency() -> None:
    runs = [{"run": "r1", "submit_us": 1_000_000}, {"run": "r2", "submit_us": 1_001_000},
            {"run": "r3", "submit_us": 1_002_000}]
    spans = {"r1": _chain(1_002_000, (1000, 2000, 3000, 4000)),  # starts 2 ms after submit
             "r2": _chain(1_004_000, (500, 500, 500, 500)),
             "r3": {"a": (1_003_000, 1_003_100)}}  # never finished
    fig = wf.run_figures("chain5", runs, spans)
    assert fig["complete"] == 2 and fig["incomplete"] == 1
    assert fig["gap_ms"] == [1.0, 2.0, 3.0, 4.0, 0.5, 0.5, 0.5, 0.5]
    assert fig["start_ms"] == [2.0, 3.0]
    # r1: 5 steps of 0.1 ms + 10 ms of gaps, from 2 ms after submit; done = e's end
    assert fig["run_ms"] == [pytest.approx(12.5), pytest.approx(5.5)]
    assert fig["first_submit_us"] == 1_000_000 and fig["last_done_us"] == spans["r1"]["e"][1]
    # when the system says when a run was done (ours: the run document), that time counts
    done = {"r1": spans["r1"]["e"][1] + 3000, "r2": None}
    fig = wf.run_figures("chain5", runs, spans, done)
    assert fig["complete"] == 1 and fig["run_ms"] == [pytest.approx(15.5)]
    out = wf.phase_figures("chain5", wf.run_figures("chain5", runs, spans))
    assert out["runs_per_s"] == pytest.approx(2 / 0.0125)  # 2 runs from the first submit to r1's end
    assert out["steps_per_s"] == pytest.approx(5 * 2 / 0.0125)
    assert out["gap_ms"]["n"] == 8 and out["gap_ms"]["p50"] == pytest.approx(0.75)
    assert "spread_ms" not in out


def test_run_figures_fan_in_and_spread() -> None:
    steps = {c: (2_000 + 100 * k, 3_000 + 100 * k) for k, c in enumerate(wf.FAN)}  # last ends at 3_900
    steps["join"] = (6_900, 7_000)
    fig = wf.run_figures("fanout10", [{"run": "r", "submit_us": 0}], {"r": steps})
    assert fig["gap_ms"] == [3.0] and fig["spread_ms"] == [0.9] and fig["start_ms"] == [2.0]
    assert fig["run_ms"] == [7.0]
    out = wf.phase_figures("fanout10", fig)
    assert out["spread_ms"]["p50"] == pytest.approx(0.9) and out["steps_per_s"] == pytest.approx(11 / 0.007)
    empty = wf.phase_figures("fanout10", wf.run_figures("fanout10", [{"run": "x", "submit_us": 5}], {}))
    assert empty["complete"] == 0 and empty["runs_per_s"] is None and empty["gap_ms"]["p50"] is None


def test_gap_breakdown_splits_a_gap_into_its_parts() -> None:
    spans = {"r": {"a": (0, 1_000), "b": (11_000, 11_500)}}
    docs = {"r": {"steps": {"a": {"completed_at": 0.003, "job_id": "r:a@1"},
                            "b": {"completed_at": 0.02, "job_id": "r:b@1"}}}}
    events = {"r:b@1": {"submit": 5_000, "dispatch": 9_000}}
    parts = wf.gap_breakdown("chain5", spans, docs, events)
    assert parts == {"result→engine": [2.0], "engine": [2.0], "scheduler": [4.0], "to worker": [2.0]}
    assert sum(v[0] for v in parts.values()) == 10.0  # the whole gap: b's start − a's end
    # a pair without the job's events is left out
    assert wf.gap_breakdown("chain5", spans, docs, {}) == {name: [] for name in wf.SEGMENTS}


def test_gap_breakdown_fan_in_counts_from_the_last_result_the_engine_applied() -> None:
    steps = {c: (0, 1_000) for c in wf.FAN}
    steps["fan[2]"] = (0, 2_000)  # the last to end at the worker ...
    steps["join"] = (20_000, 20_100)
    doc_steps = {c: {"completed_at": 0.004} for c in wf.FAN}
    doc_steps["fan[6]"] = {"completed_at": 0.010}  # ... but fan[6]'s result was applied last
    doc_steps["join"] = {"job_id": "r:join@1"}
    parts = wf.gap_breakdown("fanout10", {"r": steps}, {"r": {"steps": doc_steps}},
                             {"r:join@1": {"submit": 12_000, "dispatch": 15_000}})
    assert parts == {"result→engine": [8.0], "engine": [2.0], "scheduler": [3.0], "to worker": [5.0]}


def test_budget_is_the_idle_chain_gap_p50() -> None:
    def system(chain_p50, fan_p50):
        return {"shapes": {"chain5": {"idle": {"gap_ms": {"p50": chain_p50}}},
                           "fanout10": {"idle": {"gap_ms": {"p50": fan_p50}}}}}

    assert wf.budget({"cordum": system(9.5, 30.0)})["met"] is True
    out = wf.budget({"cordum": system(10.5, 3.0)})
    assert out["met"] is False and out["fanout10_idle_gap_p50_ms"] == 3.0
    assert wf.budget({"cordum": {"error": "boom"}})["met"] is None


def test_workflow_report_lines_render_systems_side_by_side() -> None:
    phase = wf.phase_figures("chain5", wf.run_figures(
        "chain5", [{"run": "r", "submit_us": 0}], {"r": _chain(1_000, (2_000, 2_000, 2_000, 2_000))}))
    phase.update({"cpu_ms_per_step": 1.5, "redis_commands_per_step": 12.0, "redis_by_command_per_step": {"evalsha": 3.0},
                  "breakdown_ms": {"engine": bench.summarize([1.25])}})
    systems = {"cordum": {"worker": "1 step worker", "shapes": {"chain5": {"idle": phase, "load": phase}}},
               "celery": {"error": "RuntimeError('no broker')"}}
    text = "\n".join(wf.report_lines({"settings": {"runs": 1, "idle_runs": 1, "clients": 1}, "systems": systems,
                                      "budget": wf.budget(systems), "ratios": {"chain5/dramatiq": 0.0625},
                                      "seconds": 3.0}))
    row = next(line for line in text.splitlines() if line.startswith("cordum") and "chain5" in line)
    assert row.split()[:3] == ["cordum", "chain5", "105"]  # 1 run in 9.5 ms
    assert "celery" in text and "no broker" in text
    assert "engine 1.25" in text and "evalsha 3.0" in text
    assert "cordum chain5 2.00 ms (met)" in text
    assert "chain5 vs dramatiq 0.062" in text


def test_workflow_ratios_are_ours_over_each_peer_per_shape() -> None:
    def load(rate):
        return {"load": {"runs_per_s": rate}}

    systems = {"cordum": {"shapes": {"chain5": load(10.0), "fanout10": load(None)}},
               "celery": {"shapes": {"chain5": load(100.0), "fanout10": load(50.0)}},
               "dramatiq": {"error": "x"}}
    assert wf.ratios(systems) == {"chain5/celery": pytest.approx(0.1), "fanout10/celery": None}
    assert wf.ratios({"cordum": {"error": "y"}, "celery": systems["celery"]}) == {
        "chain5/celery": None, "fanout10/celery": None}


def test_closed_loop_keeps_runs_in_flight_per_client_and_counts_failures(redis_server) -> None:
    import redis as redis_py

    pusher = redis_py.Redis.from_url(redis_server.url, decode_responses=True)
    in_flight, peak, lock = [0], [0], threading.Lock()

    def open_client(k: int):
        def send(tag: str, notify: str) -> str:
            if tag.endswith("-3"):
                raise RuntimeError("refused")  # a failed start: counted, no wait

            def finish() -> None:
                time.sleep(0.02)
                with lock:
                    in_flight[0] -= 1
                pusher.rpush(notify, "stale-run")  # a late signal of another run is skipped
                pusher.rpush(notify, tag)

            with lock:
                in_flight[0] += 1
                peak[0] = max(peak[0], in_flight[0])
            threading.Thread(target=finish, daemon=True).start()
            return tag

        return send

    prefix = f"t{time.time_ns()}"
    out = wf.closed_loop(12, 3, open_client, redis_server.url, 10, prefix=prefix)
    assert out["errors"] == 1 and "refused" in out["error_samples"][0]
    assert out["timeouts"] == 0 and out["clients"] == 3
    assert sorted(r["run"] for r in out["runs"]) == sorted(f"{prefix}-{i}" for i in range(12) if i != 3)
    assert peak[0] <= 3  # each client waited for its run before the next
    assert all(isinstance(r["submit_us"], int) for r in out["runs"])

    def never(k: int):
        return lambda tag, notify: tag

    slow = wf.closed_loop(1, 1, never, redis_server.url, 0.3, prefix=f"t{time.time_ns()}")
    assert slow["timeouts"] == 1 and len(slow["runs"]) == 1


def test_steady_throughput_leaves_out_ramp_up_and_drain() -> None:
    # 100 jobs/s for 1,000 jobs, but the first ten took a slow second to start and the last ten
    # trickled in over two more: the whole run says ~77 jobs/s, the steady part 100.
    ends = [1.0 + i * 0.1 for i in range(10)] + [2.0 + i * 0.01 for i in range(980)] + [12.0 + i * 0.2 for i in range(10)]
    assert bench.steady_throughput(ends) == pytest.approx(100, rel=0.01)
    assert bench.throughput(len(ends), 1.0, max(ends)) < 80
    assert bench.steady_throughput(list(reversed(ends))) == pytest.approx(100, rel=0.01)  # order does not matter
    assert bench.steady_throughput([1.0] * 5) is None  # too few to say
    assert bench.steady_throughput([3.0] * 20) is None  # no span


def test_median_pass_and_spread() -> None:
    passes = [{"jobs_per_s": 90.0}, {"jobs_per_s": 110.0}, {"jobs_per_s": 100.0}]
    got = bench.median_pass(passes)
    assert got["median"] == 100.0
    assert got["spread"] == pytest.approx(0.2)
    assert got["values"] == [90.0, 110.0, 100.0]
    assert bench.median_pass([{"jobs_per_s": 80.0}, {"jobs_per_s": 100.0}])["median"] == 90.0
    assert bench.median_pass([{"jobs_per_s": None}])["median"] is None
    assert "median steady state of 3 passes: 90.0, 110, 100" in bench.passes_text({**got, "jobs_per_s": 100.0,
                                                                                     "passes": passes, "jobs_per_s_spread": 0.2})


# ---- the floor (scripts/bench_floor.py) ---------------------------------------------------------

_floor_spec = importlib.util.spec_from_file_location("bench_floor", PATH.parent / "bench_floor.py")
floor = importlib.util.module_from_spec(_floor_spec)
_floor_spec.loader.exec_module(floor)


def test_floor_parts_parse_and_refuse_what_they_cannot_run() -> None:
    assert floor.parse_parts("") == frozenset()
    assert floor.parse_parts(" store, lock ,packets") == {"store", "lock", "packets"}
    with pytest.raises(ValueError, match="unknown part.*audit"):
        floor.parse_parts("store,audit")
    with pytest.raises(ValueError, match="'lock' needs 'store'"):
        floor.parse_parts("lock")
    assert bench.FLOOR_PARTS == floor.PARTS  # the driver checks --floor-with against the same names


def test_driver_checks_floor_with_and_labels_the_floor_runs() -> None:
    assert bench.parse_args(["--floor-with", " packets , store"]).floor_with == "packets,store"
    for bad in ("store,audit", "lock"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--floor-with", bad])
    assert bench.floor_label({"replicas": 2, "with": ""}) == "floor r=2"
    assert bench.floor_label({"replicas": 1, "with": "store,lock"}) == "floor r=1 +store,lock"


def test_paired_ratios_set_each_pass_of_ours_against_the_peer_passes_around_it() -> None:
    # The machine slowing down steadily: the peer's rate falls 600 -> 400 over the run, ours with it.
    peer = [600.0, 550.0, 500.0, 450.0]
    ours = [0.5 * 575, 0.5 * 525, 0.5 * 475]
    assert bench.paired_ratios(ours, peer) == pytest.approx([0.5, 0.5, 0.5])
    # Compared to the peer's median pass instead, the drift shows up as a spread of 0.46-0.55.
    assert bench.ratio(ours[0], 525.0) == pytest.approx(0.548, abs=0.001)
    assert bench.paired_ratios([300.0, None], [600.0, 0.0, 500.0]) == [None, None]  # a pass that says nothing
    with pytest.raises(ValueError):
        bench.paired_ratios([1.0, 2.0], [1.0, 2.0])
    # the paired ratio is the median of the passes that gave one (percentile 50)
    assert bench.percentile([0.4, 0.6, 0.5], 50) == 0.5 and bench.percentile([0.4, 0.6], 50) == 0.5
    assert bench.percentile([], 50) is None


def test_the_report_shows_the_paired_ratio_and_the_driver_refuses_an_unknown_peer() -> None:
    paired = {"peer": "celery", "ours_jobs_per_s": [300.0, 320.0], "peer_jobs_per_s": [600.0, 620.0, 640.0],
              "ratios": [0.49, 0.51], "ratio": 0.5}
    assert "median ratio 0.50; per pass 0.49, 0.51" in bench.paired_text(paired)
    assert "failed: boom" in bench.paired_text({"peer": "celery", "error": "boom"})
    assert bench.parse_args(["--paired", " Dramatiq"]).paired == "dramatiq"
    with pytest.raises(SystemExit):
        bench.parse_args(["--paired", "rq"])


def test_paired_passes_stop_at_the_first_failed_peer_pass(monkeypatch, tmp_path) -> None:
    # A failed peer pass leaves no ratio to compute: the passes after it would only cost minutes.
    class Topo:
        dir, downs = tmp_path, 0

        def __init__(self, args, replicas):
            pass

        def up(self):
            pass

        def down(self):
            Topo.downs += 1

    runs: list[str] = []
    monkeypatch.setattr(bench, "Topology", Topo)
    monkeypatch.setattr(bench, "warmed_up", lambda args, topo: (None, None))  # ours is never asked to run
    monkeypatch.setattr(bench, "run_peer", lambda args, peer, workdir: runs.append(peer) or {"error": "boom"})
    args = bench.parse_args(["--repeat", "3"])
    assert bench.run_paired(args, "celery", tmp_path) == {"peer": "celery", "error": "boom"}
    assert runs == ["celery"] and Topo.downs == 1
