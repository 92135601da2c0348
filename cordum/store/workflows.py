"""The workflow store: Redis layout of spec cordum-services §2.12, thin I/O over the adapter.

Documents are plain dicts (JSON); the engine converts them to and from its classes.

- A definition is a JSON string at `wf:def:<id>`, owned by its `org_id` (the tenant). Writes and
  deletes are one Lua script on that single key that refuses another tenant's definition.
- A run is a hash at `wf:run:<id>`: `doc` (the run JSON), `_fence` (the newest fencing token that
  wrote it) and copies of `status`, `tenant`, `workflow_id`, `updated` (µs) for reads that need no
  JSON decoding. Keeping the fence in the run's own hash, rather than in a `{wf:run:<id>}:fence`
  string beside it, makes the fenced write a script on ONE key: it runs unchanged on Redis Cluster
  and a run can never lose its fence by expiry or deletion of a second key.
- `update_run` is the spec's split update: (1) one script on `wf:run:<id>` compares fences, stores
  the document and returns the previous status (keeping, like the spec's script, any audit hash
  the stored steps have and the new document lacks); (2) the indexes follow in a pipeline of idempotent
  single-key commands (`run_repeatable`). A crash between the two leaves an index stale, never the
  run; readers of indexes always re-check the hash, and the next update re-writes every index.
- Reads given a tenant treat another tenant's definition or run exactly like a missing one.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Awaitable, Callable, Collection, Iterator, Mapping, Sequence

import trio

from cordum.infra.redis import Redis, score_pairs
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.jobs import JobStore, now_us

log = get_logger("workflows")

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "denied", "cancelled", "timed_out"})
TIMELINE_MAX = 1000
JOB_INDEX_TTL = 30 * 24 * 3600  # `wf:run:job:<id>`: refreshed by every update of its run

# KEYS[1] wf:def:<id>   ARGV[1] tenant   ARGV[2] JSON ("" = delete)
# A definition whose stored org_id is another tenant's is left alone: 'OWNED'.
_PUT_DEFINITION = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, doc = pcall(cjson.decode, cur)
  local owner = ''
  if ok and type(doc) == 'table' and type(doc['org_id']) == 'string' then owner = doc['org_id'] end
  if owner ~= ARGV[1] then return 'OWNED' end
elseif ARGV[2] == '' then
  return 'MISSING'
end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 'OK'
"""

# KEYS[1] wf:run:<id>
# ARGV[1] 'create' | 'update'  ARGV[2] fence  ARGV[3] doc JSON  ARGV[4] status  ARGV[5] updated µs
# ARGV[6] tenant, ARGV[7] workflow id (create only)
# ARGV[8] create: the workflow definition the run follows (JSON, kept in field `definition`).
# ARGV[8] update: '1' when the new doc has a step with a job and no audit_hash (update only): then the
# stored doc's audit hashes of those jobs are looked up, and if any would be lost the write is not
# made: {'AUDIT', JSON {job id: hash}} (the caller copies them in and writes again). The doc is
# never re-encoded here (cjson would turn empty arrays into objects).
# Fence rule: a write whose fence is older than the stored one is refused (0 counts as 0, so once
# a fenced writer has written, unfenced writes are refused too); an equal or newer one wins and
# its fence is stored. Returns {'OK', previous status, tenant, workflow id}.
_WRITE_RUN = """
local exists = redis.call('EXISTS', KEYS[1]) == 1
if ARGV[1] == 'create' then
  if exists then return {'EXISTS', '', '', ''} end
  redis.call('HSET', KEYS[1], 'doc', ARGV[3], '_fence', ARGV[2], 'status', ARGV[4], 'updated', ARGV[5],
             'tenant', ARGV[6], 'workflow_id', ARGV[7])
  if ARGV[8] and ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'definition', ARGV[8]) end
  return {'OK', '', ARGV[6], ARGV[7]}
end
if not exists then return {'MISSING', '', '', ''} end
local held = tonumber(redis.call('HGET', KEYS[1], '_fence') or '0')
local fence = tonumber(ARGV[2])
local prev = redis.call('HGET', KEYS[1], 'status') or ''
if fence < held then return {'STALE', prev, tostring(held), ''} end
if ARGV[8] == '1' then
  local function collect(steps, into, want_missing)
    if type(steps) ~= 'table' then return end
    for _, step in pairs(steps) do
      if type(step) == 'table' then
        local job, hash = step['job_id'], step['audit_hash']
        if type(job) == 'string' and job ~= '' then
          if want_missing then
            if type(hash) ~= 'string' or hash == '' then into[job] = true end
          elseif type(hash) == 'string' and hash ~= '' then
            into[job] = hash
          end
        end
        collect(step['children'], into, want_missing)
      end
    end
  end
  local ok_new, new = pcall(cjson.decode, ARGV[3])
  local ok_old, old = pcall(cjson.decode, redis.call('HGET', KEYS[1], 'doc') or '')
  if ok_new and ok_old and type(new) == 'table' and type(old) == 'table' then
    local missing, held_hashes, lost, any = {}, {}, {}, false
    collect(new['steps'], missing, true)
    collect(old['steps'], held_hashes, false)
    for job, _ in pairs(missing) do
      if held_hashes[job] then lost[job] = held_hashes[job]; any = true end
    end
    if any then return {'AUDIT', prev, cjson.encode(lost), ''} end
  end
end
redis.call('HSET', KEYS[1], 'doc', ARGV[3], '_fence', ARGV[2], 'status', ARGV[4], 'updated', ARGV[5])
return {'OK', prev, redis.call('HGET', KEYS[1], 'tenant') or '', redis.call('HGET', KEYS[1], 'workflow_id') or ''}
"""

# KEYS[1] the timer zset   ARGV[1] now   ARGV[2] limit: due members, removed as they are returned
# (one script, so two pollers never both get a member).
_POP_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do redis.call('ZREM', KEYS[1], member) end
return due
"""

# KEYS[1] a key   ARGV[1] expected value   ARGV[2] new value ("" = delete): compare-and-set.
_COMPARE_AND_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end
return 1
"""


class WorkflowStoreError(Exception):
    pass


class DefinitionOwned(WorkflowStoreError):
    """The definition id is taken by another tenant."""

    def __init__(self, workflow_id: str) -> None:
        super().__init__(f"workflow {workflow_id} belongs to another tenant")
        self.workflow_id = workflow_id


class RunNotFound(WorkflowStoreError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} not found")
        self.run_id = run_id


class RunExists(WorkflowStoreError):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} already exists")
        self.run_id = run_id


class RunFenceStale(WorkflowStoreError):
    """A run write carried an older fencing token than one that already wrote (its lock was lost)."""

    def __init__(self, run_id: str, fence: int, held: int, status: str) -> None:
        super().__init__(f"run {run_id}: write with fence {fence} rejected, fence {held} already wrote")
        self.run_id = run_id
        self.fence = fence
        self.held = held
        self.status = status


def _dumps(doc: Any) -> str:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _loads(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        log.warning("workflows.bad_document", length=len(text))
        return None
    return doc if isinstance(doc, dict) else None


def step_jobs(doc: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """(job id, step path) of every step of a run document that has a job: top-level steps by their
    id, children (for_each/loop items) as `<parent path>/<child key or index>`. A job met twice
    (children are also flattened into the top map) keeps its first, shortest path."""
    seen: set[str] = set()

    def walk(steps: Any, prefix: str) -> Iterator[tuple[str, str]]:
        items = steps.items() if isinstance(steps, Mapping) else enumerate(steps) if isinstance(steps, list) else ()
        for key, step in items:
            if not isinstance(step, Mapping):
                continue
            path = f"{prefix}/{key}" if prefix else str(key)
            job_id = step.get("job_id")
            if isinstance(job_id, str) and job_id and job_id not in seen:
                seen.add(job_id)
                yield job_id, path
            if step.get("children"):
                yield from walk(step["children"], path)

    yield from walk(doc.get("steps") or {}, "")


def _lacks_audit_hash(doc: Mapping[str, Any]) -> bool:
    """Whether some step with a job has no audit hash (one the stored run may have)."""
    return any(step.get("job_id") and not step.get("audit_hash") for step in _all_steps(doc.get("steps")))


def _all_steps(steps: Any) -> Iterator[dict[str, Any]]:
    items = steps.values() if isinstance(steps, Mapping) else steps if isinstance(steps, list) else ()
    for step in items:
        if isinstance(step, dict):
            yield step
            yield from _all_steps(step.get("children"))


def _with_audit_hashes(doc: Mapping[str, Any], hashes: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `doc` whose steps without an audit hash take the one given for their job."""
    copy = json.loads(_dumps(doc))
    for step in _all_steps(copy.get("steps")):
        job_id = step.get("job_id")
        if isinstance(job_id, str) and job_id in hashes and not step.get("audit_hash"):
            step["audit_hash"] = hashes[job_id]
    return copy


def _cursor_text(score: float, member: str) -> str:
    return f"{int(score)}:{member}"


def _parse_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    score, sep, member = cursor.partition(":")
    if not sep or not score.lstrip("-").isdigit():
        raise ValueError(f"bad cursor {cursor!r}")
    return int(score), member


class WorkflowStore:
    #: How long a claimed idempotency key whose run does not exist yet is left to its creator
    #: before another create takes it over (the creator died between the claim and the write).
    IDEMPOTENCY_GRACE = 1.0
    #: A listing page looks at no more than this many index entries per returned item.
    SCAN_FACTOR = 20

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._put_definition = redis.script(_PUT_DEFINITION)
        self._write_run = redis.script(_WRITE_RUN)
        self._pop_due = redis.script(_POP_DUE)
        self._cas = redis.script(_COMPARE_AND_SET)
        self._indexes = JobStore(redis)  # only for its run_repeatable (no I/O of its own)

    # ---- definitions ---------------------------------------------------------------------------

    async def put_definition(self, doc: Mapping[str, Any], tenant: str) -> dict[str, Any]:
        """Create or replace a definition owned by `tenant` (its `org_id`, set when empty). Raises
        DefinitionOwned if the id belongs to another tenant, ValueError on a foreign org_id."""
        doc = dict(doc)
        workflow_id = str(doc.get("id") or "")
        if not workflow_id:
            raise ValueError("definition without an id")
        if doc.get("org_id") and doc["org_id"] != tenant:
            raise ValueError(f"definition org_id {doc['org_id']!r} is not tenant {tenant!r}")
        doc["org_id"] = tenant
        reply = await self._put_definition([keys.wf_def(workflow_id)], [tenant, _dumps(doc)])
        if reply == "OWNED":
            raise DefinitionOwned(workflow_id)
        ts = now_us()
        await self.run_repeatable([("ZADD", keys.wf_index_org(tenant), ts, workflow_id),
                                   ("ZADD", keys.WF_INDEX_ALL, ts, workflow_id)])
        return doc

    async def get_definition(self, workflow_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        doc = _loads(await self._redis.execute("GET", keys.wf_def(workflow_id)))
        if doc is None or (tenant is not None and doc.get("org_id", "") != tenant):
            return None
        return doc

    async def get_definitions(self, workflow_ids: Sequence[str], *, tenant: str | None = None,
                              ) -> list[dict[str, Any] | None]:
        texts = await self._redis.pipeline([("GET", keys.wf_def(w)) for w in workflow_ids]) if workflow_ids else []
        docs = [_loads(t) if isinstance(t, str) else None for t in texts]
        return [d if d is not None and (tenant is None or d.get("org_id", "") == tenant) else None for d in docs]

    async def list_definitions(self, tenant: str, limit: int = 50, cursor: str | None = None,
                               ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first (by last write); `cursor` is the previous page's next cursor."""
        return await self._page(keys.wf_index_org(tenant), limit, cursor,
                                lambda ids: self.get_definitions(ids, tenant=tenant))

    async def delete_definition(self, workflow_id: str, tenant: str) -> bool:
        """False when missing or another tenant's (which is left alone). Runs are kept."""
        reply = await self._put_definition([keys.wf_def(workflow_id)], [tenant, ""])
        if reply != "OK":
            return False
        await self.run_repeatable([("ZREM", keys.wf_index_org(tenant), workflow_id),
                                   ("ZREM", keys.WF_INDEX_ALL, workflow_id)])
        return True

    # ---- runs: writes --------------------------------------------------------------------------

    async def create_run(self, doc: Mapping[str, Any], *, tenant: str, idempotency_key: str | None = None,
                         definition: Mapping[str, Any] | None = None) -> tuple[str, bool]:
        """Store a new run (id generated when the doc has none; `org_id` set to `tenant`) and index
        it, with the `definition` it follows kept beside it (a run goes on following the workflow
        it started with, whatever happens to the definition later). With an idempotency key
        already used by this tenant: (that run's id, False), nothing written. The key is claimed
        first (SET NX), then the run is written; a key whose run never got written (the creator
        crashed in between) is taken over after a short grace."""
        doc = dict(doc)
        run_id = str(doc.get("id") or uuid.uuid4())
        if doc.get("org_id") and doc["org_id"] != tenant:
            raise ValueError(f"run org_id {doc['org_id']!r} is not tenant {tenant!r}")
        doc["id"], doc["org_id"] = run_id, tenant
        doc.setdefault("status", "pending")
        if idempotency_key:
            doc["idempotency_key"] = idempotency_key
            holder = await self._claim_idempotency(tenant, idempotency_key, run_id)
            if holder is not None:
                return holder, False
        status, workflow_id, ts = str(doc["status"]), str(doc.get("workflow_id") or ""), now_us()
        reply = await self._write_run([keys.wf_run(run_id)],
                                      ["create", 0, _dumps(doc), status, ts, tenant, workflow_id,
                                       _dumps(definition) if definition is not None else ""])
        if reply[0] == "EXISTS":
            if idempotency_key:
                await self._cas([keys.wf_run_idempotency(tenant, idempotency_key)], [run_id, ""])
            raise RunExists(run_id)
        await self.run_repeatable(self._index_commands(run_id, doc, None, status, tenant, workflow_id, ts))
        return run_id, True

    async def _claim_idempotency(self, tenant: str, key: str, run_id: str) -> str | None:
        """None when `key` is now ours, else the run id holding it."""
        name = keys.wf_run_idempotency(tenant, key)
        for attempt in range(3):
            claimed, holder = await self._redis.pipeline([("SET", name, run_id, "NX"), ("GET", name)])
            if claimed:
                return None
            if holder is None:  # deleted in between: claim again
                continue
            if await self._redis.execute("EXISTS", keys.wf_run(holder)):
                return holder
            # The holder's run is not written yet: its creator is between the two steps, or died.
            await trio.sleep(self.IDEMPOTENCY_GRACE)
            if await self._redis.execute("EXISTS", keys.wf_run(holder)):
                return holder
            if await self._cas([name], [holder, run_id]):
                return None
        return await self._redis.execute("GET", name)

    async def update_run(self, doc: Mapping[str, Any], *, fence: int, timeline: Sequence[Mapping[str, Any]] = (),
                         indexed_jobs: Collection[str] = ()) -> str:
        """Store a run document under fencing token `fence` and move its indexes; returns the
        previous status. RunFenceStale if a newer fence already wrote, RunNotFound if missing. The
        run's tenant and workflow stay those it was created with. `timeline` events are appended
        in the same round trip as the indexes; `indexed_jobs`: step jobs whose reverse index an
        earlier write of this run made already (not written again)."""
        run_id = str(doc.get("id") or "")
        if not run_id:
            raise ValueError("run document without an id")
        status, ts = str(doc.get("status") or "pending"), now_us()
        check = "1" if _lacks_audit_hash(doc) else ""
        for _ in range(3):
            reply = await self._write_run([keys.wf_run(run_id)],
                                          ["update", int(fence), _dumps(doc), status, ts, "", "", check])
            if reply[0] != "AUDIT":
                break
            # The stored run has audit hashes this doc lacks (spec §2.12): keep them, write again.
            doc = _with_audit_hashes(doc, json.loads(reply[2]))
        else:
            raise WorkflowStoreError(f"run {run_id}: audit hashes kept changing under the write")
        if reply[0] == "MISSING":
            raise RunNotFound(run_id)
        if reply[0] == "STALE":
            raise RunFenceStale(run_id, int(fence), int(reply[2]), reply[1])
        previous, tenant, workflow_id = reply[1], reply[2], reply[3]
        commands = self._index_commands(run_id, doc, previous, status, tenant, workflow_id, ts, indexed_jobs)
        if timeline:
            key = keys.wf_run_timeline(run_id)
            commands += [("RPUSH", key, *(_dumps(dict(e)) for e in timeline)), ("LTRIM", key, -TIMELINE_MAX, -1)]
        await self.run_repeatable(commands)
        return previous

    def _index_commands(self, run_id: str, doc: Mapping[str, Any], previous: str | None, status: str,
                        tenant: str, workflow_id: str, ts: int, indexed_jobs: Collection[str] = (),
                        ) -> list[tuple[Any, ...]]:
        commands: list[tuple[Any, ...]] = [
            ("ZADD", keys.WF_RUNS_ALL, ts, run_id),
            ("ZADD", keys.wf_runs_org(tenant), ts, run_id),
            ("ZADD", keys.wf_runs_status(status), ts, run_id),
            ("SREM" if status in TERMINAL_STATUSES else "SADD", keys.wf_runs_active(tenant), run_id),
        ]
        if workflow_id:
            commands.append(("ZADD", keys.wf_runs(workflow_id), ts, run_id))
        if previous and previous != status:
            commands.append(("ZREM", keys.wf_runs_status(previous), run_id))
        for job_id, path in step_jobs(doc):
            if job_id in indexed_jobs:
                continue
            commands.append(("SET", keys.wf_run_job(job_id), _dumps({"run_id": run_id, "step_path": path}),
                             "EX", JOB_INDEX_TTL))
        return commands

    async def run_repeatable(self, commands: Sequence[tuple[Any, ...]], *, tries: int = 3) -> bool:
        """Index upkeep: idempotent commands in a pipeline, failed ones re-run (JobStore's helper;
        False when some still failed: the next update of the run re-writes them)."""
        return await self._indexes.run_repeatable(commands, tries=tries)

    async def delete_run(self, run_id: str, tenant: str) -> bool:
        """Delete a run, its timeline, job reverse entries (those still pointing at it), index
        entries, delay timer and idempotency key; False when missing or another tenant's."""
        found = await self._redis.execute("HMGET", keys.wf_run(run_id), "tenant", "workflow_id", "status", "doc")
        stored_tenant, workflow_id, status, text = found
        if text is None or stored_tenant != tenant:
            return False
        doc = _loads(text) or {}
        await self._redis.execute("DEL", keys.wf_run(run_id))
        commands: list[tuple[Any, ...]] = [
            ("ZREM", keys.WF_RUNS_ALL, run_id),
            ("ZREM", keys.wf_runs_org(tenant), run_id),
            ("SREM", keys.wf_runs_active(tenant), run_id),
            ("DEL", keys.wf_run_timeline(run_id)),
        ]
        if status:
            commands.append(("ZREM", keys.wf_runs_status(status), run_id))
        if workflow_id:
            commands += [("ZREM", keys.wf_runs(workflow_id), run_id),
                         ("ZREM", keys.WF_DELAY_TIMERS, f"{workflow_id}:{run_id}")]
        await self.run_repeatable(commands)
        for job_id, _ in step_jobs(doc):
            entry = await self._redis.execute("GET", keys.wf_run_job(job_id))
            if entry is not None and (_loads(entry) or {}).get("run_id") == run_id:
                await self._cas([keys.wf_run_job(job_id)], [entry, ""])
        key = doc.get("idempotency_key")
        if isinstance(key, str) and key:
            await self._cas([keys.wf_run_idempotency(tenant, key)], [run_id, ""])
        return True

    # ---- runs: reads ---------------------------------------------------------------------------

    async def get_run(self, run_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The run document, or None if unknown — or another tenant's when `tenant` is given."""
        stored_tenant, text = await self._redis.execute("HMGET", keys.wf_run(run_id), "tenant", "doc")
        if text is None or (tenant is not None and stored_tenant != tenant):
            return None
        return _loads(text)

    async def get_run_with_definition(self, run_id: str, *, definition: bool = True,
                                      ) -> tuple[dict[str, Any] | None, str | None]:
        """(run document, the definition JSON it follows — None for a run stored without one, or
        when not asked for: `definition=False` for a caller that has it already) in one round trip."""
        if not definition:
            return await self.get_run(run_id), None
        text, kept = await self._redis.execute("HMGET", keys.wf_run(run_id), "doc", "definition")
        return (_loads(text) if text is not None else None), kept

    async def run_fence(self, run_id: str) -> int | None:
        """The fencing token of the last fenced write (0 if none), None if the run is missing."""
        fence = await self._redis.execute("HGET", keys.wf_run(run_id), "_fence")
        return None if fence is None else int(fence)

    async def get_runs(self, run_ids: Sequence[str], *, tenant: str | None = None, workflow_id: str | None = None,
                       status: str | None = None) -> list[dict[str, Any] | None]:
        """Many runs in one round trip; None for a missing one or one not matching the filters."""
        if not run_ids:
            return []
        rows = await self._redis.pipeline(
            [("HMGET", keys.wf_run(r), "tenant", "workflow_id", "status", "doc") for r in run_ids])
        found: list[dict[str, Any] | None] = []
        for row in rows:
            if not isinstance(row, list) or row[3] is None or (tenant is not None and row[0] != tenant) \
                    or (workflow_id is not None and row[1] != workflow_id) or (status is not None and row[2] != status):
                found.append(None)
            else:
                found.append(_loads(row[3]))
        return found

    async def list_runs(self, tenant: str, *, workflow_id: str | None = None, status: str | None = None,
                        limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """A tenant's runs, most recently updated first, optionally of one workflow and/or in one
        status; `cursor` is the previous page's next cursor."""
        index = keys.wf_runs(workflow_id) if workflow_id else keys.wf_runs_org(tenant)
        return await self._page(index, limit, cursor,
                                lambda ids: self.get_runs(ids, tenant=tenant, workflow_id=workflow_id, status=status))

    async def runs_in_status(self, status: str, limit: int = 200, *, updated_before_us: int | None = None,
                             updated_after_us: int | None = None) -> list[tuple[str, int]]:
        """(run id, updated µs) of runs in a status (all tenants), least recently updated first,
        updated after `updated_after_us` (exclusive) and by `updated_before_us`: the reconciler's
        scan, a page at a time. The index may be stale: re-check the run."""
        high = "+inf" if updated_before_us is None else updated_before_us
        low = "-inf" if updated_after_us is None else f"({updated_after_us}"
        reply = await self._redis.execute("ZRANGEBYSCORE", keys.wf_runs_status(status), low, high,
                                          "WITHSCORES", "LIMIT", 0, limit)
        return [(member, int(score)) for member, score in score_pairs(reply)]

    async def recent_runs_in_status(self, status: str, *, since_us: int, limit: int = 200) -> list[str]:
        """Run ids in a status updated since `since_us`, newest first (all tenants)."""
        return await self._redis.execute("ZREVRANGEBYSCORE", keys.wf_runs_status(status), "+inf", since_us,
                                         "LIMIT", 0, limit)

    async def active_runs(self, tenant: str) -> int:
        """Non-terminal runs of a tenant (the concurrency limit's count)."""
        return int(await self._redis.execute("SCARD", keys.wf_runs_active(tenant)))

    async def _page(self, index: str, limit: int, cursor: str | None,
                    load: Callable[[list[str]], Awaitable[list[dict[str, Any] | None]]],
                    ) -> tuple[list[dict[str, Any]], str | None]:
        """Walk a zset newest first, keeping what `load` returns (None = filtered out or stale).
        The cursor is `<score>:<member>` of the last entry looked at: ties of equal score come in
        reverse member order, so the next page starts at that score and skips the members not
        after it. At most SCAN_FACTOR × limit entries are looked at per call, so a filter that
        rarely matches returns a short page (with a cursor) instead of walking the whole index."""
        if limit <= 0:
            return [], None
        after = _parse_cursor(cursor)
        high = "+inf" if after is None else str(after[0])
        batch = max(10, min(500, limit * 2))
        found: list[dict[str, Any]] = []
        last: tuple[float, str] | None = None
        offset, scanned, more = 0, 0, True
        while more and len(found) < limit:
            reply = await self._redis.execute("ZREVRANGEBYSCORE", index, high, "-inf", "WITHSCORES",
                                              "LIMIT", offset, batch)
            pairs = score_pairs(reply)
            offset += len(pairs)
            more = len(pairs) == batch
            if after is not None:
                pairs = [(m, s) for m, s in pairs if not (int(s) == after[0] and m >= after[1])]
            docs = await load([m for m, _ in pairs]) if pairs else []
            for position, ((member, score), doc) in enumerate(zip(pairs, docs)):
                last = (score, member)
                scanned += 1
                if doc is not None:
                    found.append(doc)
                if len(found) == limit:
                    more = more or position + 1 < len(pairs)
                    break
            if scanned >= self.SCAN_FACTOR * limit:
                break
        return found, (_cursor_text(*last) if more and last is not None else None)

    # ---- timeline ------------------------------------------------------------------------------

    async def append_timeline(self, run_id: str, *events: Mapping[str, Any]) -> None:
        """Append events (in order, one round trip), keeping the newest TIMELINE_MAX."""
        if not events:
            return
        key = keys.wf_run_timeline(run_id)
        await self._redis.pipeline([("RPUSH", key, *(_dumps(dict(e)) for e in events)),
                                    ("LTRIM", key, -TIMELINE_MAX, -1)])

    async def timeline(self, run_id: str, tenant: str | None = None, *, limit: int | None = None,
                       ) -> list[dict[str, Any]] | None:
        """The run's events, oldest first (the newest `limit` if given); None when the run is
        missing or another tenant's."""
        stored_tenant = await self._redis.execute("HGET", keys.wf_run(run_id), "tenant")
        if stored_tenant is None or (tenant is not None and stored_tenant != tenant):
            return None
        start = -limit if limit else 0
        events = await self._redis.execute("LRANGE", keys.wf_run_timeline(run_id), start, -1)
        return [e for e in (_loads(text) for text in events) if e is not None]

    # ---- job reverse index ---------------------------------------------------------------------

    async def run_for_job(self, job_id: str) -> tuple[str, str] | None:
        """(run id, step path) of the step that dispatched `job_id`."""
        entry = _loads(await self._redis.execute("GET", keys.wf_run_job(job_id)))
        if not entry or not entry.get("run_id"):
            return None
        return str(entry["run_id"]), str(entry.get("step_path") or "")

    # ---- delay timers --------------------------------------------------------------------------

    async def arm_timer(self, member: str, due_unix: float) -> None:
        """Arm (or move) a delay timer; the engine's members are `<workflow id>:<run id>`."""
        await self._redis.execute("ZADD", keys.WF_DELAY_TIMERS, due_unix, member)

    async def arm_timer_earlier(self, member: str, due_unix: float) -> None:
        """Arm a timer unless it is armed for an earlier time already (one round trip). A run's
        engine re-arms its next wake after every advance, so an early timer costs one no-op
        advance and never hides a later due time."""
        await self._redis.execute("ZADD", keys.WF_DELAY_TIMERS, "LT", due_unix, member)

    async def disarm_timer(self, member: str) -> None:
        await self._redis.execute("ZREM", keys.WF_DELAY_TIMERS, member)

    async def pop_due_timers(self, now_unix: float, limit: int = 100) -> list[str]:
        """Take the timers due by `now_unix` (each is handed to exactly one caller)."""
        return list(await self._pop_due([keys.WF_DELAY_TIMERS], [now_unix, limit]))

    async def timer_due(self, member: str) -> float | None:
        score = await self._redis.execute("ZSCORE", keys.WF_DELAY_TIMERS, member)
        return None if score is None else float(score)
