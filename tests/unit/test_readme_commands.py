"""The README's commands exist and work: the scripts, CI's entry point, the local stack, cordumctl."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import cordum
from cordum.dev import stack, topology
from cordum.dev.servers import free_block, free_port

ROOT = Path(__file__).resolve().parents[2]
RUN_LOCAL = "bash scripts/run_local.sh"
RUN_TESTS = "bash scripts/test.sh"


def _env(**overrides: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env or _env(), timeout=timeout)


def test_readme_starts_with_both_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:6])
    assert f"`{RUN_LOCAL}`" in head
    assert f"`{RUN_TESTS}`" in head


def test_scripts_exist_and_are_executable() -> None:
    for command in (RUN_LOCAL, RUN_TESTS):
        script = ROOT / command.split()[-1]
        assert script.is_file(), script
        assert os.access(script, os.X_OK), f"{script} is not executable"
    for path in ("scripts/install.sh", ".ci/run"):
        assert os.access(ROOT / path, os.X_OK), f"{path} is not executable"


def test_ci_runs_the_readme_test_command() -> None:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines
    assert any(re.match(r"^\s*(exec\s+)?bash scripts/test\.sh\b", line) for line in lines)


def test_stack_knows_every_service_of_pyproject() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    services = {name: entry for name, entry in scripts.items() if name != "cordumctl"}
    assert {s.name: s.entry for s in stack.SERVICES} == services


def test_local_stack_uses_given_servers_and_stops_on_sigterm(tmp_path: Path, redis_server, nats_server) -> None:
    out = tmp_path / "stack.out"
    env = _env(REDIS_URL=redis_server.url, NATS_URL=nats_server.url)
    # Cordum's default ports (50051, 50070) lie in the ephemeral range, where any outgoing
    # connection of the suite may hold one for a moment: the block comes from below it.
    base = free_block(topology.BLOCK_SIZE)
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "cordum.dev.stack", "--base-port", str(base)], stdout=sink,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 30
        while "running" not in out.read_text():
            assert proc.poll() is None, f"stack exited early with {proc.returncode}:\n{out.read_text()}"
            assert time.monotonic() < deadline, f"stack not ready:\n{out.read_text()}"
            time.sleep(0.05)
        text = out.read_text()
        assert f"REDIS_URL={redis_server.url}" in text
        assert f"NATS_URL={nats_server.url}" in text
        assert "not started here" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_local_stack_refuses_a_taken_port(nats_server) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("-m", "cordum.dev.stack", "--redis-port", str(port),
                      env=_env(REDIS_URL=None, NATS_URL=nats_server.url))
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
    assert "REDIS_URL" in result.stderr


def test_local_stack_reports_a_bad_variable() -> None:
    result = _run("-m", "cordum.dev.stack", env=_env(NATS_JS_REPLICAS="nine"))
    assert result.returncode == 2
    assert "NATS_JS_REPLICAS" in result.stderr


def test_cordumctl_version() -> None:
    result = _run("-m", "cordum.cli.main", "version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"cordumctl {cordum.__version__}"


def test_cordumctl_help_and_an_unreachable_gateway() -> None:
    assert _run("-m", "cordum.cli.main", "--help").returncode == 0
    port = free_port()  # nothing listens there
    result = _run("-m", "cordum.cli.main", "--addr", f"http://127.0.0.1:{port}", "status")
    assert result.returncode == 6
    assert "unreachable" in result.stderr
