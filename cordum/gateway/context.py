"""What every route handler shares: the gateway's options (from the environment), its clients and
stores (`Gateway`), and small request helpers (caller, role check, JSON body)."""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, TypeVar

from quart import g, request

from cordum.gateway.auth import DEV_ENVS, AuthFailures, KeyRing, Principal, load_keyring
from cordum.gateway.errors import ApiError
from cordum.gateway.idempotency import IdempotencyKeys
from cordum.gateway.oidc import OidcConfig, OidcVerifier
from cordum.infra.bus import Bus
from cordum.infra.config import Settings, env_value, parse_listen_addr, parse_positive_duration
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis
from cordum.infra.tls import GrpcTls
from cordum.runtime.lease import Leases
from cordum.safety.client import SafetyClient, kernel_client_tls, parse_kernel_addrs
from cordum.store.config import ConfigStore
from cordum.store.dlq import DlqStore
from cordum.store.jobs import JobStore
from cordum.store.workflows import WorkflowStore
from cordum.workflow.engine import WorkflowEngine, WorkflowMetrics

SERVICE = "cordum-api-gateway"
MAX_BODY = 1 << 20  # request bodies (413 above)
SENDER = "api-gateway"

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _fail_mode(raw: str) -> str:
    value = raw.strip().lower()
    if value not in ("closed", "open"):
        raise ValueError("expected 'closed' or 'open'")
    return value


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer between {low} and {high}")
        return value

    return parse


_buffer_size = _int_between(1, 10_000)


def _networks(raw: str) -> tuple[Any, ...]:
    """`CORDUM_TRUSTED_PROXIES`: comma-separated addresses or CIDR networks ("" = none)."""
    found = []
    for part in (p.strip() for p in raw.split(",")):
        if part:
            try:
                found.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                raise ValueError(f"{part!r} is not an IP address or network (e.g. 10.0.0.0/8)") from None
    return tuple(found)


def client_address(remote: str, forwarded: str | None, trusted: tuple[Any, ...]) -> str:
    """Who is calling: the peer, unless it is a trusted proxy; then the nearest address in its
    X-Forwarded-For that is not one (a client cannot spoof its way past a proxy that appends)."""
    def is_trusted(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in trusted)

    if not forwarded or not is_trusted(remote):
        return remote
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else remote


@dataclass(frozen=True)
class GatewayOptions:
    http_addr: tuple[str, int]
    safety_addrs: list[tuple[str, int]]
    safety_tls: GrpcTls
    fail_open: bool
    dlq_cleanup_interval: float
    ws_client_buffer: int
    policy_timeout: float
    keys: KeyRing = field(repr=False)
    default_tenant: str = "default"  # TENANT_ID: the operator's own tenant (system config writes)
    dev: bool = False  # CORDUM_ENV=dev|development|local
    keys_reload_interval: float = 5.0
    ws_max_per_tenant: int = 100  # WebSocket streams per tenant on this replica
    ws_ping_interval: float = 30.0
    ws_recheck_interval: float = 120.0  # a stream's key is checked again this often
    max_context_bytes: int = MAX_BODY  # a submit's `context`, as JSON
    auth_failures_per_minute: int = 30  # per client address, before it is refused (429)
    # Proxies whose X-Forwarded-For names the client (cordum-mcp on this host, a load balancer).
    trusted_proxies: tuple[Any, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    oidc: OidcConfig | None = None  # CORDUM_OIDC_ISSUER: bearer tokens of that issuer authenticate too
    audit_hmac_key: bytes = field(default=b"", repr=False)  # CORDUM_AUDIT_HMAC_KEY: keys the chain's hashes
    audit_buffer_size: int = 1000
    tenant_bytes_per_hour: int = 0  # CORDUM_TENANT_BYTES_PER_HOUR: input bytes a tenant stores an hour (0: no cap)

    @classmethod
    def from_settings(cls, settings: Settings) -> "GatewayOptions":
        return cls(
            http_addr=env_value(settings, "GATEWAY_HTTP_ADDR", ":8081", parse_listen_addr),
            safety_addrs=env_value(settings, "SAFETY_KERNEL_ADDR", "localhost:50051", parse_kernel_addrs),
            safety_tls=kernel_client_tls(settings),
            fail_open=env_value(settings, "POLICY_CHECK_FAIL_MODE", "closed", _fail_mode) == "open",
            dlq_cleanup_interval=env_value(settings, "DLQ_CLEANUP_INTERVAL", "1h", parse_positive_duration),
            ws_client_buffer=env_value(settings, "CORDUM_WS_CLIENT_BUFFER_SIZE", "256", _buffer_size),
            policy_timeout=env_value(settings, "GATEWAY_POLICY_CHECK_TIMEOUT", "5s", parse_positive_duration),
            keys=load_keyring(settings.extra),
            default_tenant=(settings.extra.get("TENANT_ID") or "").strip() or "default",
            dev=(settings.extra.get("CORDUM_ENV") or "").strip().lower() in DEV_ENVS,
            keys_reload_interval=env_value(settings, "CORDUM_API_KEYS_RELOAD_INTERVAL", "5s", parse_positive_duration),
            ws_max_per_tenant=env_value(settings, "CORDUM_WS_MAX_CONNECTIONS_PER_TENANT", "100", _int_between(1, 100_000)),
            ws_ping_interval=env_value(settings, "GATEWAY_WS_PING_INTERVAL", "30s", parse_positive_duration),
            ws_recheck_interval=env_value(settings, "GATEWAY_WS_AUTH_RECHECK_INTERVAL", "120s", parse_positive_duration),
            max_context_bytes=env_value(settings, "CORDUM_MAX_CONTEXT_BYTES", str(MAX_BODY), _int_between(1, MAX_BODY)),
            auth_failures_per_minute=env_value(settings, "CORDUM_AUTH_FAILURES_PER_MINUTE", "30", _int_between(1, 1_000_000)),
            trusted_proxies=env_value(settings, "CORDUM_TRUSTED_PROXIES", "127.0.0.0/8,::1/128", _networks),
            oidc=OidcConfig.from_env(settings.extra),
            audit_hmac_key=(settings.extra.get("CORDUM_AUDIT_HMAC_KEY") or "").strip().encode(),
            audit_buffer_size=env_value(settings, "CORDUM_AUDIT_BUFFER_SIZE", "1000", _int_between(1, 1_000_000)),
            tenant_bytes_per_hour=env_value(settings, "CORDUM_TENANT_BYTES_PER_HOUR", "0", _int_between(0, 1 << 50)),
        )


@dataclass
class Gateway:
    """The gateway's clients and stores; one per replica, shared by all handlers."""

    settings: Settings
    options: GatewayOptions
    redis: Redis
    bus: Bus
    metrics: Metrics
    safety: SafetyClient
    leases: Leases
    jobs: JobStore = field(init=False)
    dlq: DlqStore = field(init=False)
    configs: ConfigStore = field(init=False)
    workflows: WorkflowStore = field(init=False)
    # Start, cancel and rerun only: results are the cordum-workflow-engine service's.
    workflow_engine: WorkflowEngine = field(init=False)
    started_at: float = field(default_factory=time.time)
    hub: Any = None  # stream.StreamHub, set by the service
    ratelimiter: Any = None  # ratelimit.RateLimiter, set by the service (None: no limiting)
    status_cache: Any = None  # status.StatusCache
    audit: Any = None  # runtime.audit.AuditLog, set by the service (None: nothing recorded)
    auth_failures: AuthFailures = field(init=False)
    oidc: OidcVerifier | None = field(init=False)
    http_port: int | None = None

    def __post_init__(self) -> None:
        self.auth_failures = AuthFailures(limit=self.options.auth_failures_per_minute)
        self.oidc = (OidcVerifier(self.options.oidc, self.redis, self.options.keys, self.options.default_tenant)
                     if self.options.oidc is not None else None)
        self.jobs = JobStore(self.redis)
        self.dlq = DlqStore(self.redis)
        self.configs = ConfigStore(self.redis)
        self.workflows = WorkflowStore(self.redis)
        # Its metrics: a run the API starts goes pending → running here (cordum_workflows_started_total).
        self.workflow_engine = WorkflowEngine(store=self.workflows, jobs=self.jobs, bus=self.bus, leases=self.leases,
                                              redis=self.redis, metrics=WorkflowMetrics(self.metrics))
        self.idempotency = IdempotencyKeys(self.redis)
        self.submitted = self.metrics.counter(
            # The guide's per-replica throughput metric: summed over gateway replicas,
            # outcome="accepted" is the number of jobs admitted to run.
            "cordum_jobs_total", "Job submissions through this replica, by outcome", ["outcome"])
        # Cordum's names; the gateway's own name for the request counter counts too, for a release.
        self.http_requests = self.metrics.renamed_counter(
            "cordum_http_requests_total", "cordum_api_gateway_http_requests_total", "HTTP requests by method, route and status",
            ["method", "route", "status"])
        self.http_duration = self.metrics.histogram(
            "cordum_http_request_duration_seconds", "HTTP request handling time by method and route", ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.approval_decisions = self.metrics.counter(
            "cordum_approval_decisions_total", "Approval decisions by outcome (approved, rejected)", ["decision"])
        self.approval_latency = self.metrics.histogram(
            "cordum_approval_latency_seconds", "From a job being held for approval to its decision",
            buckets=(1, 10, 60, 300, 900, 3600, 4 * 3600, 24 * 3600, 7 * 24 * 3600))
        self.cancel_failures = self.metrics.counter(
            "cordum_job_cancel_failures_total", "Cancels recorded but not published to the bus (the worker was not told)")
        self.dlq_written = self.metrics.counter(
            "cordum_api_gateway_dlq_entries_written_total", "DLQ entries written by this replica's DLQ writer")

    @property
    def instance_id(self) -> str:
        return self.settings.instance_id


# ---- request helpers ------------------------------------------------------------------------


def caller() -> Principal:
    """The authenticated caller of the current /api/ request."""
    principal = getattr(g, "principal", None)
    if principal is None:  # only reachable if a route is mounted outside /api/
        raise ApiError(401, "missing API key")
    return principal


def require(role: str) -> Callable[[F], F]:
    """Route decorator: the caller's role must be at least `role`."""

    def wrap(handler: F) -> F:
        @functools.wraps(handler)
        async def checked(*args: Any, **kwargs: Any) -> Any:
            check_role(caller(), role)
            return await handler(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return wrap


def check_role(who: Principal, role: str) -> None:
    """403 unless `who`'s role is at least `role`."""
    if not who.allows(role):
        raise ApiError(403, f"role {who.role} may not do this (requires {role})", code="forbidden")


async def json_body(*, optional: bool = False) -> dict[str, Any]:
    """The request body as a JSON object; 400 naming the problem otherwise (413 if too large)."""
    return body_object(await request.get_data(as_text=False), optional=optional)


def body_object(data: bytes, *, optional: bool = False) -> dict[str, Any]:
    """A request body as a JSON object; 400 naming the problem otherwise."""
    if not data or not data.strip():
        if optional:
            return {}
        raise ApiError(400, "request body must be a JSON object")
    body = parse_json_object(data)
    if body is None:
        raise ApiError(400, "request body must be a JSON object")
    return body


MAX_JSON_DEPTH = 64
# A \uD800-\uDFFF escape: only then can the decoded text hold a lone surrogate (checked below).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json_object(data: bytes) -> dict[str, Any] | None:
    """`data` as a JSON object (None: valid JSON but not an object); ApiError 400 naming the
    problem for text that is not UTF-8, not JSON, nested deeper than MAX_JSON_DEPTH, or holding
    a lone surrogate escape (such a string cannot be stored or sent on)."""
    try:
        # Strict UTF-8 first: json.loads(bytes) would also take UTF-16/32 and let encoded
        # surrogates (ED A0 80) through, which no store or protobuf can hold.
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ApiError(400, "invalid JSON body: not UTF-8") from None
    except RecursionError:
        raise ApiError(400, f"invalid JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ApiError(400, f"invalid JSON body: {exc}") from None
    problem = _json_problem(body, "$", 0, check_text=bool(_SURROGATE_ESCAPE.search(data)))
    if problem:
        raise ApiError(400, f"invalid JSON body: {problem}")
    return body if isinstance(body, dict) else None


def json_problem(doc: Any) -> str | None:
    """What makes a decoded document unfit to store (too deep, a lone surrogate), or None."""
    return _json_problem(doc, "$", 0, check_text=True)


def _json_problem(value: Any, path: str, depth: int, *, check_text: bool) -> str | None:
    if depth > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels at {path}"
    if isinstance(value, dict):
        for key, item in value.items():
            if check_text and not _encodable(key):
                return f"a key at {path} holds a lone surrogate (\\uD800-\\uDFFF without its pair)"
            found = _json_problem(item, f"{path}.{key}" if _encodable(key) else path, depth + 1, check_text=check_text)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _json_problem(item, f"{path}[{index}]", depth + 1, check_text=check_text)
            if found:
                return found
    elif check_text and isinstance(value, str) and not _encodable(value):
        return f"the string at {path} holds a lone surrogate (\\uD800-\\uDFFF without its pair)"
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def query_int(name: str, default: int, *, low: int = 1, high: int | None = None) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if value < low:
        raise ApiError(400, f"{name} must be >= {low}")
    if high is not None and value > high:
        value = high
    return value


def optional_str(body: dict[str, Any], name: str, *, max_len: int | None = None) -> str:
    value = body.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if max_len is not None and len(value) > max_len:
        raise ApiError(400, f"{name} must be at most {max_len} characters")
    return value.strip()


def optional_str_list(body: dict[str, Any], name: str, *, max_items: int = 100) -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{name} must be an array of strings")
    if len(value) > max_items:
        raise ApiError(400, f"{name} must have at most {max_items} entries")
    return [v.strip() for v in value if v.strip()]


def optional_str_map(body: dict[str, Any], name: str, *, max_items: int = 50) -> dict[str, str]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ApiError(400, f"{name} must be an object of strings")
    if len(value) > max_items:
        raise ApiError(400, f"{name} must have at most {max_items} entries")
    return {str(k): v for k, v in value.items()}


def cursor_text(cursor: int | None) -> str | None:
    """Page cursors go out as strings of digits: the public SDK's models and paginate() expect that."""
    return None if cursor is None else str(cursor)
