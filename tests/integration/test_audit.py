"""The audit trail: the hash chain against a real Redis (appends, repeats, concurrent writers,
tampering found by verification), and the gateway recording requests and decisions into it,
locally and through `sys.audit.export` with two gateway replicas exporting."""

from __future__ import annotations

import json
import time

import trio
import trio.testing

from cordum.runtime.audit import AuditLog, new_event
from cordum.store.audit import AuditChain, Entry as AuditEntry, chain_key, link_hash
from tests.conftest import unique
from tests.integration import test_gateway as gateway_tests
from tests.integration.test_gateway import ACME_ADMIN, ADMIN, ALICE, VIEWER, _eventually

kernel, start_gateway = gateway_tests.kernel, gateway_tests.start_gateway


def _events(n: int, start: int = 0):
    return [(f"e{i}", 1.0 + i, {"tenant": "t", "kind": "test", "action": f"act {i}"}) for i in range(start, start + n)]


async def test_the_chain_links_every_event_to_the_one_before(redis) -> None:
    chain = AuditChain(redis, hmac_key=b"k")
    tenant = unique("t")
    assert await chain.append(tenant, _events(3)) == 3
    assert await chain.append(tenant, _events(2, start=2)) == 1  # e2 is there already: one new
    entries, _ = await chain.page(tenant, limit=10)
    assert [e.seq for e in entries] == [4, 3, 2, 1] and [e.id for e in entries] == ["e3", "e2", "e1", "e0"]
    assert entries[-1].prev == "" and all(a.prev == b.hash for a, b in zip(entries, entries[1:]))
    assert entries[0].hash == link_hash(b"k", entries[0].prev, 4, entries[0].event_json)
    result = await chain.verify(tenant)
    assert result.valid and result.checked == 4 and result.head_seq == 4
    assert not (await AuditChain(redis, hmac_key=b"other").verify(tenant)).valid  # the key matters


async def test_an_event_recorded_again_long_after_is_not_appended_twice(redis) -> None:
    chain = AuditChain(redis)
    tenant = unique("t")
    assert await chain.append(tenant, _events(300)) == 300
    assert await chain.append(tenant, _events(1)) == 0  # e0, 300 entries back: still known
    assert (await chain.verify(tenant)).checked == 300


async def test_concurrent_writers_keep_one_unbroken_chain(redis) -> None:
    tenant = unique("t")
    writers = [AuditChain(redis), AuditChain(redis)]

    async def write(chain: AuditChain, prefix: str) -> None:
        for i in range(25):
            await chain.append(tenant, [(f"{prefix}{i}", float(i), {"n": i, "by": prefix})])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, writers[0], "a")
        nursery.start_soon(write, writers[1], "b")
    result = await writers[0].verify(tenant)
    assert result.valid and result.checked == 50 and result.head_seq == 50


async def test_events_recorded_close_together_are_appended_together(redis) -> None:
    class Counting(AuditChain):
        appends = 0

        async def append(self, tenant, events):
            Counting.appends += 1
            return await super().append(tenant, events)

    tenant = unique("t")
    audit = AuditLog(Counting(redis), None, linger=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(audit.run)
        for i in range(5):  # a burst: what one busy moment of a replica records
            audit.record(new_event(tenant, "test", f"act {i}"))
            await trio.testing.wait_all_tasks_blocked()  # the writer saw it (without a linger: wrote it)
        with trio.fail_after(10):
            while audit.written < 5:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert Counting.appends == 1
    entries, _ = await audit.chain.page(tenant, limit=10)
    assert [e.event["action"] for e in reversed(entries)] == [f"act {i}" for i in range(5)]


async def test_verification_finds_a_removed_or_changed_entry(redis) -> None:
    chain = AuditChain(redis)
    removed, changed = unique("t"), unique("t")
    for tenant in (removed, changed):
        await chain.append(tenant, _events(5))
    third = (await redis.xrange(chain_key(removed)))[2][0]
    await redis.xdel(chain_key(removed), third)
    result = await chain.verify(removed)
    assert not result.valid and result.first_bad_seq == 4 and "does not follow" in result.problem
    # rewrite the stream with one event altered but every link copied: the altered hash gives it away
    entries = await redis.xrange(chain_key(changed))
    await redis.delete(chain_key(changed))
    for stream_id, fields in entries:
        if fields["seq"] == "2":
            event = json.loads(fields["event"])
            fields = {**fields, "event": json.dumps({**event, "action": "nothing to see"}, sort_keys=True,
                                                    separators=(",", ":"))}
        await redis.xadd(chain_key(changed), fields, id=stream_id)
    result = await chain.verify(changed)
    assert not result.valid and result.first_bad_seq == 2 and "changed after it was recorded" in result.problem


async def test_the_gateway_records_requests_and_decisions_in_the_tenants_chain(start_gateway) -> None:
    api = await start_gateway()
    job = (await api.submit(key=ALICE)).body["job_id"]
    assert (await api.call("POST", f"/api/v1/jobs/{job}/cancel", key=ALICE)).status == 200
    assert (await api.submit(key=ALICE, topic="job.vault.x")).status == 403

    async def recorded():
        items = (await api.call("GET", "/api/v1/audit/events?limit=50")).body["items"]
        return items if len(items) >= 5 else None

    items = await _eventually(recorded)
    actions = [(i["kind"], i["action"], i.get("verdict") or i.get("status")) for i in reversed(items)]
    assert ("policy_decision", "submit", "ALLOW") in actions and ("policy_decision", "submit", "DENY") in actions
    assert ("request", "POST /api/v1/jobs", 200) in actions and ("request", "POST /api/v1/jobs", 403) in actions
    assert ("request", "POST /api/v1/jobs/<job_id>/cancel", 200) in actions
    cancel = next(i for i in items if i["action"] == "POST /api/v1/jobs/<job_id>/cancel")
    assert cancel["target"] == {"job_id": job} and cancel["principal"] == "alice" and cancel["tenant"] == "default"
    verified = (await api.call("GET", "/api/v1/audit/verify")).body
    assert verified["valid"] is True and verified["checked"] >= 5
    assert (await api.call("GET", "/api/v1/audit/events", key=VIEWER)).status == 403
    theirs = (await api.call("GET", "/api/v1/audit/events", key=ACME_ADMIN)).body["items"]
    assert all(i["tenant"] == "acme" for i in theirs) and not any(i.get("job_id") == job for i in theirs)


async def test_a_rate_limited_request_is_audited_as_its_callers(start_gateway, redis) -> None:
    # Memory mode: a limit this tight kept in the shared Redis would hold up later tests' tenant.
    api = await start_gateway(API_RATE_LIMIT_RPS="0.001", API_RATE_LIMIT_BURST="2", REDIS_RATE_LIMIT="false")
    since = time.time()
    job = (await api.submit(key=ALICE)).body["job_id"]
    assert (await api.call("POST", f"/api/v1/jobs/{job}/cancel", key=ALICE)).status == 200
    assert (await api.submit(key=ALICE)).status == 429  # the gateway's submit fast path
    assert (await api.call("POST", f"/api/v1/jobs/{job}/cancel", key=ALICE)).status == 429  # through the app
    chain = AuditChain(redis)

    async def refusals():
        entries, _ = await chain.page("default", limit=200)
        found = [e for e in map(AuditEntry.view, entries)
                 if e.get("status") == 429 and e.get("principal") == "alice" and e["ts"] >= since]
        return found if len(found) >= 2 else None

    refused = sorted((e["action"], e.get("target", {})) for e in await _eventually(refusals))
    assert refused == [("POST /api/v1/jobs", {}), ("POST /api/v1/jobs/<job_id>/cancel", {"job_id": job})]


async def test_exported_events_reach_the_chain_once_whichever_replica_exports(start_gateway) -> None:
    """AUDIT_TRANSPORT=nats: two gateways publish on sys.audit.export and both consume it in queue
    group audit-exporters: every event of either is in the chain exactly once, in one valid chain."""
    first = await start_gateway(AUDIT_TRANSPORT="nats")
    second = await start_gateway(AUDIT_TRANSPORT="nats")
    config = (await first.call("GET", "/api/v1/audit/export/config")).body
    assert config["transport"] == "nats" and config["queue_group"] == "audit-exporters"
    tenant_jobs = []
    for n in range(10):
        api = (first, second)[n % 2]
        tenant_jobs.append((await api.submit(key=ALICE)).body["job_id"])

    async def all_decisions():
        items = (await first.call("GET", "/api/v1/audit/events?limit=1000")).body["items"]
        decided = [i["job_id"] for i in items if i["kind"] == "policy_decision" and i.get("job_id") in tenant_jobs]
        return items if sorted(decided) == sorted(tenant_jobs) else None

    items = await _eventually(all_decisions, timeout=30)
    ids = [i["id"] for i in items]
    assert len(ids) == len(set(ids))  # nothing appended twice
    assert {i["replica"] for i in items if i.get("job_id") in tenant_jobs} == {first.gw.instance_id, second.gw.instance_id}
    assert (await second.call("GET", "/api/v1/audit/verify")).body["valid"] is True
    health = (await first.call("GET", "/api/v1/audit/export/health")).body
    assert health["transport"] == "nats" and health["dropped"] == 0
    test = await first.call("POST", "/api/v1/audit/export/test", {})
    assert test.status == 200 and test.body["ok"] is True
    await _eventually(lambda: _has(first, test.body["event_id"]), timeout=30)


async def _has(api, event_id: str) -> bool:
    items = (await api.call("GET", "/api/v1/audit/events?limit=100", key=ADMIN)).body["items"]
    return any(i["id"] == event_id for i in items)
