"""The gateway's REST client for cordumctl (on httpx) and the mapping of outcomes to exit codes.

Every request sends `X-API-Key` and `X-Tenant-ID`; over https the gateway's certificate is checked
against the system's CAs, or `cacert` (cordumctl --cacert), or not at all (`insecure`). Redirects are
followed, but credentials go only to the origin they were given for. A non-2xx answer raises `GatewayError`, which
carries the message from the gateway's error envelope (`{"error": ..., "status": ..., "code"?}`) and
the exit code cordumctl returns for it. The API key never appears in an error's text.
"""

from __future__ import annotations

import json
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Mapping

from cordum.infra.lazy import skip_optional

# httpx's command-line client imports rich, click and pygments if they are installed (half of the
# time `import httpx` takes, 6 MB); nothing here runs it.
skip_optional("httpx._main")

import httpx  # noqa: E402

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


MAX_REDIRECTS = 5


def tls_verify(cacert: str = "", insecure: bool = False) -> ssl.SSLContext | bool:
    """What httpx (and the stream's client) check a gateway's certificate with: the system's CAs,
    a CA bundle file, or nothing (`--insecure`). A missing or unreadable bundle is a GatewayError."""
    if insecure:
        return False
    context = ssl.create_default_context()
    if cacert:
        try:
            context.load_verify_locations(cafile=cacert)
        except (OSError, ssl.SSLError) as exc:
            raise GatewayError(f"--cacert {cacert}: cannot load it ({getattr(exc, 'strerror', None) or exc})",
                               exit_code=EXIT_USAGE) from None
    return context


class Client:
    """A small synchronous client of the gateway's REST API (one httpx connection pool, shared by
    the threads that use this client)."""

    def __init__(self, addr: str = DEFAULT_ADDR, *, api_key: str = "", tenant: str = DEFAULT_TENANT,
                 timeout: float = DEFAULT_TIMEOUT, cacert: str = "", insecure: bool = False) -> None:
        self.addr = normalize_addr(addr)
        self.api_key = api_key
        self.tenant = tenant
        self.timeout = timeout
        self.cacert = cacert
        self.insecure = insecure
        self._http: httpx.Client | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the key
        return f"Client(addr={self.addr!r}, tenant={self.tenant!r})"

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "cordumctl"}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        if self.tenant:
            headers["X-Tenant-ID"] = self.tenant
        return headers

    def tls(self) -> ssl.SSLContext | bool:
        return tls_verify(self.cacert, self.insecure)

    def url(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        url = self.addr + path
        if query:
            pairs = [(k, str(v)) for k, v in query.items() if v is not None and v != ""]
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        return url

    def _client(self) -> httpx.Client:
        with self._lock:
            if self._http is None:
                # Redirects are followed by `request` itself: httpx would forward X-API-Key to
                # another host (it strips only Authorization).
                self._http = httpx.Client(verify=self.tls(), timeout=self.timeout, follow_redirects=False)
            return self._http

    def close(self) -> None:
        with self._lock:
            http, self._http = self._http, None
        if http is not None:
            http.close()

    def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                body: Any = None, headers: Mapping[str, str] | None = None) -> Response:
        """Send one request (extra `headers` on top of the usual ones); return the 2xx response or
        raise `GatewayError`."""
        headers = {**self.headers(), **(headers or {})}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        url, where = self.url(path, query), f"{method} {path}"
        try:
            resp = self._send(method, url, headers, data)
        except httpx.TimeoutException:
            raise GatewayError(f"gateway {self.addr} did not answer {where} within {self.timeout:g}s",
                               exit_code=EXIT_UNAVAILABLE) from None
        except httpx.TooManyRedirects:
            raise GatewayError(f"gateway {self.addr}: more than {MAX_REDIRECTS} redirects for {where}",
                               exit_code=EXIT_UNAVAILABLE) from None
        except (httpx.TransportError, OSError) as exc:
            raise GatewayError(f"gateway {self.addr} unreachable ({_reason(exc)})",
                               exit_code=EXIT_UNAVAILABLE) from None
        parsed = _parse(resp.content)
        if not 200 <= resp.status_code < 300:
            raise error_from_response(resp.status_code, parsed, resp.headers, where)
        return Response(resp.status_code, parsed, dict(resp.headers.items()))

    def _send(self, method: str, url: str, headers: dict[str, str], data: bytes | None) -> httpx.Response:
        """One request, following redirects; a redirect to another origin (host, port or scheme,
        https → http included) goes there without the credentials."""
        http = self._client()
        for _ in range(MAX_REDIRECTS + 1):
            resp = http.request(method, url, headers=headers, content=data)
            location = resp.headers.get("location")
            if not resp.is_redirect or not location:
                return resp
            target = urllib.parse.urljoin(url, location)
            if _origin(url)[0] == "https" and _origin(target)[0] != "https":
                # the body (a prompt, a job's input) would cross the network in clear
                raise httpx.UnsupportedProtocol(f"refused a redirect from https to {target}", request=resp.request)
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method == "POST"):
                method, data = "GET", None  # as browsers do
                headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            url = target
        raise httpx.TooManyRedirects(f"more than {MAX_REDIRECTS} redirects", request=resp.request)

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
    if isinstance(reason, OSError):
        return reason.strerror or str(reason)
    if isinstance(reason, BaseException):
        # httpx wraps the socket's error: its text ("[Errno 111] Connection refused") says it all
        return str(reason) or type(reason).__name__
    return str(reason)
