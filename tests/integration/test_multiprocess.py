"""Several real processes coordinating through the real Redis and NATS servers."""

from __future__ import annotations

import json
import signal
import time

import trio

from cordum.infra.bus import Outgoing
from tests.conftest import unique


async def _wait_for(predicate, timeout: float, what: str, step: float = 0.05):
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if value:
                return value
            await trio.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _elections(proc) -> list[dict]:
    return [json.loads(line) for line in proc.lines() if '"elected"' in line]


async def test_leader_failover_after_sigkill(spawn, redis):
    key, ttl = unique("cordum:test:leader"), 2.0
    procs = [spawn(f"leader-{i}", ["-m", "tests.procs.leader", key, str(ttl)]) for i in (1, 2)]
    leader = await _wait_for(lambda: next((p for p in procs if _elections(p)), None), 15, "a leader")
    await trio.sleep(1.0)  # both campaign for a while: still exactly one leader
    follower = next(p for p in procs if p is not leader)
    assert _elections(follower) == []

    leader.signal(signal.SIGKILL)
    killed_at = time.time()
    elected = await _wait_for(lambda: _elections(follower), ttl + 3, "the follower to take over")
    failover = elected[0]["t"] - killed_at
    # A crashed leader is replaced within about one TTL (plus the candidates' poll period).
    assert failover <= ttl + ttl / 6 + 0.5, failover
    assert elected[0]["fence"] > _elections(leader)[0]["fence"]

    await trio.sleep(0.3)
    entries = await redis.lrange(f"{key}:log", 0, -1)
    holders = [entry.split(":")[0] for entry in entries]
    switch = holders.index(follower.name)
    # One leader at a time: the log is one run of the first leader, then only the follower.
    assert set(holders[:switch]) == {leader.name}
    assert set(holders[switch:]) == {follower.name}


async def test_queue_group_delivers_each_message_to_exactly_one_process(spawn, bus):
    queue, subject, count = unique("q"), "sys.job.submit", 500
    procs = [spawn(f"consumer-{i}", ["-m", "tests.procs.consumer", subject, queue]) for i in (1, 2)]
    await _wait_for(lambda: all("ready" in p.lines() for p in procs), 15, "consumers ready")
    payloads = [f"{queue}-{n}" for n in range(count)]
    errors = await bus.publish_many([Outgoing(subject, p.encode(), msg_id=p) for p in payloads])
    assert errors == [None] * count

    def received() -> list[list[str]]:
        return [[line for line in p.lines() if line != "ready"] for p in procs]

    await _wait_for(lambda: sum(map(len, received())) >= count, 20, f"{count} deliveries")
    await trio.sleep(0.5)  # anything redelivered or duplicated would show up now
    first, second = received()
    assert len(first) + len(second) == count
    assert set(first).isdisjoint(second)
    assert set(first) | set(second) == set(payloads)
    assert first and second  # the work was shared


async def test_broadcast_reaches_every_process(spawn, bus):
    subject = f"sys.alert.{unique('b')}"
    procs = [spawn(f"listener-{i}", ["-m", "tests.procs.consumer", subject, "-"]) for i in (1, 2)]
    await _wait_for(lambda: all("ready" in p.lines() for p in procs), 15, "listeners ready")
    payloads = [f"alert-{n}" for n in range(20)]
    for payload in payloads:
        await bus.publish(subject, payload.encode())
    await _wait_for(lambda: all(len(p.lines()) > len(payloads) for p in procs), 10, "both to get all")
    for proc in procs:
        assert proc.lines()[1:] == payloads
