"""The public HTTP client, ``cordum-sdk`` 0.1.0 (PyPI, unmodified), works against our gateway
(DESIGN §1: "The public cordum-sdk client must work against it for the routes we serve").

The client (cordum_sdk_client.py) runs in its own venv and process (DESIGN §4.7); safety kernel,
scheduler, echo worker and gateway run as real processes. Checked: the SDK submits jobs through
``POST /api/v1/jobs`` and parses ``{job_id, trace_id}``; ``GET /api/v1/jobs/{id}`` parses into its
``JobDetail`` model (timestamps as RFC 3339 date-times, labels an object) and reaches SUCCEEDED
with the echo worker's result; ``GET /api/v1/jobs`` parses into ``ListJobsResponse200`` and the
SDK's ``paginate`` helper follows our ``next_cursor`` across every page; a 404 becomes the SDK's
``NotFoundError``.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

import pytest
import trio

from tests.conftest import unique
from tests.integration.stack import Stack
from tests.integration.stack import nats_server, redis_server  # noqa: F401  (servers of its own)

from .sdk_env import ensure_cordum_sdk_python

pytestmark = pytest.mark.slow

CLIENT_SCRIPT = Path(__file__).with_name("cordum_sdk_client.py")
API_KEY = "sdk-interop-key-0123456789abcdef"
JOBS = 3


@pytest.fixture(scope="session")
def cordum_sdk_python() -> Path:
    """The cordum-sdk venv's interpreter (built on first use; cached across runs)."""
    return ensure_cordum_sdk_python()


async def _run_client(python: Path, tmp_path: Path, **env: str) -> dict:
    result = await trio.run_process(
        [str(python), str(CLIENT_SCRIPT)],
        capture_stdout=True, capture_stderr=True, check=False, cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", **env},  # nothing of ours (PYTHONPATH, our venv) leaks in
    )
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, f"cordum-sdk client failed ({result.returncode}):\n{stderr[-6000:]}"
    return json.loads(result.stdout)


def _is_iso(text: object) -> bool:
    return isinstance(text, str) and datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None


async def test_cordum_sdk_submits_reads_and_lists_jobs(spawn, tmp_path, redis, cordum_sdk_python):
    tenant = unique("sdk-tenant")  # a tenant of its own: the listing holds exactly our jobs
    stack = Stack.create(spawn, tmp_path)
    stack.kernel()
    stack.scheduler()
    stack.worker()
    stack.start("gateway-1", "cordum.gateway.service", CORDUM_API_KEY=API_KEY, CORDUM_ENV="dev",
                TENANT_ID=tenant)
    await stack.ready()

    out = await _run_client(
        cordum_sdk_python, tmp_path,
        CORDUM_BASE_URL=f"http://127.0.0.1:{stack.http_ports['gateway-1']}",
        CORDUM_API_KEY=API_KEY, CORDUM_TENANT_ID=tenant, CORDUM_SDK_JOBS=str(JOBS),
        CORDUM_SDK_TIMEOUT="30",
    )
    # the public package from the registry, not anything of ours
    assert out["sdk_version"] == out["sdk_dist_version"] == "0.1.0"
    assert os.path.realpath(out["sdk_file"]).startswith(os.path.realpath(cordum_sdk_python.parents[1]))

    # (1) submit: parsed into SubmitJobResponse {job_id, trace_id}
    submitted = out["submitted"]
    assert len(submitted) == JOBS
    for entry in submitted:
        assert entry["type"] == "SubmitJobResponse"
        assert entry["dict"]["job_id"] and entry["dict"]["trace_id"], entry
    job_ids = [entry["dict"]["job_id"] for entry in submitted]
    assert len(set(job_ids)) == JOBS

    # (2) read back: JobDetail, SUCCEEDED, with the echo worker's result
    assert set(out["jobs"]) == set(job_ids)
    for n, job_id in enumerate(job_ids):
        job = out["jobs"][job_id]
        final, types = job["final"]["dict"], job["final"]["types"]
        assert final["state"] == "SUCCEEDED", job
        assert job["states_seen"][-1] == "SUCCEEDED" and all(s != "FAILED" for s in job["states_seen"]), job
        assert final["id"] == job_id and final["tenant"] == tenant and final["topic"] == "job.default"
        assert final["trace_id"] == submitted[n]["dict"]["trace_id"]
        assert final["context_ptr"] == f"redis://ctx:{job_id}" and final["result_ptr"] == f"redis://res:{job_id}"
        assert types["updated_at"] == "datetime" and _is_iso(final["updated_at"]), job
        assert types["labels"] == "JobDetailLabels" and job["final"]["labels"]["suite"] == "cordum-sdk-interop"
        assert types["result"] == "JobDetailResultType0", job
        assert final["result"]["worker_id"] == "worker-1"
        assert final["result"]["echo"]["prompt"] == f"sdk prompt {n}"
        assert final["result"]["echo"]["context"] == {"n": n, "via": "cordum-sdk"}
        assert final["context"]["prompt"] == f"sdk prompt {n}"  # extra fields kept by the model

    # (3) list: ListJobsResponse200 of JobSummary, newest first, one page
    listed = out["list"]
    assert listed["type"] == "ListJobsResponse200" and listed["next_cursor"] is None
    # newest update first (jobs finish in any order, so compare with their own timestamps)
    assert sorted(item["dict"]["id"] for item in listed["items"]) == sorted(job_ids)
    stamps = [item["dict"]["updated_at"] for item in listed["items"]]
    assert stamps == sorted(stamps, reverse=True)
    for item in listed["items"]:
        assert item["dict"]["state"] == "SUCCEEDED" and item["dict"]["tenant"] == tenant
        assert item["types"]["updated_at"] == "datetime" and _is_iso(item["dict"]["updated_at"])
    # the SDK's paginate() follows next_cursor (a string, as its model says) through every page
    assert out["first_page_cursor"]["type"] == "str" and out["first_page_cursor"]["value"].isdigit()
    assert out["paginated_ids"] == [item["dict"]["id"] for item in listed["items"]]

    # errors: our envelope maps onto the SDK's exception classes
    assert out["not_found"] == {"error": "NotFoundError", "status_code": 404, "message": "job not found"}

    # the SDK's audit_export calls (namespace telemetry) parse our answers
    audit = out["audit_export"]
    assert {call["type"] for call in audit.values()} == {"GenericObject"}, audit
    assert audit["get_audit_export_config"]["dict"]["transport"] == "local"
    assert audit["get_audit_export_health"]["dict"]["status"] in ("ok", "degraded")
    assert audit["test_audit_export"]["dict"]["ok"] is True

    # the gateway saw the same jobs
    for job_id in job_ids:
        assert await redis.execute("HGET", f"job:meta:{job_id}", "tenant") == tenant
