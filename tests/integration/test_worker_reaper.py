"""How the worker reaper tells a departed worker from a live one, against a real Redis: our workers
by their presence key, workers on the public CAP SDK by their heartbeats, and never from a replica
that hears nobody."""

from __future__ import annotations

from types import SimpleNamespace

from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.scheduler.loops import WorkerReaper
from cordum.scheduler.registry import WorkerRegistry, WorkerStatus
from cordum.store import keys
from cordum.store.jobs import JobStore

TTL = 30.0


def beat(worker_id: str, *, ours: bool = True, state: str = "") -> Heartbeat:
    labels = {"cordum.worker.presence": "redis"} if ours else {}
    if state:
        labels["cordum.worker.state"] = state
    return Heartbeat(worker_id=worker_id, pool="default", max_parallel_jobs=4, labels=labels)


def reaper_with(redis, registry: WorkerRegistry) -> WorkerReaper:
    return WorkerReaper(SimpleNamespace(registry=registry, store=JobStore(redis)))  # type: ignore[arg-type]


async def test_our_worker_is_judged_by_its_presence_key_not_its_heartbeats(redis):
    registry = WorkerRegistry(TTL, started=0)
    reaper = reaper_with(redis, registry)
    registry.observe(beat("ours"), now=0)
    await redis.execute("SET", keys.worker_alive("ours"), "ours", "PX", 60_000)
    # Its heartbeats stopped reaching this replica (NATS trouble), but its key lives: it runs.
    registry.observe(beat("other"), now=100)
    assert await reaper.status("ours", 100) is WorkerStatus.ALIVE
    await redis.execute("DEL", keys.worker_alive("ours"))
    assert await reaper.status("ours", 101) is WorkerStatus.UNKNOWN  # a key lost in a Redis restart comes back
    assert await reaper.status("ours", 101 + TTL / 3) is WorkerStatus.GONE
    await redis.execute("SET", keys.worker_alive("ours"), "ours", "PX", 60_000)
    assert await reaper.status("ours", 200) is WorkerStatus.ALIVE


async def test_a_worker_on_the_cap_sdk_is_gone_after_a_ttl_of_silence_if_others_are_heard(redis):
    registry = WorkerRegistry(TTL, started=0)
    reaper = reaper_with(redis, registry)
    registry.observe(beat("cap", ours=False), now=0)
    assert await reaper.status("cap", 10) is WorkerStatus.ALIVE
    assert await reaper.status("cap", 40) is WorkerStatus.UNKNOWN  # this replica hears nobody at all
    registry.observe(beat("other", ours=False), now=39)
    assert await reaper.status("cap", 40) is WorkerStatus.GONE


async def test_what_a_worker_says_wins_and_a_cold_replica_judges_no_stranger(redis):
    registry = WorkerRegistry(TTL, started=0)
    reaper = reaper_with(redis, registry)
    registry.observe(beat("leaving", state="draining"), now=0)
    await redis.execute("SET", keys.worker_alive("leaving"), "x", "PX", 60_000)
    assert await reaper.status("leaving", 1) is WorkerStatus.DRAINING
    registry.observe(beat("leaving", state="stopped"), now=2)
    assert await reaper.status("leaving", 2) is WorkerStatus.GONE
    cold = WorkerRegistry(TTL, started=100)
    cold_reaper = reaper_with(redis, cold)
    cold.observe(beat("other"), now=100)
    assert await cold_reaper.status("stranger", 100) is WorkerStatus.UNKNOWN
    assert await cold_reaper.status("stranger", 120) is WorkerStatus.UNKNOWN  # listened only 20 s
    cold.observe(beat("other"), now=130)
    assert await cold_reaper.status("stranger", 131) is WorkerStatus.GONE
