"""The committed generated modules are what scripts/gen_proto.sh makes from proto/ now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED_DIRS = ("cordum/agent/v1", "cordum/v1")
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_grpc.py")


def _generated(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for d in GENERATED_DIRS
        if (base / d).is_dir()
        for p in (base / d).iterdir()
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def test_generated_code_is_current(tmp_path: Path):
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, f"gen_proto.sh failed:\n{run.stderr}"
    fresh, committed = _generated(tmp_path), _generated(ROOT)
    assert fresh, "gen_proto.sh generated nothing"
    assert not fresh - committed, f"generated but not committed: {sorted(fresh - committed)}"
    assert not committed - fresh, f"committed but no longer generated: {sorted(committed - fresh)}"
    stale = [n for n in sorted(fresh) if (tmp_path / n).read_bytes() != (ROOT / n).read_bytes()]
    assert not stale, (
        f"stale generated files (run scripts/gen_proto.sh; the header line 'Protobuf Python "
        f"Version' also changes with the grpcio-tools version): {stale}"
    )
