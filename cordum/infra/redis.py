"""Trio-native Redis on top of redis-py's asyncio client.

- `redis.get(...)`, `redis.hset(...)`, … : any redis-py command, awaited from Trio (one crossing).
- `redis.execute("GET", key)`: a raw command; concurrent ones are auto-pipelined.
- `redis.pipeline([...])`: many commands, one round trip and one crossing.
- `redis.script(lua)`: registered once; called with EVALSHA and reloaded on NOSCRIPT.
The pool holds at most `REDIS_POOL_SIZE` connections and keeps `REDIS_MIN_IDLE_CONNS` warm.
A cancelled call leaves the client usable: redis-py drops the interrupted connection instead of
returning it to the pool half-read.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import redis.asyncio as aredis
import trio
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import RedisError as _RedisError
from redis.exceptions import ResponseError as _ResponseError
from redis.exceptions import TimeoutError as _TimeoutError

from cordum.infra.aio import Batcher, aio
from cordum.infra.config import Settings
from cordum.runtime.log import get_logger

log = get_logger("redis")

# Re-exported so callers can catch Redis failures without importing redis-py.
RedisError = _RedisError
RedisUnavailable = (_ConnectionError, _TimeoutError, OSError)
ResponseError = _ResponseError

Command = Sequence[Any]
_BLOCKING = {"BLPOP", "BRPOP", "BLMOVE", "BZPOPMIN", "BZPOPMAX", "BLMPOP", "BZMPOP", "XREAD", "XREADGROUP", "WAIT"}


def score_pairs(reply: Sequence[Any]) -> list[tuple[str, float]]:
    """A WITHSCORES reply as (member, score) pairs, whichever shape redis-py returned it in."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(member, float(score)) for member, score in reply]
    return [(member, float(score)) for member, score in zip(reply[::2], reply[1::2])]


class Script:
    """A Lua script registered with the server; `await script(keys, args)`."""

    def __init__(self, client: aredis.Redis, lua: str) -> None:
        self._script = client.register_script(lua)  # EVALSHA, SCRIPT LOAD on NOSCRIPT
        self._call = aio(self._run)
        self.sha = self._script.sha

    async def _run(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._script(keys=list(keys), args=list(args))

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return await self._call(keys, args)


class Redis:
    """The Trio face of one redis-py client and its pool."""

    def __init__(self, client: aredis.Redis, pool: aredis.ConnectionPool) -> None:
        self._client = client
        self._pool = pool
        self._batcher: Batcher[Command, Any] = Batcher("redis", self._execute_batch, max_batch=256)
        self.round_trips = 0  # counted for the benchmark's per-job figures

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        # Commands are looked up once and cached as Trio-awaitable wrappers.
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._client, name)
        bridged = aio(method)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return await bridged(*args, **kwargs)

        self.__dict__[name] = call
        return call

    async def execute(self, *args: Any) -> Any:
        """A raw command: `await redis.execute("SET", key, value, "NX")`. Concurrent calls are
        auto-pipelined: they share one bridge crossing and one round trip (blocking commands,
        which would hold up their batch, go alone)."""
        if str(args[0]).upper() in _BLOCKING:
            self.round_trips += 1
            return await aio(self._client.execute_command)(*args)
        return await self._batcher.submit(args)

    async def _execute_batch(self, commands: list[Command]) -> list[Any]:
        self.round_trips += 1
        return await self._run_pipeline(commands, False)

    async def pipeline(self, commands: Sequence[Command], *, transaction: bool = False) -> list[Any]:
        """Run raw commands in one round trip; errors come back in place of results."""
        if not commands:
            return []
        self.round_trips += 1
        return await aio(self._run_pipeline)(commands, transaction)

    async def _run_pipeline(self, commands: Sequence[Command], transaction: bool) -> list[Any]:
        pipe = self._client.pipeline(transaction=transaction)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    def script(self, lua: str) -> Script:
        return Script(self._client, lua)

    async def aclose(self) -> None:
        await aio(self._close)()

    async def _close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()


async def _warm(pool: aredis.BlockingConnectionPool, count: int) -> None:
    """Open `count` connections now so the first requests don't pay for the handshakes."""
    connections = []
    try:
        for _ in range(count):
            conn = await pool.get_connection()
            connections.append(conn)
    finally:
        for conn in connections:
            await pool.release(conn)


def _make_client(settings: Settings) -> tuple[aredis.Redis, aredis.BlockingConnectionPool]:
    pool = aredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=5,  # seconds to wait for a free connection before raising
        decode_responses=True,
        socket_connect_timeout=5,
        health_check_interval=30,
        client_name=f"cordum:{settings.instance_id}",  # CLIENT LIST shows which replica is which
    )
    return aredis.Redis(connection_pool=pool), pool


@asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    """Connect, warm the pool, yield; the close is shielded so it runs on every exit path."""
    client, pool = _make_client(settings)
    redis = Redis(client, pool)
    try:
        await redis.ping()
        if settings.redis_min_idle_conns:
            await aio(_warm)(pool, settings.redis_min_idle_conns)
        async with trio.open_nursery() as nursery:
            await nursery.start(redis._batcher.run)
            try:
                yield redis
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await redis.aclose()
            except Exception as exc:  # closing a dead connection may fail; nothing to recover
                log.debug("redis.close_failed", error=repr(exc))
