"""Prometheus metrics where every series carries `pod` = the instance id.

Code declares metrics as usual on `metrics.registry`; the `pod` label is added at exposition, to
every sample including the process and platform collectors, so no call site can forget it.
"""

from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from cordum.infra.aio import COUNTS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PodLabelled(Collector):
    def __init__(self, inner: CollectorRegistry, pod: str) -> None:
        self._inner = inner
        self._pod = pod

    def collect(self) -> Iterable[Metric]:
        for family in self._inner.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = dict(sample.labels)
                labels["pod"] = self._pod
                labelled.samples.append(sample._replace(labels=labels))
            yield labelled


class _CachedLabels:
    """`labels()` remembers its children: prometheus_client validates the values and takes a lock
    on every call, and the job path asks the same few children for each job (a tenth of a
    millisecond per job in the scheduler). A metric's children are never removed here."""

    _LIMIT = 10_000  # beyond this many distinct label sets, look them up the slow way

    def labels(self, *values: Any, **named: Any) -> Any:
        key = (values, tuple(named.items())) if named else values
        cache: dict[Any, Any] = self.__dict__.setdefault("_children", {})
        child = cache.get(key)
        if child is None:
            child = super().labels(*values, **named)  # type: ignore[misc]
            if len(cache) < self._LIMIT:
                cache[key] = child
        return child


class _Counter(_CachedLabels, Counter):
    pass


class _Gauge(_CachedLabels, Gauge):
    pass


class _Histogram(_CachedLabels, Histogram):
    pass


class Metrics:
    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.registry.register(_BridgeCollector())
        self._exposed = CollectorRegistry(auto_describe=False)
        self._exposed.register(_PodLabelled(self.registry, instance_id))

    def counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return _Counter(name, doc, list(labels), registry=self.registry)

    def gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return _Gauge(name, doc, list(labels), registry=self.registry)

    def histogram(self, name: str, doc: str, labels: Iterable[str] = (), buckets: Iterable[float] | None = None) -> Histogram:
        kwargs = {"buckets": list(buckets)} if buckets is not None else {}
        return _Histogram(name, doc, list(labels), registry=self.registry, **kwargs)

    def renamed_counter(self, name: str, old: str, doc: str, labels: Iterable[str] = ()) -> "Both":
        """A counter under Cordum's `name` that also counts under the `old` name it had here, so
        boards that scrape the old one keep working for a release (CHANGELOG says which)."""
        return Both(self.counter(name, doc, labels), self.counter(old, f"Deprecated: the same as {name}", labels))

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


class _BridgeCollector(Collector):
    """The Trio/asyncio bridge's counts (cordum.infra.aio.COUNTS), read at each scrape."""

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily("cordum_bridge_crossings", "Calls from Trio into asyncio (the Redis, NATS and "
                                  "gRPC clients run there)", value=COUNTS.crossings)
        yield CounterMetricFamily("cordum_bridge_wakeups", "Times the idle Trio run was woken by its host loop",
                                  value=COUNTS.wakeups)


class BoundedLabel:
    """Label values taken as they come up to `limit` distinct ones per process, then `other`:
    values anyone may choose (topics, workflow names) must not create series forever."""

    def __init__(self, limit: int = 200, other: str = "other") -> None:
        self.limit = limit
        self.other = other
        self._named: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._named or len(self._named) < self.limit:
            self._named.add(value)
            return value
        return self.other


class Both:
    """Several metrics (or labelled children) moved together: `labels`, `inc` and `observe` go to
    each. The renamed metrics count under both names through it."""

    __slots__ = ("_parts",)

    def __init__(self, *parts: object) -> None:
        self._parts = parts

    def labels(self, *values: str, **labels: str) -> "Both":
        return Both(*(part.labels(*values, **labels) for part in self._parts))  # type: ignore[attr-defined]

    def inc(self, amount: float = 1.0) -> None:
        for part in self._parts:
            part.inc(amount)  # type: ignore[attr-defined]

    def observe(self, value: float) -> None:
        for part in self._parts:
            part.observe(value)  # type: ignore[attr-defined]
