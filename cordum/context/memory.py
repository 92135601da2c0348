"""The context engine's Redis I/O: read what a window needs, append a turn. Nothing else.

Reads never fail and never outlast their deadline: whatever Redis could not deliver in time (an
error, a timeout) is left out and `MemoryView.degraded` says why; the window is built from the
rest. A CHAT window costs one round trip (LRANGE), a RAG window with a summary one (LRANGE + GET
in a pipeline); a RAG window for a file walks the chunk set with SSCAN (≤ max_chunk_scan members)
and reads the records in one pipeline. Writes (RPUSH both entries + LTRIM, one key, MULTI/EXEC)
raise `MemoryUnavailable` so the caller can fail clearly instead.
"""

from __future__ import annotations

from typing import Any, Sequence

import trio

from cordum.context.window import HISTORY_LIMIT, MemoryView
from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.store import keys

REDIS_ERRORS = (RedisError, *RedisUnavailable)
SCAN_PAGE = 200


class MemoryUnavailable(Exception):
    """Redis did not take a write (down, refusing, or slower than the deadline)."""


def _check(results: Sequence[Any]) -> list[Any]:
    for result in results:
        if isinstance(result, Exception):
            raise result
    return list(results)


class MemoryStore:
    def __init__(self, redis: Redis, *, timeout: float, max_chunk_scan: int) -> None:
        self._redis = redis
        self.timeout = timeout
        self.max_chunk_scan = max_chunk_scan

    async def read(self, memory_id: str, *, history: bool, summary: bool, file_path: str) -> MemoryView:
        view = MemoryView()
        if not memory_id or not (history or summary or file_path):
            return view
        with trio.move_on_after(self.timeout) as scope:
            try:
                commands: list[tuple[Any, ...]] = []
                if history:
                    commands.append(("LRANGE", keys.memory_events(memory_id), -HISTORY_LIMIT, -1))
                if summary:
                    commands.append(("GET", keys.memory_summary(memory_id)))
                if commands:
                    results = _check(await self._redis.pipeline(commands))
                    if history:
                        view.history = list(results.pop(0) or [])
                    if summary:
                        view.summary = results.pop(0) or None
                if file_path:
                    view.chunks = await self._chunks(memory_id)
            except REDIS_ERRORS as exc:
                view.degraded = f"redis error: {type(exc).__name__}"
        if scope.cancelled_caught:
            view.degraded = "redis timeout"
        return view

    async def _chunks(self, memory_id: str) -> list[str]:
        """The chunk records listed in the memory's chunk set, at most max_chunk_scan of them."""
        key = keys.memory_chunks(memory_id)
        members: list[str] = []
        cursor = "0"
        while len(members) < self.max_chunk_scan:
            count = min(SCAN_PAGE, self.max_chunk_scan - len(members))
            cursor, page = _check(await self._redis.pipeline([("SSCAN", key, cursor, "COUNT", count)]))[0]
            members += page
            if str(cursor) == "0":
                break
        members = members[:self.max_chunk_scan]
        if not members:
            return []
        # One GET per key (chunk keys may live on different cluster nodes): one pipeline, and a
        # record that is gone or unreadable is skipped.
        records = await self._redis.pipeline([("GET", member) for member in members])
        return [r for r in records if isinstance(r, str)]

    async def append(self, memory_id: str, entries: Sequence[str]) -> None:
        key = keys.memory_events(memory_id)
        try:
            with trio.fail_after(self.timeout):
                _check(await self._redis.pipeline([("RPUSH", key, *entries), ("LTRIM", key, -HISTORY_LIMIT, -1)],
                                                  transaction=True))
        except trio.TooSlowError:
            raise MemoryUnavailable(f"redis did not answer within {self.timeout:g}s") from None
        except REDIS_ERRORS as exc:
            raise MemoryUnavailable(f"redis error: {type(exc).__name__}") from None
