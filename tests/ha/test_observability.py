"""Per-replica observability: `pod` on every series, cordum_jobs_total adds up across gateway
replicas to the jobs run, and /api/v1/status lists the live replicas of each service."""

from __future__ import annotations

import json
import urllib.request

import trio
from prometheus_client.parser import text_string_to_metric_families

from cordum.store.jobs import JobStore
from tests.integration.stack import Stack, http_get, nats_server, redis_server, wait_state  # noqa: F401

KEY = "observability-admin-key-0123456789"


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/jobs", data=json.dumps(body).encode(),
                                     method="POST", headers={"X-API-Key": KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _status(port: int) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/status", headers={"X-API-Key": KEY})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def test_jobs_add_up_across_replicas_and_status_lists_them(spawn, tmp_path, redis):
    stack = Stack.create(spawn, tmp_path, CORDUM_API_KEY=KEY, CORDUM_ENV="dev")
    stack.kernel("safety-kernel-1")
    stack.scheduler("scheduler-1")
    stack.scheduler("scheduler-2")
    stack.worker("worker-1")
    stack.start("api-gateway-1", "cordum.gateway.service")
    stack.start("api-gateway-2", "cordum.gateway.service")
    await stack.ready()
    await trio.sleep(1.0)
    ports = [stack.http_ports["api-gateway-1"], stack.http_ports["api-gateway-2"]]
    jobs = [(await trio.to_thread.run_sync(_post, ports[n % 2], {"prompt": f"n{n}"}))["job_id"] for n in range(20)]
    store = JobStore(redis)
    for job_id in jobs:
        await wait_state(store, job_id, {"SUCCEEDED"})

    accepted = {}
    for name, port in zip(("api-gateway-1", "api-gateway-2"), ports):
        text = await trio.to_thread.run_sync(http_get, port, "/metrics")
        samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
        assert samples and all(s.labels.get("pod") == name for s in samples)  # every series, process ones too
        accepted[name] = sum(s.value for s in samples
                             if s.name == "cordum_jobs_total" and s.labels.get("outcome") == "accepted")
    assert sum(accepted.values()) == len(jobs) and all(v == 10 for v in accepted.values()), accepted

    replicas = (await trio.to_thread.run_sync(_status, ports[0]))["replicas"]
    listed = {service: sorted(r["id"] for r in items) for service, items in replicas.items()}
    assert listed["cordum-api-gateway"] == ["api-gateway-1", "api-gateway-2"]
    assert listed["cordum-scheduler"] == ["scheduler-1", "scheduler-2"]
    assert listed["cordum-safety-kernel"] == ["safety-kernel-1"]
