"""The workflow store against a real redis-server (and, for the fenced update and the timers, a
Redis Cluster, where it must not cause a single CROSSSLOT error)."""

from __future__ import annotations

import pytest
import trio

from cordum.store import keys
from cordum.store.workflows import (
    TIMELINE_MAX,
    DefinitionOwned,
    RunExists,
    RunFenceStale,
    RunNotFound,
    WorkflowStore,
    step_jobs,
)
from tests.conftest import unique


def _definition(workflow_id: str, **extra) -> dict:
    return {"id": workflow_id, "name": workflow_id, "steps": {"a": {"id": "a", "type": "worker"}}, **extra}


def _run(workflow_id: str = "wf-1", **extra) -> dict:
    return {"workflow_id": workflow_id, "status": "pending", "input": {"x": 1}, "steps": {}, **extra}


# ---- definitions -----------------------------------------------------------------------------------


async def test_definition_put_get_list_delete_with_tenant_isolation(redis):
    store = WorkflowStore(redis)
    stored = await store.put_definition(_definition("wf-a"), "acme")
    assert stored["org_id"] == "acme"
    assert (await store.get_definition("wf-a"))["name"] == "wf-a"
    assert (await store.get_definition("wf-a", tenant="acme"))["org_id"] == "acme"
    assert await store.get_definition("wf-a", tenant="globex") is None
    assert await store.get_definition("nope") is None

    # another tenant can neither take the id over, nor list, nor delete it
    with pytest.raises(DefinitionOwned):
        await store.put_definition(_definition("wf-a"), "globex")
    with pytest.raises(ValueError):
        await store.put_definition(_definition("wf-b", org_id="acme"), "globex")
    assert (await store.list_definitions("globex"))[0] == []
    assert await store.delete_definition("wf-a", "globex") is False
    assert await store.get_definition("wf-a", tenant="acme") is not None

    # replace keeps one index entry
    await store.put_definition(_definition("wf-a", name="renamed"), "acme")
    listed, cursor = await store.list_definitions("acme")
    assert [d["name"] for d in listed] == ["renamed"] and cursor is None
    assert await redis.zscore(keys.WF_INDEX_ALL, "wf-a") is not None

    assert await store.delete_definition("wf-a", "acme") is True
    assert await store.get_definition("wf-a") is None
    assert await redis.zscore(keys.wf_index_org("acme"), "wf-a") is None
    assert await redis.zscore(keys.WF_INDEX_ALL, "wf-a") is None
    assert await store.delete_definition("wf-a", "acme") is False


async def test_definition_list_pagination_newest_first(redis):
    store = WorkflowStore(redis)
    ids = [f"wf-{i:02d}" for i in range(7)]
    for workflow_id in ids:
        await store.put_definition(_definition(workflow_id), "acme")
    await store.put_definition(_definition("other"), "globex")
    # equal scores: the cursor must still neither skip nor repeat
    for workflow_id in ids[2:5]:
        await redis.zadd(keys.wf_index_org("acme"), {workflow_id: 1_000})
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        page, cursor = await store.list_definitions("acme", limit=2, cursor=cursor)
        seen += [d["id"] for d in page]
        pages += 1
        if cursor is None:
            break
    assert sorted(seen) == ids and len(seen) == len(set(seen))
    assert pages >= 4


# ---- runs ----------------------------------------------------------------------------------------


async def test_create_run_indexes_and_tenant_isolation(redis):
    store = WorkflowStore(redis)
    run_id, created = await store.create_run(_run(), tenant="acme")
    assert created
    doc = await store.get_run(run_id)
    assert doc["id"] == run_id and doc["org_id"] == "acme" and doc["status"] == "pending"
    assert await store.get_run(run_id, tenant="acme") == doc
    assert await store.get_run(run_id, tenant="globex") is None
    assert await store.get_run("missing") is None
    assert await redis.zscore(keys.wf_runs_status("pending"), run_id) is not None
    assert await redis.zscore(keys.wf_runs("wf-1"), run_id) is not None
    assert await redis.zscore(keys.WF_RUNS_ALL, run_id) is not None
    assert await redis.sismember(keys.wf_runs_active("acme"), run_id)
    assert await store.active_runs("acme") == 1 and await store.active_runs("globex") == 0
    assert await store.run_fence(run_id) == 0
    with pytest.raises(RunExists):
        await store.create_run({**_run(), "id": run_id}, tenant="acme")
    with pytest.raises(ValueError):
        await store.create_run(_run(org_id="acme"), tenant="globex")


async def test_create_run_idempotency_key_is_per_tenant(redis):
    store = WorkflowStore(redis)
    first, created = await store.create_run(_run(), tenant="acme", idempotency_key="k1")
    assert created
    again, created_again = await store.create_run(_run(), tenant="acme", idempotency_key="k1")
    assert (again, created_again) == (first, False)
    assert len(await redis.zrange(keys.WF_RUNS_ALL, 0, -1)) == 1
    other, other_created = await store.create_run(_run(), tenant="globex", idempotency_key="k1")
    assert other_created and other != first
    assert await redis.get(keys.wf_run_idempotency("acme", "k1")) == first
    assert await redis.get(keys.wf_run_idempotency("globex", "k1")) == other


async def test_concurrent_creates_with_one_key_make_one_run(redis):
    store = WorkflowStore(redis)
    results: list[tuple[str, bool]] = []

    async def create() -> None:
        results.append(await store.create_run(_run(), tenant="acme", idempotency_key="same"))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(create)
    assert len({run_id for run_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


async def test_idempotency_key_of_a_run_never_written_is_taken_over(redis):
    store = WorkflowStore(redis)
    store.IDEMPOTENCY_GRACE = 0.05
    await redis.set(keys.wf_run_idempotency("acme", "k"), "ghost")  # the creator died after SET NX
    run_id, created = await store.create_run(_run(), tenant="acme", idempotency_key="k")
    assert created and run_id != "ghost"
    assert await redis.get(keys.wf_run_idempotency("acme", "k")) == run_id


async def _fenced_updates_and_status_index(redis) -> None:
    store = WorkflowStore(redis)
    run_id, _ = await store.create_run(_run(), tenant="acme")
    doc = await store.get_run(run_id)

    assert await store.update_run({**doc, "status": "running"}, fence=5) == "pending"
    assert await store.run_fence(run_id) == 5
    with pytest.raises(RunFenceStale) as stale:
        await store.update_run({**doc, "status": "failed"}, fence=4)
    assert stale.value.held == 5 and stale.value.status == "running"
    with pytest.raises(RunFenceStale):
        await store.update_run({**doc, "status": "failed"}, fence=0)
    assert (await store.get_run(run_id))["status"] == "running"
    assert await store.update_run({**doc, "status": "waiting"}, fence=5) == "running"  # equal: same holder
    assert await store.update_run({**doc, "status": "succeeded", "output": 1}, fence=9) == "waiting"
    assert await store.run_fence(run_id) == 9
    assert (await store.get_run(run_id))["output"] == 1

    for status in ("pending", "running", "waiting", "succeeded"):
        score = await redis.zscore(keys.wf_runs_status(status), run_id)
        assert (score is not None) == (status == "succeeded"), status
    assert [r for r, _ in await store.runs_in_status("succeeded")] == [run_id]
    assert await store.runs_in_status("running") == []
    assert not await redis.sismember(keys.wf_runs_active("acme"), run_id)
    with pytest.raises(RunNotFound):
        await store.update_run({**doc, "id": "missing"}, fence=1)


async def test_update_run_fences_and_moves_status_index(redis):
    await _fenced_updates_and_status_index(redis)


async def test_update_run_keeps_tenant_and_workflow(redis):
    store = WorkflowStore(redis)
    run_id, _ = await store.create_run(_run(), tenant="acme")
    doc = await store.get_run(run_id)
    await store.update_run({**doc, "org_id": "globex", "workflow_id": "wf-2", "status": "running"}, fence=1)
    assert await store.get_run(run_id, tenant="acme") is not None
    assert await redis.zscore(keys.wf_runs("wf-2"), run_id) is None
    assert not await redis.sismember(keys.wf_runs_active("globex"), run_id)


async def test_list_runs_pagination_and_filters(redis):
    store = WorkflowStore(redis)
    mine = []
    for i in range(9):
        run_id, _ = await store.create_run(_run("wf-x" if i % 2 else "wf-y"), tenant="acme")
        mine.append(run_id)
    await store.create_run(_run("wf-x"), tenant="globex")
    doc = await store.get_run(mine[0])
    await store.update_run({**doc, "status": "running"}, fence=1)

    seen, cursor = [], None
    while True:
        page, cursor = await store.list_runs("acme", limit=4, cursor=cursor)
        seen += [r["id"] for r in page]
        if cursor is None:
            break
    assert sorted(seen) == sorted(mine) and len(seen) == len(mine)
    assert seen[0] == mine[0]  # most recently updated first

    of_x, _ = await store.list_runs("acme", workflow_id="wf-x", limit=50)
    assert {r["id"] for r in of_x} == set(mine[1::2])
    running, _ = await store.list_runs("acme", status="running")
    assert [r["id"] for r in running] == [mine[0]]
    assert (await store.list_runs("globex", workflow_id="wf-y"))[0] == []
    assert len((await store.list_runs("globex"))[0]) == 1
    with pytest.raises(ValueError):
        await store.list_runs("acme", cursor="garbage")


async def test_sparse_filter_returns_short_pages_that_still_reach_every_match(redis):
    store = WorkflowStore(redis)
    store.SCAN_FACTOR = 1
    wanted = []
    for i in range(30):
        run_id, _ = await store.create_run(_run(), tenant="acme")
        if i in (3, 17, 28):
            doc = await store.get_run(run_id)
            await store.update_run({**doc, "status": "running"}, fence=1)
            wanted.append(run_id)
    seen, cursor, calls = [], None, 0
    while True:
        page, cursor = await store.list_runs("acme", status="running", limit=2, cursor=cursor)
        seen += [r["id"] for r in page]
        calls += 1
        if cursor is None:
            break
    assert sorted(seen) == sorted(wanted) and calls > 2


async def test_timeline_capped_and_tenant_scoped(redis):
    store = WorkflowStore(redis)
    run_id, _ = await store.create_run(_run(), tenant="acme")
    for i in range(TIMELINE_MAX + 5):
        await store.append_timeline(run_id, {"type": "step_dispatched", "n": i})
    events = await store.timeline(run_id, "acme")
    assert len(events) == TIMELINE_MAX
    assert events[0]["n"] == 5 and events[-1]["n"] == TIMELINE_MAX + 4
    assert [e["n"] for e in await store.timeline(run_id, "acme", limit=2)] == [TIMELINE_MAX + 3, TIMELINE_MAX + 4]
    assert await store.timeline(run_id, "globex") is None
    assert await store.timeline("missing", "acme") is None


async def test_job_reverse_index_and_delete_run(redis):
    store = WorkflowStore(redis)
    run_id, _ = await store.create_run(_run(), tenant="acme", idempotency_key="del")
    doc = await store.get_run(run_id)
    doc["steps"] = {
        "a": {"step_id": "a", "status": "running", "job_id": f"{run_id}:a@1"},
        "each": {"step_id": "each", "status": "running",
                 "children": [{"step_id": "each[0]", "job_id": f"{run_id}:each[0]@1"}]},
        "b": {"step_id": "b", "status": "pending"},
    }
    await store.update_run(doc, fence=1)
    assert await store.run_for_job(f"{run_id}:a@1") == (run_id, "a")
    assert await store.run_for_job(f"{run_id}:each[0]@1") == (run_id, "each/0")
    assert await store.run_for_job("unknown") is None
    await store.append_timeline(run_id, {"type": "run_status"})
    await store.arm_timer(f"wf-1:{run_id}", 10)

    assert await store.delete_run(run_id, "globex") is False
    assert await store.delete_run(run_id, "acme") is True
    assert await store.get_run(run_id) is None
    assert await store.run_for_job(f"{run_id}:a@1") is None
    assert await redis.exists(keys.wf_run_timeline(run_id)) == 0
    assert await redis.zscore(keys.WF_RUNS_ALL, run_id) is None
    assert await redis.zscore(keys.wf_runs_status("pending"), run_id) is None
    assert await store.timer_due(f"wf-1:{run_id}") is None
    assert not await redis.sismember(keys.wf_runs_active("acme"), run_id)
    assert await redis.get(keys.wf_run_idempotency("acme", "del")) is None
    assert await store.delete_run(run_id, "acme") is False


def test_step_jobs_walks_children_once():
    doc = {"steps": {"p": {"job_id": "j0", "children": {"x": {"job_id": "j1"}}}, "p[0]": {"job_id": "j1"},
                     "q": {"status": "pending"}, "bad": "not a step"}}
    assert dict(step_jobs(doc)) == {"j0": "p", "j1": "p/x"}


# ---- delay timers ------------------------------------------------------------------------------


async def _timers_pop_once(redis) -> None:
    store = WorkflowStore(redis)
    await store.arm_timer("wf:early", 100)
    await store.arm_timer("wf:late", 500)
    assert await store.timer_due("wf:early") == 100
    assert await store.pop_due_timers(50) == []
    assert await store.pop_due_timers(200) == ["wf:early"]
    assert await store.pop_due_timers(200) == []
    assert await store.timer_due("wf:late") == 500
    await store.disarm_timer("wf:late")
    assert await store.timer_due("wf:late") is None

    members = [f"wf:run-{i}" for i in range(300)]
    for i, member in enumerate(members):
        await store.arm_timer(member, 1000 + i)
    await store.arm_timer("wf:future", 10_000)
    popped: list[list[str]] = [[], []]

    async def poll(slot: int) -> None:
        while True:
            batch = await store.pop_due_timers(5000, limit=7)
            if not batch:
                return
            popped[slot] += batch
            await trio.sleep(0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll, 0)
        nursery.start_soon(poll, 1)
    both = popped[0] + popped[1]
    assert sorted(both) == sorted(members) and len(both) == len(set(both))
    assert await store.timer_due("wf:future") == 10_000


async def test_timers_pop_only_due_members_exactly_once(redis):
    await _timers_pop_once(redis)


# ---- Redis Cluster -------------------------------------------------------------------------------


@pytest.mark.parametrize("store_settings", ["cluster"], indirect=True)
async def test_update_and_timers_on_cluster_without_crossslot(store_redis):
    """store_redis asserts that no CROSSSLOT reply was sent while the test ran."""
    assert store_redis.cluster
    await _fenced_updates_and_status_index(store_redis)
    await _timers_pop_once(store_redis)
    store = WorkflowStore(store_redis)
    await store.put_definition(_definition(unique("wf")), "acme")
    run_id, _ = await store.create_run(_run(), tenant="acme", idempotency_key="c")
    await store.append_timeline(run_id, {"type": "run_status"})
    assert await store.delete_run(run_id, "acme")


async def test_update_keeps_stored_audit_hashes_the_new_doc_lacks(redis):
    store = WorkflowStore(redis)
    run_id, _ = await store.create_run(_run(), tenant="acme")
    doc = await store.get_run(run_id)
    doc["steps"] = {"a": {"job_id": "j-a", "status": "running", "output": []},
                    "p": {"job_id": "j-p", "children": [{"job_id": "j-c", "status": "running"}]}}
    await store.update_run(doc, fence=1)
    stored = await store.get_run(run_id)
    stored["steps"]["a"]["audit_hash"] = "h-a"
    stored["steps"]["p"]["children"][0]["audit_hash"] = "h-c"
    await store.update_run(stored, fence=1)

    doc["steps"]["a"]["status"] = "succeeded"  # the engine's copy never saw the hashes
    doc["steps"]["p"]["children"][0]["audit_hash"] = ""
    await store.update_run(doc, fence=1)
    after = await store.get_run(run_id)
    assert after["steps"]["a"] == {"job_id": "j-a", "status": "succeeded", "output": [], "audit_hash": "h-a"}
    assert after["steps"]["p"]["children"][0]["audit_hash"] == "h-c"
    assert "audit_hash" not in doc["steps"]["a"]  # the caller's doc is not modified

    doc["steps"]["a"]["audit_hash"] = "h-new"  # a doc that has its own hash keeps it
    await store.update_run(doc, fence=1)
    assert (await store.get_run(run_id))["steps"]["a"]["audit_hash"] == "h-new"
