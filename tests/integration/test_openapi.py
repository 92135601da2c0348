"""The gateway's OpenAPI document (`/api/v1/openapi.json`): it names every route the app has, and
schemathesis, run against a running gateway with it (valid and invalid inputs, every operation),
finds no server error and no answer the document does not describe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio

from cordum.gateway.openapi import document, flask_rule
from tests.integration import test_gateway as gateway_tests
from tests.integration.test_gateway import ADMIN, _routes

kernel, start_gateway = gateway_tests.kernel, gateway_tests.start_gateway
NOT_DOCUMENTED = {("GET", "/api/v1/stream"), ("GET", "/api/v1/openapi.json")}  # a WebSocket; the document itself


async def test_the_document_names_every_route_and_no_other(start_gateway) -> None:
    api = await start_gateway()
    served = (await api.call("GET", "/api/v1/openapi.json", key=None)).body  # public: no key needed
    assert served == document() and served["openapi"].startswith("3.1")
    documented = {(method.upper(), flask_rule(path)) for path, ops in served["paths"].items() for method in ops}
    routes = {(m, r) for m, r in _routes(api.gw)} | {("GET", "/api/v1/stream")}
    assert documented == routes - NOT_DOCUMENTED


async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(start_gateway, tmp_path) -> None:
    api = await start_gateway(API_RATE_LIMIT_RPS="100000", API_RATE_LIMIT_BURST="100000",
                              CORDUM_AUTH_FAILURES_PER_MINUTE="1000000")
    st = Path(sys.executable).parent / "st"
    argv = [str(st), "run", f"http://127.0.0.1:{api.port}/api/v1/openapi.json", "-H", f"X-API-Key: {ADMIN}",
            "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--phases", "examples,coverage,fuzzing", "--max-examples", "15", "--workers", "1", "--seed", "7",
            "--suppress-health-check", "all", "--max-failures", "20", "--no-color",
            "--request-timeout", "120"]  # a loaded CI machine may be slow; a hang still fails
    done = await trio.to_thread.run_sync(lambda: subprocess.run(argv, capture_output=True, text=True, timeout=900,
                                                                cwd=tmp_path))
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:]
