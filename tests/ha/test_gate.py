"""The HA gate (scripts/production_gate.sh --gate 19 --strict) against a real 2-replica topology."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cordum.dev import state as st
from tests.ha.test_dev_topology import ROOT, cordumctl, free_block

KEY = "gate-test-admin-key-0123456789"


def test_gate_19_passes_on_a_healthy_two_replica_topology(tmp_path: Path) -> None:
    base = free_block()
    env = {**os.environ, "CORDUM_DEV_DIR": str(tmp_path / "dev"), "CORDUM_API_KEY": KEY, "PYTHONUNBUFFERED": "1",
           "API_RATE_LIMIT_RPS": "20", "API_RATE_LIMIT_BURST": "60",
           # the workers count their executions there; scenarios 2 and 5 read it (issue 8)
           "ECHO_EXECUTIONS_KEY": "cordum:gate-test:executions"}
    for name in ("REDIS_URL", "NATS_URL", "CORDUM_DEV_BASE_PORT", "CORDUM_INSTANCE_ID"):
        env.pop(name, None)
    up = cordumctl(env, "up", "--replicas", "2", "--workers", "2", "--detach", "--base-port", str(base), timeout=150)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        gate = subprocess.run(["bash", "scripts/production_gate.sh", "--gate", "19", "--strict"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
        print(gate.stdout)
        lines = [line for line in gate.stdout.splitlines() if line.startswith("gate 19.")]
        assert gate.returncode == 0, gate.stdout + gate.stderr
        assert len(lines) == 5 and all(" PASS " in line for line in lines), gate.stdout
        assert "gate 19: 5 passed, 0 failed" in gate.stdout
        # scenario 5 stopped and restarted scheduler-2: it is running again
        data = st.load(tmp_path / "dev")
        record = next(r for r in data["replicas"] if r["name"] == "scheduler-2")
        assert st.alive(record["pid"], record["start_time"])
    finally:
        cordumctl(env, "dev", "down", timeout=200)
