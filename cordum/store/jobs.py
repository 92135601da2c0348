"""The job store: Redis layout of spec cordum-jobpath §2.4, with guarded, fenced transitions.

Every state change is one Lua script on the job's own hash (`job:meta:<id>`, a single key, so it
runs unchanged on Redis Cluster): it checks the transition table and the fencing token, writes the
new state and fields, and returns the previous state. The indexes (`job:index:<state>`, recent,
tenant-active, deadline, events, legacy state mirror) follow in one pipeline: idempotent upserts
and removals, so a crash between the two steps leaves an index stale but never the job itself; the
readers of indexes (reconciler, replayer, listings) always re-check the hash.

On a single Redis server (no cluster), when the caller knows the job's tenant, the same script also
makes the index writes (from their keys: `_Upkeep`) and runs any follow-ups (such as the decision
log) itself: a state change is then one round trip. Those keys are passed as data rather than
KEYS, which only a single server allows; on a cluster the two-step form above is used, with the
same writes as commands (`_index_commands`).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping, NamedTuple, Sequence

from google.protobuf import json_format

from cordum.agent.v1.job_pb2 import JobRequest, JobResult
import trio

from cordum.infra.redis import NoScriptError, Redis, RedisError, RedisUnavailable, score_pairs
from cordum.runtime.log import get_logger
from cordum.store import keys, output
from cordum.store.jobstate import TERMINAL, TRANSITIONS, JobState, increments_attempts, parse_state

log = get_logger("jobs")

DAY = 24 * 3600
META_TTL = 7 * DAY
DATA_TTL = DAY
IDEMPOTENCY_TTL = 90 * DAY
RECENT_MAX = 1000
TENANT_RECENT_MAX = 10_000

_NON_TERMINAL = [s for s in JobState if s not in TERMINAL]
# States a job is held in for people to act on: indexed per tenant (keys.tenant_state_index), so
# `/api/v1/approvals` reads one small index. Writing it costs nothing on the job path: a job enters
# or leaves it only through approval.
TENANT_INDEXED_STATES = frozenset({JobState.APPROVAL_REQUIRED})
# The index sweep leaves alone a job changed this recently: its index writes may be on their way.
REPAIR_SETTLE_US = 5_000_000
# A listing filtered by state or topic looks at most this many recent jobs per request; past it
# the page comes back short, with a cursor to go on from (bounded work per request).
LIST_SCAN_BUDGET = 1000

# KEYS[1] job:meta:<id>; with KEYS[2] the job's lock and KEYS[3] its fence counter, the write is
# made only while nobody holds the lock, under the next fence (as if the lock were taken and given
# back around it: see JobStore.transition's `unlocked`)
# ARGV[1] to-state ("" = fields only)  ARGV[2] allowed from-states, comma separated, "" entry = no
# state yet  ARGV[3] fence (0 = unfenced)  ARGV[4] now µs  ARGV[5] ttl s
# ARGV[6] how many follow-up commands (standalone Redis only: see JobStore.transition)
# ARGV[7] prefix of the state indexes and ARGV[8] the job id, for the state indexes
# ARGV[9] the from-states whose move to `to` counts a scheduling attempt (jobstate.increments_attempts)
# ARGV[10] how many conditions: each field must hold exactly its value ("" = absent), else nothing
# is written
# ARGV[11] how many index-upkeep arguments follow (0, or the UPKEEP_ARGS of `_Upkeep`: standalone
# Redis only): the move's index writes (jobpath §2.4), made here from their keys rather than sent
# as whole commands (side by side: a fifth less of Redis's CPU and of ours per state change)
# ARGV[12..] the upkeep, the conditions (field, value), then the follow-up commands (each its
# length, then its parts), then the fields to set (field, value). Flat, not JSON: decoding a JSON
# argument cost about a sixth of the script's time in Redis, and encoding it as much again on our side.
_UPDATE = """
local now = redis.call('HMGET', KEYS[1], 'state', '_fence', 'attempts')
local cur = now[1] or ''
local to = ARGV[1]
if to ~= '' then
  if not string.find(ARGV[2], ',' .. cur .. ',', 1, true) then
    return {'INVALID', cur}
  end
elseif cur == '' then
  return {'MISSING', cur}
end
local u = 12
local i = u + tonumber(ARGV[11])
for _ = 1, tonumber(ARGV[10]) do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') ~= ARGV[i + 1] then return {'CHANGED', cur, ARGV[i]} end
  i = i + 2
end
local follow = i
for _ = 1, tonumber(ARGV[6]) do i = i + tonumber(ARGV[i]) + 1 end
local fence = tonumber(ARGV[3])
if #KEYS == 3 then
  if redis.call('EXISTS', KEYS[2]) == 1 then return {'BUSY', cur} end
  fence = redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], %(fence_ttl_ms)d)
end
local held = tonumber(now[2] or '0')
local attempts = tonumber(now[3] or '0')
local set = {}
if fence > 0 then
  if fence < held then return {'STALE', cur, tostring(held)} end
  set = {'_fence', fence}
end
if to ~= '' then
  if string.find(ARGV[9], ',' .. cur .. ',', 1, true) then attempts = attempts + 1 end
  local n = #set
  set[n + 1], set[n + 2], set[n + 3], set[n + 4], set[n + 5], set[n + 6] =
    'state', to, 'updated_at', ARGV[4], 'attempts', attempts
end
for j = i, #ARGV do set[#set + 1] = ARGV[j] end
if #set > 0 then redis.call('HSET', KEYS[1], unpack(set)) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
if ARGV[11] ~= '0' then
  local job, ts, ttl = ARGV[8], ARGV[4], ARGV[5]
  redis.call('SET', ARGV[u], to, 'EX', ttl)
  redis.call('ZADD', ARGV[7] .. string.lower(to), ts, job)
  redis.call('ZADD', ARGV[u + 3], ts, job)
  if ARGV[u + 4] ~= '0' then redis.call('ZREMRANGEBYRANK', ARGV[u + 3], 0, -tonumber(ARGV[u + 4]) - 1) end
  redis.call('RPUSH', ARGV[u + 1], ARGV[u + 2])
  redis.call('EXPIRE', ARGV[u + 1], ttl)
  if ARGV[u + 5] ~= '' then
    redis.call('ZADD', ARGV[u + 5], ts, job)
    if ARGV[u + 6] ~= '0' then redis.call('ZREMRANGEBYRANK', ARGV[u + 5], 0, -tonumber(ARGV[u + 6]) - 1) end
    redis.call(ARGV[u + 8], ARGV[u + 7], job)
  end
  if ARGV[u + 9] ~= '' then redis.call('ZREM', ARGV[u + 9], job) end
  if cur ~= '' and cur ~= to then redis.call('ZREM', ARGV[7] .. string.lower(cur), job) end
end
while follow < i do
  local n = tonumber(ARGV[follow])
  redis.call(unpack(ARGV, follow + 1, follow + n))
  follow = follow + n + 1
end
return {'OK', cur, tostring(attempts), redis.call('HGET', KEYS[1], 'tenant') or ''}
""" % {"fence_ttl_ms": keys.FENCE_TTL_MS}


def _meta_of(job_id: str, raw: Any, tenant: str | None) -> dict[str, Any] | None:
    if not raw or "state" not in raw:
        return None
    if tenant is not None and raw.get("tenant", "") != tenant:
        return None
    meta = decode_meta(raw)
    meta["id"] = job_id
    return meta


class JobStoreError(Exception):
    pass


class JobNotFound(JobStoreError):
    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class InvalidTransition(JobStoreError):
    def __init__(self, job_id: str, current: str, target: str) -> None:
        super().__init__(f"job {job_id}: invalid transition {current or '(none)'} -> {target}")
        self.job_id = job_id
        self.current = parse_state(current)
        self.target = target


class ConditionFailed(JobStoreError):
    """A guarded write found a field changed (e.g. the attempt moved on, or a worker claimed it)."""

    def __init__(self, job_id: str, current: str, field: str) -> None:
        super().__init__(f"job {job_id}: {field} changed")
        self.job_id = job_id
        self.current = parse_state(current)
        self.field = field


class LockHeld(JobStoreError):
    """A write to be made only while nobody holds the job's lock (`unlocked`) found it held."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id}: its lock is held")
        self.job_id = job_id


class StaleFence(JobStoreError):
    def __init__(self, job_id: str, fence: int, held: int) -> None:
        super().__init__(f"job {job_id}: write with fence {fence} rejected, fence {held} already wrote")
        self.job_id = job_id
        self.fence = fence
        self.held = held


@dataclass(frozen=True)
class Transition:
    job_id: str
    previous: JobState | None
    state: JobState
    attempts: int
    tenant: str


def now_us() -> int:
    return int(time.time() * 1_000_000)


def _encode(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, bool):
        return "true" if value else ""
    return str(value)


JSON_FIELDS = frozenset({"labels", "risk_tags", "requires", "safety_remediations", "safety_constraints"})


SCAN_FIELDS = ("state", "updated_at", "tenant", "worker_id")  # what scan_jobs reads of each job


def decode_meta(raw: Mapping[str, str]) -> dict[str, Any]:
    """A meta hash as Python values (JSON fields parsed, numbers as ints)."""
    meta: dict[str, Any] = dict(raw)
    for name in JSON_FIELDS & meta.keys():
        try:
            meta[name] = json.loads(meta[name]) if meta[name] else None
        except ValueError:
            pass
    for name in ("attempts", "updated_at", "deadline_unix", "_fence"):
        if meta.get(name, "").lstrip("-").isdigit():
            meta[name] = int(meta[name])
    return meta


def request_to_json(request: JobRequest) -> str:
    return json_format.MessageToJson(request, preserving_proto_field_name=True, indent=None)


def request_from_json(text: str) -> JobRequest:
    return json_format.Parse(text, JobRequest(), ignore_unknown_fields=True)


def result_to_json(result: JobResult) -> str:
    return json_format.MessageToJson(result, preserving_proto_field_name=True, indent=None)


def result_from_json(text: str) -> JobResult:
    return json_format.Parse(text, JobResult(), ignore_unknown_fields=True)


class JobStore:
    def __init__(self, redis: Redis, *, meta_ttl: int = META_TTL, data_ttl: int = DATA_TTL) -> None:
        self._redis = redis
        self._update = redis.script(_UPDATE)
        self.meta_ttl = meta_ttl
        self.data_ttl = data_ttl

    # ---- writes --------------------------------------------------------------------------------

    async def create(
        self,
        job_id: str,
        state: JobState,
        *,
        request: JobRequest,
        fields: Mapping[str, Any],
        context: Any = None,
        decision: Mapping[str, Any] | None = None,
    ) -> Transition:
        """Create a job in `state` with its meta, request snapshot, trace, (optional) input
        context and (optional) first policy decision, in one round trip. Raises
        InvalidTransition if the job already exists."""
        after: list[tuple[Any, ...]] = [("SET", keys.job_request(job_id), request_to_json(request), "EX", self.meta_ttl)]
        if decision is not None:
            after += self.decision_commands(job_id, decision)
        if context is not None:
            after.append(("SET", keys.context(job_id), json.dumps(context), "EX", self.data_ttl))
        trace_id = str(fields.get("trace_id") or "")
        if trace_id:
            after += [("SADD", keys.trace(trace_id), job_id), ("EXPIRE", keys.trace(trace_id), self.meta_ttl)]
        if fields.get("deadline_unix"):
            after.append(("ZADD", keys.JOB_DEADLINE, int(fields["deadline_unix"]), job_id))
        if self._redis.cluster:
            # The request and input are written first: a job whose hash exists can be re-driven.
            await self._redis.pipeline(after)
            after = []
        return await self.transition(job_id, state, fields=fields, allowed_from=[None],
                                     tenant=str(fields.get("tenant", "")), after=after)

    async def transition(
        self,
        job_id: str,
        to: JobState,
        *,
        fence: int = 0,
        fields: Mapping[str, Any] | None = None,
        allowed_from: Iterable[JobState | None] | None = None,
        event: Mapping[str, Any] | None = None,
        tenant: str | None = None,
        after: Sequence[tuple[Any, ...]] = (),
        expect: Mapping[str, Any] | None = None,
        along: Callable[[], Callable[[], Awaitable[Any]]] | None = None,
        unlocked: str | None = None,
    ) -> Transition:
        """Move `job_id` to `to` if the table (or `allowed_from`, which narrows or replaces it)
        allows it from the current state, the fence is not older than the last fenced write, and
        every `expect` field holds its value (else ConditionFailed). `after`: more commands to run
        once the transition is made (decision log, worker history). `along`: queues one more
        command right behind the transition's script, in its round trip (a lock's release after
        its last write), whatever the transition's outcome; awaited before this returns.
        `unlocked` (a lock key; one server only): the move is made only while nobody holds that
        lock (else LockHeld), and takes the lock's next fence itself, so it is what a holder of
        the lock would write in one step, and a paused earlier holder's writes are stale after it.

        On a single Redis server, when the caller knows the job's tenant, the whole change
        (state, indexes, events, `after`) is one script: one round trip. On a cluster the script
        touches only the job's hash, and the rest follows in a pipeline (see module docstring)."""
        sources = _allowed_sources(to) if allowed_from is None else set(allowed_from)
        ts = now_us()
        if tenant is not None and not self._redis.cluster:
            created = all(source is None for source in sources)
            upkeep = self._upkeep(job_id, to, tenant, ts, event, created=created)
            follow = _tenant_state_commands(job_id, to, tenant, ts, left=sources) + list(after)
            reply = await self._run_update(job_id, to.value, sources, fence, fields, ts=ts, follow=follow,
                                           expect=expect, along=along, unlocked=unlocked, upkeep=upkeep)
            previous, attempts = parse_state(reply[1]), int(reply[2])
            return Transition(job_id, previous, to, attempts, reply[3])
        if unlocked is not None:
            raise ValueError("an unlocked transition needs the job's tenant and a single Redis server")
        reply = await self._run_update(job_id, to.value, sources, fence, fields, ts=ts, expect=expect, along=along)
        previous, attempts, stored_tenant = parse_state(reply[1]), int(reply[2]), reply[3]
        await self.run_repeatable(self._index_commands(job_id, previous, to, stored_tenant, ts, event) + list(after))
        return Transition(job_id, previous, to, attempts, stored_tenant)

    async def run_repeatable(self, commands: Sequence[tuple[Any, ...]], *, tries: int = 3) -> bool:
        """Run commands that may run twice (index upkeep) in a pipeline, re-running the ones that
        failed. False when some still failed: the index sweep repairs what they left out."""
        pending = list(commands)
        for attempt in range(tries):
            if not pending:
                return True
            try:
                replies = await self._redis.pipeline(pending)
            except Exception as exc:  # the connection broke: every command is in doubt, run them again
                log.warning("jobs.index_write_failed", error=repr(exc), attempt=attempt + 1)
                replies = [exc] * len(pending)
            pending = [command for command, reply in zip(pending, replies) if isinstance(reply, Exception)]
            if pending and attempt + 1 < tries:
                await trio.sleep(0.05 * 2**attempt)
        if pending:
            log.warning("jobs.index_write_abandoned", commands=len(pending))
        return not pending

    async def cancel(self, job_id: str, reason: str) -> Transition:
        """CANCELLED unless already terminal (bypasses the table, spec §2.8); the returned
        transition's state is the job's state afterwards."""
        try:
            return await self.transition(
                job_id, JobState.CANCELLED, allowed_from=_NON_TERMINAL,
                fields={"failure_reason": reason}, event={"reason": reason},
            )
        except InvalidTransition as exc:
            if exc.current is None:
                raise JobNotFound(job_id) from None
            meta = await self.get(job_id)
            return Transition(job_id, exc.current, exc.current, int(meta.get("attempts", 0)) if meta else 0,
                              meta.get("tenant", "") if meta else "")

    async def set_fields(self, job_id: str, fields: Mapping[str, Any], *, fence: int = 0,
                         expect: Mapping[str, Any] | None = None, after: Sequence[tuple[Any, ...]] = ()) -> None:
        """Update fields of an existing job (no state change), fenced and guarded like a transition;
        `after` runs once the update is made (in the same script on one server)."""
        if self._redis.cluster:
            await self._run_update(job_id, "", set(), fence, fields, expect=expect)
            await self.run_repeatable(after)
        else:
            await self._run_update(job_id, "", set(), fence, fields, expect=expect, follow=after)

    async def _run_update(
        self, job_id: str, to: str, sources: set[JobState | None], fence: int, fields: Mapping[str, Any] | None,
        *, ts: int | None = None, follow: Sequence[tuple[Any, ...]] = (), expect: Mapping[str, Any] | None = None,
        along: Callable[[], Callable[[], Awaitable[Any]]] | None = None, unlocked: str | None = None,
        upkeep: _Upkeep | None = None,
    ) -> list[str]:
        allowed, counting = _source_lists(to, sources)
        args: list[Any] = [to, allowed, fence, ts or now_us(), self.meta_ttl, len(follow), _INDEX_PREFIX, job_id,
                           counting, len(expect) if expect else 0]
        if upkeep is None:
            args.append(0)
        else:
            args.append(UPKEEP_ARGS)
            args += upkeep
        for name, value in (expect or {}).items():
            args += [name, _encode(value)]
        for command in follow:
            args.append(len(command))
            args += command
        for name, value in (fields or {}).items():
            args += [name, _encode(value)]
        keys_ = [keys.job_meta(job_id)]
        if unlocked is not None:
            keys_ += [unlocked, keys.fence_counter(unlocked)]
        if along is None:
            reply = await self._update(keys_, args)
        else:
            reply = await self._update_along(keys_, args, along)
        status = reply[0]
        if status == "OK":
            return reply
        if status == "MISSING":
            raise JobNotFound(job_id)
        if status == "STALE":
            raise StaleFence(job_id, fence, int(reply[2]))
        if status == "CHANGED":
            raise ConditionFailed(job_id, reply[1], reply[2])
        if status == "BUSY":
            raise LockHeld(job_id)
        raise InvalidTransition(job_id, reply[1], to)

    async def _update_along(self, keys_: list[str], args: list[Any],
                            along: Callable[[], Callable[[], Awaitable[Any]]]) -> list[str]:
        """The update script and `along`'s command in one round trip; `along`'s reply is awaited
        too (it handles its own failures), whatever the update's. A server without the update
        script (restarted) has run `along` all the same (a lock's release): the write is not
        made after it; the script is loaded and NoScriptError raised, for the caller to try
        again (a consumer redelivers the message)."""
        update = self._update.call_later(keys_, args)
        other = along()
        try:
            try:
                return await update()
            except NoScriptError:
                await self._redis.script_load(self._update.lua)
                raise
        finally:
            try:
                await other()
            except (RedisError, *RedisUnavailable) as exc:  # e.g. a lock left to expire: logged, not raised
                log.warning("jobs.along_failed", job_id=keys_[0], error=repr(exc))

    def _upkeep(self, job_id: str, to: JobState, tenant: str, ts: int, event: Mapping[str, Any] | None, *,
                created: bool) -> _Upkeep:
        """The index upkeep of a move to `to` (jobpath §2.4), as the update script takes it. The
        recent lists grow by a job when it is created: they are trimmed then, not on every move of
        a job already in them (a job trimmed out and moved later is one extra member until the
        next creation trims it)."""
        record = {"ts": ts, "state": to.value, **({"ctx": dict(event)} if event else {})}
        return _Upkeep(keys.job_state(job_id), keys.job_events(job_id), json.dumps(record, separators=(",", ":")),
                       keys.JOB_RECENT, RECENT_MAX if created else 0,
                       keys.tenant_recent(tenant) if tenant else "", TENANT_RECENT_MAX if created else 0,
                       keys.tenant_active(tenant) if tenant else "", "SREM" if to in TERMINAL else "SADD",
                       keys.JOB_DEADLINE if to in TERMINAL else "")

    def _index_commands(
        self, job_id: str, previous: JobState | None, to: JobState, tenant: str, ts: int,
        event: Mapping[str, Any] | None,
    ) -> list[tuple[Any, ...]]:
        """The index upkeep of a move from `previous` to `to` as commands (on a cluster, where they
        follow the script in a pipeline): the very writes the script makes from `_upkeep`."""
        up = self._upkeep(job_id, to, tenant, ts, event, created=previous is None)
        commands: list[tuple[Any, ...]] = [
            ("SET", up.state_key, to.value, "EX", self.meta_ttl),
            ("ZADD", keys.job_index(to.value), ts, job_id),
            ("ZADD", up.recent_key, ts, job_id),
            *([("ZREMRANGEBYRANK", up.recent_key, 0, -up.recent_trim - 1)] if up.recent_trim else []),
            ("RPUSH", up.events_key, up.record),
            ("EXPIRE", up.events_key, self.meta_ttl),
        ]
        if up.tenant_recent_key:
            commands.append(("ZADD", up.tenant_recent_key, ts, job_id))
            if up.tenant_recent_trim:
                commands.append(("ZREMRANGEBYRANK", up.tenant_recent_key, 0, -up.tenant_recent_trim - 1))
            commands.append((up.active_op, up.active_key, job_id))
        if up.deadline_key:
            commands.append(("ZREM", up.deadline_key, job_id))
        if previous is not None and previous != to:
            commands.append(("ZREM", keys.job_index(previous.value), job_id))
        left = {previous} if previous is not None else set()
        return commands + _tenant_state_commands(job_id, to, tenant, ts, left=left)

    async def set_deadline(self, job_id: str, deadline_us: int, *, fence: int = 0) -> None:
        await self.set_fields(job_id, {"deadline_unix": deadline_us}, fence=fence)
        await self.run_repeatable([("ZADD", keys.JOB_DEADLINE, deadline_us, job_id)])

    async def store_request(self, job_id: str, request: JobRequest) -> None:
        await self._redis.execute("SET", keys.job_request(job_id), request_to_json(request), "EX", self.meta_ttl)

    def decision_commands(self, job_id: str, record: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Appending a safety decision to the job's log (to run with a transition's `after`)."""
        return [("RPUSH", keys.job_decisions(job_id), json.dumps(record, separators=(",", ":"), default=str)),
                ("EXPIRE", keys.job_decisions(job_id), self.meta_ttl)]

    def worker_history_commands(self, worker_id: str, job_id: str) -> list[tuple[Any, ...]]:
        key = keys.worker_jobs(worker_id)
        return [("ZADD", key, now_us(), job_id), ("ZREMRANGEBYRANK", key, 0, -RECENT_MAX - 1)]

    @staticmethod
    def dlq_pending_commands(job_id: str, *, pending: bool) -> list[tuple[Any, ...]]:
        """`job:dlq:pending` lists the finished jobs whose DLQ event has not gone out yet."""
        if pending:
            return [("ZADD", keys.JOB_DLQ_PENDING, now_us(), job_id)]
        return [("ZREM", keys.JOB_DLQ_PENDING, job_id)]

    async def dlq_pending(self, *, marked_before_us: int, limit: int = 200) -> list[str]:
        return await self._redis.execute("ZRANGEBYSCORE", keys.JOB_DLQ_PENDING, "-inf", marked_before_us,
                                         "LIMIT", 0, limit)

    async def output_pending(self, *, listed_before_us: int, limit: int = 100) -> list[str]:
        """SUCCEEDED jobs whose output content check was listed before then and is still due."""
        return list(await self._redis.execute("ZRANGEBYSCORE", keys.JOB_OUTPUT_PENDING, "-inf", listed_before_us,
                                              "LIMIT", 0, limit))

    @staticmethod
    def inflight_commands(worker_id: str, job_id: str, *, done: bool) -> list[tuple[Any, ...]]:
        """Keeping `worker_inflight` (what the worker reaper re-routes) current: a dispatch adds the
        job (and marks the worker as one to look at), a result or re-route removes it."""
        if not worker_id:
            return []
        if done:
            return [("ZREM", keys.worker_inflight(worker_id), job_id)]
        ts = now_us()
        return [("ZADD", keys.worker_inflight(worker_id), ts, job_id),
                ("EXPIRE", keys.worker_inflight(worker_id), META_TTL),
                ("ZADD", keys.WORKERS_INFLIGHT, ts, worker_id)]

    async def inflight(self, worker_id: str, *, dispatched_before_us: int | None = None,
                       limit: int = 500) -> list[tuple[str, int]]:
        """(job id, dispatch µs) of the jobs dispatched to a worker and not finished, oldest first."""
        high = "+inf" if dispatched_before_us is None else dispatched_before_us
        reply = await self._redis.execute("ZRANGEBYSCORE", keys.worker_inflight(worker_id), "-inf", high,
                                          "WITHSCORES", "LIMIT", 0, limit)
        return [(job_id, int(float(score))) for job_id, score in score_pairs(reply)]

    async def worker_present(self, worker_id: str) -> bool:
        return bool(await self._redis.execute("EXISTS", keys.worker_alive(worker_id)))

    async def workers_with_inflight(self) -> list[tuple[str, int]]:
        return [(w, int(float(ts))) for w, ts in score_pairs(
            await self._redis.execute("ZRANGE", keys.WORKERS_INFLIGHT, 0, -1, "WITHSCORES"))]

    async def forget_worker(self, worker_id: str, seen_before_us: int) -> None:
        """Drop a worker from the reaper's list once it has nothing in flight (ZREM only if no
        dispatch moved its score meanwhile)."""
        if int(await self._redis.execute("ZCARD", keys.worker_inflight(worker_id))) == 0:
            score = await self._redis.execute("ZSCORE", keys.WORKERS_INFLIGHT, worker_id)
            if score is not None and int(float(score)) <= seen_before_us:
                await self._redis.execute("ZREM", keys.WORKERS_INFLIGHT, worker_id)
                # A dispatch may have slipped in between: then the worker goes back on the list.
                if int(await self._redis.execute("ZCARD", keys.worker_inflight(worker_id))) > 0:
                    await self._redis.execute("ZADD", keys.WORKERS_INFLIGHT, now_us(), worker_id)

    # ---- idempotency ---------------------------------------------------------------------------

    async def reserve_idempotency(self, tenant: str, key: str, job_id: str) -> str | None:
        """Claim `key` for `job_id`; returns None when claimed, else the job that holds it."""
        name = keys.idempotency(tenant, key)
        reserved, holder = await self._redis.pipeline([
            ("SET", name, job_id, "NX", "EX", IDEMPOTENCY_TTL), ("GET", name),
        ])
        return None if reserved else holder

    async def lookup_idempotency(self, tenant: str, key: str) -> str | None:
        return await self._redis.execute("GET", keys.idempotency(tenant, key))

    # ---- reads ---------------------------------------------------------------------------------

    async def get(self, job_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The job's meta, or None if unknown — or owned by another tenant when `tenant` is given
        (so another tenant's job looks exactly like a missing one)."""
        return _meta_of(job_id, await self._redis.execute("HGETALL", keys.job_meta(job_id)), tenant)

    def get_later(self, job_id: str) -> Callable[[], Awaitable[dict[str, Any] | None]]:
        """`get`, queued with the next Redis batch (after what was queued before it)."""
        reply = self._redis.execute_later("HGETALL", keys.job_meta(job_id))

        async def meta() -> dict[str, Any] | None:
            return _meta_of(job_id, await reply(), None)

        return meta

    @property
    def on_cluster(self) -> bool:
        return self._redis.cluster

    @property
    def redis(self) -> Redis:
        return self._redis

    async def get_many(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        raws = await self._redis.pipeline([("HGETALL", keys.job_meta(j)) for j in job_ids])
        found: list[dict[str, Any] | None] = []
        for job_id, raw in zip(job_ids, raws):
            if isinstance(raw, dict) and "state" in raw:
                meta = decode_meta(raw)
                meta["id"] = job_id
                found.append(meta)
            else:
                found.append(None)
        return found

    async def state(self, job_id: str) -> JobState | None:
        return parse_state(await self._redis.execute("HGET", keys.job_meta(job_id), "state") or None)

    async def get_request(self, job_id: str) -> JobRequest | None:
        text = await self._redis.execute("GET", keys.job_request(job_id))
        return request_from_json(text) if text else None

    async def get_context(self, job_id: str) -> Any:
        text = await self._redis.execute("GET", keys.context(job_id))
        return None if text is None else json.loads(text)

    async def has_output(self, job_id: str) -> bool:
        """Whether a worker stored the job's output (`res:<id>`, written before its result is sent)."""
        return bool(await self._redis.execute("EXISTS", keys.result(job_id)))

    async def served_output(self, meta: Mapping[str, Any], *, include_quarantined: bool = False,
                            unpointed: bool = False) -> tuple[str | None, str | None]:
        """(key, text) of the output a reader may see of a job (`store.output` decides which),
        raising `output.Withheld` for one the output policy has not cleared, or that changed after
        its check. `unpointed`: a job without `result_ptr` is read at `res:<id>` anyway."""
        key = output.served_result_key(meta, include_quarantined=include_quarantined)
        if key is None and unpointed:
            key = keys.result(str(meta["id"]))
        text = await self._redis.execute("GET", key) if key else None
        if not include_quarantined and not output.unchanged(meta, key or "", text):
            raise output.Withheld("the output changed after the output policy checked it")
        return key, text

    async def events(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(e) for e in await self._redis.execute("LRANGE", keys.job_events(job_id), 0, -1)]

    async def decisions(self, job_id: str) -> list[dict[str, Any]]:
        return [json.loads(d) for d in await self._redis.execute("LRANGE", keys.job_decisions(job_id), 0, -1)]

    async def list(
        self, tenant: str, *, state: str | None = None, topic: str | None = None, limit: int = 50,
        cursor: int | None = None, budget: int = LIST_SCAN_BUDGET,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Newest first; `cursor` is an updated_at (µs) bound. A state indexed per tenant is read
        from its index; otherwise the tenant's recent set is filtered, looking at no more than
        `budget` jobs: a short page then comes with a cursor to go on from."""
        if state is not None and parse_state(state) in TENANT_INDEXED_STATES:
            index = keys.tenant_state_index(tenant, state)
        else:
            index = keys.tenant_recent(tenant)
        high = "+inf" if cursor is None else str(cursor)
        found: list[dict[str, Any]] = []
        looked, batch = 0, min(max(limit * 2, 100), budget)
        next_cursor: int | None = None
        while len(found) < limit:
            if looked >= budget:
                next_cursor = int(high.lstrip("(")) - 1 if high != "+inf" else None
                break
            ids = await self._redis.execute("ZREVRANGEBYSCORE", index, high, "-inf", "WITHSCORES", "LIMIT", 0, batch)
            if not ids:
                break
            pairs = score_pairs(ids)
            looked += len(pairs)
            metas = await self.get_many([job_id for job_id, _ in pairs])
            for (_, score), meta in zip(pairs, metas):
                high = "(" + str(int(float(score)))
                if meta is None or meta.get("tenant", "") != tenant or (state and meta["state"] != state) \
                        or (topic and meta.get("topic") != topic):
                    continue
                found.append(meta)
                if len(found) == limit:
                    break
            if len(pairs) < batch:
                break
        if len(found) == limit:
            next_cursor = int(found[-1]["updated_at"]) - 1
        return found, next_cursor

    async def index_held_jobs(self, batch: int = 500) -> int:
        """Index every job held in a TENANT_INDEXED_STATES state under its tenant (jobs that
        entered it before these indexes existed); returns how many were looked at."""
        looked = 0
        for state in TENANT_INDEXED_STATES:
            start = 0
            while True:
                flat = await self._redis.execute("ZRANGE", keys.job_index(state.value), start, start + batch - 1,
                                                 "WITHSCORES")
                if not flat:
                    break
                pairs = score_pairs(flat)
                metas = await self.get_many([job_id for job_id, _ in pairs])
                await self._redis.pipeline([
                    ("ZADD", keys.tenant_state_index(meta.get("tenant", ""), state.value), "NX", score, job_id)
                    for (job_id, score), meta in zip(pairs, metas)
                    if meta is not None and meta["state"] == state.value and meta.get("tenant")
                ] or [("PING",)])
                looked += len(pairs)
                start += batch
        return looked

    async def ids_in_state(self, state: JobState, *, updated_before_us: int, limit: int = 200) -> list[str]:
        return await self._redis.execute(
            "ZRANGEBYSCORE", keys.job_index(state.value), "-inf", updated_before_us, "LIMIT", 0, limit
        )

    async def due_deadlines(self, now: int, limit: int = 200) -> list[str]:
        return await self._redis.execute("ZRANGEBYSCORE", keys.JOB_DEADLINE, "-inf", now, "LIMIT", 0, limit)

    async def active_count(self, tenant: str) -> int:
        return int(await self._redis.execute("SCARD", keys.tenant_active(tenant)))

    async def scan_jobs(self, cursor: str, count: int = 500) -> tuple[str, list[dict[str, Any]]]:
        """One page of every job's hash, whatever the indexes say: (next cursor, metas with the
        fields the index upkeep follows, SCAN_FIELDS, and `id`); the cursor is "0" again after
        the last page. Those fields only: the sweep reads hundreds of jobs a second, whole
        hashes cost five times as much on both sides."""
        prefix = keys.job_meta("")
        cursor, names = await self._redis.scan_page(cursor, prefix + "*", count=count)
        ids = [name[len(prefix):] for name in names]
        if not ids:
            return cursor, []
        replies = await self._redis.pipeline([("HMGET", keys.job_meta(j), *SCAN_FIELDS) for j in ids])
        metas = []
        for job_id, values in zip(ids, replies):
            if isinstance(values, list) and values and values[0]:  # gone meanwhile, or the read failed
                meta = decode_meta({name: value for name, value in zip(SCAN_FIELDS, values) if value is not None})
                meta["id"] = job_id
                metas.append(meta)
        return cursor, metas

    async def repair_indexes(self, metas: Sequence[Mapping[str, Any]], *, settled_us: int = REPAIR_SETTLE_US) -> list[str]:
        """Put live jobs back into their state index (and tenant's active set, and the in-flight
        list of the worker they were sent to) where a lost write left them out: one pipeline of
        checks, one of re-reads and one of repairs for the whole page. Returns the ids repaired.

        `metas` were read a while ago (a scan page): a job that moved on since (its index entries
        moved with it) must not be put back where it was. So only jobs unchanged for `settled_us`
        are looked at (the index writes of a recent change may still be on their way, on a
        cluster), and a job is repaired only if it is still in the state and at the update time
        it was scanned at, read again right before the repair."""
        checks: list[tuple[Any, ...]] = []
        wanted: list[tuple[Mapping[str, Any], str]] = []  # (meta, what the check looks for)
        settled_before = now_us() - settled_us
        finished = [("SREM", keys.tenant_active(meta["tenant"]), meta["id"]) for meta in metas
                    if JobState(meta["state"]) in TERMINAL and meta.get("tenant")]
        if finished:  # a finished job never counts as a tenant's unfinished work, however it got there
            await self.run_repeatable(finished)
        for meta in metas:
            state = JobState(meta["state"])
            if state in TERMINAL or int(meta.get("updated_at") or 0) > settled_before:
                continue
            checks.append(("ZSCORE", keys.job_index(state.value), meta["id"]))
            wanted.append((meta, "index"))
            if state in (JobState.DISPATCHED, JobState.RUNNING) and meta.get("worker_id"):
                checks.append(("ZSCORE", keys.worker_inflight(meta["worker_id"]), meta["id"]))
                wanted.append((meta, "inflight"))
        if not checks:
            return []
        missing = [(meta, kind) for (meta, kind), found in zip(wanted, await self._redis.pipeline(checks))
                   if found is None]  # absent (a failed check reads as present: the next pass looks again)
        if not missing:
            return []
        now = await self._redis.pipeline([("HMGET", keys.job_meta(meta["id"]), "state", "updated_at")
                                          for meta, _ in missing])
        commands: list[tuple[Any, ...]] = []
        repaired: list[str] = []
        for (meta, kind), current in zip(missing, now):
            if not isinstance(current, list) or current != [meta["state"], str(meta.get("updated_at"))]:
                continue  # moved on since the scan: its indexes moved with it
            job_id = meta["id"]
            if kind == "inflight":
                commands += self.inflight_commands(meta["worker_id"], job_id, done=False)
            else:
                state = meta["state"]
                commands += [("ZADD", keys.job_index(state), int(meta.get("updated_at") or now_us()), job_id),
                             ("SET", keys.job_state(job_id), state, "EX", self.meta_ttl)]
                if meta.get("tenant"):
                    commands.append(("SADD", keys.tenant_active(meta["tenant"]), job_id))
            if job_id not in repaired:
                repaired.append(job_id)
        if commands:
            await self.run_repeatable(commands)
        return repaired

    async def drop_from_index(self, state: JobState, job_id: str) -> None:
        """Repair a stale index entry (the hash says the job moved on)."""
        await self._redis.execute("ZREM", keys.job_index(state.value), job_id)

    async def forget_stale(self, job_id: str, state: JobState | None) -> None:
        """Drop the index and deadline entries of a job that is gone or already finished."""
        commands: list[tuple[Any, ...]] = [("ZREM", keys.JOB_DEADLINE, job_id)]
        if state is not None:
            commands.append(("ZREM", keys.job_index(state.value), job_id))
        await self._redis.pipeline(commands)


class _Upkeep(NamedTuple):
    """The index writes of one move, in the update script's argument order (ARGV[12..21])."""

    state_key: str  # the legacy state mirror: SET to EX ttl
    events_key: str  # RPUSH record, EXPIRE ttl
    record: str
    recent_key: str  # ZADD ts job (and trimmed to recent_trim when that is not 0)
    recent_trim: int
    tenant_recent_key: str  # "" = no tenant: no per-tenant writes
    tenant_recent_trim: int
    active_key: str  # the tenant's active set: active_op job
    active_op: str
    deadline_key: str  # "" = leave the deadline index alone (not terminal)


UPKEEP_ARGS = len(_Upkeep._fields)
_INDEX_PREFIX = keys.job_index("")


def _tenant_state_commands(job_id: str, to: JobState, tenant: str, ts: int,
                           left: Iterable[JobState | None]) -> list[tuple[Any, ...]]:
    """The per-tenant index of a held state (TENANT_INDEXED_STATES): the job leaves that of each
    state in `left` (harmless where it was not) and enters that of `to`."""
    if not tenant:
        return []
    commands: list[tuple[Any, ...]] = [("ZREM", keys.tenant_state_index(tenant, state.value), job_id)
                                       for state in TENANT_INDEXED_STATES.intersection(left) if state != to]
    if to in TENANT_INDEXED_STATES:
        commands.append(("ZADD", keys.tenant_state_index(tenant, to.value), ts, job_id))
    return commands


@functools.lru_cache(maxsize=256)
def _source_lists_of(to: str, sources: frozenset[JobState | None]) -> tuple[str, str]:
    return _state_list(sources), _state_list({s for s in sources if to and increments_attempts(s, to)})


def _source_lists(to: str, sources: set[JobState | None]) -> tuple[str, str]:
    """The script's allowed and attempt-counting from-state lists (a handful of moves recur: cached)."""
    return _source_lists_of(to, frozenset(sources))


def _state_list(states: Iterable[JobState | None]) -> str:
    """`,A,B,` for a Lua membership test; the empty entry stands for "no state yet" (so an empty
    set must be "", not ",,")."""
    names = ["" if s is None else s.value for s in states]
    return "," + ",".join(names) + "," if names else ""


def _allowed_sources(to: JobState) -> set[JobState | None]:
    return {source for source, targets in TRANSITIONS.items() if to in targets}


def decode_output(text: str | None) -> Any:
    """An output as the API shows it: JSON decoded, else the text itself."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text
