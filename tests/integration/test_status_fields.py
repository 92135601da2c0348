"""The fields of `GET /api/v1/status` and `/health` that Cordum's clients and release gates read
(spec §1.5), from the in-process gateway against the real servers; and the Redis pool's
counters behind `redis_pool_stats`, against the real redis-server."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

import cordum
from cordum.gateway.status import health
from cordum.infra.aio import aio
from cordum.infra.bus import open_bus
from cordum.infra.config import load_settings
from cordum.infra.http import health_body
from cordum.infra.metrics import Metrics
from cordum.infra.redis import RedisError, open_redis
from tests.integration.test_gateway import VIEWER, Api, api, kernel, start_gateway

FIXTURES = (api, kernel, start_gateway)  # the gateway test module's, used here by name

POOL_FIELDS = {"hits", "misses", "timeouts", "total_conns", "idle_conns", "stale_conns"}


async def test_status_carries_the_fields_cordums_gates_read(api: Api, monkeypatch) -> None:
    monkeypatch.setenv("CORDUM_BUILD_COMMIT", "0123abc")
    for _ in range(3):
        assert (await api.submit()).status == 200
    first = await api.call("GET", "/api/v1/status")
    again = await api.call("GET", "/api/v1/status")
    assert first.status == again.status == 200
    # the Redis-read parts are cached per replica: an immediate second call reads none of them
    assert (first.headers["X-Cache"], again.headers["X-Cache"]) == ("MISS", "HIT")

    body = first.body
    pool = body["redis_pool_stats"]
    assert set(pool) == POOL_FIELDS, pool
    assert pool["hits"] > 0 and pool["misses"] >= 1 and pool["timeouts"] == 0  # gate 21: hits > 0
    assert pool["total_conns"] >= pool["idle_conns"] >= 0 and pool["total_conns"] >= 1
    assert body["goroutine_count"] > 10
    assert body["build"] == {"version": cordum.__version__, "commit": "0123abc", "date": ""}
    assert body["nats"]["connected"] is True and body["nats"]["status"] == "connected"
    assert body["nats"]["url"].startswith("nats://")  # the operator's admins see which server
    assert body["redis"] == {"ok": True, "status": "ok"}
    assert again.body["redis_pool_stats"]["hits"] >= pool["hits"]  # live, not cached

    viewer = (await api.call("GET", "/api/v1/status", key=VIEWER)).body
    assert "url" not in viewer["nats"] and viewer["nats"]["status"] == "connected"


async def test_health_has_cordums_shape(api: Api) -> None:
    reply = await api.call("GET", "/health", key=None)
    assert reply.status == 200
    assert {k: reply.body[k] for k in ("status", "nats", "redis")} == {
        "status": "healthy", "nats": "connected", "redis": "ok"}
    assert "error" not in reply.body


async def test_health_names_what_is_down_without_hosts() -> None:
    class DeadRedis:
        async def ping(self) -> bool:
            raise ConnectionError("Error 111 connecting to redis.internal:6379")

    gw = SimpleNamespace(redis=DeadRedis(), bus=SimpleNamespace(connected=False, state="reconnecting"))
    body, code = await health_body("api-gateway", Metrics("i-1"), lambda: health(gw))
    assert code == 503
    assert {k: body[k] for k in ("status", "nats", "redis", "error")} == {
        "status": "unhealthy", "nats": "reconnecting", "redis": "error", "error": "redis: ping failed: ConnectionError"}


async def test_bus_state_and_url(settings) -> None:
    async with open_bus(settings, name="tests") as bus:
        assert (bus.state, bus.connected) == ("connected", True)
        assert bus.server_url is not None and bus.server_url.startswith("nats://127.0.0.1:")
    assert (bus.state, bus.connected, bus.server_url) == ("closed", False, None)


async def test_pool_counts_hits_misses_timeouts_and_stale_connections(server_env, redis) -> None:
    settings = load_settings({**server_env, "REDIS_POOL_SIZE": "1", "REDIS_MIN_IDLE_CONNS": "0"})
    async with open_redis(settings) as client:
        # open_redis PINGs: one connection made (a miss), now idle
        assert client.pool_stats() == {"hits": 0, "misses": 1, "timeouts": 0, "total_conns": 1,
                                       "idle_conns": 1, "stale_conns": 0}
        for n in range(3):
            await client.execute("SET", "pool-stats", n)
        assert await client.get("pool-stats") == "2"
        stats = client.pool_stats()
        assert stats["hits"] == 4 and stats["misses"] == 1

        # the only connection held: a second caller waits, then times out
        pool = client._pool
        held = await aio(pool.get_connection)()
        assert client.pool_stats()["idle_conns"] == 0 and client.pool_stats()["total_conns"] == 1
        pool.timeout = 0.2
        with pytest.raises(RedisError, match="No connection available"):
            await aio(pool.get_connection)()
        await aio(pool.release)(held)
        stats = client.pool_stats()
        assert stats["timeouts"] == 1 and stats["hits"] == 5

        # a cancelled call drops its connection (half-read): the next hand-out redials it
        with trio.move_on_after(0.1):
            await client.execute("BLPOP", "pool-stats-empty", 5)
        assert await client.execute("PING") is True
        stats = client.pool_stats()
        assert (stats["hits"], stats["misses"], stats["stale_conns"]) == (6, 2, 0), stats

        # the server closes the idle connection: the next hand-out finds it closed
        client_id = await client.execute("CLIENT", "ID")
        await redis.execute("CLIENT", "KILL", "ID", client_id)
        await trio.sleep(0.2)  # for the closed socket to reach the client's loop
        try:
            await client.execute("PING")
        except RedisError:
            pass  # RESP3's maintenance notifications on: redis-py hands it out, the command fails
        assert await client.execute("PING") is True  # on a new connection, dialled once
        stats = client.pool_stats()
        assert (stats["stale_conns"], stats["misses"], stats["timeouts"]) == (1, 3, 1), stats
        assert await client.execute("CLIENT", "ID") != client_id


async def test_pool_stats_on_a_cluster_say_so(server_env, redis_cluster) -> None:
    settings = load_settings({**server_env, "REDIS_CLUSTER_ADDRESSES": redis_cluster.seeds})
    async with open_redis(settings) as client:
        await client.execute("SET", "pool-stats", 1)
        stats = client.pool_stats()
    assert stats["cluster"] is True and set(stats) == POOL_FIELDS | {"cluster"}
    assert stats["total_conns"] >= stats["idle_conns"] and stats["total_conns"] >= 1
