"""Private virtual environments holding public SDKs, for interop tests.

cap-sdk-python must never share a process with our code (DESIGN §4.10): it pins protobuf<7,
ships generated modules for the same .proto file names as ours, and puts its ``cap/pb`` folder
first on sys.path so that ``cordum`` names *its* package. So it gets its own venv, built once and
reused (default ``<repo>/.cordum/sdk-venv``, or ``$CORDUM_SDK_VENV``), driven via sdk_codec.py.

The public HTTP client ``cordum-sdk`` (DESIGN §1) gets one too (default
``<repo>/.cordum/cordum-sdk-venv``, or ``$CORDUM_CLIENT_SDK_VENV``), driven via cordum_sdk_client.py.
cordum-sdk 0.1.0's generated models import ``dateutil`` without declaring python-dateutil as a
dependency, so the venv installs it alongside (the SDK itself is used unmodified).
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

SDK_REQUIREMENT = "cap-sdk-python==2.17.0"
CORDUM_SDK_REQUIREMENTS = ("cordum-sdk==0.1.0", "python-dateutil>=2.8")
REPO = Path(__file__).resolve().parents[2]
_MARKER = ".cordum-sdk-ok"


def venv_dir() -> Path:
    return Path(os.environ.get("CORDUM_SDK_VENV") or REPO / ".cordum" / "sdk-venv")


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def cordum_sdk_venv_dir() -> Path:
    return Path(os.environ.get("CORDUM_CLIENT_SDK_VENV") or REPO / ".cordum" / "cordum-sdk-venv")


def ensure_sdk_python(timeout: float = 600) -> Path:
    """Return the CAP SDK venv's interpreter, creating the venv and installing the SDK if needed."""
    return _ensure_venv(venv_dir(), (SDK_REQUIREMENT,), timeout)


def ensure_cordum_sdk_python(timeout: float = 600) -> Path:
    """Return the cordum-sdk (HTTP client) venv's interpreter, building it if needed."""
    return _ensure_venv(cordum_sdk_venv_dir(), CORDUM_SDK_REQUIREMENTS, timeout)


def _ensure_venv(venv: Path, requirements: tuple[str, ...], timeout: float) -> Path:
    wanted = "\n".join(requirements)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test runs build it once
        marker = venv / _MARKER
        python = _python(venv)
        if python.exists() and marker.exists() and marker.read_text().strip() == wanted:
            return python
        if not python.exists():
            _run([sys.executable, "-m", "venv", str(venv)], timeout)
        _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *requirements], timeout)
        marker.write_text(wanted + "\n")
        return python


def _run(cmd: list[str], timeout: float) -> None:
    # PYTHONPATH must not leak our package into the SDK's environment
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


if __name__ == "__main__":
    print(ensure_cordum_sdk_python() if sys.argv[1:] == ["cordum-sdk"] else ensure_sdk_python())
