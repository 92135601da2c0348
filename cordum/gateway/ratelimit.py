"""API rate limiting: GCRA per tenant and per API key, global across gateway replicas via Redis.

Algorithm — GCRA (the generic cell rate algorithm, a token bucket with one number of state)
---------------------------------------------------------------------------------------------
Each limit has a rate `rps` and a `burst`. The emission interval is T = 1/rps and the state is
one timestamp, the *theoretical arrival time* (TAT): when the bucket will be full again. For a
request at time `now`:

    tat      = max(stored TAT, now)          # an idle limit has "caught up"
    new_tat  = tat + T
    allow_at = new_tat - burst * T
    now >= allow_at  → admit, store new_tat (expires at new_tat, when it is equivalent to absent)
    now <  allow_at  → reject, store nothing; retry after (allow_at - now)

So an idle client may send `burst` requests at once, after which exactly one request per T is
admitted (steady `rps`); over any window of length w at most `burst + rps * w` requests pass, with
no boundary effect (unlike the original's fixed one-second counters, which admit 2 × burst across a
second boundary). Rejected requests don't consume anything. Retry-After is the exact time until the
next request would pass, rounded up to whole seconds (at least 1).

Two limits apply to every authenticated `/api/` request (and WebSocket upgrade): one per tenant and
one per API key; a request passes only if both admit it, and then both are charged (all-or-nothing,
so a request rejected by one limit costs nothing on the other).

Redis mode (`REDIS_RATE_LIMIT` true, the default): one Lua script, one round trip, one EVALSHA per
request. Its two keys share the tenant as hash tag, so it is cluster-safe:

    cordum:rl:{<tenant>}:tenant          the tenant's TAT (µs, Redis server time)
    cordum:rl:{<tenant>}:key:<sha256>    the API key's TAT; 32 hex chars of SHA-256(key), never the key

Time comes from `redis.call('TIME')` inside the script, so the replicas' clocks don't matter, and
the keys expire (PX) when their TAT passes. Every replica shares the state, so the admitted total
across replicas stays within the one limit.

Memory mode (`REDIS_RATE_LIMIT=false|0|no`): the same GCRA in Python (`Gcra`, pure, with an
injectable clock), per replica — N replicas admit up to N × the limit.

Fallback: when Redis fails (RedisError, connection errors, or no answer within
`API_RATE_LIMIT_REDIS_TIMEOUT`, 200 ms) the request is decided by the in-memory limiter instead
(as the guide says; never fail closed), a warning is logged at most once per 30 s, and Redis is
tried again for the requests after a 1 s pause (so a hung Redis costs at most one timeout per
second, not one per request). `/api/v1/status` reports
`rate_limiter: {mode: "redis" | "memory" | "memory-fallback", rps, burst}`.

Rejections answer 429 with `Retry-After` and `{"error": "rate limited", "status": 429,
"code": "rate_limited"}`, and count in `cordum_rate_limit_hits_total{scope="tenant"|"key"}` (the
scope that must wait longer; one increment per rejected request).

Environment: API_RATE_LIMIT_RPS (30, > 0, may be fractional), API_RATE_LIMIT_BURST (50, ≥ 1),
API_RATE_LIMIT_REDIS_TIMEOUT (200ms), REDIS_RATE_LIMIT (true).
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import trio

from cordum.infra.config import Settings, env_value, parse_positive_duration, parse_positive_int
from cordum.infra.metrics import Metrics
from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.runtime.log import get_logger
from cordum.store import keys as rkeys

log = get_logger("gateway.ratelimit")

WARN_EVERY = 30.0  # seconds between "Redis unavailable" warnings
REDIS_RETRY = 1.0  # seconds of memory-only limiting after a Redis failure before trying it again
SCOPES = ("tenant", "key")

# KEYS[i]: TAT keys; ARGV[2i-1], ARGV[2i]: emission interval (whole µs) and burst of KEYS[i].
# All values are integers below 2^53, exact in Lua's doubles.
# Returns {admitted (1|0), wait_1 (µs), wait_2 (µs), ...}; on rejection nothing is written.
GCRA_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = #KEYS
local new_tat = {}
local reply = {1}
for i = 1, n do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local nt = tat + interval
  local allow_at = nt - burst * interval
  if now < allow_at then
    reply[1] = 0
    reply[i + 1] = allow_at - now
  else
    reply[i + 1] = 0
  end
  new_tat[i] = nt
end
if reply[1] == 1 then
  for i = 1, n do
    local ttl_ms = math.floor((new_tat[i] - now) / 1000) + 1
    redis.call('SET', KEYS[i], string.format('%d', new_tat[i]), 'PX', ttl_ms)
  end
end
return reply
"""


# ---- configuration --------------------------------------------------------------------------


def _positive_float(raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError("expected a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a number greater than zero")
    return value


@dataclass(frozen=True)
class RateLimitConfig:
    rps: float = 30.0
    burst: int = 50
    use_redis: bool = True
    redis_timeout: float = 0.2

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimitConfig":
        """Raises ConfigError naming the variable."""
        return cls(
            rps=env_value(settings, "API_RATE_LIMIT_RPS", "30", _positive_float),
            burst=env_value(settings, "API_RATE_LIMIT_BURST", "50", parse_positive_int),
            use_redis=settings.redis_rate_limit,
            redis_timeout=env_value(settings, "API_RATE_LIMIT_REDIS_TIMEOUT", "200ms", parse_positive_duration),
        )


# ---- the pure algorithm ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    waits: tuple[float, ...]  # seconds until each limit would admit (0 where it admits)

    @property
    def retry_after(self) -> int:
        """Whole seconds for the Retry-After header: the longest wait rounded up, at least 1."""
        return max(1, math.ceil(max(self.waits, default=0.0) - 1e-9))

    @property
    def limiting(self) -> int:
        """Index of the limit that must wait longest (the first on a tie)."""
        return max(range(len(self.waits)), key=lambda i: (self.waits[i], -i)) if self.waits else 0


US = 1_000_000  # both implementations count integer microseconds: exact arithmetic, no drift


def interval_us(rps: float) -> int:
    """The emission interval T = 1/rps in whole microseconds (at least 1)."""
    return max(1, round(US / rps))


def gcra_step(tat: int | None, now: int, interval: int, burst: int) -> tuple[int, int]:
    """One GCRA evaluation in µs: (the TAT to store if admitted, µs to wait; 0 = admitted)."""
    start = now if tat is None or tat < now else tat
    new_tat = start + interval
    allow_at = new_tat - burst * interval
    return new_tat, (allow_at - now if now < allow_at else 0)


class Gcra:
    """The in-memory limiter: GCRA over a dict of TATs, all-or-nothing across the limits of one
    request. Pure apart from the clock, which is injectable (seconds, monotonic)."""

    SWEEP_EVERY = 4096  # checks between sweeps of expired entries

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tat: dict[str, int] = {}
        self._checks = 0

    def __len__(self) -> int:
        return len(self._tat)

    def _now(self) -> int:
        return round(self.clock() * US)

    def check(self, limits: Sequence[tuple[str, float, int]]) -> Decision:
        """`limits`: (name, rps, burst) per limit; admits (and charges all) only if all admit."""
        now = self._now()
        steps = [gcra_step(self._tat.get(name), now, interval_us(rps), burst) for name, rps, burst in limits]
        allowed = all(wait == 0 for _, wait in steps)
        if allowed:
            for (name, _, _), (new_tat, _) in zip(limits, steps):
                self._tat[name] = new_tat
        self._checks += 1
        if self._checks % self.SWEEP_EVERY == 0:
            self.sweep()
        return Decision(allowed, tuple(wait / US for _, wait in steps))

    def sweep(self) -> None:
        """Forget limits whose TAT has passed: they are equivalent to never seen."""
        now = self._now()
        for name in [n for n, tat in self._tat.items() if tat <= now]:
            del self._tat[name]


# ---- the gateway's limiter ------------------------------------------------------------------


def key_hash(api_key: str) -> str:
    """How an API key appears in Redis key names and logs: 32 hex chars of its SHA-256."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0
    scope: str = ""  # the limit that rejected ("tenant" | "key")


class RateLimiter:
    """One per gateway replica: decides each request against its tenant and key limits."""

    def __init__(self, config: RateLimitConfig, redis: Redis | None, metrics: Metrics | None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.redis = redis if config.use_redis else None
        self.clock = clock
        self.memory = Gcra(clock)
        self.fallback = False  # the last decision came from memory because Redis failed
        self._script = self.redis.script(GCRA_LUA) if self.redis is not None else None
        self._retry_redis_at = 0.0
        self._last_warning: float | None = None
        self.hits = (metrics.counter("cordum_rate_limit_hits_total", "Requests rejected by the API rate limiter",
                                     ["scope"]) if metrics is not None else None)

    @property
    def mode(self) -> str:
        if self.redis is None:
            return "memory"
        return "memory-fallback" if self.fallback else "redis"

    def describe(self) -> dict[str, Any]:
        rps: float | int = int(self.config.rps) if float(self.config.rps).is_integer() else self.config.rps
        return {"mode": self.mode, "rps": rps, "burst": self.config.burst}

    def _limits(self, tenant: str, api_key: str) -> list[tuple[str, float, int]]:
        rps, burst = self.config.rps, self.config.burst
        return [(rkeys.rate_limit_tat(tenant, "tenant"), rps, burst),
                (rkeys.rate_limit_tat(tenant, "key:" + key_hash(api_key)), rps, burst)]

    async def check(self, tenant: str, api_key: str) -> Verdict:
        limits = self._limits(tenant, api_key)
        decision = await self._decide(limits)
        if decision.allowed:
            return Verdict(True)
        scope = SCOPES[decision.limiting]
        if self.hits is not None:
            self.hits.labels(scope=scope).inc()
        return Verdict(False, decision.retry_after, scope)

    async def _decide(self, limits: list[tuple[str, float, int]]) -> Decision:
        if self._script is None:
            return self.memory.check(limits)
        if self.fallback and self.clock() < self._retry_redis_at:
            return self.memory.check(limits)
        error: str | None = None
        with trio.move_on_after(self.config.redis_timeout) as scope:
            try:
                reply = await self._script(
                    [name for name, _, _ in limits],
                    [v for _, rps, burst in limits for v in (interval_us(rps), burst)],
                )
            except (RedisError, *RedisUnavailable) as exc:
                error = repr(exc)
        if scope.cancelled_caught:
            error = f"no answer within {self.config.redis_timeout:g}s"
        if error is not None:
            self._redis_failed(error)
            return self.memory.check(limits)
        if self.fallback:
            self.fallback = False
            log.info("ratelimit.redis_recovered", mode="redis")
        return Decision(bool(int(reply[0])), tuple(int(w) / US for w in reply[1:]))

    def _redis_failed(self, error: str) -> None:
        now = self.clock()
        self.fallback = True
        self._retry_redis_at = now + REDIS_RETRY
        if self._last_warning is None or now - self._last_warning >= WARN_EVERY:
            self._last_warning = now
            log.warning("ratelimit.redis_unavailable", mode="memory-fallback", error=error,
                        detail="rate limiting per replica (in memory) until Redis answers")
