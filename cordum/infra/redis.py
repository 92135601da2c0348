"""Trio-native Redis on top of redis-py's asyncio client, one server or a Redis Cluster.

- `redis.get(...)`, `redis.hset(...)`, … : any redis-py command, awaited from Trio (one crossing).
- `redis.execute("GET", key)`: a raw command; concurrent ones are auto-pipelined.
- `redis.pipeline([...])`: many commands, one round trip and one crossing.
- `redis.script(lua)`: registered once; called with EVALSHA and reloaded on NOSCRIPT.
- `redis.scan_keys(pattern)`: SCAN to the end — on a cluster, on every primary.
The pool holds at most `REDIS_POOL_SIZE` connections and keeps `REDIS_MIN_IDLE_CONNS` warm.
A cancelled call leaves the client usable: redis-py drops the interrupted connection instead of
returning it to the pool half-read.

Redis Cluster
-------------
`REDIS_CLUSTER_ADDRESSES=host:port,host:port` (seeds; credentials and TLS come from `REDIS_URL`)
or `REDIS_URL=redis+cluster://[user:password@]host:port[,host:port]` (`rediss+cluster://` for TLS)
selects redis-py's `RedisCluster`; the adapter's API is the same. How each call routes:

- A command goes to the primary owning its key's slot (MOVED/ASK redirects and topology changes
  are followed by redis-py). Keyless admin commands fan out where redis-py says: FLUSHDB, SCAN,
  SCRIPT LOAD to every primary; PING to every node.
- A pipeline (and the auto-pipelined `execute` batches) is split by node: one round trip per node
  involved, sent concurrently, results back in order. Each command in it must be single-slot.
  `transaction=True` (MULTI/EXEC) is only possible when every key shares one slot (redis-py
  refuses otherwise); the one user, the safety kernel's SnapshotLog, touches a single key.
- A script runs with EVALSHA on the node owning its keys' slot; on NOSCRIPT (a new or failed-over
  primary) redis-py loads it on every primary and retries. All its KEYS must share one slot.
- `REDIS_POOL_SIZE` bounds the connections per node. redis-py's cluster pool raises instead of
  waiting when a node's pool is exhausted, so the adapter admits at most `REDIS_POOL_SIZE` calls at
  a time (each holds at most one connection per node).

What keeps Cordum's keys cluster-safe (no CROSSSLOT):
- Every Lua script touches one key (job transition on `job:meta:<id>`, config revision, fenced
  HSET, lease renew/release, the safety circuit breaker), or keys sharing one `{hash tag}`: the lease
  acquire script increments `{<lock key>}:fence` next to `<lock key>` (the tag is the whole lock
  key, so both hash to the lock key's slot), the GCRA rate limiter's keys are all
  `cordum:rl:{<tenant>}:…`.
- Multi-key maintenance (job indexes, tenant sets, traces, DLQ index, worker job lists) is done
  as idempotent single-key commands in a pipeline after the script (ZADD/SADD are upserts,
  ZREM/SREM/DEL of a missing member or key are no-ops; the reconciler repairs a stale index).
  No command names two keys: DLQ removal is one `DEL` per entry, not `DEL k1 k2 …`.
- Global indexes (`job:index:<state>`, `dlq:index`, …) are deliberately not hash-tagged: each is
  one hot key on one node, updated outside scripts.
- Listings that SCAN (the instance registry) iterate every primary (`scan_keys`).
"""

from __future__ import annotations

import json

import asyncio
import hashlib
import inspect
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence
from urllib.parse import unquote, urlsplit

import redis.asyncio as aredis
import trio
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.client import NEVER_DECODE
from redis.exceptions import ClusterCrossSlotError as _ClusterCrossSlotError
from redis.exceptions import ClusterDownError as _ClusterDownError
from redis.exceptions import ConnectionError as _ConnectionError
from redis.exceptions import RedisClusterException as _RedisClusterException
from redis.exceptions import RedisError as _RedisError
from redis.exceptions import NoScriptError as _NoScriptError
from redis.exceptions import ResponseError as _ResponseError
from redis.exceptions import SlotNotCoveredError as _SlotNotCoveredError
from redis.exceptions import TimeoutError as _TimeoutError

try:
    import hiredis
except ImportError:  # optional: redis-py packs in Python then
    hiredis = None  # type: ignore[assignment]

from cordum.infra.aio import Batcher, aio
from cordum.infra.config import Settings
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger

log = get_logger("redis")

# Re-exported so callers can catch Redis failures without importing redis-py.
RedisError = _RedisError
NoScriptError = _NoScriptError
# CLUSTERDOWN and an uncovered slot are transient while a replica is promoted after a failover.
RedisUnavailable = (_ConnectionError, _TimeoutError, OSError, _ClusterDownError, _SlotNotCoveredError)
ResponseError = _ResponseError
# A command or script whose keys are in different slots: a bug, never retried. The server replies
# CROSSSLOT (ClusterCrossSlotError); redis-py usually refuses before sending (RedisClusterException).
CrossSlotError = (_ClusterCrossSlotError, _RedisClusterException)

Command = Sequence[Any]
# How long a batch or pipeline waits for Redis before it fails (as a connection error: callers
# retry or redeliver), like redis-py 8's default socket timeout.
OP_TIMEOUT = 5.0
_BLOCKING = {"BLPOP", "BRPOP", "BLMOVE", "BZPOPMIN", "BZPOPMAX", "BLMPOP", "BZMPOP", "XREAD", "XREADGROUP", "WAIT"}


def score_pairs(reply: Sequence[Any]) -> list[tuple[str, float]]:
    """A WITHSCORES reply as (member, score) pairs, whichever shape redis-py returned it in."""
    if reply and isinstance(reply[0], (list, tuple)):
        return [(member, float(score)) for member, score in reply]
    return [(member, float(score)) for member, score in zip(reply[::2], reply[1::2])]


class _Gate:
    """At most `limit` calls in flight, on the asyncio side (cluster mode: redis-py's per-node pool
    raises MaxConnectionsError instead of waiting; one call holds at most one connection per node,
    so `limit` calls never exceed `REDIS_POOL_SIZE` connections on any node). No limit: a no-op."""

    def __init__(self, limit: int | None) -> None:
        self._limit = limit
        self._semaphore: asyncio.Semaphore | None = None

    async def run(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        if self._limit is None:
            return await fn(*args, **kwargs)
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self._limit)
        async with self._semaphore:
            return await fn(*args, **kwargs)


class Script:
    """A Lua script; `await script(keys, args)`. Calls go through the auto-pipeline as EVALSHA
    (concurrent script calls share round trips and crossings with other commands); on NOSCRIPT
    (a restarted or newly promoted server) the script is loaded and the call retried once. On a
    cluster all KEYS must share one slot: EVALSHA goes to the node owning it."""

    def __init__(self, redis: "Redis", lua: str) -> None:
        self._redis = redis
        self.lua = lua
        self.sha = hashlib.sha1(lua.encode()).hexdigest()

    def call_later(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Callable[[], Awaitable[Any]]:
        """The call, queued with the next batch (see `Redis.execute_later`); the reply raises
        NoScriptError if the server does not have the script (the caller then calls it again)."""
        return self._redis.execute_later("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        command = ("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self._redis.execute(*command)
        except _NoScriptError:
            await self._redis.script_load(self.lua)  # every primary, on a cluster
            return await self._redis.execute(*command)


class Redis:
    """The Trio face of one redis-py client (standalone or cluster) and its pool."""

    def __init__(
        self,
        client: aredis.Redis | RedisCluster,
        pool: aredis.ConnectionPool | None = None,
        *,
        max_in_flight: int | None = None,
    ) -> None:
        self._client = client
        self._pool = pool
        # Read on every transition: isinstance on redis-py's generic cluster class is slow.
        self.cluster = isinstance(client, RedisCluster)
        self._gate = _Gate(max_in_flight)
        self._batcher: Batcher[Command, Any] = Batcher("redis", self._execute_batch, max_batch=256)
        # redis-py's reply converters (HGETALL → dict, SET → bool, …) in a plain dict: its own is
        # case-insensitive, a Python-level lookup per reply.
        self._reply_callbacks = {str(name).upper(): fn for name, fn in client.response_callbacks.items()}
        self._held = _HeldConnection(pool, self._reply_callbacks) if pool is not None and _POOL is _CountingPool else None
        self.round_trips = 0  # counted for the benchmark's per-job figures

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        # Commands are looked up once and cached as Trio-awaitable wrappers.
        if name.startswith("_"):
            raise AttributeError(name)
        method = getattr(self._client, name)
        bridged = aio(self._gate.run)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.round_trips += 1
            return await bridged(method, *args, **kwargs)

        self.__dict__[name] = call
        return call

    async def execute(self, *args: Any) -> Any:
        """A raw command: `await redis.execute("SET", key, value, "NX")`. Concurrent calls are
        auto-pipelined: they share one bridge crossing and one round trip (blocking commands,
        which would hold up their batch, go alone)."""
        if str(args[0]).upper() in _BLOCKING:
            self.round_trips += 1
            return await aio(self._gate.run)(self._client.execute_command, *args)
        return await self._batcher.submit(args)

    async def execute_bytes(self, *args: Any) -> Any:
        """A raw command whose reply is not decoded (bytes stay bytes: a job's output need not be
        UTF-8). Not batched: it is for the rare reads that need it."""
        self.round_trips += 1
        return await aio(self._gate.run)(self._client.execute_command, *args, **{NEVER_DECODE: True})

    def execute_later(self, *args: Any) -> Callable[[], Awaitable[Any]]:
        """`execute`, sent with the next batch: await the returned function for the reply. A
        command queued right after another goes in the same pipeline, after it, on one server
        (on a cluster, commands for different nodes run concurrently)."""
        return self._batcher.submit_later(args)

    async def _execute_batch(self, commands: list[Command]) -> list[Any]:
        self.round_trips += 1
        if self._held is not None:
            return await self._held.run(commands)
        return await self._gate.run(self._run_pipeline, commands, False)

    async def pipeline(self, commands: Sequence[Command], *, transaction: bool = False) -> list[Any]:
        """Run raw commands in one round trip (per node, on a cluster); errors come back in place
        of results. `transaction=True` on a cluster needs every key in one slot."""
        if not commands:
            return []
        self.round_trips += 1
        return await aio(self._gate.run)(self._run_pipeline, commands, transaction)

    async def _run_pipeline(self, commands: Sequence[Command], transaction: bool) -> list[Any]:
        if not transaction and self._pool is not None:
            return await _lean_pipeline(self._pool, self._reply_callbacks, commands)
        pipe = self._client.pipeline(transaction=transaction)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    def script(self, lua: str) -> Script:
        return Script(self, lua)

    def pool_usage(self) -> tuple[int, int, int] | None:
        """(connections in use, idle, the pool's limit), read from the pool's own bookkeeping (no
        round trip). None on a cluster: its pools are per node, bounded by the in-flight gate."""
        pool = self._pool
        if pool is None:
            return None
        in_use = len(getattr(pool, "_in_use_connections", ()))
        idle = len(getattr(pool, "_available_connections", ()))
        return in_use, idle, int(pool.max_connections)

    def pool_stats(self) -> dict[str, Any]:
        """The pool's counters and connections now, as go-redis's PoolStats (see `_CountingPool`
        for what each counts); no round trip. `idle_conns` are the open idle connections,
        `total_conns` those plus the ones in use. On a cluster redis-py keeps one small pool per
        node and counts nothing: hits, misses, timeouts and stale_conns are 0 there,
        `total_conns`/`idle_conns` are summed over the nodes, and `cluster` is true."""
        pool = self._pool
        if pool is None:
            nodes = self._client.get_nodes() if self.cluster else []
            total = sum(len(getattr(node, "_connections", ())) for node in nodes)
            idle = sum(len(getattr(node, "_free", ())) for node in nodes)
            return {"hits": 0, "misses": 0, "timeouts": 0, "total_conns": total, "idle_conns": idle,
                    "stale_conns": 0, "cluster": self.cluster}
        idle = sum(1 for conn in list(getattr(pool, "_available_connections", ())) if conn.is_connected)
        in_use = len(getattr(pool, "_in_use_connections", ()))
        return {"hits": getattr(pool, "hits", 0), "misses": getattr(pool, "misses", 0),
                "timeouts": getattr(pool, "timeouts", 0), "total_conns": in_use + idle, "idle_conns": idle,
                "stale_conns": getattr(pool, "stale", 0)}

    async def scan_keys(self, match: str, *, count: int = 200, limit: int | None = None) -> list[str]:
        """The keys matching `match`, SCANned to the end (on a cluster: on every primary, each
        with its own cursor); at most `limit`."""
        self.round_trips += 1
        return await aio(self._gate.run)(self._scan, match, count, limit)

    async def _scan(self, match: str, count: int, limit: int | None) -> list[str]:
        found: list[str] = []
        iterator = self._client.scan_iter(match=match, count=count)
        try:
            async for key in iterator:
                found.append(key)
                if limit is not None and len(found) >= limit:
                    break
        finally:
            await iterator.aclose()
        return found

    async def scan_page(self, cursor: str, match: str, *, count: int = 500) -> tuple[str, list[str]]:
        """One page of a SCAN walk: start with cursor "0"; "0" comes back after the last page. On
        a cluster the cursor carries one position per primary, so a walk visits every node."""
        self.round_trips += 1
        return await aio(self._gate.run)(self._scan_page, cursor, match, count)

    async def _scan_page(self, cursor: str, match: str, count: int) -> tuple[str, list[str]]:
        if not self.cluster:
            position, found = await self._client.scan(cursor=int(cursor), match=match, count=count)
            return str(position), list(found)
        if cursor == "0":
            positions, found = await self._client.scan(match=match, count=count)  # every primary, once
        else:
            positions = json.loads(cursor)
            name, at = next(iter(positions.items()))
            moved, found = await self._client.scan(cursor=at, match=match, count=count,
                                                   target_nodes=self._client.get_node(node_name=name))
            positions[name] = moved[name]
        remaining = {name: at for name, at in positions.items() if at != 0}
        return (json.dumps(remaining) if remaining else "0"), list(found)

    async def aclose(self) -> None:
        await aio(self._close)()

    async def _close(self) -> None:
        if self._held is not None:
            await self._held.close()
        await self._client.aclose()
        if self._pool is not None:
            await self._pool.disconnect()


class _HeldConnection:
    """The auto-pipeline's connection, kept from one batch to the next while batches keep coming.

    Taking a connection from redis-py's pool and giving it back costs about as much CPU as a small
    batch's own round trip (a condition lock, a timer, its observability hooks). The batcher sends
    one batch at a time, so it keeps its connection while it is busy, and gives it back once no
    batch came for HOLD_S, or at once when the pool has none left for other callers (the next batch
    takes one again: nobody waits on the batcher for longer than a batch). A second sender (the
    batcher's rare send from a caller's own task, during a shutdown) goes through the pool.
    A connection Redis closed while held is redialled before the next batch, as the pool would."""

    HOLD_S = 0.005

    def __init__(self, pool: Any, callbacks: dict[str, Callable[..., Any]]) -> None:
        self._pool = pool
        self._callbacks = callbacks
        self._connection: Any = None
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def run(self, commands: Sequence[Command]) -> list[Any]:
        if self._busy:
            return await _lean_pipeline(self._pool, self._callbacks, commands)
        self._busy = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            connection = self._connection
            if connection is None:
                connection = self._connection = await self._pool.get_connection()
            else:
                reader = getattr(connection, "_reader", None)
                if reader is not None and reader.at_eof():  # closed by the server since the last batch
                    await connection.disconnect()  # the write below dials a new one
                if not connection.is_connected:
                    self._pool.misses += 1  # a dial, as the pool counts its own (pool_stats)
            return await _deadlined(connection, self._callbacks, commands)
        finally:
            self._busy = False
            if self._connection is not None:
                if self._pool.can_get_connection():
                    self._timer = asyncio.get_running_loop().call_later(self.HOLD_S, self._let_go)
                else:
                    self._let_go()

    def _let_go(self) -> None:
        self._timer = None
        connection, self._connection = self._connection, None
        if connection is not None:
            task = asyncio.ensure_future(self._pool.release(connection))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._let_go()
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)


async def _lean_pipeline(pool: aredis.ConnectionPool, callbacks: dict[str, Callable[..., Any]],
                         commands: Sequence[Command]) -> list[Any]:
    """What redis-py's non-transactional pipeline does on one server (one write, the replies read
    in order, an error reply in place of its command's result, the connection's own retry policy
    on a broken connection), without its per-call bookkeeping: redis-py 8 prepares HIMPORT field
    sets and records OpenTelemetry durations around every pipeline, a third of a pipeline's CPU
    for commands we never send. Cancelled or broken mid-way, the connection disconnects itself
    (redis-py's own handling), so the pool redials it instead of handing it out half-read.

    One deadline (OP_TIMEOUT) for the write and every reply, where redis-py's socket timeout
    would start a task for the write and a timer for each reply (see _make_client)."""
    connection = await pool.get_connection()
    try:
        return await _deadlined(connection, callbacks, commands)
    finally:
        await pool.release(connection)


async def _deadlined(connection: Any, callbacks: dict[str, Callable[..., Any]], commands: Sequence[Command]) -> list[Any]:
    deadline = asyncio.timeout(OP_TIMEOUT)
    try:
        async with deadline:
            return await connection.retry.call_with_retry(
                lambda: _send_and_read(connection, callbacks, commands),
                lambda error: connection.disconnect(),
            )
    except TimeoutError:
        if not deadline.expired():
            raise
        # The deadline cancelled the read or write: the connection dropped itself.
        raise _TimeoutError(f"Redis did not answer {len(commands)} command(s) within {OP_TIMEOUT:g} s") from None


async def _send_and_read(connection: Any, callbacks: dict[str, Callable[..., Any]],
                         commands: Sequence[Command]) -> list[Any]:
    await connection.send_packed_command(connection.pack_commands(commands))
    replies: list[Any] = []
    for command in commands:
        try:
            reply = await connection.read_response()
        except _ResponseError as exc:
            replies.append(exc)
            continue
        name = command[0]
        callback = callbacks.get(name.upper() if isinstance(name, str) else name.decode().upper())
        if callback is not None:
            reply = callback(reply)
            if inspect.isawaitable(reply):
                reply = await reply
        replies.append(reply)
    return replies


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


class _HiredisPacking:
    """redis-py's asyncio connections pack commands in Python (a tenth of the scheduler's CPU went
    to it); its sync ones use hiredis's C packer when installed, and so do ours. Same bytes: str
    as UTF-8, int and float as redis-py writes them. A type hiredis does not take (bytearray, an
    enum, bool, None) goes to redis-py's own packer, which packs or refuses it as before."""

    def pack_command(self, *args: Any) -> list[bytes]:
        split = args
        if isinstance(args[0], str):
            split = tuple(args[0].encode().split()) + args[1:]
        elif b" " in args[0]:
            split = tuple(args[0].split()) + args[1:]
        try:
            return [hiredis.pack_command(split)]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc]


def _with_hiredis_packing(connection_class: type) -> type:
    if hiredis is None or issubclass(connection_class, _HiredisPacking):
        return connection_class
    return type(f"Hiredis{connection_class.__name__}", (_HiredisPacking, connection_class), {})


class _CountingPool(aredis.BlockingConnectionPool):
    """redis-py's blocking pool, counting hand-outs as go-redis's PoolStats do (`Redis.pool_stats`):

    - hits: handed out with its connection open;
    - misses: the pool had to dial: a new connection, or one dropped after an I/O error or a
      cancelled call (redis-py keeps the object and reconnects it when next handed out);
    - timeouts: waits for a free connection that timed out (the caller got "No connection
      available");
    - stale: connections the server had closed while they sat idle, found when handed out.
      redis-py reconnects one in place (also a miss) unless its maintenance notifications are on
      (RESP3's default, "auto"): then the command on it fails, and the next hand-out redials it.

    The counters are plain integers without a lock: only the asyncio loop uses the pool, and
    status reads them from the same thread. The hot overrides are plain functions returning the
    parent's coroutine: a command pays a few attribute reads, no extra frame, await or lock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hits = self.misses = self.timeouts = self.stale = 0

    def get_connection(self, *args: Any, **kwargs: Any) -> Awaitable[Any]:  # type: ignore[override]
        if self.can_get_connection():
            return super().get_connection(*args, **kwargs)
        # Exhausted: only a caller that waits can time out, so only it pays for the try (one
        # that found room waits only if others take it first: such a rare timeout goes uncounted).
        return self._wait_for_connection(*args, **kwargs)

    async def _wait_for_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().get_connection(*args, **kwargs)
        except _ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                self.timeouts += 1
            raise

    def ensure_connection(self, connection: Any) -> Awaitable[None]:  # type: ignore[override]
        # Called once per hand-out, with the connection the pool just picked.
        reader = connection._reader
        if reader is None:
            self.misses += 1
        elif not reader.at_eof():
            self.hits += 1
        else:
            self.stale += 1
            if not getattr(self, "maint_notifications_enabled", lambda: False)():
                self.misses += 1
        return super().ensure_connection(connection)


# The hooks above exist in redis-py 6+; an older redis-py gets the plain pool (status then
# reports its connections, and zeros for the counters).
_POOL = _CountingPool if all(hasattr(aredis.BlockingConnectionPool, name)
                             for name in ("can_get_connection", "ensure_connection")) else aredis.BlockingConnectionPool


def _make_client(settings: Settings) -> tuple[aredis.Redis, aredis.BlockingConnectionPool]:
    pool = _POOL.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_size,
        timeout=5,  # seconds to wait for a free connection before raising
        decode_responses=True,
        socket_connect_timeout=5,
        socket_keepalive=True,
        # No periodic PING before reuse: redis-py re-arms its timer after every reply through
        # asyncio.get_running_loop(), a getpid() syscall per reply on Python 3.11. redis-py
        # replaces a connection the server closed when handing it out only while its maintenance
        # notifications are off, and RESP3 turns them on ("auto"): such a connection, like one
        # that died unnoticed, fails its next command, which the caller treats as any Redis
        # error (a consumer redelivers, an HTTP request answers 503); it is redialled after.
        health_check_interval=0,
        # No socket timeout: redis-py 8's default (5 s) starts a task around every write and a
        # timer around every reply read. Batches and pipelines, nearly all our traffic, get one
        # deadline each instead (_lean_pipeline, OP_TIMEOUT); a single redis-py call waits as
        # redis-py 7 did, until the server answers or the caller is cancelled.
        socket_timeout=None,
        client_name=f"cordum:{settings.instance_id}",  # CLIENT LIST shows which replica is which
        # REDIS_USERNAME/REDIS_PASSWORD; credentials in the URL, if any, take precedence
        **_password_options(settings),
    )
    # The URL picks the class (TCP, TLS, unix socket); each gets the C packer.
    pool.connection_class = _with_hiredis_packing(pool.connection_class)
    return aredis.Redis(connection_pool=pool), pool


def cluster_credentials(url: str) -> dict[str, Any]:
    """Username, password and TLS for the cluster client, from REDIS_URL (`redis://`,
    `rediss://`, or the `redis+cluster://` URL itself)."""
    scheme, _, rest = url.partition("://")
    userinfo = rest.split("/", 1)[0].rpartition("@")[0]
    options: dict[str, Any] = {"ssl": scheme.startswith("rediss")}
    if scheme in ("redis", "rediss"):
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    else:
        username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    if username:
        options["username"] = unquote(username)
    if password:
        options["password"] = unquote(password)
    return options


def _password_options(settings: Settings) -> dict[str, str]:
    options = {"password": settings.redis_password} if settings.redis_password else {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    return options


def _make_cluster_client(settings: Settings) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in settings.redis_cluster_nodes],
        max_connections=settings.redis_pool_size,  # per node
        require_full_coverage=True,
        decode_responses=True,
        socket_connect_timeout=5,
        socket_keepalive=True,
        health_check_interval=0,  # as for one server (_make_client)
        client_name=f"cordum:{settings.instance_id}",
        **{**_password_options(settings), **cluster_credentials(settings.redis_url)},
    )


@asynccontextmanager
async def open_redis(settings: Settings) -> AsyncIterator[Redis]:
    """Connect, warm the pool, yield; the close is shielded so it runs on every exit path."""
    if settings.redis_cluster:
        redis = Redis(_make_cluster_client(settings), max_in_flight=settings.redis_pool_size)
        pool = None
    else:
        client, pool = _make_client(settings)
        redis = Redis(client, pool)
    try:
        await redis.ping()  # on a cluster: discovers the slots and nodes first
        if pool is not None and settings.redis_min_idle_conns:
            await aio(_warm)(pool, settings.redis_min_idle_conns)
        async with trio.open_nursery() as nursery:
            await nursery.start(redis._batcher.run)
            try:
                yield redis
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with close_scope(2):
            try:
                await redis.aclose()
            except Exception as exc:  # closing a dead connection may fail; nothing to recover
                log.debug("redis.close_failed", error=repr(exc))
