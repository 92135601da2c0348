"""The API rate limiter against the real Redis: bursts on one gateway, the global limit across two
in-process gateway replicas sharing Redis, per-replica memory mode (REDIS_RATE_LIMIT=no), and the
fall back to memory when the limiter's Redis goes away (a dedicated redis-server, stopped here).

Limits are small (rps 1, burst 8) so bounds hold however slow the machine is: the assertions allow
`burst + rps × elapsed` and never depend on a request landing in a particular instant."""

from __future__ import annotations

import math
import urllib.request

import trio

from cordum.dev.servers import start_redis
from cordum.gateway import ratelimit
from cordum.gateway.ratelimit import RateLimitConfig, RateLimiter, key_hash
from cordum.infra.config import load_settings
from cordum.infra.redis import open_redis
from tests.integration.test_gateway import (  # noqa: F401  (kernel, start_gateway: fixtures)
    ACME, ADMIN, ALICE, BOB, Api, Reply, kernel, start_gateway)

RPS, BURST = 1, 8
LIMITS = {"API_RATE_LIMIT_RPS": str(RPS), "API_RATE_LIMIT_BURST": str(BURST),
          # Generous, so a slow shared machine never tips a test into the fallback by accident.
          "API_RATE_LIMIT_REDIS_TIMEOUT": "5s"}
PATH = "/api/v1/workers"


async def _burst(apis: list[Api], n: int, key: str = ALICE) -> tuple[list[Reply], float]:
    """n concurrent requests spread round-robin over the gateways; (replies, elapsed seconds)."""
    replies: list[Reply] = []

    async def one(api: Api) -> None:
        replies.append(await api.call("GET", PATH, key=key))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, apis[i % len(apis)])
    return replies, trio.current_time() - start


def _ceiling(elapsed: float) -> int:
    return BURST + math.ceil(RPS * elapsed)


def _check_rejections(replies: list[Reply]) -> None:
    for reply in replies:
        if reply.status == 429:
            assert reply.body == {"error": "rate limited", "status": 429, "code": "rate_limited"}
            retry = reply.headers["Retry-After"]
            assert retry.isdigit() and 1 <= int(retry) <= math.ceil(BURST / RPS)
        else:
            assert reply.status == 200, reply.raw


def _hits(api: Api, scope: str = "tenant") -> float:
    return api.gw.metrics.registry.get_sample_value("cordum_rate_limit_hits_total", {"scope": scope}) or 0.0


async def _status(api: Api, key: str = ACME) -> dict:
    reply = await api.call("GET", "/api/v1/status", key=key)
    assert reply.status == 200, reply.raw
    return reply.body["rate_limiter"]


async def test_burst_on_one_gateway_is_bounded(start_gateway, redis) -> None:
    api = await start_gateway(**LIMITS)
    replies, elapsed = await _burst([api], 30)
    admitted = sum(r.status == 200 for r in replies)
    assert BURST <= admitted <= _ceiling(elapsed), (admitted, elapsed)
    _check_rejections(replies)
    assert _hits(api) == len(replies) - admitted
    # /health and /metrics are never limited.
    for _ in range(3):
        assert (await api.call("GET", "/health", key=None)).status == 200
    text = await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{api.port}/metrics", timeout=5).read().decode())
    assert [line for line in text.splitlines()
            if line.startswith("cordum_rate_limit_hits_total{") and 'scope="tenant"' in line and "pod=" in line]
    # Another key of the same tenant shares the tenant limit; another tenant does not.
    assert (await api.call("GET", PATH, key=BOB)).status == 429
    assert (await api.call("GET", PATH, key=ACME)).status == 200
    # State lives under cordum:rl:, tagged by tenant, and names a hash of the key, never the key.
    names = sorted(await redis.keys("cordum:rl:*"))
    assert f"cordum:rl:{{default}}:key:{key_hash(ALICE)}" in names and "cordum:rl:{default}:tenant" in names
    assert not any(ALICE in n or ACME in n for n in names)
    assert 0 < await redis.pttl("cordum:rl:{default}:tenant") <= (BURST / RPS) * 1000 + 1
    assert await _status(api) == {"mode": "redis", "rps": RPS, "burst": BURST}


async def test_two_gateways_share_one_global_limit(start_gateway) -> None:
    a, b = await start_gateway(**LIMITS), await start_gateway(**LIMITS)
    replies, elapsed = await _burst([a, b], 40)
    admitted = sum(r.status == 200 for r in replies)
    assert BURST <= admitted <= _ceiling(elapsed), (admitted, elapsed)
    _check_rejections(replies)
    assert _hits(a) + _hits(b) == 40 - admitted
    assert _hits(a) > 0 and _hits(b) > 0  # both replicas enforced the one shared limit
    assert await _status(a) == await _status(b) == {"mode": "redis", "rps": RPS, "burst": BURST}


async def test_memory_mode_limits_each_replica_alone(start_gateway, redis) -> None:
    env = {**LIMITS, "REDIS_RATE_LIMIT": "no"}
    a, b = await start_gateway(**env), await start_gateway(**env)
    start = trio.current_time()
    per_replica = []
    for api in (a, b):
        replies, _ = await _burst([api], 16)
        _check_rejections(replies)
        per_replica.append(sum(r.status == 200 for r in replies))
    elapsed = trio.current_time() - start
    for admitted in per_replica:  # each replica admits its own burst: N replicas, N × the limit
        assert BURST <= admitted <= _ceiling(elapsed)
    assert sum(per_replica) > _ceiling(0)
    assert await redis.keys("cordum:rl:*") == []
    assert await _status(a) == {"mode": "memory", "rps": RPS, "burst": BURST}


async def test_unreachable_redis_falls_back_to_memory(start_gateway, tmp_path, monkeypatch) -> None:
    warnings: list[str] = []
    monkeypatch.setattr(ratelimit.log, "warning", lambda event, **fields: warnings.append(event))
    api = await start_gateway(API_RATE_LIMIT_RPS=str(RPS), API_RATE_LIMIT_BURST=str(BURST))
    # The limiter gets its own redis-server, which the test stops; the rest of the gateway keeps
    # the session's Redis.
    server = start_redis(tmp_path / "rl-redis")
    try:
        settings = load_settings({"REDIS_URL": server.url, "CORDUM_INSTANCE_ID": "rl-test",
                                  "REDIS_MIN_IDLE_CONNS": "1"})
        async with open_redis(settings) as own:
            limiter = RateLimiter(RateLimitConfig(rps=RPS, burst=BURST), own, None)
            limiter.hits = api.gw.ratelimiter.hits
            api.gw.ratelimiter = limiter
            assert (await api.call("GET", PATH, key=ALICE)).status == 200
            assert await _status(api) == {"mode": "redis", "rps": RPS, "burst": BURST}
            assert await own.exists("cordum:rl:{default}:tenant") == 1

            server.stop()
            before = _hits(api)
            replies, elapsed = await _burst([api], 20)
            admitted = sum(r.status == 200 for r in replies)
            # Memory takes over with the same limits (fresh state: a whole burst), never fails closed.
            assert BURST <= admitted <= _ceiling(elapsed), (admitted, elapsed)
            _check_rejections(replies)
            assert _hits(api) - before == 20 - admitted
            assert await _status(api) == {"mode": "memory-fallback", "rps": RPS, "burst": BURST}
            assert warnings == ["ratelimit.redis_unavailable"]  # once, not once per request

            # Redis back (same port): after the retry pause the limiter uses it again.
            monkeypatch.setattr(ratelimit, "REDIS_RETRY", 0.1)
            server = start_redis(tmp_path / "rl-redis-2", port=server.port)
            await trio.sleep(0.2)
            with trio.fail_after(10):
                while (await api.call("GET", PATH, key=BOB)).status != 200 or limiter.mode != "redis":
                    await trio.sleep(0.2)
            assert await _status(api) == {"mode": "redis", "rps": RPS, "burst": BURST}
    finally:
        server.stop()
