"""Workflows driven through the public HTTP SDK (cordum-sdk 0.1.0, unmodified): its
``client.workflows`` namespace (the generated ``workflows`` and ``workflow_runs`` operations).

Run *only* by the cordum-sdk venv's interpreter (tests/interop/sdk_env.py), never imported by our
test process (DESIGN §1, §4.7):

    <cordum-sdk-venv>/bin/python cordum_sdk_workflows_client.py

1. ``create_workflow(body=WorkflowDefinition(...))`` with steps in the SDK's own shape (type
   ``job``, ``config``, ``retry{max_attempts, backoff_sec}``): step ``fetch`` on ``job.default``
   (the echo worker answers it), then ``hold`` on CORDUM_SDK_HOLD_TOPIC (held for a human by the
   policy, so the run stays running until it is cancelled);
2. ``get_workflow``, ``list_workflows``, ``dry_run_workflow``;
3. ``start_workflow_run(id, body=StartWorkflowRunBody)``, then ``get_workflow_run`` until the run's
   ``hold`` step is running (or CORDUM_SDK_TIMEOUT seconds pass);
4. ``list_workflow_runs(id)``, ``list_all_workflow_runs(limit, workflow_id)``, ``get_run_timeline``;
5. ``cancel_workflow_run(id, run_id)``, then ``get_workflow_run`` once more;
6. ``get_workflow_run`` of an unknown run: the SDK's ``NotFoundError``; a definition with a cycle:
   its ``ValidationError``.

Environment: CORDUM_BASE_URL, CORDUM_API_KEY, CORDUM_TENANT_ID, CORDUM_SDK_HOLD_TOPIC,
CORDUM_SDK_TIMEOUT (default 30). Prints one JSON object on stdout: what the SDK parsed (its
models' ``to_dict()`` and the Python types of fields it converts). Any SDK exception propagates.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

from cordum_sdk import CordumClient
from cordum_sdk._generated.models.create_workflow_response_201 import CreateWorkflowResponse201
from cordum_sdk._generated.models.dry_run_result import DryRunResult
from cordum_sdk._generated.models.dry_run_workflow_body import DryRunWorkflowBody
from cordum_sdk._generated.models.dry_run_workflow_body_input import DryRunWorkflowBodyInput
from cordum_sdk._generated.models.list_all_workflow_runs_response_200 import ListAllWorkflowRunsResponse200
from cordum_sdk._generated.models.run_detail import RunDetail
from cordum_sdk._generated.models.start_workflow_run_body import StartWorkflowRunBody
from cordum_sdk._generated.models.start_workflow_run_response_200 import StartWorkflowRunResponse200
from cordum_sdk._generated.models.workflow_definition import WorkflowDefinition
from cordum_sdk._generated.models.workflow_definition_steps import WorkflowDefinitionSteps
from cordum_sdk.errors import NotFoundError, ValidationError

# The jobs client beside this script (its folder is first on sys.path when run as a script).
from cordum_sdk_client import _expect, _type


def _run(detail: RunDetail) -> dict[str, Any]:
    steps = detail.steps.additional_properties if detail.steps else {}
    return {
        "dict": detail.to_dict(),
        "types": {"status": _type(detail.status), "started_at": _type(detail.started_at),
                  "completed_at": _type(detail.completed_at),
                  "steps": {sid: {"started_at": _type(s.started_at), "job_id": _type(s.job_id)}
                            for sid, s in steps.items()}},
    }


def main() -> None:
    hold_topic = os.environ["CORDUM_SDK_HOLD_TOPIC"]
    timeout = float(os.environ.get("CORDUM_SDK_TIMEOUT", "30"))
    workflow_id = f"sdk-flow-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {"workflow_id": workflow_id}

    with CordumClient(os.environ["CORDUM_BASE_URL"], os.environ["CORDUM_API_KEY"],
                      tenant_id=os.environ["CORDUM_TENANT_ID"], timeout=10.0) as client:
        wf = client.workflows

        # 1. create, with steps in the SDK's own model shape
        steps = WorkflowDefinitionSteps.from_dict({
            "fetch": {"id": "fetch", "type": "job", "name": "fetch",
                      "config": {"topic": "job.default", "input": {"prompt": "fetch ${input.what}"}},
                      "retry": {"max_attempts": 2, "backoff_sec": 1}, "timeout_sec": 60},
            "hold": {"id": "hold", "type": "job", "depends_on": ["fetch"], "config": {"topic": hold_topic}},
        })
        body = WorkflowDefinition(id=workflow_id, name="sdk flow", steps=steps, description="via cordum-sdk",
                                  timeout_sec=600)
        created = _expect(wf.create_workflow(body=body), CreateWorkflowResponse201)
        out["created"] = created.to_dict()

        # 2. read it back
        got = _expect(wf.get_workflow(workflow_id), WorkflowDefinition)
        out["got"] = {"dict": got.to_dict(), "step_types": {k: _type(v) for k, v in got.steps.additional_properties.items()}}
        listed = wf.list_workflows()
        out["listed"] = {"type": _type(listed), "ids": [d.id for d in listed], "item_types": sorted({_type(d) for d in listed})}
        dry = _expect(wf.dry_run_workflow(workflow_id, body=DryRunWorkflowBody(
            input_=DryRunWorkflowBodyInput.from_dict({"what": "news"}))), DryRunResult)
        out["dry_run"] = dry.to_dict()

        # 3. start a run and follow it until its second step is running
        started = _expect(wf.start_workflow_run(workflow_id, body=StartWorkflowRunBody.from_dict({"what": "news"})),
                          StartWorkflowRunResponse200)
        run_id = started.run_id
        out["started"] = started.to_dict()
        statuses: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            detail = _expect(wf.get_workflow_run(run_id), RunDetail)
            hold = detail.steps.additional_properties.get("hold") if detail.steps else None
            if not statuses or statuses[-1] != str(detail.status):
                statuses.append(str(detail.status))
            if (hold is not None and hold.status == "running") or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        out["running"] = {"statuses_seen": statuses, **_run(detail)}

        # 4. listings and the timeline
        of_workflow = wf.list_workflow_runs(workflow_id)
        out["runs_of_workflow"] = {"type": _type(of_workflow), "ids": [r.id for r in of_workflow],
                                   "statuses": [str(r.status) for r in of_workflow]}
        page = _expect(wf.list_all_workflow_runs(limit=10, workflow_id=workflow_id), ListAllWorkflowRunsResponse200)
        out["all_runs"] = {"ids": [r.id for r in page.items], "next_cursor": page.next_cursor,
                           "started_at_types": [_type(r.started_at) for r in page.items]}
        timeline = wf.get_run_timeline(run_id)
        out["timeline"] = {"types": [e.type for e in timeline], "timestamp_types": sorted({_type(e.timestamp) for e in timeline})}

        # 5. cancel, then read the run once more
        out["cancel_returned"] = repr(wf.cancel_workflow_run(workflow_id, run_id))
        out["cancelled"] = _run(_expect(wf.get_workflow_run(run_id), RunDetail))

        # 6. errors map onto the SDK's exception classes
        try:
            wf.get_workflow_run("no-such-run-0000")
        except NotFoundError as exc:
            out["not_found"] = {"error": type(exc).__name__, "status_code": exc.status_code, "message": exc.message}
        try:
            wf.create_workflow(body=WorkflowDefinition(id=f"{workflow_id}-cycle", name="cycle", steps=WorkflowDefinitionSteps.from_dict({
                "a": {"id": "a", "type": "job", "depends_on": ["b"], "config": {"topic": "job.default"}},
                "b": {"id": "b", "type": "job", "depends_on": ["a"], "config": {"topic": "job.default"}}})))
        except ValidationError as exc:
            out["invalid"] = {"error": type(exc).__name__, "status_code": exc.status_code, "message": exc.message}

    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
