"""The pure report math of the job-path benchmark (scripts/bench_driver.py): percentiles, per-job
timelines and latencies, throughput, ratios, per-job figures, Redis/NATS/proc/py-spy parsing."""

from __future__ import annotations

import importlib.util
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
        "jobs": 2, "clients": 1, "bench_seconds": 1.0, "ratios": {"1/celery": 0.5},
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
