"""Configuration documents `cfg:<scope>:<id>`: JSON `{scope, scope_id, data, revision, updated_at,
meta}`, written with a revision check in one single-key script (optimistic concurrency)."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

from cordum.infra.redis import Redis
from cordum.store import keys

SCOPES = ("system", "org", "team", "workflow", "step")

# KEYS[1] doc  ARGV[1] expected revision (-1 = any)  ARGV[2] new doc JSON, revision 0 first
_PUT = """
local cur = redis.call('GET', KEYS[1])
local revision = 0
if cur then revision = tonumber(cjson.decode(cur)['revision'] or 0) end
if tonumber(ARGV[1]) >= 0 and tonumber(ARGV[1]) ~= revision then return {'CONFLICT', tostring(revision)} end
-- The document is stored as sent (cjson would turn empty lists into objects); only the
-- revision placeholder is filled in.
local encoded = string.gsub(ARGV[2], '"revision": *0', '"revision": ' .. (revision + 1), 1)
redis.call('SET', KEYS[1], encoded)
return {'OK', encoded}
"""


class RevisionConflict(Exception):
    def __init__(self, current: int) -> None:
        super().__init__(f"configuration changed meanwhile (now at revision {current})")
        self.current = current


class ConfigStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._put = redis.script(_PUT)

    async def get(self, scope: str, scope_id: str) -> dict[str, Any] | None:
        text = await self._redis.execute("GET", keys.config_doc(scope, scope_id))
        return json.loads(text) if text else None

    async def put(
        self, scope: str, scope_id: str, data: Mapping[str, Any], *, meta: Mapping[str, Any] | None = None,
        expected_revision: int | None = None,
    ) -> dict[str, Any]:
        if scope not in SCOPES:
            raise ValueError(f"unknown config scope {scope!r}; expected one of {', '.join(SCOPES)}")
        doc = {"revision": 0, "scope": scope, "scope_id": scope_id, "data": dict(data),
               "updated_at": time.time(), "meta": dict(meta or {})}
        reply = await self._put([keys.config_doc(scope, scope_id)],
                                [-1 if expected_revision is None else expected_revision, json.dumps(doc)])
        if reply[0] == "CONFLICT":
            raise RevisionConflict(int(reply[1]))
        return json.loads(reply[1])

    async def effective(self, *scopes: tuple[str, str]) -> dict[str, Any]:
        """`data` of each (scope, id) merged in order, later keys winning (system → org → team)."""
        merged: dict[str, Any] = {}
        for scope, scope_id in scopes:
            doc = await self.get(scope, scope_id)
            if doc:
                _merge(merged, doc.get("data") or {})
        return merged


def _merge(into: dict[str, Any], data: Mapping[str, Any]) -> None:
    for name, value in data.items():
        if isinstance(value, Mapping) and isinstance(into.get(name), dict):
            _merge(into[name], value)
        else:
            into[name] = json.loads(json.dumps(value))
