"""A worker's claim on one attempt of a job, kept in the job's own hash (`job:meta:<id>`).

Before running a job, a worker claims the attempt the scheduler dispatched; the claim tells it
whether to run at all: the attempt may be superseded (the job was re-routed or retried meanwhile),
the job may be finished or cancelled, another worker may hold the attempt, or this attempt may
already have a stored result (a crash or a lost publish after the work was done). After running, the
worker commits the result into the same hash, only while its claim still stands; the scheduler
completes a job from a committed result when the result message never arrives (reconciler, worker
reaper). The claim and the commit touch one key, so they run unchanged on Redis Cluster; on one
server the commit also writes the output (`res:<id>`), in the same script.

Fields: `run_claim` = "<worker id>:<attempt>", `run_result` = the JobResult as protobuf JSON,
`run_result_attempt` = the attempt it belongs to.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cordum.agent.v1.job_pb2 import JobResult
from cordum.infra.redis import Redis
from cordum.protocol import pointers
from cordum.store import keys
from cordum.store.jobs import result_from_json, result_to_json

# KEYS[1] job:meta:<id>; ARGV[1] attempt ("" = the job's current one); ARGV[2] worker id
_CLAIM = """
local state, attempts, stored, stored_attempt, claim =
  unpack(redis.call('HMGET', KEYS[1], 'state', 'attempts', 'run_result', 'run_result_attempt', 'run_claim'))
if not state then return {'MISSING', '', ''} end
attempts = attempts or '0'
local attempt = ARGV[1]
if attempt == '' then attempt = attempts end
if tonumber(attempt) > tonumber(attempts) then return {'AHEAD', state, attempts} end
if attempt ~= attempts then return {'SUPERSEDED', state, attempts} end
if stored and stored_attempt == attempt then
  return {'FINISHED', state, stored, attempt}
end
if state ~= 'DISPATCHED' and state ~= 'RUNNING' then return {'NOT_RUNNABLE', state, attempts} end
local mine = ARGV[2] .. ':' .. attempt
claim = claim or ''
if claim ~= '' and claim ~= mine and string.match(claim, ':(%d+)$') == attempt then
  return {'TAKEN', state, claim}
end
redis.call('HSET', KEYS[1], 'run_claim', mine)
return {'CLAIMED', state, attempt}
"""

# KEYS[1] job:meta:<id>; ARGV[1] the claim; ARGV[2] attempt; ARGV[3] result (protobuf JSON). A
# claim that vanished (a Redis failover lost the write) still commits while the attempt is current.
_CLAIM_STANDS = """
local claim = redis.call('HGET', KEYS[1], 'run_claim') or ''
if claim ~= ARGV[1] then
  local state = redis.call('HGET', KEYS[1], 'state') or ''
  if claim ~= '' or redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[2]
     or (state ~= 'DISPATCHED' and state ~= 'RUNNING') then return 0 end
end
"""
_COMMIT = _CLAIM_STANDS + """
redis.call('HSET', KEYS[1], 'run_result', ARGV[3], 'run_result_attempt', ARGV[2])
return 1
"""
# The same, with the output: KEYS[2] res:<id>; ARGV[4] the output; ARGV[5] its TTL (s). Written only
# while the claim stands (a worker whose attempt was superseded leaves the new attempt's output be).
# Two keys in two slots: for one server only.
_COMMIT_WITH_OUTPUT = _CLAIM_STANDS + """
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
redis.call('HSET', KEYS[1], 'run_result', ARGV[3], 'run_result_attempt', ARGV[2])
return 1
"""


class Claim(str, enum.Enum):
    CLAIMED = "CLAIMED"  # run it
    MISSING = "MISSING"  # no job record (a producer outside the control plane): run it, unfenced
    FINISHED = "FINISHED"  # this attempt already has a result: publish that one again, don't run
    SUPERSEDED = "SUPERSEDED"  # a later attempt exists (retried or re-routed): drop this message
    AHEAD = "AHEAD"  # the record has not reached this attempt (a write lost in a Redis failover): later
    NOT_RUNNABLE = "NOT_RUNNABLE"  # finished, cancelled, or waiting to be dispatched again: drop
    TAKEN = "TAKEN"  # another worker runs this attempt: drop


@dataclass(frozen=True)
class ClaimOutcome:
    claim: Claim
    state: str
    attempt: int
    token: str = ""  # what to commit with
    stored: JobResult | None = None

    @property
    def runs(self) -> bool:
        return self.claim in (Claim.CLAIMED, Claim.MISSING)


class RunClaims:
    def __init__(self, redis: Redis) -> None:
        self._claim = redis.script(_CLAIM)
        self._commit = redis.script(_COMMIT)
        self._commit_with_output = redis.script(_COMMIT_WITH_OUTPUT)

    async def claim(self, job_id: str, attempt: int | None, worker_id: str) -> ClaimOutcome:
        reply = await self._claim([keys.job_meta(job_id)], ["" if attempt is None else str(attempt), worker_id])
        kind, state, detail = Claim(reply[0]), reply[1], reply[2]
        if kind is Claim.CLAIMED:
            return ClaimOutcome(kind, state, int(detail), token=f"{worker_id}:{detail}")
        if kind is Claim.FINISHED:
            return ClaimOutcome(kind, state, int(reply[3]), stored=result_from_json(detail))
        return ClaimOutcome(kind, state, attempt or 0)

    async def commit(self, job_id: str, outcome: ClaimOutcome, result: JobResult) -> bool:
        """Store the attempt's result while the claim stands; False when it was lost (the job moved
        on to another attempt: this result must not be published). Unfenced runs commit nothing."""
        if outcome.claim is not Claim.CLAIMED:
            return True
        return bool(await self._commit([keys.job_meta(job_id)],
                                       [outcome.token, str(outcome.attempt), result_to_json(result)]))

    async def commit_with_output(self, job_id: str, outcome: ClaimOutcome, result: JobResult, output: str,
                                 ttl: int) -> bool:
        """`commit` and the output's write (`res:<id>`, `ttl` seconds) in one script: one round trip
        instead of two (one Redis server; on a cluster the caller writes the output first)."""
        assert outcome.claim is Claim.CLAIMED
        return bool(await self._commit_with_output(
            [keys.job_meta(job_id), pointers.result_key(job_id)],
            [outcome.token, str(outcome.attempt), result_to_json(result), output, ttl]))
