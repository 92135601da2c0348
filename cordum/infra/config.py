"""Settings from the environment, validated once at start.

Every variable of the guide's configuration table is here with its default. A bad value raises
`ConfigError` naming the variable, the value and what is allowed; `main` turns that into a clean exit.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, TypeVar

from cordum.runtime.identity import default_instance_id
from cordum.runtime.log import redact_urls

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the variable."""


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of true/false/1/0/yes/no/on/off")


def parse_duration(raw: str) -> float:
    """Seconds from `30s`, `250ms`, `2m`, `1h` or a bare number of seconds."""
    match = _DURATION.match(raw)
    if not match:
        raise ValueError("expected a duration such as 30s, 250ms, 2m or a number of seconds")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError("expected an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"expected an integer {bound}")
        return value

    return parse


def _one_of(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ValueError("expected one of " + ", ".join(repr(c) for c in choices))
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip()
        if not any(value.startswith(s + "://") for s in schemes) or value.endswith("://"):
            raise ValueError("expected a URL starting with " + " or ".join(f"{s}://" for s in schemes))
        return value

    return parse


def parse_host_port(raw: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets: `[::1]:7000`), both parts required."""
    host, sep, port = raw.strip().rpartition(":")
    host = host.strip().strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{raw.strip()!r} is not host:port with a port between 1 and 65535")
    return host, int(port)


REDIS_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def parse_redis_cluster_addresses(raw: str) -> tuple[tuple[str, int], ...]:
    """`REDIS_CLUSTER_ADDRESSES`: comma-separated `host:port` seeds (any one reachable node is
    enough to discover the cluster; list several so start-up survives a node being down)."""
    parts = [part.strip() for part in raw.split(",")]
    if not any(parts):
        return ()
    if not all(parts):
        raise ValueError("expected comma-separated host:port seeds, without empty entries")
    return tuple(parse_host_port(part) for part in parts)


def parse_redis_url(raw: str) -> tuple[str, tuple[tuple[str, int], ...]]:
    """`REDIS_URL`: `redis://`, `rediss://` or `unix://` for one server, or
    `redis+cluster://[user:password@]host:port[,host:port...][/0]` (`rediss+cluster://` for TLS) for
    a Redis Cluster. Returns the URL and the cluster seeds (empty for one server)."""
    value = _url("redis", "rediss", "unix", *REDIS_CLUSTER_SCHEMES)(raw)
    scheme, _, rest = value.partition("://")
    if scheme not in REDIS_CLUSTER_SCHEMES:
        return value, ()
    hosts, _, path = rest.partition("/")
    if path.strip("/") not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0: drop the /<db> path or use /0")
    if "?" in hosts or "#" in hosts:
        raise ValueError("query parameters are not supported on a redis+cluster:// URL")
    _, _, hosts = hosts.rpartition("@")  # credentials are read by the client, not here
    seeds = parse_redis_cluster_addresses(hosts)
    if not seeds:
        raise ValueError(f"expected {scheme}://host:port[,host:port...]")
    return value, seeds


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def parse_nats_servers(raw: str) -> tuple[str, ...]:
    """`NATS_URL`: one server URL or several, comma-separated (`nats://a:4222,nats://b:4222`), the
    members of one NATS cluster; the client connects to one and fails over to the others."""
    parts = [part.strip() for part in raw.split(",")]
    if not all(parts):
        raise ValueError("expected comma-separated server URLs, without empty entries")
    check = _url(*NATS_SCHEMES)
    servers = []
    for part in parts:
        try:
            servers.append(check(part))
        except ValueError as exc:
            raise ValueError(f"{part!r}: {exc}") from None
        host = part.partition("://")[2].rpartition("@")[2].split("/")[0]
        if ":" in host and not host.rsplit(":", 1)[1].isdigit():
            raise ValueError(f"{part!r}: the port must be a number")
    return tuple(servers)


def parse_listen_addr(raw: str) -> tuple[str, int]:
    """`host:port` or `:port` (all interfaces), as the Go services take them."""
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected host:port or :port with a port between 1 and 65535")
    return (host.strip("[]") or "0.0.0.0", int(port))


def _env(env: Mapping[str, str], name: str, default: str, parse: Callable[[str], T]) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        raw = default
    try:
        return parse(raw)
    except ValueError as exc:
        raise ConfigError(redact_urls(f"{name}={raw!r} is invalid: {exc}")) from None


@dataclass(frozen=True)
class Settings:
    """What every service reads from its environment."""

    instance_id: str
    redis_url: str = "redis://localhost:6379/0"
    # Seeds of a Redis Cluster (REDIS_CLUSTER_ADDRESSES or a redis+cluster:// REDIS_URL); empty:
    # one server at redis_url.
    redis_cluster_nodes: tuple[tuple[str, int], ...] = ()
    redis_pool_size: int = 20
    redis_min_idle_conns: int = 5
    redis_rate_limit: bool = True
    nats_url: str = "nats://localhost:4222"
    nats_servers: tuple[str, ...] = ("nats://localhost:4222",)  # NATS_URL split on commas
    nats_use_jetstream: bool = True
    nats_js_replicas: int = 1
    nats_js_ack_wait: float = 30.0
    nats_js_max_age: float = 7 * 24 * 3600.0
    mcp_transport: str = "stdio"
    mcp_http_addr: tuple[str, int] = ("0.0.0.0", 8090)
    audit_transport: str = ""
    safety_decision_cache_ttl: float = 0.0
    safety_decision_cache_max_size: int = 10000
    shutdown_timeout: float = 15.0
    log_level: str = "info"
    # Credentials kept out of the URLs (and out of repr): REDIS_USERNAME/REDIS_PASSWORD (an ACL
    # user, or the requirepass password) apply when REDIS_URL carries none; NATS_USER/NATS_PASSWORD
    # or NATS_TOKEN when NATS_URL carries none.
    redis_username: str = field(default="", repr=False)
    redis_password: str = field(default="", repr=False)
    nats_user: str = field(default="", repr=False)
    nats_password: str = field(default="", repr=False)
    nats_token: str = field(default="", repr=False)
    extra: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def redis_cluster(self) -> bool:
        return bool(self.redis_cluster_nodes)


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the environment; raises ConfigError on the first bad value."""
    env = os.environ if env is None else env
    pool = _env(env, "REDIS_POOL_SIZE", "20", _int_in(1, 10000))
    min_idle = _env(env, "REDIS_MIN_IDLE_CONNS", "5", _int_in(0, 10000))
    if min_idle > pool:
        raise ConfigError(
            f"REDIS_MIN_IDLE_CONNS={min_idle} is invalid: must not exceed REDIS_POOL_SIZE={pool}"
        )
    instance = env.get("CORDUM_INSTANCE_ID", "").strip() or default_instance_id()
    if any(c.isspace() for c in instance):
        raise ConfigError(f"CORDUM_INSTANCE_ID={instance!r} is invalid: must not contain spaces")
    redis_url, url_seeds = _env(env, "REDIS_URL", "redis://localhost:6379/0", parse_redis_url)
    seeds = _env(env, "REDIS_CLUSTER_ADDRESSES", "", parse_redis_cluster_addresses)
    if seeds and url_seeds:
        raise ConfigError(
            f"REDIS_CLUSTER_ADDRESSES={env.get('REDIS_CLUSTER_ADDRESSES')!r} is invalid: REDIS_URL is already "
            "a redis+cluster:// URL; set the seeds in one of the two"
        )
    if seeds and redis_url.startswith("unix://"):
        raise ConfigError(
            f"REDIS_CLUSTER_ADDRESSES={env.get('REDIS_CLUSTER_ADDRESSES')!r} is invalid: REDIS_URL={redact_urls(redis_url)!r} "
            "is a unix socket; a cluster client takes credentials and TLS from a redis:// or rediss:// REDIS_URL"
        )
    nats_servers = _env(env, "NATS_URL", "nats://localhost:4222", parse_nats_servers)
    return Settings(
        instance_id=instance,
        redis_url=redis_url,
        redis_cluster_nodes=seeds or url_seeds,
        redis_pool_size=pool,
        redis_min_idle_conns=min_idle,
        redis_rate_limit=_env(env, "REDIS_RATE_LIMIT", "true", parse_bool),
        nats_url=",".join(nats_servers),
        nats_servers=nats_servers,
        nats_use_jetstream=_env(env, "NATS_USE_JETSTREAM", "true", parse_bool),
        nats_js_replicas=_env(env, "NATS_JS_REPLICAS", "1", _int_in(1, 5)),
        nats_js_ack_wait=_env(env, "NATS_JS_ACK_WAIT", "30s", parse_positive_duration),
        nats_js_max_age=_env(env, "NATS_JS_MAX_AGE", "168h", parse_positive_duration),
        mcp_transport=_env(env, "MCP_TRANSPORT", "stdio", _one_of("stdio", "http")),
        mcp_http_addr=_env(env, "MCP_HTTP_ADDR", ":8090", parse_listen_addr),
        audit_transport=_env(env, "AUDIT_TRANSPORT", "local", _one_of("local", "nats")),
        safety_decision_cache_ttl=_env(env, "SAFETY_DECISION_CACHE_TTL", "0", parse_duration),
        safety_decision_cache_max_size=_env(
            env, "SAFETY_DECISION_CACHE_MAX_SIZE", "10000", _int_in(1, 10_000_000)
        ),
        shutdown_timeout=_env(env, "CORDUM_SHUTDOWN_TIMEOUT", "15s", parse_positive_duration),
        log_level=_env(env, "CORDUM_LOG_LEVEL", "info", _one_of("debug", "info", "warning", "error")),
        **_credentials(env),
        extra=env,
    )


def _credentials(env: Mapping[str, str]) -> dict[str, str]:
    found = {name.lower(): (env.get(name) or "").strip()
             for name in ("REDIS_USERNAME", "REDIS_PASSWORD", "NATS_USER", "NATS_PASSWORD", "NATS_TOKEN")}
    if bool(found["nats_user"]) != bool(found["nats_password"]):
        raise ConfigError("NATS_USER and NATS_PASSWORD go together: set both or neither")
    if found["nats_token"] and found["nats_user"]:
        raise ConfigError("NATS_TOKEN is invalid together with NATS_USER/NATS_PASSWORD: use one or the other")
    if found["redis_username"] and not found["redis_password"]:
        raise ConfigError("REDIS_USERNAME is invalid without REDIS_PASSWORD")
    return {"redis_username": found["redis_username"], "redis_password": found["redis_password"],
            "nats_user": found["nats_user"], "nats_password": found["nats_password"],
            "nats_token": found["nats_token"]}


def parse_positive_duration(raw: str) -> float:
    value = parse_duration(raw)
    if value <= 0:
        raise ValueError("expected a duration greater than zero")
    return value


parse_positive_int = _int_in(1)


def env_value(settings: Settings, name: str, default: str, parse: Callable[[str], T]) -> T:
    """A service-specific variable, validated like the common ones."""
    return _env(settings.extra, name, default, parse)
