"""A short chaos run (scripts/chaos, cordum/dev/chaos.py) against its own 2-replica topology: no job
lost, none executed twice (counted by the workers, ECHO_EXECUTIONS_KEY), none in a wrong state.

Four rounds with a fixed seed (115): restart NATS, restart Redis, kill -9 scheduler-1, kill -9 worker-1
(replaced by a worker with a new id), while plain, slow, retryable and failing jobs flow through
both gateways. The SIGSTOP kind ("pause") is left out of this short run: to matter it must outlast
the 30 s job-lock TTL, a constant of the scheduler (not an environment variable), so one pause
round alone would take longer than this whole run; `scripts/chaos` runs it (default --pause 35).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cordum.dev import state as st

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_short_chaos_run_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_DIR", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID",
                 "CORDUM_API_KEY", "ECHO_EXECUTIONS_KEY"):
        env.pop(name, None)
    sdir = tmp_path / "chaos"
    run = subprocess.run(
        [sys.executable, "-m", "cordum.dev.chaos", "--rounds", "4", "--seed", "115", "--faults", "kill,term,redis,nats",
         "--rate", "3", "--warmup", "3", "--gap", "1", "--down", "1", "--recovery-timeout", "45", "--settle", "60",
         "--quiet", "3", "--state-dir", str(sdir), "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    print(run.stderr[-6000:])
    assert run.stdout.strip(), run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    print(json.dumps(summary, indent=1))

    # The topology is gone, whatever the verdict.
    data = st.load(sdir)
    assert data is not None
    assert not st.supervisor_alive(data)
    assert [r["name"] for r in data["replicas"] if st.alive(r.get("pid"), r.get("start_time"))] == []

    assert "aborted" not in summary, summary
    assert summary["rounds"] == 4 and summary["jobs"] > 20
    assert summary["lost"] == 0, summary["examples"].get("lost")
    assert summary["duplicated"] == 0, summary["examples"].get("duplicated")
    assert summary["wrong_state"] == 0, summary["examples"].get("wrong_state")
