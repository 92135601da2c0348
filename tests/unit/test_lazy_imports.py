"""cordum.infra.lazy: a package's __init__ deferred until something reads from the package itself;
an optional module made to look absent. Each case runs in a fresh interpreter (imports are
process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import ROOT


def run(code: str, cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                         timeout=60, env={"PYTHONPATH": f"{cwd}:{ROOT}", "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_package(root: Path) -> None:
    """pkgx: an __init__ that re-exports a heavy module; pkgx.sub: the same one level down."""
    for package in (root / "pkgx", root / "pkgx" / "sub"):
        package.mkdir(parents=True)
        (package / "heavy.py").write_text("VALUE = 'heavy'\n")
        (package / "light.py").write_text("VALUE = 'light'\n")
        (package / "__init__.py").write_text("import sys\nsys.inits = getattr(sys, 'inits', []) + [__name__]\n"
                                             "from .heavy import VALUE as FROM_INIT\nfrom . import light\n")
    (root / "optional_user.py").write_text("try:\n    import json.tool as extra\nexcept ImportError:\n"
                                           "    extra = None\n")


def test_submodules_import_without_the_deferred_inits_which_run_on_first_read(tmp_path) -> None:
    make_package(tmp_path)
    seen = run("""
        import json, sys
        from cordum.infra.lazy import defer_init
        deferred = defer_init("pkgx.sub")
        from pkgx.sub.light import VALUE
        before = {"inits": getattr(sys, "inits", []), "heavy": "pkgx.sub.heavy" in sys.modules, "value": VALUE}
        from pkgx.sub import FROM_INIT      # a name only the __init__ defines: it runs now
        after_sub = list(sys.inits)
        import pkgx
        top = pkgx.FROM_INIT                # the parent's own __init__, deferred as well
        print(json.dumps({"deferred": deferred, "before": before, "from_init": FROM_INIT,
                          "after_sub": after_sub, "top": top, "inits": sys.inits,
                          "again": defer_init("pkgx"), "light": pkgx.light.VALUE}))
    """, tmp_path)
    assert seen["deferred"] is True
    assert seen["before"] == {"inits": [], "heavy": False, "value": "light"}
    assert seen["from_init"] == "heavy" and seen["after_sub"] == ["pkgx.sub"]
    assert seen["top"] == "heavy" and seen["inits"] == ["pkgx.sub", "pkgx"]  # each ran once
    assert seen["again"] is False and seen["light"] == "light"


def test_a_package_imported_already_or_missing_is_left_alone(tmp_path) -> None:
    make_package(tmp_path)
    seen = run("""
        import json, sys, pkgx
        from cordum.infra.lazy import defer_init
        print(json.dumps({"imported": defer_init("pkgx"), "missing": defer_init("no_such_package_here"),
                          "module": defer_init("optional_user"), "inits": sys.inits,
                          "registered": "no_such_package_here" in sys.modules}))
    """, tmp_path)
    assert seen == {"imported": False, "missing": False, "module": False, "inits": ["pkgx"], "registered": False}


def test_a_skipped_optional_module_looks_absent_unless_imported_already(tmp_path) -> None:
    make_package(tmp_path)
    seen = run("""
        import json, sys
        from cordum.infra.lazy import skip_optional
        skip_optional("json.tool")
        import optional_user
        import json.decoder
        skip_optional("json.decoder")       # imported already: stays
        print(json.dumps({"extra": optional_user.extra, "decoder": sys.modules["json.decoder"] is not None}))
    """, tmp_path)
    assert seen == {"extra": None, "decoder": True}


def test_cordum_mcp_loads_only_the_server_side_of_the_sdk(tmp_path) -> None:
    seen = run("""
        import json, sys
        import cordum.mcp.service
        loaded = sorted(m for m in ("mcp.client", "mcp.server.mcpserver", "uvicorn", "httpx._main")
                        if sys.modules.get(m) is not None)
        from mcp import ClientSession      # whoever wants the whole SDK still gets it
        print(json.dumps({"loaded": loaded, "client": ClientSession.__module__,
                          "now": "mcp.client" in sys.modules}))
    """, tmp_path)
    assert seen == {"loaded": [], "client": "mcp.client.session", "now": True}
