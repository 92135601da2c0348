"""OIDC bearer tokens: `Authorization: Bearer <JWT>` from the configured issuer, beside API keys.

Enabled by CORDUM_OIDC_ISSUER (with CORDUM_OIDC_AUDIENCE, required then). A token is accepted when
its signature verifies against the issuer's JWKS with an allowed algorithm (asymmetric only, never
`none` or a shared secret), `iss` is the issuer, `aud` names the audience, and `exp`/`nbf` hold
(30 s leeway). Who it is: the tenant from claim CORDUM_OIDC_CLAIM_TENANT (`tenant`; absent: the
gateway's TENANT_ID), the role from CORDUM_OIDC_CLAIM_ROLE (`role`, a string or a list: the
highest known role; absent: CORDUM_OIDC_DEFAULT_ROLE, `viewer`), the principal from `sub`.

The JWKS (from CORDUM_OIDC_JWKS_URL, else the issuer's discovery document) is kept in memory
and shared by the gateway replicas in Redis at `cordum:auth:jwks:<issuerHash>` for an hour (the
guide's key): a replica that starts, or meets a key id it does not know, reads Redis before it
asks the issuer, and asks the issuer at most once per REFRESH_COOLDOWN_S. `joserfc` (and `cryptography` under it, some
15 MB) is imported only by a gateway that has OIDC configured.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Mapping

import trio

from cordum.gateway.auth import ROLES, KeyRing, Principal
from cordum.infra.config import ConfigError
from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.validate import tenant_name_problem

log = get_logger("gateway.oidc")

ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")
JWKS_TTL_S = 3600
REFRESH_COOLDOWN_S = 60.0
MAX_DOCUMENT_BYTES = 1 << 20
FETCH_TIMEOUT_S = 5.0
LEEWAY_S = 30


class TokenRefused(Exception):
    """A bearer token that does not authenticate; the message says why (it is sent back)."""


@dataclass(frozen=True)
class OidcConfig:
    issuer: str
    audience: str
    jwks_url: str = ""
    claim_tenant: str = "tenant"
    claim_role: str = "role"
    default_role: str = "viewer"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "OidcConfig | None":
        issuer = (env.get("CORDUM_OIDC_ISSUER") or "").strip().rstrip("/")
        if not issuer:
            return None
        audience = (env.get("CORDUM_OIDC_AUDIENCE") or "").strip()
        if not audience:
            raise ConfigError("CORDUM_OIDC_AUDIENCE is required with CORDUM_OIDC_ISSUER: tokens issued for "
                              "another audience must not be accepted")
        if not trusted_url(issuer):
            raise ConfigError(f"CORDUM_OIDC_ISSUER={issuer!r} is invalid: expected an https:// URL "
                              "(http:// only for this machine)")
        role = (env.get("CORDUM_OIDC_DEFAULT_ROLE") or "viewer").strip().lower()
        if role not in ROLES:
            raise ConfigError(f"CORDUM_OIDC_DEFAULT_ROLE={role!r} is invalid: one of {', '.join(ROLES)}")
        return cls(issuer=issuer, audience=audience, jwks_url=(env.get("CORDUM_OIDC_JWKS_URL") or "").strip(),
                   claim_tenant=(env.get("CORDUM_OIDC_CLAIM_TENANT") or "tenant").strip(),
                   claim_role=(env.get("CORDUM_OIDC_CLAIM_ROLE") or "role").strip(), default_role=role)


def trusted_url(url: str) -> bool:
    """Keys are fetched over https (http only from this machine: a test or local issuer), so
    nobody on the way can hand the gateway signing keys of their own."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in ("127.0.0.1", "localhost", "::1"))


def issuer_hash(issuer: str) -> str:
    """The guide's `<issuerHash>`: hex of the first 16 bytes of SHA-256(issuer URL)."""
    return hashlib.sha256(issuer.encode()).digest()[:16].hex()


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


MAX_HEADER_CHARS = 2048


def _header(token: str) -> dict[str, Any]:
    first = token.split(".", 1)[0]
    if len(first) > MAX_HEADER_CHARS:
        raise TokenRefused("malformed token header")
    try:
        header = json.loads(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4)))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise TokenRefused("malformed token header") from None
    if not isinstance(header, dict):
        raise TokenRefused("malformed token header")
    return header


def _get(url: str) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "cordum-gateway"})
    with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_S) as response:  # noqa: S310 - configured URL
        data = response.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ValueError(f"{url} answered more than {MAX_DOCUMENT_BYTES} bytes")
    return data


class Jwks:
    """The issuer's key set: memory → Redis (shared, 1 h) → the issuer (at most once a minute)."""

    def __init__(self, config: OidcConfig, redis: Redis) -> None:
        self._config = config
        self._redis = redis
        self._cache_key = keys.oidc_jwks(issuer_hash(config.issuer))
        self._keys: Any = None  # joserfc KeySet
        self._kids: frozenset[str] = frozenset()
        self._loaded_at = -1e18
        self._fetched_at = -1e18
        self._lock = trio.Lock()
        self._unknown: dict[str, float] = {}  # key ids no key set had, when last looked for
        self.fetches = 0

    async def for_kid(self, kid: str) -> Any:
        if self._current(kid):  # the common case: no lock, no I/O
            return self._keys
        refused_at = self._unknown.get(kid)
        if refused_at is not None and trio.current_time() - refused_at < REFRESH_COOLDOWN_S:
            raise TokenRefused("token signed with a key the issuer does not have")
        async with self._lock:
            if self._current(kid):
                return self._keys  # type: ignore[return-value]
            cached = await self._from_redis()
            if cached is not None:
                self._install(cached)
                if self._current(kid):
                    return self._keys  # type: ignore[return-value]
            if trio.current_time() - self._fetched_at >= REFRESH_COOLDOWN_S or self._keys is None:
                self._fetched_at = trio.current_time()
                document = await self._fetch()
                self._install(document)
                try:
                    await self._redis.execute("SET", self._cache_key, document, "EX", JWKS_TTL_S)
                except (RedisError, *RedisUnavailable) as exc:  # best effort: this replica has them
                    log.warning("oidc.jwks_cache_write_failed", error=repr(exc))
            if self._keys is None:
                raise TokenRefused("the issuer's keys are not available")
            if kid and kid not in self._kids:  # asked the issuer (or may not yet): remember the miss
                if len(self._unknown) > 1000:
                    self._unknown.clear()
                self._unknown[kid] = trio.current_time()
                raise TokenRefused("token signed with a key the issuer does not have")
            return self._keys

    def _current(self, kid: str) -> bool:
        fresh = trio.current_time() - self._loaded_at < JWKS_TTL_S
        return self._keys is not None and fresh and (not kid or kid in self._kids)

    def _install(self, document: str) -> None:
        from joserfc.errors import JoseError
        from joserfc.jwk import KeySet

        try:
            self._keys = KeySet.import_key_set(json.loads(document))
        except (ValueError, JoseError, TypeError) as exc:
            raise TokenRefused(f"the issuer's key set is unusable ({exc.__class__.__name__})") from None
        self._kids = frozenset(str(k.kid) for k in self._keys.keys if k.kid)
        self._loaded_at = trio.current_time()

    async def _from_redis(self) -> str | None:
        try:
            return await self._redis.execute("GET", self._cache_key)
        except (RedisError, *RedisUnavailable):
            return None

    async def _fetch(self) -> str:
        self.fetches += 1
        try:
            return await trio.to_thread.run_sync(self._fetch_blocking)
        except (OSError, ValueError, http.client.HTTPException) as exc:
            log.warning("oidc.jwks_fetch_failed", issuer=self._config.issuer, error=repr(exc))
            raise TokenRefused("the issuer's keys could not be fetched") from None

    def _fetch_blocking(self) -> str:
        url = self._config.jwks_url
        if not url:
            discovery = json.loads(_get(self._config.issuer + "/.well-known/openid-configuration"))
            url = discovery.get("jwks_uri") if isinstance(discovery, dict) else None
            if not isinstance(url, str) or not url:
                raise ValueError("the discovery document names no jwks_uri")
        if not trusted_url(url):
            raise ValueError(f"the JWKS URL {url!r} is not https")
        document = _get(url).decode()
        json.loads(document)  # a JSON document, or nothing is cached
        return document


class OidcVerifier:
    def __init__(self, config: OidcConfig, redis: Redis, ring: KeyRing, default_tenant: str) -> None:
        from joserfc.jwt import JWTClaimsRegistry

        self.config = config
        self.jwks = Jwks(config, redis)
        self._ring = ring
        self._default_tenant = default_tenant
        self._claims = JWTClaimsRegistry(leeway=LEEWAY_S, iss={"essential": True, "value": config.issuer},
                                         aud={"essential": True, "value": config.audience},
                                         exp={"essential": True}, sub={"essential": True})

    async def principal(self, token: str) -> Principal:
        """The caller a token names; TokenRefused saying why it does not."""
        from joserfc import jwt
        from joserfc.errors import JoseError

        header = _header(token)
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenRefused(f"token algorithm {algorithm!r} is not accepted")
        key_set = await self.jwks.for_kid(str(header.get("kid") or ""))
        try:
            claims = jwt.decode(token, key_set, algorithms=[algorithm]).claims
            self._claims.validate(claims)
        except JoseError as exc:
            raise TokenRefused(f"token refused ({exc.error})") from None
        except (ValueError, TypeError, KeyError, RecursionError) as exc:  # malformed, or no key of that id
            raise TokenRefused(f"token refused ({exc.__class__.__name__})") from None
        tenant = str(claims.get(self.config.claim_tenant) or self._default_tenant)
        problem = tenant_name_problem(tenant)
        if problem:
            raise TokenRefused(f"token claim {self.config.claim_tenant!r}: {problem}")
        subject = str(claims["sub"])
        return Principal(tenant=tenant, role=self._role(claims.get(self.config.claim_role)), principal_id=subject,
                         key_fingerprint=self._ring.name_of(f"oidc:{self.config.issuer}:{subject}"),
                         expires_at=float(claims["exp"]))

    def _role(self, claimed: Any) -> str:
        names = claimed if isinstance(claimed, list) else [claimed]
        known = [str(name).lower() for name in names if str(name).lower() in ROLES]
        return max(known, key=ROLES.index) if known else self.config.default_role


def token_current(who: Principal) -> bool:
    """A token principal stands until its token expires (an API key's is re-checked in its ring)."""
    return time.time() < who.expires_at
