"""A worker's claim on a dispatched attempt, against a real Redis (cordum/worker/claims.py)."""

from __future__ import annotations

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.job_pb2 import JobRequest, JobResult
from cordum.store.jobs import JobStore
from cordum.store.jobstate import JobState
from cordum.worker.claims import Claim, RunClaims
from tests.conftest import unique

S = JobState


async def _dispatched(store: JobStore, attempts: int = 1) -> str:
    job_id = unique("job")
    await store.create(job_id, S.PENDING, request=JobRequest(job_id=job_id), fields={"tenant": "t"})
    for n in range(attempts):
        if n:
            await store.transition(job_id, S.RETRYING)
        await store.transition(job_id, S.DISPATCHED, fields={"worker_id": "w"})
    return job_id


async def test_one_worker_claims_an_attempt_and_commits_its_result_once(redis):
    store, claims = JobStore(redis), RunClaims(redis)
    job_id = await _dispatched(store)
    mine = await claims.claim(job_id, 1, "w-a")
    assert mine.claim is Claim.CLAIMED and mine.token == "w-a:1"
    assert (await claims.claim(job_id, 1, "w-b")).claim is Claim.TAKEN
    assert (await claims.claim(job_id, 1, "w-a")).claim is Claim.CLAIMED  # its own redelivery
    result = JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_SUCCEEDED, worker_id="w-a")
    assert await claims.commit(job_id, mine, result)
    again = await claims.claim(job_id, 1, "w-a")  # after a crash: answer with the stored result
    assert again.claim is Claim.FINISHED and again.stored == result and again.attempt == 1


async def test_messages_for_other_attempts_or_ended_jobs_do_not_run(redis):
    store, claims = JobStore(redis), RunClaims(redis)
    job_id = await _dispatched(store, attempts=2)
    assert (await claims.claim(job_id, 1, "w")).claim is Claim.SUPERSEDED
    assert (await claims.claim(job_id, 3, "w")).claim is Claim.AHEAD  # the record lost a write: wait
    assert (await claims.claim(job_id, None, "w")).claim is Claim.CLAIMED  # no header: the current one
    await store.cancel(job_id, "user asked")
    assert (await claims.claim(job_id, 2, "w")).claim is Claim.NOT_RUNNABLE
    assert (await claims.claim(unique("nobody"), 1, "w")).claim is Claim.MISSING


async def test_a_commit_holds_after_the_claim_was_lost_but_not_after_the_job_moved_on(redis):
    store, claims = JobStore(redis), RunClaims(redis)
    job_id = await _dispatched(store)
    mine = await claims.claim(job_id, 1, "w-a")
    result = JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_FAILED, worker_id="w-a")
    await redis.execute("HDEL", f"job:meta:{job_id}", "run_claim")  # a failover lost the claim
    assert await claims.commit(job_id, mine, result)
    moved = await _dispatched(store)
    claim = await claims.claim(moved, 1, "w-a")
    await store.transition(moved, S.RETRYING)
    await store.transition(moved, S.DISPATCHED, fields={"worker_id": "w-b"})  # re-routed: attempt 2
    assert (await claims.claim(moved, 2, "w-b")).claim is Claim.CLAIMED
    assert not await claims.commit(moved, claim, result)


async def test_the_output_is_written_with_the_commit_and_only_while_the_claim_stands(redis):
    store, claims = JobStore(redis), RunClaims(redis)
    job_id = await _dispatched(store)
    mine = await claims.claim(job_id, 1, "w-a")
    result = JobResult(job_id=job_id, status=job_pb2.JOB_STATUS_SUCCEEDED, worker_id="w-a",
                       result_ptr=f"redis://res:{job_id}")
    assert await claims.commit_with_output(job_id, mine, result, '{"answer": 42}', 60)
    assert await redis.execute("GET", f"res:{job_id}") == '{"answer": 42}'
    assert 0 < await redis.execute("TTL", f"res:{job_id}") <= 60
    assert (await claims.claim(job_id, 1, "w-a")).stored == result
    # A worker whose attempt was superseded neither commits nor touches the new attempt's output.
    stale = await claims.claim(moved := await _dispatched(store), 1, "w-a")
    await store.transition(moved, S.RETRYING)
    await store.transition(moved, S.DISPATCHED, fields={"worker_id": "w-b"})
    current = await claims.claim(moved, 2, "w-b")
    assert await claims.commit_with_output(moved, current, result, "new", 60)
    assert not await claims.commit_with_output(moved, stale, result, "old", 60)
    assert await redis.execute("GET", f"res:{moved}") == "new"
