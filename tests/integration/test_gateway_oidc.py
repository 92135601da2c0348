"""OIDC bearer tokens at the gateway: real JWTs signed by a test issuer (joserfc), its discovery
document and JWKS served over HTTP, the JWKS shared by replicas through Redis."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from cordum.gateway.oidc import issuer_hash
from cordum.store import keys
from tests.httpstub import send_json
from tests.integration import test_gateway as gateway_tests
from tests.integration.test_gateway import ALICE, Api

kernel, start_gateway = gateway_tests.kernel, gateway_tests.start_gateway
AUDIENCE = "cordum-api"


class Issuer:
    """A stand-in identity provider: discovery + JWKS over HTTP; signs tokens with its key."""

    def __init__(self) -> None:
        self.key = RSAKey.generate_key(2048, parameters={"kid": "key-1"})
        self.requests: list[str] = []
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                issuer.requests.append(self.path)
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": [issuer.key.as_dict(private=False)]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                send_json(self, 200, body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, key: Any = None, alg: str = "RS256", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUDIENCE, "sub": "user-42", "iat": now, "exp": now + 300, **claims}
        signer = key or self.key
        return jwt.encode({"alg": alg, "kid": getattr(signer, "kid", None) or "key-1"}, body, signer)


@pytest.fixture
def issuer():
    idp = Issuer()
    yield idp
    idp.server.shutdown()


async def _oidc_gateway(start_gateway, issuer: Issuer) -> Api:
    return await start_gateway(CORDUM_OIDC_ISSUER=issuer.url, CORDUM_OIDC_AUDIENCE=AUDIENCE)


async def _as(api: Api, token: str, path: str = "/api/v1/jobs", method: str = "GET", body: Any = None):
    return await api.call(method, path, body, key=None, headers={"Authorization": f"Bearer {token}"})


async def test_a_token_of_the_issuer_authenticates_with_tenant_and_role_from_its_claims(start_gateway, issuer) -> None:
    api = await _oidc_gateway(start_gateway, issuer)
    viewer = issuer.token(tenant="acme")  # no role claim: viewer
    assert (await _as(api, viewer)).status == 200
    refused = await _as(api, viewer, method="POST", body={"prompt": "x"})
    assert refused.status == 403 and refused.body["code"] == "forbidden"
    operator = issuer.token(tenant="acme", role=["viewer", "operator"])
    submitted = await _as(api, operator, method="POST", body={"prompt": "x"})
    assert submitted.status == 200, submitted.raw
    job = (await _as(api, operator, f"/api/v1/jobs/{submitted.body['job_id']}")).body
    assert job["tenant"] == "acme" and job["principal"] == "user-42"
    # another tenant's job is not found for this token; API keys keep working beside tokens
    assert (await api.call("GET", f"/api/v1/jobs/{submitted.body['job_id']}", key=ALICE)).status == 404
    assert (await api.call("GET", "/api/v1/jobs", key=ALICE)).status == 200


@pytest.mark.parametrize("claims,why", [
    ({"aud": "someone-else"}, "aud"),
    ({"iss": "https://evil.example"}, "iss"),
    ({"exp": int(time.time()) - 3600}, "expired"),
    ({"tenant": "Acme:EU"}, "tenant"),
])
async def test_a_token_for_another_audience_issuer_time_or_tenant_is_refused(start_gateway, issuer, claims, why) -> None:
    api = await _oidc_gateway(start_gateway, issuer)
    reply = await _as(api, issuer.token(**claims))
    assert reply.status == 401 and reply.body["code"] == "unauthenticated", (why, reply.raw)


async def test_forged_tokens_are_refused(start_gateway, issuer) -> None:
    api = await _oidc_gateway(start_gateway, issuer)
    stranger = RSAKey.generate_key(2048, parameters={"kid": "key-1"})  # the right kid, the wrong key
    assert (await _as(api, issuer.token(key=stranger))).status == 401
    unknown = RSAKey.generate_key(2048, parameters={"kid": "key-9"})
    assert (await _as(api, issuer.token(key=unknown))).status == 401
    shared = OctKey.generate_key(256, parameters={"kid": "key-1"})  # a shared-secret algorithm
    hs = await _as(api, issuer.token(key=shared, alg="HS256"))
    assert hs.status == 401 and "HS256" in hs.body["error"]
    header = "eyJhbGciOiJub25lIiwia2lkIjoia2V5LTEifQ"  # {"alg":"none","kid":"key-1"}
    unsigned = header + "." + issuer.token().split(".")[1] + "."
    assert (await _as(api, unsigned)).status == 401


async def test_replicas_share_the_issuers_keys_through_redis(start_gateway, issuer, redis) -> None:
    first = await _oidc_gateway(start_gateway, issuer)
    token = issuer.token(tenant="acme")
    assert (await _as(first, token)).status == 200
    cached_key = keys.oidc_jwks(issuer_hash(issuer.url))
    assert cached_key == f"cordum:auth:jwks:{issuer_hash(issuer.url)}" and len(issuer_hash(issuer.url)) == 32
    assert 3500 < await redis.ttl(cached_key) <= 3600
    assert json.loads(await redis.get(cached_key))["keys"][0]["kid"] == "key-1"
    fetched = list(issuer.requests)
    issuer.server.shutdown()  # the issuer is down: a second replica still verifies, from Redis
    second = await _oidc_gateway(start_gateway, issuer)
    assert (await _as(second, token)).status == 200
    assert issuer.requests == fetched


async def test_hostile_token_headers_are_a_401_not_a_500(start_gateway, issuer) -> None:
    import base64

    api = await _oidc_gateway(start_gateway, issuer)
    def header(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    deep, deeper = (header(b'{"a":' + b"[" * n + b"]" * n + b"}") for n in (700, 5000))
    assert deep.startswith("eyJ") and deeper.startswith("eyJ")  # they look like JWTs
    for token in (deep + ".e30.x", deeper + ".e30.x", "eyJhbGciOiJSUzI1NiJ9.e30", "eyJ" + "A" * 5000 + ".e30.x"):
        reply = await _as(api, token)
        assert reply.status == 401, (token[:20], reply.raw)


def test_an_issuer_is_trusted_over_https_only_or_on_this_machine() -> None:
    from cordum.gateway.oidc import OidcConfig
    from cordum.infra.config import ConfigError

    with pytest.raises(ConfigError, match="expected an https:// URL"):
        OidcConfig.from_env({"CORDUM_OIDC_ISSUER": "http://idp.example.com", "CORDUM_OIDC_AUDIENCE": "a"})
    assert OidcConfig.from_env({"CORDUM_OIDC_ISSUER": "https://idp.example.com", "CORDUM_OIDC_AUDIENCE": "a"})
    assert OidcConfig.from_env({"CORDUM_OIDC_ISSUER": "http://127.0.0.1:9", "CORDUM_OIDC_AUDIENCE": "a"})
    with pytest.raises(ConfigError, match="CORDUM_OIDC_AUDIENCE is required"):
        OidcConfig.from_env({"CORDUM_OIDC_ISSUER": "https://idp.example.com"})


async def test_a_browser_opens_the_stream_with_its_token_as_the_key_subprotocol(start_gateway, issuer) -> None:
    """The dashboard cannot send Authorization on a WebSocket: it offers the token as it would an API
    key (`cordum-api-key` and the token's base64url); a forged one is refused before the upgrade."""
    import trio

    from cordum.cli.ws import StreamError, WebSocketClient
    from cordum.gateway.auth import KEY_SUBPROTOCOL
    from tests.integration.test_gateway import _b64url

    api = await _oidc_gateway(start_gateway, issuer)
    url = f"ws://127.0.0.1:{api.port}/api/v1/stream"

    def open_with(token: str) -> None:
        offered = {"Sec-WebSocket-Protocol": f"{KEY_SUBPROTOCOL}, {_b64url(token)}"}
        with WebSocketClient(url, headers=offered, timeout=10):
            pass

    await trio.to_thread.run_sync(open_with, issuer.token(tenant="acme"))
    forged = issuer.token(key=RSAKey.generate_key(2048, parameters={"kid": "key-1"}), tenant="acme")
    with pytest.raises(StreamError, match="HTTP 401"):
        await trio.to_thread.run_sync(open_with, forged)
