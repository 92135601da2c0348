"""Routing, pure: which pool may run a topic, and which live worker of it gets the job.

Pools file (`pools.yaml`):

    topics:
      job.default: default            # a pool, or a list of pools
    pools:
      default:
        requires: []                  # capabilities this pool offers (a job's `requires` ⊆ these)
        status: active                # draining / inactive pools receive nothing

A worker is eligible when it is alive, in a candidate pool, matches every `placement.*`,
`constraint.*` and `node.*` label of the job, and is not overloaded (≥ 90 % of its slots, CPU or
GPU). The least loaded (active jobs + cpu/100 + gpu/100) wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import yaml

PLACEMENT_PREFIXES = ("placement.", "constraint.", "node.")
OVERLOAD = 0.9


class PoolsError(ValueError):
    """The pools file is unusable; the message says why."""


class NoRoute(Exception):
    """No worker can take the job now. `code` is the DLQ/retry reason code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Pool:
    name: str
    requires: frozenset[str] = frozenset()
    status: str = "active"


@dataclass(frozen=True)
class Pools:
    topics: Mapping[str, tuple[str, ...]]
    pools: Mapping[str, Pool]

    def pools_for(self, topic: str) -> tuple[str, ...]:
        return tuple(p for p in self.topics.get(topic, ()) if self.pools.get(p, Pool(p)).status == "active")


NO_POOLS = Pools(topics={}, pools={})
OTHER_TOPIC = "other"


def topic_label(pools: Pools, topic: str) -> str:
    """A topic as a metric label: itself if the pools file routes it, else `other` (bounded)."""
    return topic if topic in pools.topics else OTHER_TOPIC


@dataclass(frozen=True)
class WorkerInfo:
    """What routing needs to know about a worker (from its last heartbeat)."""

    worker_id: str
    pool: str
    active_jobs: int = 0
    max_parallel_jobs: int = 0
    cpu_load: float = 0.0
    gpu_utilization: float = 0.0
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def overloaded(self) -> bool:
        if self.max_parallel_jobs > 0 and self.active_jobs / self.max_parallel_jobs >= OVERLOAD:
            return True
        return self.cpu_load >= OVERLOAD * 100 or self.gpu_utilization >= OVERLOAD * 100

    @property
    def score(self) -> float:
        return self.active_jobs + self.cpu_load / 100 + self.gpu_utilization / 100


def parse_pools(data: Any, source: str = "pools") -> Pools:
    if not isinstance(data, Mapping):
        raise PoolsError(f"{source}: expected a mapping with 'topics' and 'pools'")
    unknown = set(data) - {"topics", "pools"}
    if unknown:
        raise PoolsError(f"{source}: unknown key(s) {', '.join(sorted(unknown))}; expected 'topics' and 'pools'")
    raw_topics = data.get("topics") or {}
    if not isinstance(raw_topics, Mapping) or not raw_topics:
        raise PoolsError(f"{source}: 'topics' must map at least one topic to a pool")
    topics: dict[str, tuple[str, ...]] = {}
    for topic, target in raw_topics.items():
        names = [target] if isinstance(target, str) else target
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
            raise PoolsError(f"{source}: topics.{topic} must be a pool name or a list of pool names")
        topics[str(topic)] = tuple(names)
    pools: dict[str, Pool] = {}
    for name, spec in (data.get("pools") or {}).items():
        spec = spec or {}
        if not isinstance(spec, Mapping):
            raise PoolsError(f"{source}: pools.{name} must be a mapping")
        extra = set(spec) - {"requires", "status", "description", "drain_started_at", "drain_timeout_seconds"}
        if extra:
            raise PoolsError(f"{source}: pools.{name}: unknown key(s) {', '.join(sorted(extra))}")
        requires = spec.get("requires") or []
        if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
            raise PoolsError(f"{source}: pools.{name}.requires must be a list of strings")
        status = spec.get("status", "active")
        if status not in ("active", "draining", "inactive"):
            raise PoolsError(f"{source}: pools.{name}.status must be active, draining or inactive")
        pools[str(name)] = Pool(str(name), frozenset(r.lower() for r in requires), status)
    for topic, names in topics.items():
        for pool in names:
            pools.setdefault(pool, Pool(pool))
    return Pools(topics, pools)


def load_pools_text(text: str, source: str) -> Pools:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PoolsError(f"{source}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_pools(data, source)


def candidate_pools(pools: Pools, topic: str, requires: Iterable[str], labels: Mapping[str, str]) -> tuple[str, ...]:
    names = pools.pools_for(topic)
    preferred = labels.get("preferred_pool")
    if preferred:
        if preferred not in names:
            raise NoRoute("no_pool_mapping", f"preferred pool {preferred!r} does not serve {topic}")
        names = (preferred,)
    if not names:
        raise NoRoute("no_pool_mapping", f"no pool serves topic {topic}")
    needed = {r.lower() for r in requires}
    fitting = tuple(n for n in names if needed <= pools.pools[n].requires)
    if not fitting:
        raise NoRoute("no_pool_mapping", f"no pool for {topic} offers {sorted(needed)}")
    return fitting


def pick_worker(
    pools: Pools, workers: Iterable[WorkerInfo], *, topic: str, requires: Iterable[str] = (),
    labels: Mapping[str, str] | None = None,
) -> WorkerInfo:
    """The least-loaded eligible worker, or NoRoute(no_pool_mapping | no_workers | pool_overloaded)."""
    labels = labels or {}
    allowed = set(candidate_pools(pools, topic, requires, labels))
    placement = {k: v for k, v in labels.items() if k.startswith(PLACEMENT_PREFIXES)}
    candidates = [
        w for w in workers
        if w.pool in allowed and all(w.labels.get(k) == v for k, v in placement.items())
    ]
    if not candidates:
        raise NoRoute("no_workers", f"no live worker in pool(s) {', '.join(sorted(allowed))} for {topic}")
    preferred = labels.get("preferred_worker_id")
    for worker in candidates:
        if worker.worker_id == preferred and not worker.overloaded:
            return worker
    available = [w for w in candidates if not w.overloaded]
    if not available:
        raise NoRoute("pool_overloaded", f"every worker for {topic} is overloaded")
    return min(available, key=lambda w: (w.score, w.worker_id))
