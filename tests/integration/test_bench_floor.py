"""scripts/bench_floor.py, the benchmark's floor: its four processes carry jobs end to end.

On servers of its own: the floor uses the services' durable consumer names (the same
`cordum-scheduler` queue on `sys.job.submit`), which must not meet the session's other tests.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from pathlib import Path

import pytest
import redis as redis_sync

from cordum.dev.servers import free_port, start_nats, start_redis
from cordum.store import keys

SCRIPT = str(Path(__file__).resolve().parents[2] / "scripts" / "bench_floor.py")


def _wait_for_port(port: int, procs: list, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            dead = [p.name for p in procs if p.popen.poll() is not None]
            assert not dead, f"floor processes exited: {dead}"
            time.sleep(0.1)
    raise AssertionError(f"the floor's gateway did not listen on :{port}")


@pytest.mark.parametrize("parts", ["", "store,lock,packets"])
def test_the_floor_carries_each_job_through_every_hop(tmp_path: Path, spawn, parts: str) -> None:
    redis_server, nats_server = start_redis(tmp_path / "redis"), start_nats(tmp_path / "nats")
    try:
        port = free_port()
        env = {"REDIS_URL": redis_server.url, "NATS_URL": nats_server.url, "FLOOR_PORT": str(port),
               "FLOOR_WITH": parts}
        procs = [spawn(f"floor-{role}", [SCRIPT, role], env=env) for role in ("scheduler", "worker", "engine", "gateway")]
        _wait_for_port(port, procs)
        client = redis_sync.Redis.from_url(redis_server.url, decode_responses=True)
        deadline = time.monotonic() + 120
        while client.scard("floor:ready") < 4:  # the consumers take new messages only
            assert time.monotonic() < deadline, "the floor's consumers did not start"
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        ids = []
        for _ in range(5):  # one keep-alive connection, as the benchmark's clients
            conn.request("POST", "/api/v1/jobs", body=b'{"prompt": "x"}', headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            assert response.status == 202
            ids.append(json.loads(response.read())["job_id"])
        conn.close()
        deadline = time.monotonic() + 120
        while client.zcard("floor:done") < len(ids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(client.zrange("floor:done", 0, -1)) == sorted(ids)
        for job_id in ids:
            job = client.hgetall(f"floor:job:{job_id}")
            if not parts:
                # written by the gateway (request), the worker (result) and the scheduler (state)
                assert job == {"state": "SUCCEEDED", "request": '{"prompt": "x"}', "result": "{}"}
                continue
            assert job == {"result": "{}"}  # the worker's; the rest is in the job store's record
            meta = client.hgetall(f"job:meta:{job_id}")
            assert meta["state"] == "SUCCEEDED" and meta["tenant"] == "default"
            assert int(meta["_fence"]) >= 1  # the DISPATCHED write was fenced by the scheduler's lock
            states = [json.loads(e)["state"] for e in client.lrange(f"job:events:{job_id}", 0, -1)]
            assert states[:2] == ["PENDING", "DISPATCHED"] and states[-1] == "SUCCEEDED"
            assert client.exists(keys.job_lock(job_id)) == 0  # the lock, released with RUNNING
    finally:
        nats_server.stop()
        redis_server.stop()
