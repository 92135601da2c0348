"""A job lock given back in its last write's round trip (`JobStore.transition(along=...)`,
`Leases.release_later`), against one real redis-server, on the paths where it can go wrong."""

from __future__ import annotations

import pytest
import trio

from cordum.agent.v1.job_pb2 import JobRequest
from cordum.infra.redis import NoScriptError
from cordum.runtime import lease as lease_module
from cordum.runtime.lease import Leases
from cordum.store import keys
from cordum.store.jobs import JobStore
from cordum.store.jobstate import JobState
from tests.conftest import unique


async def _job(store: JobStore) -> str:
    job_id = unique("job")
    await store.create(job_id, JobState.PENDING, request=JobRequest(job_id=job_id), fields={"tenant": "t"})
    return job_id


async def test_a_server_without_the_update_script_gets_no_write_after_the_release(redis):
    """After a restart scripts come back one by one: if the release's is there and the update's
    is not, the release runs in the round trip and the update does not. The write must then not
    be made (the lock is gone; a rival may hold it): NoScriptError goes up for the message to be
    tried again, and the script is loaded for that next try."""
    store, leases, rival = JobStore(redis), Leases(redis, "holder"), Leases(redis, "rival")
    job_id = await _job(store)
    lease = await leases.try_acquire(keys.job_lock(job_id), 5)
    await redis.execute("SCRIPT", "FLUSH")
    await redis.script_load(lease_module._RELEASE)
    with pytest.raises(NoScriptError):
        await store.transition(job_id, JobState.DISPATCHED, fence=lease.fence, tenant="t",
                               along=lambda: leases.release_later(lease))
    assert await redis.get(keys.job_lock(job_id)) is None
    assert (await store.get(job_id))["state"] == "PENDING"
    again = await rival.try_acquire(keys.job_lock(job_id), 5)
    await store.transition(job_id, JobState.DISPATCHED, fence=again.fence, tenant="t",
                           along=lambda: rival.release_later(again))  # loaded: one round trip again
    assert (await store.get(job_id))["state"] == "DISPATCHED"
    assert await redis.get(keys.job_lock(job_id)) is None


async def test_a_release_that_never_came_back_is_made_again_on_the_way_out(redis):
    """The early release is queued but never sent (its caller cancelled as the Redis flusher
    stopped, say): the lease's body ends and `holding` releases it itself, instead of leaving the
    job locked for its TTL."""
    leases = Leases(redis, "holder")
    key = unique("cordum:test:lock")

    class Unsent:  # the release script, as a flusher that is gone would leave it
        def __init__(self, script) -> None:
            self.script = script

        def call_later(self, keys_, args):
            async def unanswered() -> int:
                await trio.sleep_forever()
            return unanswered

        async def __call__(self, keys_, args):
            return await self.script(keys_, args)

    leases._release = Unsent(leases._release)
    async with leases.hold(key, 5) as lease:
        leases.release_later(lease)
        assert lease.giving_back and not lease.released
    assert lease.released
    assert await redis.get(key) is None
