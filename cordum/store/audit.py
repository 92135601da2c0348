"""The audit chain: each tenant's audit events in one Redis stream, `audit:chain:{<tenant>}`, each
entry carrying the hash of the one before it, so a change to any recorded event, or a removed one,
shows when the chain is verified.

    hash = HMAC-SHA256(CORDUM_AUDIT_HMAC_KEY, prev + "\\n" + seq + "\\n" + event)   (SHA-256 without a key)

`event` is the event's canonical JSON (sorted keys, no spaces). Appending is a compare-and-set on
the stream's last entry: a writer reads the head, computes the hashes of its batch, and one script
appends them only if the head is still the one it read and none of their ids is in the chain's id
set (`audit:chain:ids:{<tenant>}`): a repeated append (a redelivered export, a batch retried after
its reply was lost) is a no-op. Both keys carry the tenant as their hash tag, so the script runs
unchanged on Redis Cluster. The stream keeps about MAX_ENTRIES per tenant; verification starts from
the oldest entry kept. Events come from the services (the API, and the bus for exports): whoever
can publish on `sys.audit.export` can add to a chain, which is why NATS must be reachable by
Cordum's services only (README, Security).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import trio

from cordum.infra.redis import Redis

MAX_ENTRIES = 100_000
MAX_CAS_TRIES = 20

_APPEND = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local head = ''
if #last > 0 then
  local fields = last[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'hash' then head = fields[i + 1] end
  end
end
if head ~= ARGV[1] then return 0 end
for i = 3, #ARGV, 6 do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then return 0 end
end
for i = 3, #ARGV, 6 do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'id', ARGV[i], 'seq', ARGV[i + 1], 'ts', ARGV[i + 2],
             'event', ARGV[i + 3], 'prev', ARGV[i + 4], 'hash', ARGV[i + 5])
  redis.call('ZADD', KEYS[2], ARGV[i + 1], ARGV[i])
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[2]) - 1)
return 1
"""


def chain_key(tenant: str) -> str:
    return f"audit:chain:{{{tenant}}}"


def ids_key(tenant: str) -> str:
    """The ids of the events in the chain (score: their sequence number): an event recorded twice
    (a redelivered export, a batch retried after its reply was lost) is appended once."""
    return f"audit:chain:ids:{{{tenant}}}"


def canonical(event: Mapping[str, Any]) -> str:
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def link_hash(key: bytes, prev: str, seq: int, event_json: str) -> str:
    data = f"{prev}\n{seq}\n{event_json}".encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Entry:
    stream_id: str
    id: str
    seq: int
    ts: float
    event: dict[str, Any]
    event_json: str
    prev: str
    hash: str

    def view(self) -> dict[str, Any]:
        return {"seq": self.seq, "id": self.id, "ts": self.ts, "prev_hash": self.prev, "hash": self.hash, **self.event}


def _entry(stream_id: str, fields: Mapping[str, str]) -> Entry:
    event_json = fields.get("event", "{}")
    try:
        event = json.loads(event_json)
    except ValueError:
        event = {"unreadable": event_json}
    return Entry(stream_id, fields.get("id", ""), int(fields.get("seq", 0) or 0), float(fields.get("ts", 0) or 0),
                 event if isinstance(event, dict) else {"value": event}, event_json, fields.get("prev", ""),
                 fields.get("hash", ""))


class ChainConflict(Exception):
    """The chain kept moving under this writer for MAX_CAS_TRIES attempts."""


@dataclass(frozen=True)
class Verification:
    valid: bool
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str = ""


class AuditChain:
    def __init__(self, redis: Redis, *, hmac_key: bytes = b"", max_entries: int = MAX_ENTRIES) -> None:
        self._redis = redis
        self._append = redis.script(_APPEND)
        self.hmac_key = hmac_key
        self.max_entries = max_entries

    async def append(self, tenant: str, events: Sequence[tuple[str, float, Mapping[str, Any]]]) -> int:
        """Append (id, ts, event) in order, skipping ids the chain has already; how many were new."""
        key, ids = chain_key(tenant), ids_key(tenant)
        texts = [canonical(event) for _, _, event in events]  # what a lost race leaves to redo: the links
        for attempt in range(MAX_CAS_TRIES):
            if attempt:  # lost the race for the head: step aside a random moment, or two writers
                await trio.sleep(random.uniform(0, 0.002 * attempt))  # in lock-step starve one of them
            last, known = await self._redis.pipeline([  # one node: both keys carry the tenant's hash tag
                ("XREVRANGE", key, "+", "-", "COUNT", 1), ("ZMSCORE", ids, *[event_id for event_id, _, _ in events])])
            if isinstance(last, Exception):
                raise last
            if isinstance(known, Exception):
                raise known
            newest = [_entry(sid, dict(fields)) for sid, fields in last or []]
            head_hash = newest[0].hash if newest else ""
            head_seq = newest[0].seq if newest else 0
            seen = {event_id for (event_id, _, _), score in zip(events, known) if score is not None}
            args: list[Any] = [head_hash, self.max_entries]
            prev, seq, added = head_hash, head_seq, 0
            for (event_id, ts, _), text in zip(events, texts):
                if event_id in seen:
                    continue
                seen.add(event_id)
                seq += 1
                digest = link_hash(self.hmac_key, prev, seq, text)
                args += [event_id, seq, repr(ts), text, prev, digest]
                prev, added = digest, added + 1
            if not added:
                return 0
            if int(await self._append([key, ids], args)) == 1:
                return added
        raise ChainConflict(f"the audit chain of tenant {tenant} kept moving")

    async def page(self, tenant: str, *, limit: int = 100, before: str | None = None) -> tuple[list[Entry], str | None]:
        """Newest first; `before` is a stream id (exclusive) to go on from."""
        high = f"({before}" if before else "+"
        raw = await self._redis.execute("XREVRANGE", chain_key(tenant), high, "-", "COUNT", limit) or []
        entries = [_entry(sid, dict(fields)) for sid, fields in raw]
        return entries, (entries[-1].stream_id if len(entries) == limit else None)

    async def verify(self, tenant: str, *, page_size: int = 1000, max_entries: int | None = None) -> Verification:
        """Recompute every kept link, oldest first: the first entry whose hash does not follow from
        its predecessor and its own event (or whose sequence skips) is named."""
        key, low = chain_key(tenant), "-"
        prev_hash, prev_seq, checked = None, None, 0
        while True:
            raw = await self._redis.execute("XRANGE", key, low, "+", "COUNT", page_size) or []
            for sid, fields in raw:
                entry = _entry(sid, dict(fields))
                problem = _link_problem(self.hmac_key, entry, prev_hash, prev_seq)
                if problem:
                    return Verification(False, checked, prev_seq or 0, prev_hash or "", entry.seq, problem)
                prev_hash, prev_seq, checked = entry.hash, entry.seq, checked + 1
                if max_entries is not None and checked >= max_entries:
                    return Verification(True, checked, entry.seq, entry.hash)
            if len(raw) < page_size:
                return Verification(True, checked, prev_seq or 0, prev_hash or "")
            low = f"({raw[-1][0]}"


def _link_problem(key: bytes, entry: Entry, prev_hash: str | None, prev_seq: int | None) -> str:
    if prev_hash is not None and entry.prev != prev_hash:
        return f"entry {entry.seq} does not follow entry {prev_seq} (an entry was removed or changed)"
    if prev_seq is not None and entry.seq != prev_seq + 1:
        return f"entry {entry.seq} follows entry {prev_seq} (a sequence gap)"
    if link_hash(key, entry.prev, entry.seq, entry.event_json) != entry.hash:
        return f"entry {entry.seq} was changed after it was recorded (its hash does not match)"
    return ""
