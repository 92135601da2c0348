"""API keys, roles and tenants.

Keys: `CORDUM_API_KEY` (role admin, tenant `TENANT_ID`, default "default") and any number more
from `CORDUM_API_KEYS_PATH`: a YAML or JSON list (or `{"keys": [...]}`) of
`{key, tenant, role (admin|operator|viewer; default viewer), principal_id, actor_id, actor_type,
expires_at}`. The file
is read again when it changes (`KeyRing.reload_if_changed`; a file that no longer parses keeps
the keys in force and the error is logged); a key past its `expires_at` (ISO 8601, UTC unless it
says otherwise) authenticates nothing. Keys are kept only as SHA-256 digests and compared with
`hmac.compare_digest`. A principal carries its key's name (`key_fingerprint`: an HMAC of the
digest under the deployment's fingerprint secret, so it cannot be used to test guesses of the key
offline), which a job records as `submitted_key` so that nobody approves a job submitted with
their own key; no job or run view shows it (the audit trail records it). Weak keys (shorter than
16 characters, an obvious default, or fewer than 8 distinct characters) refuse to start unless
`CORDUM_ENV=dev`; the error names the variable, never the key. No key at all is a startup error too. An address with too many failed
authentications is refused for a while before any key is looked at (`AuthFailures`).

Roles: viewer reads (GET); operator also submits, cancels, approves, rejects and retries DLQ
entries; admin does everything (config writes, DLQ deletes).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import yaml

from cordum.infra.config import ConfigError
from cordum.store.validate import TENANT_RULE, tenant_name_problem

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
    actor_id: str = ""  # the agent the key belongs to, if the keys file binds one
    actor_type: str = ""  # human | service, with actor_id
    key_fingerprint: str = ""  # identifies the key, never reveals it (see KeyRing.set_fingerprint_secret)
    legacy_fingerprint: str = ""  # the unkeyed form jobs recorded before: still recognised
    expires_at: float = 0.0  # unix time a bearer token's principal ends (0: an API key's, see KeyRing)

    def allows(self, role: str) -> bool:
        return _RANK[self.role] >= _RANK[role]

    @property
    def identity(self) -> str:
        """Recorded as `submitted_by`: the principal id, else the role."""
        return self.principal_id or self.role


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def key_fingerprint(key: str) -> str:
    """The unkeyed name of an API key (the first 16 hex digits of its SHA-256): what a ring without
    a fingerprint secret uses, and what jobs recorded before there was one."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def keyed_fingerprint(secret: bytes, digest: bytes) -> str:
    """A key's name under the deployment's fingerprint secret: an HMAC of the key's SHA-256, so
    nobody who sees it (in a job record, a log) can test guesses of the key offline."""
    return hmac.new(secret, digest, hashlib.sha256).hexdigest()[:16]


MIN_DISTINCT_CHARS = 8  # "aaaaaaaaaaaaaaaa" and "1212121212121212" are long, not strong


def is_weak(key: str) -> bool:
    return (len(key) < MIN_KEY_LENGTH or key.strip().lower() in WEAK_KEYS
            or len(set(key)) < MIN_DISTINCT_CHARS)


class AuthFailures:
    """Failed authentications per client address (per replica, in memory): an address with
    `limit` failures within `window` seconds is refused before its key is even looked at, so
    keys cannot be guessed at the speed of the API. Bounded: the least recently failing
    addresses are forgotten first past `max_addresses`."""

    def __init__(self, limit: int = 30, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def blocked_for(self, address: str, now: float) -> float:
        """Seconds until `address` may try again (0: it may now)."""
        times = self._failures.get(address)
        if not times:
            return 0.0
        recent = [t for t in times if now - t < self.window]
        self._failures[address] = recent
        if len(recent) < self.limit:
            return 0.0
        return max(0.0, recent[-self.limit] + self.window - now)

    def record(self, address: str, now: float) -> None:
        times = self._failures.pop(address, [])
        times = [t for t in times if now - t < self.window][-self.limit:] + [now]
        self._failures[address] = times
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)


# (key, principal, expires_at as unix seconds or None)
KeyEntry = tuple[str, Principal, float | None]


@dataclass(frozen=True)
class KeysFile:
    """Where the file keys come from, and what is needed to read it again."""

    path: Path
    default_tenant: str
    dev: bool

    def signature(self) -> tuple[int, int, int] | None:
        """What changes when the file is replaced or rewritten (None: it cannot be read)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def read(self) -> list[KeyEntry]:
        return _read_keys_file(self.path, default_tenant=self.default_tenant, dev=self.dev)


class KeyRing:
    def __init__(self, entries: Iterable[KeyEntry], *, static: Iterable[KeyEntry] = (),
                 source: KeysFile | None = None) -> None:
        self._secret = b""
        self._static = [_stored(entry) for entry in static]
        self._entries = self._static + [_stored(entry) for entry in entries]
        self._source = source
        self._signature = source.signature() if source is not None else None
        self.reload_error = ""
        if not self._entries:
            raise ConfigError("CORDUM_API_KEY is not set (and CORDUM_API_KEYS_PATH gives no keys): "
                              "the gateway refuses to start without an API key")

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = _digest(key)
        now = time.time()
        found: Principal | None = None
        for known, principal, expires_at in self._entries:  # compare every entry: no early-exit timing
            if hmac.compare_digest(known, digest) and found is None and (expires_at is None or now < expires_at):
                found = principal
        return found

    def still_valid(self, principal: Principal) -> bool:
        """Whether the key `principal` was authenticated with is still in force, unchanged (a
        long-lived connection re-checks this: a key removed from the file, expired, or given
        another tenant or role loses it); for a bearer token's principal, until the token expires."""
        now = time.time()
        if principal.expires_at:
            return now < principal.expires_at
        return any(known == principal and (expires_at is None or now < expires_at)
                   for _, known, expires_at in self._entries)

    def reload_if_changed(self) -> bool:
        """Read the keys file again if it changed since the last read; whether the keys changed.
        A file that cannot be read or parsed keeps the keys in force (`reload_error` says why)."""
        if self._source is None:
            return False
        signature = self._source.signature()
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            entries = self._source.read()
        except ConfigError as exc:
            self.reload_error = str(exc)
            return False
        self.reload_error = ""
        self._entries = self._static + [self._fingerprinted(_stored(entry)) for entry in entries]
        return True

    def name_of(self, identity: str) -> str:
        """The name a non-key credential (a token's issuer and subject) is recorded under."""
        return keyed_fingerprint(self._secret, _digest(identity)) if self._secret else _digest(identity).hex()[:16]

    def set_fingerprint_secret(self, secret: bytes) -> None:
        """Name every key by `keyed_fingerprint` from now on (the secret is shared by all gateway
        replicas, so a key has one name everywhere); the unkeyed name stays as its legacy one."""
        self._secret = secret
        self._static = [self._fingerprinted(entry) for entry in self._static]
        self._entries = [self._fingerprinted(entry) for entry in self._entries]

    def _fingerprinted(self, entry: tuple[bytes, Principal, float | None]) -> tuple[bytes, Principal, float | None]:
        digest, principal, expires_at = entry
        if not self._secret:
            return entry
        named = dataclasses.replace(principal, key_fingerprint=keyed_fingerprint(self._secret, digest),
                                    legacy_fingerprint=digest.hex()[:16])
        return digest, named, expires_at


def _stored(entry: KeyEntry) -> tuple[bytes, Principal, float | None]:
    key, principal, expires_at = entry
    return _digest(key), principal, expires_at


def load_keyring(env: Any) -> KeyRing:
    """The key ring from the environment mapping; raises ConfigError naming the variable."""
    dev = env.get("CORDUM_ENV", "").strip().lower() in DEV_ENVS
    tenant = env.get("TENANT_ID", "").strip() or "default"
    if tenant_name_problem(tenant):
        raise ConfigError(f"TENANT_ID={tenant!r} is invalid: {TENANT_RULE}")
    static_entries: list[KeyEntry] = []
    static = env.get("CORDUM_API_KEY", "").strip()
    if static:
        if is_weak(static) and not dev:
            raise ConfigError(
                f"CORDUM_API_KEY is too weak (shorter than {MIN_KEY_LENGTH} characters or a well-known "
                "default); set a long random key, or CORDUM_ENV=dev for local testing"
            )
        static_entries.append((static, Principal(tenant=tenant, role="admin", principal_id="", static_admin=True,
                                                 key_fingerprint=key_fingerprint(static)), None))
    path = env.get("CORDUM_API_KEYS_PATH", "").strip()
    source = KeysFile(Path(path), tenant, dev) if path else None
    return KeyRing(source.read() if source else [], static=static_entries, source=source)


def _expiry(raw: Any, where: str) -> float | None:
    if raw is None or raw == "":
        return None
    if isinstance(raw, datetime):  # YAML reads an unquoted timestamp as one
        moment = raw
    else:
        try:
            moment = datetime.fromisoformat(str(raw).strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{where} is invalid: expires_at must be an ISO 8601 time "
                              "(e.g. 2027-01-31T00:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _read_keys_file(path: Path, *, default_tenant: str, dev: bool) -> list[KeyEntry]:
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
        if tenant_name_problem(tenant):
            raise ConfigError(f"{where} is invalid: tenant {tenant!r} must be {TENANT_RULE}")
        principal_id = str(item.get("principal_id") or "").strip()
        actor_id = str(item.get("actor_id") or "").strip()
        actor_type = str(item.get("actor_type") or "").strip().lower()
        if actor_type not in ("", "human", "service"):
            raise ConfigError(f"{where} is invalid: actor_type must be human or service")
        entries.append((key.strip(), Principal(tenant=tenant, role=role, principal_id=principal_id,
                                               actor_id=actor_id, actor_type=actor_type,
                                               key_fingerprint=key_fingerprint(key.strip())),
                        _expiry(item.get("expires_at"), where)))
    return entries


# A browser cannot set headers on a WebSocket: it offers the key as a subprotocol, as Cordum's
# clients do (`cordum-api-key.<base64url key>`, or `cordum-api-key` followed by the key's base64).
KEY_SUBPROTOCOL = "cordum-api-key"


def offered_subprotocols(header: str | None) -> list[str]:
    """The subprotocols a WebSocket client offered (its Sec-WebSocket-Protocol header), in order."""
    return [part.strip() for part in (header or "").split(",") if part.strip()]


def key_from_subprotocols(header: str | None) -> str | None:
    offered = offered_subprotocols(header)
    encoded = None
    for index, part in enumerate(offered):
        if part.startswith(KEY_SUBPROTOCOL + "."):
            encoded = part[len(KEY_SUBPROTOCOL) + 1:]
        elif part == KEY_SUBPROTOCOL and index + 1 < len(offered):
            encoded = offered[index + 1]
        if encoded:
            break
    if not encoded:
        return None
    try:
        key = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return key.strip() or None


def key_from_headers(headers: Any, args: Any | None = None) -> str | None:
    """The API key of a request: `X-API-Key`, else (WebSocket) the `cordum-api-key` subprotocol,
    else the `api_key` query parameter (refused outside dev mode by the caller)."""
    key = headers.get("X-API-Key")
    if not key and args is not None:
        key = key_from_subprotocols(headers.get("Sec-WebSocket-Protocol")) or args.get("api_key")
    return key.strip() if key else None

