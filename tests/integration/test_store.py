"""The job, DLQ and config stores against a real redis-server."""

from __future__ import annotations

import json

import pytest
import trio

from cordum.agent.v1.job_pb2 import JobRequest
from cordum.store import keys
from cordum.store.config import ConfigStore, RevisionConflict
from cordum.store.dlq import DlqStore, dlq_entry
from cordum.store.jobs import RECENT_MAX, TENANT_RECENT_MAX, InvalidTransition, JobNotFound, JobStore, StaleFence
from cordum.store.jobstate import JobState as S
from tests.conftest import unique


@pytest.fixture
async def redis(store_redis):
    """Every test here runs twice: on one redis-server and on a Redis Cluster (3+3), where it must
    not cause a single CROSSSLOT error."""
    yield store_redis


async def _new_job(store: JobStore, tenant: str = "acme", **fields) -> str:
    job_id = unique("job")
    request = JobRequest(job_id=job_id, topic="job.default", tenant_id=tenant)
    await store.create(job_id, S.PENDING, request=request,
                       fields={"topic": "job.default", "tenant": tenant, "trace_id": "t-" + job_id, **fields},
                       context={"prompt": "hi"})
    return job_id


async def test_create_writes_meta_request_context_and_indexes(redis):
    store = JobStore(redis)
    job_id = await _new_job(store, labels={"env": "dev"})
    meta = await store.get(job_id)
    assert meta["state"] == "PENDING" and meta["tenant"] == "acme" and meta["labels"] == {"env": "dev"}
    assert (await store.get_request(job_id)).topic == "job.default"
    assert await store.get_context(job_id) == {"prompt": "hi"}
    assert await redis.zscore(keys.job_index("pending"), job_id) is not None
    assert await redis.sismember(keys.tenant_active("acme"), job_id)
    assert await redis.get(keys.job_state(job_id)) == "PENDING"
    assert job_id in await redis.smembers(keys.trace("t-" + job_id))
    with pytest.raises(InvalidTransition):  # creating twice is refused
        await _new_job_with_id(store, job_id)


async def _new_job_with_id(store: JobStore, job_id: str) -> None:
    await store.create(job_id, S.PENDING, request=JobRequest(job_id=job_id), fields={"tenant": "acme"})


@pytest.mark.parametrize("one_trip", [False, True], ids=["two-step", "one-trip"])
async def test_the_recent_lists_are_trimmed_when_a_job_is_created_not_when_it_moves(redis, one_trip):
    store = JobStore(redis)
    tenant = unique("trim")
    recent = keys.tenant_recent(tenant)
    await redis.zadd(recent, {f"old-{n}": n for n in range(TENANT_RECENT_MAX - 1)})
    first = await _new_job(store, tenant=tenant)
    assert await redis.zcard(recent) == TENANT_RECENT_MAX
    await redis.zadd(recent, {"older-1": -2, "older-2": -1})  # jobs trimmed out earlier, moved since
    await store.transition(first, S.SCHEDULED, **({"tenant": tenant} if one_trip else {}))
    assert await redis.zcard(recent) == TENANT_RECENT_MAX + 2  # a move adds no member: nothing trimmed
    second = await _new_job(store, tenant=tenant)
    assert await redis.zcard(recent) == TENANT_RECENT_MAX  # the oldest went
    assert await redis.zscore(recent, first) is not None and await redis.zscore(recent, second) is not None
    assert await redis.zscore(recent, "older-1") is None and await redis.zscore(recent, "old-0") is None
    assert await redis.zcard(keys.JOB_RECENT) <= RECENT_MAX


@pytest.mark.parametrize("one_trip", [False, True], ids=["two-step", "one-trip"])
async def test_transitions_follow_the_table_and_move_indexes(redis, one_trip):
    store = JobStore(redis)
    job_id = await _new_job(store)
    tenant = {"tenant": "acme"} if one_trip else {}  # a known tenant allows the one-round-trip form
    t = await store.transition(job_id, S.SCHEDULED, **tenant)
    assert (t.previous, t.state, t.attempts) == (S.PENDING, S.SCHEDULED, 1)
    await store.transition(job_id, S.DISPATCHED, **tenant)
    await store.transition(job_id, S.RUNNING, **tenant)
    assert await redis.zscore(keys.job_index("dispatched"), job_id) is None
    assert await redis.sismember(keys.tenant_active("acme"), job_id)
    await store.transition(job_id, S.SUCCEEDED, fields={"result_ptr": "redis://res:" + job_id},
                           after=[("ZADD", keys.worker_jobs("w-1"), 1, job_id)], **tenant)
    assert await redis.zscore(keys.worker_jobs("w-1"), job_id) == 1
    with pytest.raises(InvalidTransition) as invalid:
        await store.transition(job_id, S.FAILED)  # terminal: no regression
    assert invalid.value.current == S.SUCCEEDED
    assert await redis.zscore(keys.job_index("running"), job_id) is None
    assert await redis.zscore(keys.job_index("succeeded"), job_id) is not None
    assert not await redis.sismember(keys.tenant_active("acme"), job_id)
    assert [e["state"] for e in await store.events(job_id)] == ["PENDING", "SCHEDULED", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    assert (await store.get(job_id))["result_ptr"] == "redis://res:" + job_id


async def test_concurrent_duplicate_results_make_one_terminal_transition(redis):
    store = JobStore(redis)
    job_id = await _new_job(store)
    for state in (S.SCHEDULED, S.DISPATCHED, S.RUNNING):
        await store.transition(job_id, state)
    outcomes: list[str] = []

    async def complete() -> None:
        try:
            await store.transition(job_id, S.SUCCEEDED)
            outcomes.append("won")
        except InvalidTransition:
            outcomes.append("refused")

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(complete)
    assert sorted(outcomes) == ["refused"] * 9 + ["won"]


async def test_fenced_writes_reject_an_older_fence(redis):
    store = JobStore(redis)
    job_id = await _new_job(store)
    await store.transition(job_id, S.SCHEDULED, fence=7)
    with pytest.raises(StaleFence) as stale:
        await store.transition(job_id, S.DISPATCHED, fence=6)  # a paused former lock holder
    assert stale.value.held == 7
    assert await store.state(job_id) == S.SCHEDULED
    await store.transition(job_id, S.DISPATCHED, fence=8)
    with pytest.raises(StaleFence):
        await store.set_fields(job_id, {"worker_id": "late"}, fence=7)


async def test_cancel_is_idempotent_and_respects_terminal_states(redis):
    store = JobStore(redis)
    job_id = await _new_job(store)
    first = await store.cancel(job_id, "cancelled via api")
    assert (first.previous, first.state) == (S.PENDING, S.CANCELLED)
    again = await store.cancel(job_id, "again")
    assert again.state == S.CANCELLED and again.previous == S.CANCELLED
    with pytest.raises(JobNotFound):
        await store.cancel(unique("missing"), "x")


async def test_reads_are_scoped_to_the_tenant(redis):
    store = JobStore(redis)
    mine, theirs = await _new_job(store, "tenant-a"), await _new_job(store, "tenant-b")
    assert await store.get(mine, tenant="tenant-a") is not None
    assert await store.get(theirs, tenant="tenant-a") is None  # looks exactly like a missing job
    items, _ = await store.list("tenant-a", limit=50)
    assert mine in [i["id"] for i in items] and theirs not in [i["id"] for i in items]


async def test_listing_pages_newest_first(redis):
    store = JobStore(redis)
    tenant = unique("tenant")
    ids = [await _new_job(store, tenant) for _ in range(5)]
    page1, cursor = await store.list(tenant, limit=3)
    page2, end = await store.list(tenant, limit=3, cursor=cursor)
    assert [i["id"] for i in page1 + page2] == ids[::-1] and end is None
    running = ids[0]
    for state in (S.SCHEDULED, S.DISPATCHED, S.RUNNING):
        await store.transition(running, state)
    only, _ = await store.list(tenant, state="RUNNING")
    assert [i["id"] for i in only] == [running]


async def test_idempotency_key_is_claimed_once(redis):
    store = JobStore(redis)
    key = unique("idem")
    claims = []

    async def claim(job_id: str) -> None:
        claims.append((job_id, await store.reserve_idempotency("acme", key, job_id)))

    async with trio.open_nursery() as nursery:
        for n in range(8):
            nursery.start_soon(claim, f"job-{n}")
    winners = [job for job, holder in claims if holder is None]
    assert len(winners) == 1
    assert {holder for _, holder in claims if holder is not None} == {winners[0]}
    assert await store.reserve_idempotency("other-tenant", key, "job-x") is None  # keys are per tenant


async def test_dlq_entries_page_per_tenant_and_trim(redis):
    dlq = DlqStore(redis, max_size=5)
    tenant, other = unique("tenant"), unique("other")
    for n in range(3):  # another tenant's entries, older than all of this tenant's
        await dlq.put(dlq_entry(job_id=f"{other}-{n}", tenant=other, topic="job.default",
                                status="JOB_STATUS_FAILED", reason="x", reason_code="x", created=1_600_000_000 + n))
    for n in range(7):
        await dlq.put(dlq_entry(job_id=f"{tenant}-{n}", tenant=tenant, topic="job.default",
                                status="JOB_STATUS_FAILED", reason="boom", reason_code="worker_failed",
                                created=1_700_000_000 + n))
    items, cursor = await dlq.page(tenant, limit=3)
    # Capped at 5 entries per tenant: this tenant's two oldest were evicted, the other tenant's
    # older entries were not (one tenant's failures never evict another's).
    assert [e["job_id"] for e in items] == [f"{tenant}-6", f"{tenant}-5", f"{tenant}-4"]
    rest, end = await dlq.page(tenant, limit=3, cursor=cursor)
    assert [e["job_id"] for e in rest] == [f"{tenant}-3", f"{tenant}-2"] and end is None
    assert await dlq.get(f"{tenant}-0") is None and await redis.zscore(keys.DLQ_INDEX, f"{tenant}-0") is None
    assert [e["job_id"] for e in (await dlq.page(other, limit=10))[0]] == [f"{other}-2", f"{other}-1", f"{other}-0"]
    assert await dlq.get(f"{tenant}-6", tenant=other) is None
    assert await dlq.delete(f"{tenant}-6", tenant=tenant) and not await dlq.delete(f"{tenant}-6", tenant=tenant)
    assert await redis.zscore(keys.dlq_tenant_index(tenant), f"{tenant}-6") is None


async def test_listing_one_tenant_reads_only_its_own_index(redis):
    """A tenant with a few entries lists them without walking another tenant's thousands."""
    dlq = DlqStore(redis)
    busy, quiet = unique("busy"), unique("quiet")
    await redis.pipeline([("ZADD", keys.dlq_tenant_index(busy), 1_800_000_000 + n, f"{busy}-{n}") for n in range(3000)])
    await dlq.put(dlq_entry(job_id=f"{quiet}-1", tenant=quiet, topic="job.default", status="S", reason="r",
                            reason_code="c", created=1_700_000_000))
    before = int((await redis.info("commandstats")).get("cmdstat_get", {}).get("calls", 0))
    items, _ = await dlq.page(quiet, limit=1)
    after = int((await redis.info("commandstats")).get("cmdstat_get", {}).get("calls", 0))
    assert [e["job_id"] for e in items] == [f"{quiet}-1"]
    assert after - before <= 2  # one entry read (plus, at most, another client's GET)


async def test_dlq_cleanup_drops_expired_entries_and_indexes_old_ones_by_tenant(redis):
    dlq = DlqStore(redis)
    tenant = unique("t")
    job_id, old_id = unique("job"), unique("old")
    await dlq.put(dlq_entry(job_id=job_id, tenant=tenant, topic="job.x", status="S", reason="r", reason_code="c"))
    await redis.delete(keys.dlq_entry(job_id))  # as if its TTL ran out
    # An entry written before tenant indexes existed: only in dlq:index.
    entry = dlq_entry(job_id=old_id, tenant=tenant, topic="job.x", status="S", reason="r", reason_code="c")
    await redis.set(keys.dlq_entry(old_id), json.dumps(entry))
    await redis.zadd(keys.DLQ_INDEX, {old_id: entry["created_unix"]})
    assert await dlq.cleanup() >= 2  # the expired member, from both indexes
    assert await redis.zscore(keys.DLQ_INDEX, job_id) is None
    assert await redis.zscore(keys.dlq_tenant_index(tenant), job_id) is None
    assert [e["job_id"] for e in (await dlq.page(tenant))[0]] == [old_id]


async def test_config_documents_use_revisions(redis):
    store = ConfigStore(redis)
    org = unique("org")
    first = await store.put("org", org, {"pools": {"a": {"requires": []}}, "limits": {"max": 3}})
    assert first["revision"] == 1 and first["data"]["pools"]["a"]["requires"] == []
    second = await store.put("org", org, {"limits": {"max": 4}}, expected_revision=1)
    assert second["revision"] == 2
    with pytest.raises(RevisionConflict):
        await store.put("org", org, {"limits": {"max": 5}}, expected_revision=1)
    await store.put("system", "default", {"limits": {"max": 1, "queue": 9}})
    merged = await store.effective(("system", "default"), ("org", org))
    assert merged["limits"] == {"max": 4, "queue": 9}


async def test_flush_and_scan_cover_every_primary(redis):
    """The fixture's FLUSHDB emptied every node; SCAN-based listings see keys on every primary
    (on a cluster, 60 instance keys spread over all three)."""
    from cordum.runtime.instances import list_instances

    assert await redis.dbsize() == 0
    await redis.pipeline([("SET", keys.instance("scheduler", f"s-{i:02d}"),
                           f'{{"id": "s-{i:02d}", "service": "scheduler"}}', "EX", 60) for i in range(60)])
    assert len(await redis.scan_keys(keys.INSTANCE_PREFIX + "*", count=10)) == 60
    listed = await list_instances(redis)
    assert [e["id"] for e in listed["scheduler"]] == [f"s-{i:02d}" for i in range(60)]
    assert len(await redis.scan_keys(keys.INSTANCE_PREFIX + "*", limit=5)) == 5


async def test_multi_key_scripts_share_a_slot_and_transactions_work(redis):
    """What the stores rely on: a script over `k` and `{k}:fence`, a MULTI/EXEC on one key, and
    auto-pipelined commands spread over many slots."""
    from cordum.infra.redis import CrossSlotError

    script = redis.script("redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])")
    lock = unique("cordum:scheduler:job")
    assert await script([lock, keys.fence_counter(lock)], ["holder"]) == 1
    await redis.script_flush()  # every primary forgets it: EVALSHA gets NOSCRIPT, reloads, retries
    assert await script([lock, keys.fence_counter(lock)], ["holder"]) == 2
    assert await redis.pipeline([("ZADD", "z", 1, "a"), ("ZCARD", "z")], transaction=True) == [1, 1]
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(redis.execute, "SET", f"spread:{i}", i)
    assert [int(v) for v in await redis.pipeline([("GET", f"spread:{i}") for i in range(50)])] == list(range(50))
    if redis.cluster:  # two unrelated keys: refused (by redis-py, before anything is sent)
        with pytest.raises(CrossSlotError):
            await redis.pipeline([("DEL", "spread:1", "spread:2")])


async def test_the_store_counts_attempts_by_the_pure_rule(redis):
    store = JobStore(redis)
    job_id = await _new_job(store)
    assert (await store.transition(job_id, S.DISPATCHED)).attempts == 1  # straight from PENDING
    assert (await store.transition(job_id, S.SCHEDULED)).attempts == 2  # a rolled-back dispatch counts
    assert (await store.transition(job_id, S.DISPATCHED)).attempts == 2  # counted on entering SCHEDULED
    assert (await store.transition(job_id, S.RUNNING)).attempts == 2


async def _footprint(redis, job_id: str, tenant: str) -> dict:
    """Everything the store wrote for a job, with its id replaced by "<job>" (to compare two jobs)."""
    def plain(value):
        return json.loads(json.dumps(value).replace(job_id, "<job>"))
    sorted_sets = [keys.job_index(state.value) for state in S] + [
        keys.JOB_RECENT, keys.JOB_DEADLINE, keys.tenant_recent(tenant),
        keys.tenant_state_index(tenant, S.APPROVAL_REQUIRED.value)]
    return plain({
        "meta": await redis.hgetall(keys.job_meta(job_id)),
        "state": await redis.get(keys.job_state(job_id)),
        "events": await redis.lrange(keys.job_events(job_id), 0, -1),
        "ttls": [await redis.ttl(key) > 0 for key in (keys.job_meta(job_id), keys.job_state(job_id), keys.job_events(job_id))],
        "scores": {key: await redis.zscore(key, job_id) for key in sorted_sets},
        "active": await redis.sismember(keys.tenant_active(tenant), job_id),
    })


async def test_the_one_trip_form_writes_exactly_what_the_two_step_form_writes(redis, monkeypatch):
    """The script makes the index upkeep itself from its keys on one server; on a cluster (and
    without a known tenant) the same writes follow it as commands. Both must leave the same
    record, move after move: through approval, a fence, an event's context, a deadline."""
    store = JobStore(redis)
    tenant = unique("forms")
    prints = []
    for one_trip in (False, True):
        clock = iter(range(1_700_000_000_000_000, 1_800_000_000_000_000, 1000))  # the same times for both
        monkeypatch.setattr("cordum.store.jobs.now_us", lambda clock=clock: next(clock))
        job_id = await _new_job(store, tenant=tenant, deadline_unix=1_900_000_000_000_000)
        await redis.zadd(keys.JOB_DEADLINE, {job_id: 1_900_000_000_000_000})
        known = {"tenant": tenant} if one_trip else {}
        await store.transition(job_id, S.APPROVAL_REQUIRED, **known)
        await store.transition(job_id, S.PENDING, event={"approved_by": "ops"}, **known)
        await store.transition(job_id, S.DISPATCHED, fence=3, fields={"worker_id": "w-1"}, **known)
        await store.transition(job_id, S.RUNNING, fence=3, allowed_from=[S.DISPATCHED], **known)
        await store.transition(job_id, S.SUCCEEDED, fence=4, fields={"result_ptr": "redis://res:" + job_id}, **known)
        prints.append(await _footprint(redis, job_id, tenant))
    two_step, one_trip = prints
    events = [json.loads(e) for e in one_trip["events"]]
    assert one_trip == two_step
    # and what both wrote is the spec's record (a check that the comparison compares something)
    assert [e["state"] for e in events] == ["PENDING", "APPROVAL_REQUIRED", "PENDING", "DISPATCHED", "RUNNING", "SUCCEEDED"]
    assert events[2]["ctx"] == {"approved_by": "ops"}
    assert one_trip["meta"]["state"] == one_trip["state"] == "SUCCEEDED" and one_trip["meta"]["_fence"] == "4"
    assert one_trip["meta"]["attempts"] == "1" and one_trip["ttls"] == [True, True, True]
    assert {key for key, score in one_trip["scores"].items() if score is not None} == {
        keys.job_index("succeeded"), keys.JOB_RECENT, keys.tenant_recent(tenant)}
    assert not one_trip["active"]


async def test_the_index_sweep_repairs_a_lost_index_entry_and_nothing_else(redis):
    """A live job missing from its state index (a lost write) is put back; a job that finished
    after the sweep read it, or that changed moments ago, is left alone: putting those back would
    list a finished job as running and count it as the tenant's unfinished work forever."""
    store = JobStore(redis)
    tenant = unique("sweep")
    lost, finished, fresh = [await _new_job(store, tenant=tenant) for _ in range(3)]
    for job_id in (lost, finished, fresh):
        await store.transition(job_id, S.DISPATCHED, tenant=tenant, fields={"worker_id": "w1"})
    scanned = {job_id: await store.get(job_id) for job_id in (lost, finished, fresh)}
    # the lost write: `lost` is missing from the dispatched index and its tenant's active set
    await redis.zrem(keys.job_index("dispatched"), lost)
    await redis.srem(keys.tenant_active(tenant), lost)
    # `finished` finishes after the scan read it (its index entries move with it)
    await store.transition(finished, S.SUCCEEDED, tenant=tenant)
    repaired = await store.repair_indexes([scanned[lost], scanned[finished]], settled_us=0)
    assert repaired == [lost]
    assert await redis.zscore(keys.job_index("dispatched"), lost) is not None
    assert await redis.sismember(keys.tenant_active(tenant), lost)
    assert await redis.zscore(keys.job_index("dispatched"), finished) is None
    assert not await redis.sismember(keys.tenant_active(tenant), finished)
    assert await redis.get(keys.job_state(finished)) == "SUCCEEDED"
    # a job changed moments ago is not judged yet (its index writes may still be on their way)
    await redis.zrem(keys.job_index("dispatched"), fresh)
    assert await store.repair_indexes([scanned[fresh]]) == []
    # a finished job left in its tenant's active set (however it got there) is taken out
    await redis.sadd(keys.tenant_active(tenant), finished)
    await store.repair_indexes([await store.get(finished)])
    assert not await redis.sismember(keys.tenant_active(tenant), finished)


async def test_the_sweep_scan_reads_what_the_repair_needs(redis):
    store = JobStore(redis)
    tenant = unique("scan")
    job_id = await _new_job(store, tenant=tenant)
    await store.transition(job_id, S.DISPATCHED, tenant=tenant, fields={"worker_id": "w9"})
    cursor, seen = "0", {}
    while True:  # a whole walk: every job's hash, on every primary of a cluster
        cursor, metas = await store.scan_jobs(cursor, 500)
        seen.update((meta["id"], meta) for meta in metas)
        if cursor == "0":
            break
    meta = seen[job_id]
    assert meta == {"id": job_id, "state": "DISPATCHED", "tenant": tenant, "worker_id": "w9",
                    "updated_at": (await store.get(job_id))["updated_at"]}
    await redis.zrem(keys.job_index("dispatched"), job_id)
    assert await store.repair_indexes([meta], settled_us=0) == [job_id]
    assert await redis.zscore(keys.job_index("dispatched"), job_id) is not None
