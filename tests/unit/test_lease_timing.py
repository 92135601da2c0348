"""The lease keeper's timing, on a MockClock: renewal cadence and stepping down before expiry.

The Redis side of leases is tested against a real server (tests/integration/test_leases.py);
here only the clock matters, so the renew call is scripted.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cordum.runtime.lease import Lease, LeaseLost, Leases


class ScriptedLeases(Leases):
    def __init__(self, outcomes: list[object]) -> None:  # no Redis: renew (and release) scripted
        self.outcomes = outcomes
        self.renewals: list[float] = []
        self._init_keeper()

    async def renew(self, lease: Lease) -> bool:
        sent = trio.current_time()
        self.renewals.append(sent)
        outcome = self.outcomes.pop(0) if self.outcomes else True
        if isinstance(outcome, BaseException):
            raise outcome
        if outcome:
            lease.valid_until = sent + lease.ttl - lease.margin
        return bool(outcome)

    async def release(self, lease: Lease) -> bool:
        lease.released = True
        return True


def _lease(ttl: float) -> Lease:
    lease = Lease("k", "v#1", 1, ttl, 0.0)
    lease.valid_until = trio.current_time() + ttl - lease.margin
    return lease


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_renews_every_third_of_the_ttl(clock):
    leases = ScriptedLeases([])
    lease = _lease(30.0)
    with trio.move_on_after(100):
        await leases.keep(lease)
    assert not lease.lost
    gaps = [b - a for a, b in zip([0.0] + leases.renewals, leases.renewals)]
    assert gaps and all(gap == pytest.approx(10.0) for gap in gaps)


async def test_steps_down_before_expiry_when_redis_is_unreachable(clock):
    leases = ScriptedLeases([ConnectionError("redis down")] * 1000)
    lease = _lease(30.0)
    with trio.CancelScope() as body:
        lease._body = body
        await leases.keep(lease)
    assert lease.lost and body.cancel_called
    # Cancelled at the local validity deadline: strictly before the server could expire it.
    assert trio.current_time() == pytest.approx(30.0 - lease.margin)
    assert trio.current_time() < 30.0
    # It kept retrying quickly once renewal started failing.
    assert len(leases.renewals) > 5


async def test_steps_down_at_once_when_the_lease_is_gone(clock):
    leases = ScriptedLeases([True, False])
    lease = _lease(9.0)
    await leases.keep(lease)
    assert lease.lost
    assert leases.renewals == pytest.approx([3.0, 6.0])


async def test_one_failed_renewal_is_retried_without_losing_the_lease(clock):
    leases = ScriptedLeases([ConnectionError("blip"), True])
    lease = _lease(9.0)
    with trio.move_on_after(20):
        await leases.keep(lease)
    assert not lease.lost
    assert leases.renewals[0] == pytest.approx(3.0)
    assert leases.renewals[1] < 4.0  # retried quickly, not a whole interval later


# ---- the shared keeper (Leases.keep_all): the same timing, from one task ----------------------


async def _held_by_the_shared_keeper(leases: ScriptedLeases, lease: Lease, body_seconds: float) -> bool:
    """Hold `lease` under `keep_all` for `body_seconds`; whether the body ran to its end."""
    finished = False
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.keep_all)
        try:
            async with leases.holding(lease):
                await trio.sleep(body_seconds)
                finished = True
        except LeaseLost:
            pass
        nursery.cancel_scope.cancel()
    return finished


async def test_the_shared_keeper_renews_every_third_of_the_ttl(clock):
    leases = ScriptedLeases([])
    lease = _lease(30.0)
    assert await _held_by_the_shared_keeper(leases, lease, 95)
    assert not lease.lost
    gaps = [b - a for a, b in zip([0.0] + leases.renewals, leases.renewals)]
    assert len(gaps) == 9 and all(gap == pytest.approx(10.0) for gap in gaps)


async def test_the_shared_keeper_stops_the_body_before_expiry_when_redis_is_unreachable(clock):
    leases = ScriptedLeases([ConnectionError("redis down")] * 1000)
    lease = _lease(30.0)
    assert not await _held_by_the_shared_keeper(leases, lease, 100)
    assert lease.lost
    assert trio.current_time() == pytest.approx(30.0 - lease.margin)
    assert len(leases.renewals) > 5


async def test_the_shared_keeper_keeps_many_leases_each_on_its_own_time(clock):
    leases = ScriptedLeases([])
    long_ = _lease(30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.keep_all)

        async def hold(lease: Lease) -> None:
            async with leases.holding(lease):
                await trio.sleep(20)

        nursery.start_soon(hold, long_)
        await trio.sleep(5)  # the keeper sleeps until the long lease's first renewal (t=10)...
        short = _lease(3.0)
        nursery.start_soon(hold, short)  # ...and is woken for the short one's (t=6)
        await trio.sleep(30)
        nursery.cancel_scope.cancel()
    assert not short.lost and not long_.lost
    assert leases.renewals[:3] == pytest.approx([6.0, 7.0, 8.0])  # every second: a third of 3 s
    assert 10.0 in [pytest.approx(t) for t in leases.renewals] and leases._kept == {}


async def test_a_renewal_still_in_flight_when_the_body_ends_is_no_loss(clock):
    class SlowLeases(ScriptedLeases):
        async def renew(self, lease: Lease) -> bool:
            await trio.sleep(1.0)  # the body ends (and its lease is released) meanwhile
            self.renewals.append(trio.current_time())
            return False  # as Redis answers a renewal that comes after the release

    leases = SlowLeases([])
    lease = _lease(3.0)  # first renewal at t=1, its answer at t=2
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.keep_all)
        async with leases.holding(lease):  # raises LeaseLost if the late answer counted as a loss
            await trio.sleep(1.5)
        await trio.sleep(1.5)  # the keeper, still running, gets the renewal's answer
        nursery.cancel_scope.cancel()
    assert not lease.lost and lease.released and leases.renewals == pytest.approx([2.0])


async def test_when_the_shared_keeper_stops_the_bodies_stop_and_the_leases_are_released(clock):
    leases = ScriptedLeases([])
    lease = _lease(30.0)
    outcome: list[str] = []

    async def hold() -> None:
        try:
            async with leases.holding(lease):
                await trio.sleep(100)
                outcome.append("finished")
        except LeaseLost:
            outcome.append("lost")

    async with trio.open_nursery() as nursery:
        keeper = trio.CancelScope()

        async def keep(*, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with keeper:
                await leases.keep_all(task_status=task_status)

        await nursery.start(keep)
        nursery.start_soon(hold)
        await trio.sleep(5)
        keeper.cancel()  # the keeper alone stops (a crash of it, say)
    assert outcome == ["lost"] and lease.released and not lease.lost
    assert trio.current_time() == pytest.approx(5.0)
