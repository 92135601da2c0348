"""The public HTTP client ``cordum-sdk`` 0.1.0 (PyPI, unmodified) drives workflows against our
gateway through its ``workflows`` namespace (its generated ``workflows`` and ``workflow_runs``
operations): create (with steps in the SDK's own shape), get, list, dry-run, start a run, read it,
list runs, read the timeline and cancel — every answer parsed by the SDK's models.

Real processes: safety kernel, scheduler, cordum-workflow-engine, echo worker and gateway. The
run's first step is answered by the echo worker; its second one is held for a human by the policy
(topic ``job.approve``), so the run is still running when the SDK cancels it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from cordum.protocol import subjects
from cordum.protocol.packets import decode
from tests.conftest import unique
from tests.integration import stack as stack_module
from tests.integration.stack import Stack

from .sdk_env import ensure_cordum_sdk_python

pytestmark = pytest.mark.slow

# servers of its own (its processes share JetStream durables)
redis_server, nats_server = stack_module.redis_server, stack_module.nats_server

CLIENT_SCRIPT = Path(__file__).with_name("cordum_sdk_workflows_client.py")
API_KEY = "sdk-workflows-key-0123456789abcdef"
HOLD_TOPIC = "job.approve"  # the stack's policy: require_approval


@pytest.fixture(scope="session")
def cordum_sdk_python() -> Path:
    return ensure_cordum_sdk_python()


async def test_cordum_sdk_creates_starts_reads_lists_and_cancels_workflow_runs(spawn, tmp_path, redis, bus,
                                                                               cordum_sdk_python) -> None:
    tenant = unique("sdk-wf-tenant")
    stack = Stack.create(spawn, tmp_path, WORKFLOW_ENGINE_SCAN_INTERVAL="1s")
    stack.kernel()
    stack.scheduler()
    stack.workflow_engine()
    stack.worker()
    stack.start("gateway-1", "cordum.gateway.service", CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev", TENANT_ID=tenant)
    await stack.ready(timeout=60)
    await trio.sleep(1.0)  # the worker's heartbeats reach the scheduler

    cancels: list[str] = []

    async def watch_cancels(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(subjects.CANCEL) as messages:
            task_status.started()
            async for msg in messages:
                cancels.append(decode(msg.data).job_cancel.job_id)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_cancels)
        result = await trio.run_process(
            [str(cordum_sdk_python), str(CLIENT_SCRIPT)], capture_stdout=True, capture_stderr=True, check=False,
            cwd=tmp_path, env={"PATH": "/usr/bin:/bin",  # nothing of ours (PYTHONPATH, our venv) leaks in
                               "CORDUM_BASE_URL": f"http://127.0.0.1:{stack.http_ports['gateway-1']}",
                               "CORDUM_API_KEY": API_KEY, "CORDUM_TENANT_ID": tenant,
                               "CORDUM_SDK_HOLD_TOPIC": HOLD_TOPIC, "CORDUM_SDK_TIMEOUT": "45"})
        stderr = result.stderr.decode(errors="replace")
        assert result.returncode == 0, f"cordum-sdk workflows client failed:\n{stderr[-6000:]}"
        out = json.loads(result.stdout)
        run_id = out["started"]["run_id"]
        with trio.move_on_after(10):
            while f"{run_id}:hold@1" not in cancels:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    workflow_id = out["workflow_id"]

    # 1-2. the definition, created in the SDK's shape, reads back through its models
    assert out["created"] == {"id": workflow_id}
    got = out["got"]["dict"]
    assert got["id"] == workflow_id and got["name"] == "sdk flow" and got["org_id"] == tenant
    assert out["got"]["step_types"] == {"fetch": "WorkflowStep", "hold": "WorkflowStep"}
    fetch = got["steps"]["fetch"]
    assert fetch["type"] == "worker" and fetch["topic"] == "job.default" and fetch["timeout_sec"] == 60
    assert fetch["retry"]["max_retries"] == 1 and fetch["retry"]["initial_backoff_sec"] == 1
    assert got["steps"]["hold"]["depends_on"] == ["fetch"]
    assert out["listed"]["type"] == "list" and out["listed"]["ids"] == [workflow_id]
    assert out["listed"]["item_types"] == ["WorkflowDefinition"]
    dry = out["dry_run"]
    assert [s["step_id"] for s in dry["steps"]] == ["fetch", "hold"] and dry["warnings"] == []

    # 3. the run: started, its first step done by the echo worker, its second one held
    running = out["running"]
    assert running["dict"]["id"] == run_id and running["dict"]["status"] == "running", running
    assert running["types"]["status"] == "RunSummaryStatus" and running["types"]["started_at"] == "datetime"
    assert running["types"]["completed_at"] == "NoneType"
    steps = running["dict"]["steps"]
    assert steps["fetch"]["status"] == "succeeded" and steps["hold"]["status"] == "running"
    assert steps["hold"]["job_id"] == f"{run_id}:hold@1"
    assert running["types"]["steps"]["fetch"] == {"started_at": "datetime", "job_id": "str"}
    assert running["dict"]["input"] == {"what": "news"}
    assert await redis.execute("HGET", stack_module.EXECUTIONS_KEY, f"{run_id}:fetch@1") == "1"

    # 4. listings and timeline parse into the SDK's models
    assert out["runs_of_workflow"] == {"type": "list", "ids": [run_id], "statuses": ["running"]}
    assert out["all_runs"] == {"ids": [run_id], "next_cursor": None, "started_at_types": ["datetime"]}
    assert out["timeline"]["types"][0] == "run_created" and "step_dispatched" in out["timeline"]["types"]
    assert out["timeline"]["timestamp_types"] == ["datetime"]

    # 5. cancel: 204 (the SDK returns None), the run is cancelled, its held job told to stop
    assert out["cancel_returned"] == "None"
    cancelled = out["cancelled"]["dict"]
    assert cancelled["status"] == "cancelled" and cancelled["steps"]["hold"]["status"] == "cancelled"
    assert out["cancelled"]["types"]["completed_at"] == "datetime"
    assert f"{run_id}:hold@1" in cancels

    # 6. our error envelope maps onto the SDK's exception classes
    assert out["not_found"] == {"error": "NotFoundError", "status_code": 404, "message": "workflow run not found"}
    assert out["invalid"]["error"] == "ValidationError" and out["invalid"]["status_code"] == 400
    assert "dependency cycle" in out["invalid"]["message"]
