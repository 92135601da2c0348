"""The rate limiter's pure parts with a fake clock: GCRA (burst, then the steady rate; Retry-After),
all-or-nothing across the tenant and key limits, and the Redis → memory fallback state machine
(mode, one warning per 30 s, retry after 1 s, recovery) against a fake Redis script."""

from __future__ import annotations

import pytest

from cordum.gateway import ratelimit
from cordum.gateway.ratelimit import Decision, Gcra, RateLimitConfig, RateLimiter, gcra_step, interval_us, key_hash
from cordum.infra.config import ConfigError, load_settings
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError
from cordum.store import keys


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _run(gcra: Gcra, n: int, rps: float = 10, burst: int = 5) -> list[Decision]:
    return [gcra.check([("t", rps, burst)]) for _ in range(n)]


def test_burst_then_steady_rate() -> None:
    clock = Clock()
    gcra = Gcra(clock)
    decisions = _run(gcra, 8)  # burst 5 at one instant
    assert [d.allowed for d in decisions] == [True] * 5 + [False] * 3
    assert decisions[5].waits == pytest.approx((0.1,))  # one emission interval (1/rps)
    admitted = 0
    for _ in range(100):  # one second at 100 attempts/s: exactly rps more pass
        clock.advance(0.01)
        admitted += gcra.check([("t", 10, 5)]).allowed
    assert admitted == 10


def test_idle_refills_to_burst_not_beyond() -> None:
    clock = Clock()
    gcra = Gcra(clock)
    _run(gcra, 5)
    clock.advance(3600)
    assert sum(d.allowed for d in _run(gcra, 20)) == 5


def test_window_bound_holds_at_every_offset() -> None:
    # Over any window of w seconds at most burst + rps*w pass (no 2x burst at a second boundary).
    clock = Clock(999.95)
    gcra = Gcra(clock)
    times = []
    for _ in range(400):
        if gcra.check([("t", 10, 5)]).allowed:
            times.append(clock.now)
        clock.advance(0.005)
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if t < start + 1.0)
        assert in_window <= 5 + 10 * 1.0 + 1e-9


def test_retry_after_is_computed_not_constant() -> None:
    clock = Clock()
    gcra = Gcra(clock)
    _run(gcra, 50, rps=0.5, burst=50)
    rejected = gcra.check([("t", 0.5, 50)])
    assert not rejected.allowed and rejected.waits == pytest.approx((2.0,)) and rejected.retry_after == 2
    clock.advance(1.5)
    rejected = gcra.check([("t", 0.5, 50)])
    assert rejected.waits == pytest.approx((0.5,)) and rejected.retry_after == 1  # rounded up, >= 1
    clock.advance(0.5)
    assert gcra.check([("t", 0.5, 50)]).allowed
    # Fast rates still answer at least 1 second.
    assert Decision(False, (0.001,)).retry_after == 1
    assert Decision(False, (3.0000000001, 0.2)).retry_after == 3
    assert Decision(False, (0.2, 7.5)).retry_after == 8


def test_rejections_are_free_and_both_limits_are_all_or_nothing() -> None:
    clock = Clock()
    gcra = Gcra(clock)
    # Key A exhausts the shared tenant limit (burst 3); key B's own limit is untouched.
    tenant = ("tenant", 10, 3)
    for _ in range(3):
        assert gcra.check([tenant, ("key-a", 10, 100)]).allowed
    denied = gcra.check([tenant, ("key-b", 10, 100)])
    assert not denied.allowed and denied.limiting == 0 and denied.waits[1] == 0.0
    # A key limit tighter than the tenant's rejects without charging the tenant.
    small = Gcra(clock)
    assert small.check([("tenant", 10, 5), ("key", 10, 1)]).allowed
    for _ in range(10):
        assert small.check([("tenant", 10, 5), ("key", 10, 1)]).limiting == 1
    for i in range(4):  # the tenant still has exactly 4 of its 5 left
        assert small.check([("tenant", 10, 5), (f"other-{i}", 10, 1)]).allowed, "tenant was charged"
    assert not small.check([("tenant", 10, 5), ("third", 10, 1)]).allowed


def test_gcra_step_and_sweep() -> None:
    assert gcra_step(None, 10_000_000, 100_000, 2) == (10_100_000, 0)
    assert gcra_step(10_200_000, 10_000_000, 100_000, 2) == (10_300_000, 100_000)
    assert interval_us(30) == 33_333 and interval_us(1e9) == 1
    clock = Clock()
    gcra = Gcra(clock)
    gcra.check([("a", 10, 5)])
    gcra.check([("b", 1, 5)])
    clock.advance(0.5)
    gcra.sweep()
    assert len(gcra) == 1  # "a" (TAT now+0.1) expired, "b" (now+1) not yet


def test_config_from_environment() -> None:
    cfg = RateLimitConfig.from_settings(load_settings({}))
    assert (cfg.rps, cfg.burst, cfg.use_redis, cfg.redis_timeout) == (30.0, 50, True, 0.2)
    cfg = RateLimitConfig.from_settings(load_settings(
        {"API_RATE_LIMIT_RPS": "2.5", "API_RATE_LIMIT_BURST": "7", "REDIS_RATE_LIMIT": "no"}))
    assert (cfg.rps, cfg.burst, cfg.use_redis) == (2.5, 7, False)
    for name, value in (("API_RATE_LIMIT_RPS", "0"), ("API_RATE_LIMIT_RPS", "x"), ("API_RATE_LIMIT_BURST", "0"),
                        ("API_RATE_LIMIT_REDIS_TIMEOUT", "0")):
        with pytest.raises(ConfigError, match=name):
            RateLimitConfig.from_settings(load_settings({name: value}))


def test_key_names_hash_the_key_and_share_the_tenant_tag() -> None:
    secret = "alice-key-0123456789abcdef"
    assert len(key_hash(secret)) == 32 and secret not in key_hash(secret)
    limiter = RateLimiter(RateLimitConfig(use_redis=False), None, None)
    names = [name for name, _, _ in limiter._limits("acme", secret)]
    assert names == ["cordum:rl:{acme}:tenant", f"cordum:rl:{{acme}}:key:{key_hash(secret)}"]
    assert all(secret not in n for n in names)
    odd = keys.rate_limit_tat("a}b", "tenant")
    assert odd.startswith("cordum:rl:{t-") and odd.count("{") == 1


# ---- the Redis / memory / memory-fallback state machine ------------------------------------


class FakeScript:
    def __init__(self) -> None:
        self.fail = False
        self.calls = 0

    async def __call__(self, keys, args):
        self.calls += 1
        if self.fail:
            raise RedisError("connection refused")
        return [1, 0, 0]


class FakeRedis:
    def __init__(self) -> None:
        self.script_obj = FakeScript()

    def script(self, lua: str) -> FakeScript:
        return self.script_obj


async def test_fallback_mode_warning_throttle_and_recovery(monkeypatch) -> None:
    warnings = []
    monkeypatch.setattr(ratelimit.log, "warning", lambda event, **f: warnings.append(event))
    clock = Clock()
    fake = FakeRedis()
    metrics = Metrics("unit")
    limiter = RateLimiter(RateLimitConfig(rps=1, burst=2), fake, metrics, clock=clock)
    assert limiter.describe() == {"mode": "redis", "rps": 1, "burst": 2}
    assert (await limiter.check("t", "k")).allowed and fake.script_obj.calls == 1

    fake.script_obj.fail = True
    verdicts = [await limiter.check("t", "k") for _ in range(3)]  # memory: burst 2, then 429
    assert [v.allowed for v in verdicts] == [True, True, False]
    assert verdicts[2].retry_after == 1 and verdicts[2].scope == "tenant"
    assert limiter.mode == "memory-fallback" and warnings == ["ratelimit.redis_unavailable"]
    assert fake.script_obj.calls == 2  # Redis is not retried for REDIS_RETRY seconds

    for _ in range(5):  # failing again within 30 s: no new warning
        clock.advance(ratelimit.REDIS_RETRY)
        await limiter.check("t", "k")
    assert len(warnings) == 1 and fake.script_obj.calls == 7
    clock.advance(ratelimit.WARN_EVERY)
    await limiter.check("t", "k")
    assert len(warnings) == 2

    fake.script_obj.fail = False
    clock.advance(ratelimit.REDIS_RETRY)
    assert (await limiter.check("t", "k")).allowed
    assert limiter.mode == "redis"
    assert metrics.registry.get_sample_value("cordum_rate_limit_hits_total", {"scope": "tenant"}) >= 1


async def test_memory_mode_never_touches_redis() -> None:
    fake = FakeRedis()
    limiter = RateLimiter(RateLimitConfig(rps=1, burst=1, use_redis=False), fake, None, clock=Clock())
    assert limiter.mode == "memory"
    assert (await limiter.check("t", "k")).allowed
    verdict = await limiter.check("t", "k")
    assert not verdict.allowed and verdict.retry_after == 1
    assert fake.script_obj.calls == 0
