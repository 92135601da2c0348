"""cordum-mcp's configuration: command-line flags over environment variables, validated once.

    --addr / CORDUM_GATEWAY_ADDR          the gateway's REST API (default http://localhost:8081)
    --api-key / CORDUM_API_KEY            stdio: the key every call uses; HTTP: not used (each
                                          request brings its own credential)
    CORDUM_TENANT_ID                      sent as X-Tenant-ID (the gateway refuses other tenants' keys)
    --request-timeout / CORDUM_MCP_REQUEST_TIMEOUT   per gateway call (default 30s)
    MCP_TRANSPORT stdio|http, MCP_HTTP_ADDR :8090 (read by cordum.infra.config)
    CORDUM_MCP_READ_ONLY                  true: the mutating tools are neither listed nor callable
    CORDUM_MCP_DISABLED_TOOLS             comma-separated tool names, likewise switched off

A bad value raises ConfigError naming the flag or variable (the service exits 2).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Mapping, Sequence

from cordum.cli.http import normalize_addr
from cordum.infra.config import ConfigError, Settings, env_value, parse_bool, parse_positive_duration
from cordum.mcp.catalog import MUTATING, TOOLS, UNAVAILABLE

DEFAULT_GATEWAY = "http://localhost:8081"
DEFAULT_TIMEOUT = "30s"


@dataclass(frozen=True)
class McpConfig:
    transport: str
    http_addr: tuple[str, int]
    gateway: str
    api_key: str
    tenant: str
    request_timeout: float
    disabled: frozenset[str]  # tools switched off (read-only mode adds every mutating tool)
    read_only: bool = False

    def __repr__(self) -> str:  # never shows the key
        return (f"McpConfig(transport={self.transport!r}, gateway={self.gateway!r}, tenant={self.tenant!r}, "
                f"read_only={self.read_only}, disabled={sorted(self.disabled)})")

    def enabled(self, tool: str) -> bool:
        return tool in TOOLS and tool not in self.disabled


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cordum-mcp", description=(
        "MCP server for Cordum: a tenant-scoped proxy over the gateway's REST API. "
        "MCP_TRANSPORT=stdio (default) or http (MCP_HTTP_ADDR, default :8090)."))
    p.add_argument("--addr", help="gateway address (env CORDUM_GATEWAY_ADDR, default %s)" % DEFAULT_GATEWAY)
    p.add_argument("--api-key", help="gateway API key for stdio (env CORDUM_API_KEY)")
    p.add_argument("--request-timeout", help="per gateway call, e.g. 30s (env CORDUM_MCP_REQUEST_TIMEOUT)")
    return p


def _gateway_url(raw: str) -> str:
    url = normalize_addr(raw)
    scheme, _, rest = url.partition("://")
    if scheme not in ("http", "https") or not rest:
        raise ValueError("expected http://host:port or https://host:port")
    return url


def _tool_names(raw: str) -> frozenset[str]:
    names = frozenset(part.strip() for part in raw.split(",") if part.strip())
    unknown = sorted(n for n in names if n not in TOOLS and n not in UNAVAILABLE)
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}")
    return names


def _flag(value: str | None, flag: str, parse, default: str, settings: Settings, var: str):
    """A flag wins over its variable; its error names the flag."""
    if value is None:
        return env_value(settings, var, default, parse)
    try:
        return parse(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}={value!r} is invalid: {exc}") from None


def load_config(settings: Settings, argv: Sequence[str] = ()) -> McpConfig:
    args = parser().parse_args(list(argv))
    env: Mapping[str, str] = settings.extra
    gateway = _flag(args.addr, "--addr", _gateway_url, DEFAULT_GATEWAY, settings, "CORDUM_GATEWAY_ADDR")
    timeout = _flag(args.request_timeout, "--request-timeout", parse_positive_duration, DEFAULT_TIMEOUT, settings,
                    "CORDUM_MCP_REQUEST_TIMEOUT")
    api_key = (args.api_key if args.api_key is not None else env.get("CORDUM_API_KEY", "")).strip()
    tenant = env.get("CORDUM_TENANT_ID", "").strip()
    if any(c.isspace() for c in tenant):
        raise ConfigError(f"CORDUM_TENANT_ID={tenant!r} is invalid: must not contain spaces")
    read_only = env_value(settings, "CORDUM_MCP_READ_ONLY", "false", parse_bool)
    disabled = env_value(settings, "CORDUM_MCP_DISABLED_TOOLS", "", _tool_names)
    if read_only:
        disabled |= MUTATING
    return McpConfig(transport=settings.mcp_transport, http_addr=settings.mcp_http_addr, gateway=gateway,
                     api_key=api_key, tenant=tenant, request_timeout=timeout, disabled=disabled, read_only=read_only)
