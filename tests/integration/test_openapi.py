"""The gateway's OpenAPI document (`/api/v1/openapi.json`): it names every route the app has, and
schemathesis, run against a running gateway with it (valid and invalid inputs, every operation),
finds no server error and no answer the document does not describe."""

from __future__ import annotations

import asyncio
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
    stuck: list[str] = []

    async def watch() -> None:
        # The whole run takes ~20 s: at 60 s something waits, and what every task of this process
        # (the gateway's included) awaits says what (a request once hung for 120 s on CI).
        await trio.sleep(60)
        stuck.append(task_tree())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        done = await trio.to_thread.run_sync(lambda: subprocess.run(argv, capture_output=True, text=True, timeout=900,
                                                                    cwd=tmp_path))
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-5000:] + "\n".join(stuck)


def task_tree() -> str:
    """Every Trio task of this run and the frames it awaits in (innermost last)."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{lineno} {f.f_code.co_name}"
                  for f, lineno in task.iter_await_frames()]
        lines.append("  " * depth + f"{task.name}: " + " > ".join(frames[-6:]))
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    from cordum.infra import aio  # the asyncio side: redis-py's, nats-py's and grpclib's tasks

    if aio._loop is not None:
        for task in asyncio.all_tasks(aio._loop):
            frames = [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}" for f in task.get_stack()]
            lines.append(f"asyncio {task.get_name()}: " + " > ".join(frames[-6:]))
    return "tasks after 60 s:\n" + "\n".join(lines)
