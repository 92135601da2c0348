"""Leases against a real redis-server: acquire, renew, expiry, takeover, fencing."""

from __future__ import annotations

import pytest
import trio

from cordum.runtime.lease import LeaseLost, Leases, LeaseUnavailable
from cordum.store import keys
from cordum.agent.v1.job_pb2 import JobRequest
from cordum.store.jobs import JobStore, StaleFence
from cordum.store.jobstate import JobState
from tests.conftest import unique


@pytest.fixture
async def redis(store_redis):
    """Every test here runs twice: on one redis-server and on a Redis Cluster (3+3), where it must
    not cause a single CROSSSLOT error."""
    yield store_redis


async def test_acquire_is_exclusive_and_fences_increase(redis):
    a, b = Leases(redis, "replica-a"), Leases(redis, "replica-b")
    key = unique("cordum:test:lock")
    first = await a.try_acquire(key, 5)
    assert first is not None and first.fence == 1
    assert await b.try_acquire(key, 5) is None
    stored = await redis.get(key)
    assert stored == first.value and stored.startswith("replica-a/") and stored.endswith("#1")
    assert await a.release(first)
    second = await b.try_acquire(key, 5)
    assert second is not None and second.fence == 2
    # The fence counter shares the lock's slot and outlives the lock.
    assert await redis.get(keys.fence_counter(key)) == "2"
    assert 0 < await redis.pttl(keys.fence_counter(key))


async def test_release_and_renew_are_compare_and_set(redis):
    a, b = Leases(redis, "replica-a"), Leases(redis, "replica-b")
    key = unique("cordum:test:lock")
    lease = await a.try_acquire(key, 0.2)
    await trio.sleep(0.3)  # expires on the server
    taken = await b.try_acquire(key, 5)
    assert taken is not None and taken.fence > lease.fence
    # The old holder can neither renew nor delete its successor's lease.
    assert not await a.renew(lease)
    assert not await a.release(lease)
    assert await redis.get(key) == taken.value


async def test_renewal_keeps_the_lease_past_its_ttl(redis):
    leases, rival = Leases(redis, "holder"), Leases(redis, "rival")
    key = unique("cordum:test:lock")
    async with leases.hold(key, 0.6) as lease:
        await trio.sleep(1.5)  # 2.5 TTLs: only renewal keeps it
        assert await redis.get(key) == lease.value
        assert await rival.try_acquire(key, 1) is None
    assert await redis.get(key) is None  # released on exit
    assert await rival.try_acquire(key, 1) is not None


async def test_hold_raises_when_taken(redis):
    leases = Leases(redis, "holder")
    key = unique("cordum:test:lock")
    async with leases.hold(key, 5):
        with pytest.raises(LeaseUnavailable):
            async with leases.hold(key, 5):
                pass


async def test_losing_the_lease_cancels_the_protected_work(redis):
    leases = Leases(redis, "holder")
    key = unique("cordum:test:lock")
    reached_end = False
    with pytest.raises(LeaseLost):
        async with leases.hold(key, 0.6):
            # An operator deletes the lock (or it expired and went elsewhere): the next
            # renewal finds it gone and the body must be cancelled.
            await redis.delete(key)
            await trio.sleep(5)
            reached_end = True
    assert not reached_end


async def test_the_shared_keeper_renews_and_steps_down_like_a_lease_s_own(redis):
    leases, rival = Leases(redis, "holder"), Leases(redis, "rival")
    kept, lost = unique("cordum:test:lock"), unique("cordum:test:lock")
    reached_end = False
    async with trio.open_nursery() as nursery:
        await nursery.start(leases.keep_all)
        async with leases.hold(kept, 0.6) as lease:
            await trio.sleep(1.5)  # 2.5 TTLs: only renewal keeps it
            assert await redis.get(kept) == lease.value
            assert await rival.try_acquire(kept, 1) is None
            with pytest.raises(LeaseLost):
                async with leases.hold(lost, 0.6):
                    await redis.delete(lost)  # gone: the next renewal finds out, the body stops
                    await trio.sleep(5)
                    reached_end = True
        assert await redis.get(kept) is None  # released on exit
        assert not reached_end and leases._kept == {}
        nursery.cancel_scope.cancel()


async def test_stale_holder_fenced_write_is_rejected(redis):
    # The job's own lock, as the scheduler takes it; the job store checks the fence on every write.
    a, b = Leases(redis, "paused"), Leases(redis, "successor")
    store = JobStore(redis)
    job_id = unique("job")
    await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id), fields={"tenant": "t"})
    stale = await a.try_acquire(keys.job_lock(job_id), 0.2)
    await store.transition(job_id, JobState.DISPATCHED, fence=stale.fence, fields={"worker_id": "paused"})
    await trio.sleep(0.3)  # the holder "pauses" past its TTL
    fresh = await b.try_acquire(keys.job_lock(job_id), 5)
    await store.transition(job_id, JobState.RUNNING, fence=fresh.fence, fields={"worker_id": "successor"})
    with pytest.raises(StaleFence) as rejected:
        await store.transition(job_id, JobState.FAILED, fence=stale.fence, fields={"worker_id": "paused"})
    assert rejected.value.held == fresh.fence
    meta = await store.get(job_id)
    assert (meta["state"], meta["worker_id"], meta["_fence"]) == ("RUNNING", "successor", fresh.fence)


async def test_errors_from_the_body_come_out_unwrapped_and_release_the_lease(redis):
    leases = Leases(redis, "holder")
    key = unique("cordum:test:lock")
    with pytest.raises(KeyError):
        async with leases.hold(key, 5):
            raise KeyError("boom")
    assert await redis.get(key) is None


async def test_leader_election_runs_one_loop_and_hands_over_on_release(redis):
    from cordum.runtime.leader import LeaderElection, every

    key = unique("cordum:test:leader")
    ticks: list[tuple[str, float]] = []

    def step(name: str):
        async def tick(lease) -> None:
            ticks.append((name, trio.current_time()))
        return every(0.05, tick)

    elections = {name: LeaderElection(Leases(redis, name), key, ttl=1.2) for name in ("a", "b")}
    async with trio.open_nursery() as nursery:
        scopes = {}
        for name, election in elections.items():
            scopes[name] = trio.CancelScope()

            async def campaign(name=name, election=election) -> None:
                with scopes[name]:
                    await election.run(step(name))

            nursery.start_soon(campaign)
        await trio.sleep(1.5)
        first = ticks[0][0]
        assert {name for name, _ in ticks} == {first}  # only the leader's loop ran
        stopped_at = trio.current_time()
        scopes[first].cancel()  # graceful stop: the lease is released on the way out
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    other = "b" if first == "a" else "a"
    taken_over = [t for name, t in ticks if name == other]
    assert taken_over, "the other replica never took over"
    assert taken_over[0] - stopped_at < 0.5  # at its next poll, not after a TTL
    assert all(t < stopped_at + 0.01 for name, t in ticks if name == first)
    assert elections[other].terms == 1


async def test_a_lease_released_early_is_no_longer_kept_and_its_body_goes_on(redis):
    """`release_later`: the release goes with the next batch (behind a last write); the keeper
    stops renewing it (a renewal would find it gone and cancel the body), and the body's exit
    releases nothing more (a rival's lease taken meanwhile stays)."""
    leases, rival = Leases(redis, "holder"), Leases(redis, "rival")
    key = unique("cordum:test:lock")
    async with leases.hold(key, 0.6) as lease:
        assert await leases.release_later(lease)()
        taken = await rival.try_acquire(key, 5)
        assert taken is not None and taken.fence > lease.fence
        await trio.sleep(0.5)  # past the keeper's renewal time (TTL/3): no LeaseLost
        assert not lease.lost
    assert await redis.get(key) == taken.value
    assert await leases.release(lease)  # releasing again is a no-op
    assert await redis.get(key) == taken.value


async def test_a_transition_carries_the_lock_release_in_its_round_trip(redis):
    """`JobStore.transition(along=...)`: the release is queued right behind the write, so both go
    in one round trip (per node: on a cluster the lock and the job live apart); the release
    happens whatever the transition's outcome."""
    store, leases = JobStore(redis), Leases(redis, "holder")
    job_id = unique("job")
    tenant = None if redis.cluster else "t"  # the one-script path is for one server
    await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id), fields={"tenant": "t"})
    lease = await leases.try_acquire(keys.job_lock(job_id), 5)
    trips = redis.round_trips
    await store.transition(job_id, JobState.DISPATCHED, fence=lease.fence, tenant=tenant,
                           along=lambda: leases.release_later(lease))
    if not redis.cluster:
        assert redis.round_trips - trips == 1
    assert await redis.get(keys.job_lock(job_id)) is None
    assert (await store.get(job_id))["state"] == "DISPATCHED"
    again = await leases.try_acquire(keys.job_lock(job_id), 5)
    await store.transition(job_id, JobState.RUNNING, fence=again.fence, tenant=tenant,
                           along=lambda: leases.release_later(again))
    third = await leases.try_acquire(keys.job_lock(job_id), 5)
    with pytest.raises(StaleFence):  # refused: the lock is released all the same
        await store.transition(job_id, JobState.SUCCEEDED, fence=lease.fence, tenant=tenant,
                               along=lambda: leases.release_later(third))
    assert await redis.get(keys.job_lock(job_id)) is None
    assert (await store.get(job_id))["state"] == "RUNNING"
