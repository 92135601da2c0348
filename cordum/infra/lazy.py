"""Import less of a library than its package `__init__` would (a service's memory, issue 11).

Some packages re-export everything they have from their `__init__`, so importing any one module of
theirs loads all of it. The MCP SDK is one: `import mcp.server.lowlevel` first runs
`mcp/__init__.py`, which imports the SDK's client, and `mcp/server/__init__.py`, which imports the
high-level `MCPServer` (with uvicorn): 11 MB of a cordum-mcp process that uses none of them.

`defer_init(name)` registers a package without running its `__init__`: its submodules import as
usual, and the first read of an attribute that is not one of them (`from mcp import ClientSession`)
runs the real `__init__` right then, so code that wants the whole package still gets it, only
later. A package already imported is left as it is.

`skip_optional(name)` makes a module that a library imports only if it can (inside `try: ...
except ImportError`) look absent, e.g. httpx's command-line client, which pulls rich, click and
pygments into every process that imports httpx when they happen to be installed.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from typing import Any


def defer_init(name: str) -> bool:
    """Register package `name` (its parent first, if dotted) with its `__init__` deferred; True if
    it was deferred now, False if it was imported already or is not an installed package."""
    if name in sys.modules:
        return False
    parent, _, child = name.rpartition(".")
    if parent and parent not in sys.modules:
        defer_init(parent)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None or spec.loader is None:
        return False
    module = importlib.util.module_from_spec(spec)  # __path__, __spec__, __file__: nothing run yet
    module.__getattr__ = _run_init_on_first_read(module, spec)  # type: ignore[attr-defined]
    sys.modules[name] = module
    if parent:
        setattr(sys.modules[parent], child, module)
    return True


def _run_init_on_first_read(module: types.ModuleType, spec: Any):
    running = False

    def __getattr__(attr: str) -> Any:
        nonlocal running
        # While the real __init__ runs, the import system asks for submodules it has yet to import
        # (`from . import x`): they are missing, so that it imports them.
        if running:
            raise AttributeError(f"module {module.__name__!r} has no attribute {attr!r}")
        running = True
        del module.__getattr__  # type: ignore[attr-defined]
        spec.loader.exec_module(module)
        return getattr(module, attr)

    return __getattr__


def skip_optional(name: str) -> None:
    """Make `import name` raise ImportError in this process, unless it is imported already."""
    sys.modules.setdefault(name, None)  # type: ignore[arg-type]  (None: "not importable", by design)
