"""Fixtures for talking to the public CAP SDK, which runs in its own venv and process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest

from .sdk_env import ensure_sdk_python

CODEC = Path(__file__).with_name("sdk_codec.py")

SdkCall = Callable[[str, Any], Any]


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    """The SDK venv's interpreter (built on first use, ~10 s; cached across runs)."""
    return ensure_sdk_python()


@pytest.fixture(scope="session")
def sdk(sdk_python: Path) -> SdkCall:
    """``sdk(mode, payload)`` runs sdk_codec.py in the SDK venv and returns its JSON answer."""

    def call(mode: str, payload: Any = None) -> Any:
        proc = subprocess.run(
            [str(sdk_python), str(CODEC), mode],
            input=json.dumps(payload) if payload is not None else "",
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin"},  # nothing of our environment (PYTHONPATH) leaks in
        )
        if proc.returncode != 0:
            raise AssertionError(f"sdk_codec {mode} failed:\n{proc.stderr}")
        return json.loads(proc.stdout)

    return call


@pytest.fixture(scope="session")
def sdk_descriptors(sdk: SdkCall) -> dict:
    return sdk("describe")
