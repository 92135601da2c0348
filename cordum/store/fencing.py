"""Fenced writes: a record remembers the highest fencing token that wrote it and refuses writes
carrying an older one. This is what makes a lease safe when its holder was paused past expiry:
the successor's first write raises the bar, and the stale holder's late write is rejected.
"""

from __future__ import annotations

from typing import Mapping

from cordum.infra.redis import Redis

FENCE_FIELD = "_fence"

_FENCED_HSET = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local fence = tonumber(ARGV[2])
if fence < current then return current end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], unpack(ARGV, 3))
return 0
"""


class StaleFence(Exception):
    def __init__(self, key: str, fence: int, current: int) -> None:
        super().__init__(f"write to {key} with fence {fence} rejected: already written with fence {current}")
        self.key = key
        self.fence = fence
        self.current = current


class FencedHashes:
    def __init__(self, redis: Redis) -> None:
        self._script = redis.script(_FENCED_HSET)

    async def hset(self, key: str, fence: int, fields: Mapping[str, str]) -> None:
        """HSET `fields` on `key` unless it was already written with a newer fence."""
        args: list[str | int] = [FENCE_FIELD, fence]
        for name, value in fields.items():
            args += [name, value]
        current = int(await self._script([key], args))
        if current:
            raise StaleFence(key, fence, current)
