"""The public HTTP client (cordum-sdk 0.1.0, unmodified) driving the gateway's memory routes.

Run *only* by the cordum-sdk venv's interpreter (tests/interop/sdk_env.py), never imported by our
test process (DESIGN §1, §4.7): ``<cordum-sdk-venv>/bin/python cordum_sdk_memory_client.py``.

cordum-sdk 0.1.0's facade has no ``memory`` namespace (its namespace table omits it), so the
memory operations it ships, ``cordum_sdk._generated.api.memory.{get_memory, create_artifact,
get_artifact}``, are called with the SDK's generated ``Client``; jobs go through the facade
(``client.jobs``). Steps:

1. two jobs with one ``memory_id`` through ``jobs.submit_job``, each awaited to SUCCEEDED (a chat
   worker builds its window and records its answer through the context engine);
2. ``get_memory(key="mem:<memory id>:events")`` (the conversation) and ``get_memory(ptr=<result>)``;
3. ``create_artifact`` then ``get_artifact(<artifact_ptr>)``;
4. with the other tenant's key: the same memory, result and artifact, each answered 404.

Environment: CORDUM_BASE_URL, CORDUM_API_KEY, CORDUM_TENANT_ID, CORDUM_OTHER_API_KEY,
CORDUM_OTHER_TENANT_ID, CORDUM_MEMORY_ID, CORDUM_SDK_TIMEOUT (30). Prints one JSON object.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from importlib import metadata
from typing import Any

import cordum_sdk
from cordum_sdk import CordumClient
from cordum_sdk._generated.api.memory import create_artifact, get_artifact, get_memory
from cordum_sdk._generated.client import Client
from cordum_sdk._generated.models.artifact_detail import ArtifactDetail
from cordum_sdk._generated.models.create_artifact_request import CreateArtifactRequest
from cordum_sdk._generated.models.create_artifact_request_labels import CreateArtifactRequestLabels
from cordum_sdk._generated.models.create_artifact_response import CreateArtifactResponse
from cordum_sdk._generated.models.get_memory_response_200 import GetMemoryResponse200
from cordum_sdk._generated.models.job_detail import JobDetail
from cordum_sdk._generated.models.submit_job_request import SubmitJobRequest

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED", "OUTPUT_QUARANTINED"}


def _expect(value: Any, cls: type) -> Any:
    if not isinstance(value, cls):  # the generated call returns None for a documented non-200 status
        raise AssertionError(f"expected a parsed {cls.__name__}, got {value!r}")
    return value


def _generated(base_url: str, key: str) -> Client:
    return Client(base_url=base_url, headers={"X-API-Key": key}, timeout=10.0, raise_on_unexpected_status=True)


def main() -> None:
    base_url = os.environ["CORDUM_BASE_URL"]
    tenant, other_tenant = os.environ["CORDUM_TENANT_ID"], os.environ["CORDUM_OTHER_TENANT_ID"]
    memory_id = os.environ["CORDUM_MEMORY_ID"]
    timeout = float(os.environ.get("CORDUM_SDK_TIMEOUT", "30"))
    out: dict[str, Any] = {"sdk_version": cordum_sdk.__version__, "sdk_dist_version": metadata.version("cordum-sdk")}

    with CordumClient(base_url, os.environ["CORDUM_API_KEY"], tenant_id=tenant, timeout=10.0) as client:
        out["facade_has_memory"] = hasattr(client, "memory")
        jobs = []
        for prompt in ("first question", "second question"):
            submitted = client.jobs.submit_job(body=SubmitJobRequest(prompt=prompt, topic="job.default",
                                                                     memory_id=memory_id))
            deadline = time.monotonic() + timeout
            while True:
                detail = _expect(client.jobs.get_job(submitted.job_id), JobDetail)
                if detail.state in TERMINAL or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            jobs.append({"id": submitted.job_id, "state": detail.state, "result": detail.to_dict().get("result")})
        out["jobs"] = jobs

    mine = _generated(base_url, os.environ["CORDUM_API_KEY"])
    theirs = _generated(base_url, os.environ["CORDUM_OTHER_API_KEY"])
    with mine, theirs:
        events_key = f"mem:{memory_id}:events"
        memory = _expect(get_memory.sync(client=mine, key=events_key, x_tenant_id=tenant), GetMemoryResponse200)
        out["memory"] = memory.to_dict()
        result_ptr = f"redis://res:{jobs[-1]['id']}"
        result = _expect(get_memory.sync(client=mine, ptr=result_ptr, x_tenant_id=tenant), GetMemoryResponse200)
        out["result_memory"] = result.to_dict()

        content = b"nightly report: 3 jobs, 0 failures\n"
        created = _expect(create_artifact.sync(client=mine, x_tenant_id=tenant, body=CreateArtifactRequest(
            content_base64=base64.b64encode(content).decode(), content_type="text/plain", retention="7d",
            labels=CreateArtifactRequestLabels.from_dict({"suite": "memory-interop"}))), CreateArtifactResponse)
        out["created"] = created.to_dict()
        detail = _expect(get_artifact.sync(created.artifact_ptr, client=mine, x_tenant_id=tenant), ArtifactDetail)
        out["artifact"] = {"dict": detail.to_dict(), "content": base64.b64decode(detail.content_base64).decode(),
                           "created_at_type": type(detail.metadata.created_at).__name__,
                           "labels": detail.metadata.labels.to_dict()}

        out["other_tenant"] = {
            "memory": get_memory.sync_detailed(client=theirs, key=events_key, x_tenant_id=other_tenant).status_code,
            "result": get_memory.sync_detailed(client=theirs, ptr=result_ptr, x_tenant_id=other_tenant).status_code,
            "artifact": get_artifact.sync_detailed(created.artifact_ptr, client=theirs,
                                                   x_tenant_id=other_tenant).status_code,
        }
        out["missing"] = get_memory.sync_detailed(client=mine, key="mem:no-such-memory:events",
                                                  x_tenant_id=tenant).status_code

    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
