"""Per-replica decision cache (spec §4.6) — pure: the clock is a parameter.

Entries are keyed by ``(policy snapshot, request key)`` and remember the snapshot they were
computed under, so a decision from another policy version is never returned; ``on_policy_swap``
also drops every entry of other versions at once.  ``ttl_seconds <= 0`` disables the cache.
At capacity, expired entries are dropped first, then the least recently used one.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

from cordum.agent.v1 import safety_pb2

__all__ = ["DEFAULT_MAX_SIZE", "DecisionCache", "proto_request_key"]

DEFAULT_MAX_SIZE = 10_000
V = TypeVar("V")


def proto_request_key(req: safety_pb2.PolicyCheckRequest) -> str:
    """sha256 hex of the deterministic protobuf encoding with ``job_id`` cleared (§4.6)."""
    clone = safety_pb2.PolicyCheckRequest()
    clone.CopyFrom(req)
    clone.job_id = ""
    return hashlib.sha256(clone.SerializeToString(deterministic=True)).hexdigest()


@dataclass
class _Entry(Generic[V]):
    value: V
    expires: float
    snapshot: str


class DecisionCache(Generic[V]):
    """TTL + LRU map from ``(snapshot, request_key)`` to a decision."""

    def __init__(
        self,
        ttl_seconds: float,
        max_size: int = DEFAULT_MAX_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = float(ttl_seconds)
        self.max_size = max_size if max_size > 0 else DEFAULT_MAX_SIZE  # non-positive ignored
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], _Entry[V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, snapshot: str, request_key: str) -> V | None:
        if not self.enabled:
            return None
        key = (snapshot, request_key)
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        if entry.snapshot != snapshot or entry.expires <= self._clock():
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def put(self, snapshot: str, request_key: str, value: V) -> None:
        if not self.enabled:
            return
        now = self._clock()
        key = (snapshot, request_key)
        if key in self._entries:
            del self._entries[key]
        elif len(self._entries) >= self.max_size:
            self._evict(now)
        self._entries[key] = _Entry(value, now + self.ttl, snapshot)

    def _evict(self, now: float) -> None:
        for k in [k for k, e in self._entries.items() if e.expires <= now]:
            del self._entries[k]
        while len(self._entries) >= self.max_size:
            self._entries.popitem(last=False)  # least recently used

    def on_policy_swap(self, snapshot: str) -> None:
        """A new policy is live: drop every entry computed under another snapshot."""
        for k in [k for k, e in self._entries.items() if e.snapshot != snapshot]:
            del self._entries[k]

    def clear(self) -> None:
        self._entries.clear()
