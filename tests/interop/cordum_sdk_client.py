"""A client of our gateway written with the public HTTP SDK (cordum-sdk 0.1.0, unmodified).

Run *only* by the cordum-sdk venv's interpreter (tests/interop/sdk_env.py,
``ensure_cordum_sdk_python``), never imported by our test process (DESIGN §1, §4.7):

    <cordum-sdk-venv>/bin/python cordum_sdk_client.py

Uses the SDK's sync facade, ``CordumClient(base_url, api_key, tenant_id=...)``, and its resource
namespace ``client.jobs`` (the generated operations parse responses into the SDK's models):

1. ``jobs.submit_job(body=SubmitJobRequest(...))`` for each of CORDUM_SDK_JOBS jobs;
2. ``jobs.get_job(id)`` until each job is terminal (or CORDUM_SDK_TIMEOUT seconds pass);
3. ``jobs.list_jobs(limit=50)``, and ``cordum_sdk.paginate(jobs.list_jobs, limit=1)`` (the SDK's
   cursor-following helper);
4. ``jobs.get_job`` of an unknown id, which must raise the SDK's ``NotFoundError``;
5. ``telemetry.get_audit_export_config``, ``get_audit_export_health`` and ``test_audit_export``.

Environment: CORDUM_BASE_URL, CORDUM_API_KEY, CORDUM_TENANT_ID, CORDUM_SDK_JOBS (default 2),
CORDUM_SDK_TIMEOUT (default 30).

Prints one JSON object on stdout: what the SDK parsed (``to_dict()`` of its models, plus the Python
type names of the parsed fields whose type the SDK checks). Any SDK exception propagates: the
script exits non-zero with the traceback on stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from importlib import metadata
from typing import Any

import cordum_sdk
from cordum_sdk import CordumClient, paginate
from cordum_sdk._generated.models.job_detail import JobDetail
from cordum_sdk._generated.models.job_summary import JobSummary
from cordum_sdk._generated.models.list_jobs_response_200 import ListJobsResponse200
from cordum_sdk._generated.models.submit_job_request import SubmitJobRequest
from cordum_sdk._generated.models.submit_job_request_context import SubmitJobRequestContext
from cordum_sdk._generated.models.submit_job_request_labels import SubmitJobRequestLabels
from cordum_sdk._generated.models.submit_job_response import SubmitJobResponse
from cordum_sdk.errors import NotFoundError

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED", "OUTPUT_QUARANTINED"}
MAX_PAGES = 50  # the paginate check must end even if cursors never do


def _type(value: Any) -> str:
    return type(value).__name__


def _expect(value: Any, cls: type) -> Any:
    if not isinstance(value, cls):  # the facade returns None for a documented non-200 status
        raise AssertionError(f"expected a parsed {cls.__name__}, got {value!r}")
    return value


def _detail(detail: JobDetail) -> dict[str, Any]:
    return {
        "dict": detail.to_dict(),
        "types": {"updated_at": _type(detail.updated_at), "created_at": _type(detail.created_at),
                  "labels": _type(detail.labels), "result": _type(detail.result),
                  "risk_tags": _type(detail.risk_tags), "priority": _type(detail.priority)},
        "labels": detail.labels.to_dict() if hasattr(detail.labels, "to_dict") else None,
    }


def _summary(item: JobSummary) -> dict[str, Any]:
    return {"dict": item.to_dict(), "types": {"updated_at": _type(item.updated_at), "id": _type(item.id)}}


def main() -> None:
    base_url = os.environ["CORDUM_BASE_URL"]
    count = int(os.environ.get("CORDUM_SDK_JOBS", "2"))
    timeout = float(os.environ.get("CORDUM_SDK_TIMEOUT", "30"))
    out: dict[str, Any] = {"sdk_version": cordum_sdk.__version__,
                           "sdk_dist_version": metadata.version("cordum-sdk"),
                           "sdk_file": cordum_sdk.__file__}

    with CordumClient(base_url, os.environ["CORDUM_API_KEY"], tenant_id=os.environ["CORDUM_TENANT_ID"],
                      timeout=10.0) as client:
        # 1. submit
        submitted = []
        for n in range(count):
            body = SubmitJobRequest(
                prompt=f"sdk prompt {n}",
                topic="job.default",
                context=SubmitJobRequestContext.from_dict({"n": n, "via": "cordum-sdk"}),
                labels=SubmitJobRequestLabels.from_dict({"suite": "cordum-sdk-interop"}),
            )
            response = _expect(client.jobs.submit_job(body=body), SubmitJobResponse)
            submitted.append({"type": _type(response), "dict": response.to_dict()})
        out["submitted"] = submitted

        # 2. read back until terminal
        jobs = {}
        for entry in submitted:
            job_id = entry["dict"]["job_id"]
            states: list[str] = []
            deadline = time.monotonic() + timeout
            while True:
                detail = _expect(client.jobs.get_job(job_id), JobDetail)
                if not states or states[-1] != detail.state:
                    states.append(detail.state)
                if detail.state in TERMINAL or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            jobs[job_id] = {"states_seen": states, "final": _detail(detail)}
        out["jobs"] = jobs

        # 3. list: one page, then every page via the SDK's cursor-following helper
        listed = _expect(client.jobs.list_jobs(limit=50), ListJobsResponse200)
        out["list"] = {"type": _type(listed), "next_cursor": listed.next_cursor,
                       "items": [_summary(item) for item in listed.items]}
        pages: list[str] = []
        for item in paginate(client.jobs.list_jobs, limit=1):
            pages.append(item.id)
            if len(pages) >= MAX_PAGES:
                break
        out["paginated_ids"] = pages
        first_page = _expect(client.jobs.list_jobs(limit=1), ListJobsResponse200)
        out["first_page_cursor"] = {"value": first_page.next_cursor, "type": _type(first_page.next_cursor)}

        # 4. the error envelope maps onto the SDK's exception classes
        try:
            client.jobs.get_job("no-such-job-0000")
        except NotFoundError as exc:
            out["not_found"] = {"error": type(exc).__name__, "status_code": exc.status_code,
                                "message": exc.message}
        else:
            out["not_found"] = {"error": None}

        # 5. the audit export calls (namespace `telemetry`): each parses into the SDK's GenericObject
        audit = {}
        for name in ("get_audit_export_config", "get_audit_export_health", "test_audit_export"):
            parsed = getattr(client.telemetry, name)(x_tenant_id=os.environ["CORDUM_TENANT_ID"])
            audit[name] = {"type": _type(parsed), "dict": parsed.to_dict() if hasattr(parsed, "to_dict") else None}
        out["audit_export"] = audit

    json.dump(out, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
