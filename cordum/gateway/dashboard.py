"""The dashboard: one page and its script and style, served by every gateway replica at
`/dashboard` (`/` redirects there). The files are read once at start and hold no data; every view
reads the JSON API with the key the user signed in with (kept in the tab's sessionStorage, sent
as `X-API-Key`, and as the `cordum-api-key` WebSocket subprotocol for the live stream), so the
API's own auth, tenant scoping and roles apply unchanged. No build step, no external downloads:
the page loads nothing but these three files (the Content-Security-Policy says so)."""

from __future__ import annotations

from pathlib import Path

from quart import Quart, Response, redirect

UI_DIR = Path(__file__).with_name("ui")
PATH = "/dashboard"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
_HEADERS = {
    # Only this origin's script, style and API; no inline script, no framing, no referrer.
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _load() -> dict[str, tuple[bytes, str]]:
    return {f"{PATH}/{path.name}" if path.name != "index.html" else PATH: (path.read_bytes(), _TYPES[path.suffix])
            for path in sorted(UI_DIR.iterdir()) if path.suffix in _TYPES}


def register(app: Quart) -> None:
    files = _load()

    @app.get("/")
    async def root() -> Response:
        return redirect(PATH + "/", 302)

    @app.get(PATH)
    async def dashboard_bare() -> Response:
        return redirect(PATH + "/", 302)  # relative asset paths resolve under /dashboard/

    @app.get(PATH + "/")
    @app.get(PATH + "/<name>")
    async def dashboard_file(name: str = "") -> Response:
        found = files.get(f"{PATH}/{name}" if name else PATH)
        if found is None:
            return Response("not found\n", status=404, content_type="text/plain; charset=utf-8", headers=_HEADERS)
        body, content_type = found
        return Response(body, content_type=content_type, headers=_HEADERS)
