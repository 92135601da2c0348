"""The gateway's REST client for cordumctl (stdlib only) and the mapping of outcomes to exit codes.

Every request sends `X-API-Key` and `X-Tenant-ID`. A non-2xx answer raises `GatewayError`, which
carries the message from the gateway's error envelope (`{"error": ..., "status": ..., "code"?}`) and
the exit code cordumctl returns for it. The API key never appears in an error's text.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Mapping

# Exit codes (documented in `cordumctl --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the job/run ended in a non-success state, or a generic failure (e.g. HTTP 400/409)
EXIT_USAGE = 2  # bad command line (argparse)
EXIT_NOT_FOUND = 3  # HTTP 404
EXIT_AUTH = 4  # HTTP 401/403, or a policy denial
EXIT_RATE_LIMITED = 5  # HTTP 429, or a policy throttle
EXIT_UNAVAILABLE = 6  # gateway unreachable, timed out, 5xx, or reporting itself unhealthy
EXIT_APPROVAL = 7  # the job is held for approval

EXIT_CODES_HELP = """\
exit codes:
  0  ok (job get/watch, job submit --wait: the job SUCCEEDED; run get, run start --wait:
     the run succeeded)
  1  the job ended in a non-success state (FAILED, DENIED, CANCELLED, TIMEOUT, ...), the run
     in failed, denied, cancelled or timed_out, or another failure (e.g. the gateway
     answered 400 or 409)
  2  usage error
  3  not found (404)
  4  authentication or permission (401/403); a policy denial on submit
  5  rate limited or throttled (429)
  6  gateway unreachable, timed out or failing (5xx); `status`: NATS or Redis down
  7  approval required (the job is held for approval)
"""

DEFAULT_ADDR = "http://localhost:8081"
DEFAULT_TENANT = "default"
DEFAULT_TIMEOUT = 10.0


def exit_code_for_status(status: int) -> int:
    """The exit code for an HTTP status (0 for a connection failure, which is EXIT_UNAVAILABLE)."""
    if 200 <= status < 300:
        return EXIT_OK
    if status == 404:
        return EXIT_NOT_FOUND
    if status in (401, 403):
        return EXIT_AUTH
    if status == 429:
        return EXIT_RATE_LIMITED
    if status >= 500 or status == 0:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


def normalize_addr(addr: str) -> str:
    """`localhost:8081` → `http://localhost:8081`; drops a trailing `/` and `/api/v1`."""
    addr = addr.strip()
    if "://" not in addr:
        addr = "http://" + addr
    addr = addr.rstrip("/")
    if addr.endswith("/api/v1"):
        addr = addr[: -len("/api/v1")]
    return addr


@dataclass
class GatewayError(Exception):
    """A request that did not succeed: `status` is the HTTP status, 0 when the gateway was not reached."""

    message: str
    status: int = 0
    code: str = ""
    body: Any = None
    retry_after: str = ""
    exit_code: int = field(default=EXIT_FAILED)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def describe(self) -> str:
        """One line for stderr, e.g. `HTTP 404: job not found`."""
        text = self.message
        if self.code and self.code not in text:
            text = f"{text} ({self.code})"
        if self.status:
            text = f"HTTP {self.status}: {text}"
        if self.retry_after:
            text = f"{text}; retry after {self.retry_after}s"
        return text


@dataclass
class Response:
    status: int
    body: Any  # parsed JSON, raw text, or None for an empty body
    headers: Mapping[str, str]


CREDENTIAL_HEADERS = ("x-api-key", "authorization", "x-tenant-id")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme.lower(), (parts.hostname or "").lower(), parts.port


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects, but sends the API key only to the origin it was given for: a redirect to
    another host, port or scheme (https → http included) goes there without it."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            for name in [name for name in new.headers if name.lower() in CREDENTIAL_HEADERS]:
                new.remove_header(name)
        return new


_OPENER = urllib.request.build_opener(_SameOriginRedirects)


class Client:
    """A small synchronous client of the gateway's REST API."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, api_key: str = "", tenant: str = DEFAULT_TENANT,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.addr = normalize_addr(addr)
        self.api_key = api_key
        self.tenant = tenant
        self.timeout = timeout

    def __repr__(self) -> str:  # never shows the key
        return f"Client(addr={self.addr!r}, tenant={self.tenant!r})"

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "cordumctl"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if self.tenant:
            headers["X-Tenant-ID"] = self.tenant
        return headers

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = self.addr + path
        if query:
            pairs = [(k, str(v)) for k, v in query.items() if v is not None and v != ""]
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        return url

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, headers: Mapping[str, str] | None = None) -> Response:
        """Send one request (extra `headers` on top of the usual ones); return the 2xx response or
        raise `GatewayError`."""
        headers = {**self.headers(), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url(path, query), data=data, method=method, headers=headers)
        where = f"{method} {path}"
        try:
            with _OPENER.open(req, timeout=self.timeout) as resp:
                return Response(resp.status, _parse(resp.read()), dict(resp.headers.items()))
        except urllib.error.HTTPError as exc:
            raw = b""
            try:
                raw = exc.read()
            except OSError:
                pass
            raise error_from_response(exc.code, _parse(raw), exc.headers, where) from None
        except urllib.error.URLError as exc:
            raise GatewayError(f"gateway {self.addr} unreachable ({_reason(exc.reason)})",
                               exit_code=EXIT_UNAVAILABLE) from None
        except (TimeoutError, socket.timeout):
            raise GatewayError(f"gateway {self.addr} did not answer {where} within {self.timeout:g}s",
                               exit_code=EXIT_UNAVAILABLE) from None
        except (ConnectionError, OSError) as exc:
            raise GatewayError(f"gateway {self.addr} unreachable ({_reason(exc)})",
                               exit_code=EXIT_UNAVAILABLE) from None

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query).body

    def post(self, path: str, body: Any = None, *, query: Mapping[str, Any] | None = None,
             headers: Mapping[str, str] | None = None) -> Any:
        return self.request("POST", path, query=query, body=body if body is not None else {},
                            headers=headers).body

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path).body


def error_from_response(status: int, body: Any, headers: Any, where: str = "") -> GatewayError:
    """Build the `GatewayError` for a non-2xx answer, reading the error envelope when there is one."""
    message, code = "", ""
    if isinstance(body, dict):
        message = str(body.get("error") or body.get("message") or "")
        code = str(body.get("code") or "")
    elif isinstance(body, str):
        message = body.strip()[:200]
    if not message:
        message = _default_message(status)
        if where:
            message = f"{where}: {message}"
    retry_after = ""
    if headers is not None:
        retry_after = str(headers.get("Retry-After") or "")
    return GatewayError(message, status=status, code=code, body=body, retry_after=retry_after,
                        exit_code=exit_code_for_status(status))


def _default_message(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return "error"


def _parse(raw: bytes) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _reason(reason: Any) -> str:
    if isinstance(reason, BaseException):
        return reason.strerror or str(reason) if isinstance(reason, OSError) else str(reason)
    return str(reason)
