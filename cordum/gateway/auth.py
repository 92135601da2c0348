"""API keys, roles and tenants.

Keys: `CORDUM_API_KEY` (role admin, tenant `TENANT_ID`, default "default") and any number more
from `CORDUM_API_KEYS_PATH`: a YAML or JSON list (or `{"keys": [...]}`) of
`{key, tenant, role (admin|operator|viewer; default viewer), principal_id}`. Keys are kept only
as SHA-256 digests and compared with `hmac.compare_digest`; a principal carries its key's
fingerprint (`key_fingerprint`: the first 16 hex digits of the SHA-256, never the key), which a
job records as `submitted_key` so that nobody approves a job submitted with their own key. Weak keys (shorter than 16 characters, or an
obvious default) refuse to start unless `CORDUM_ENV=dev`; the error names the variable, never the
key. No key at all is a startup error too.

Roles: viewer reads (GET); operator also submits, cancels, approves, rejects and retries DLQ
entries; admin does everything (config writes, DLQ deletes).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import yaml

from cordum.infra.config import ConfigError

ROLES = ("viewer", "operator", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
MIN_KEY_LENGTH = 16
WEAK_KEYS = frozenset({"changeme", "cordum", "secret", "test", "password", "admin", "default",
                       "apikey", "api-key", "changeme123", "password123", "cordum-api-key"})
DEV_ENVS = frozenset({"dev", "development", "local"})


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from the API key."""

    tenant: str
    role: str
    principal_id: str = ""
    static_admin: bool = False  # the CORDUM_API_KEY key
    key_fingerprint: str = ""  # key_fingerprint(key): identifies the key, never reveals it

    def allows(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def identity(self) -> str:
        """Recorded as `submitted_by`: the principal id, else the role."""
        return self.principal_id or self.role


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_fingerprint(key: str) -> str:
    """A stable, non-reversible name for an API key: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def is_weak(key: str) -> bool:
    return len(key) < MIN_KEY_LENGTH or key.strip().lower() in WEAK_KEYS


class KeyRing:
    def __init__(self, entries: Iterable[tuple[str, Principal]]) -> None:
        self._entries = [(_digest(key), principal) for key, principal in entries]
        if not self._entries:
            raise ConfigError("CORDUM_API_KEY is not set (and CORDUM_API_KEYS_PATH gives no keys): "
                              "the gateway refuses to start without an API key")

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = _digest(key)
        found: Principal | None = None
        for known, principal in self._entries:  # compare every entry: no early-exit timing
            if hmac.compare_digest(known, digest) and found is None:
                found = principal
        return found


def load_keyring(env: Any) -> KeyRing:
    """The key ring from the environment mapping; raises ConfigError naming the variable."""
    dev = env.get("CORDUM_ENV", "").strip().lower() in DEV_ENVS
    tenant = env.get("TENANT_ID", "").strip() or "default"
    entries: list[tuple[str, Principal]] = []
    static = env.get("CORDUM_API_KEY", "").strip()
    if static:
        if is_weak(static) and not dev:
            raise ConfigError(
                f"CORDUM_API_KEY is too weak (shorter than {MIN_KEY_LENGTH} characters or a well-known "
                "default); set a long random key, or CORDUM_ENV=dev for local testing"
            )
        entries.append((static, Principal(tenant=tenant, role="admin", principal_id="", static_admin=True,
                                          key_fingerprint=key_fingerprint(static))))
    path = env.get("CORDUM_API_KEYS_PATH", "").strip()
    if path:
        entries += _read_keys_file(Path(path), default_tenant=tenant, dev=dev)
    return KeyRing(entries)


def _read_keys_file(path: Path, *, default_tenant: str, dev: bool) -> list[tuple[str, Principal]]:
    var = "CORDUM_API_KEYS_PATH"
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{var}={str(path)!r} is invalid: cannot read it ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(text) if text.strip() else []
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{var}={str(path)!r} is invalid: not YAML/JSON{where}") from None
    if isinstance(doc, dict) and "keys" in doc:
        doc = doc["keys"]
    if not isinstance(doc, list):
        raise ConfigError(f"{var}={str(path)!r} is invalid: expected a list of {{key, tenant, role, principal_id}}")
    entries = []
    for index, item in enumerate(doc):
        where = f"{var}={str(path)!r} entry {index + 1}"
        if not isinstance(item, dict):
            raise ConfigError(f"{where} is invalid: expected an object")
        key = item.get("key")
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{where} is invalid: key is required")
        if is_weak(key.strip()) and not dev:
            raise ConfigError(f"{where} is invalid: the key is too weak (shorter than {MIN_KEY_LENGTH} "
                              "characters or a well-known default)")
        role = str(item.get("role") or "viewer").strip().lower()  # least privilege unless stated
        if role not in _RANK:
            raise ConfigError(f"{where} is invalid: role must be one of {', '.join(ROLES)}")
        tenant = str(item.get("tenant") or default_tenant).strip()
        principal_id = str(item.get("principal_id") or "").strip()
        entries.append((key.strip(), Principal(tenant=tenant, role=role, principal_id=principal_id,
                                               key_fingerprint=key_fingerprint(key.strip()))))
    return entries


def key_from_headers(headers: Any, args: Any | None = None) -> str | None:
    """The API key of a request: `X-API-Key`, else (WebSocket) the `api_key` query parameter."""
    key = headers.get("X-API-Key")
    if not key and args is not None:
        key = args.get("api_key")
    return key.strip() if key else None

