"""Dispatching under the submit-time policy decision while the policy that made it is in force.

The gateway checks a job against the policy when it is submitted (`Evaluate`) and the scheduler
checks it again before dispatch (jobpath §3.3), to catch a policy changed in between. Our
kernel's evaluation is a pure function of the request and the policy (`cordum/safety/evaluate.py`:
no clock, no counters, velocity rules refused by the parser), so while the newest policy any
kernel replica loaded (`cordum:safety:snapshots`, read in the round trip that takes the job's
lock) is the one that decided at submit, a second check can only repeat the first. Then the
scheduler dispatches under the stored decision without a gRPC call (the job's decision log
records the dispatch's decision as reused, so its trace still shows both).

Reused: an ALLOW or ALLOW_WITH_CONSTRAINTS stored with a snapshot (a fail-open admission stores
none). Checked again as before: any other decision, a snapshot that is not the newest, a job
published straight to the bus (nothing stored), constraints that do not parse, and everything on
Redis Cluster (the job and the snapshot list live on different nodes). A kernel recording its
new snapshot a moment after loading it leaves the same window as a check that reached it just
before the reload. `SCHEDULER_REUSE_SUBMIT_DECISION=false` turns this off (for a kernel whose
decisions depend on more than the request and the policy, such as Cordum's velocity rules).
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, Mapping

from google.protobuf import json_format

from cordum.agent.v1 import safety_pb2
from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.safety.client import SafetyDecision, Verdict
from cordum.store.keys import SAFETY_SNAPSHOTS

NewestSnapshot = Callable[[], Awaitable["str | None"]]

REUSABLE = {
    Verdict.ALLOW.value: safety_pb2.DECISION_TYPE_ALLOW,
    Verdict.ALLOW_WITH_CONSTRAINTS.value: safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS,
}


def stored_decision(meta: Mapping[str, Any], newest_snapshot: str | None) -> SafetyDecision | None:
    """The decision stored with the job if the policy that made it is the newest one loaded;
    None when the job must be checked again."""
    kind = REUSABLE.get(str(meta.get("safety_decision") or ""))
    snapshot = str(meta.get("safety_snapshot") or "")
    if kind is None or not snapshot or snapshot != newest_snapshot or meta.get("safety_approval_required"):
        return None
    response = safety_pb2.PolicyCheckResponse(
        decision=kind, reason=str(meta.get("safety_reason") or ""), rule_id=str(meta.get("safety_rule_id") or ""),
        policy_snapshot=snapshot,
    )
    constraints = meta.get("safety_constraints")
    if constraints:
        try:
            json_format.Parse(constraints if isinstance(constraints, str) else json.dumps(constraints), response.constraints)
        except (json_format.ParseError, TypeError, ValueError):
            return None
    return SafetyDecision(Verdict(str(meta["safety_decision"])), response.reason, response)


def newest_snapshot_later(redis: Redis) -> NewestSnapshot:
    """The newest snapshot in `cordum:safety:snapshots` (a sorted set scored by load time),
    queued for the next round trip; None when there is none or it could not be read."""
    reply = redis.execute_later("ZREVRANGE", SAFETY_SNAPSHOTS, 0, 0)

    async def newest() -> str | None:
        try:
            found = await reply()
        except (RedisError, *RedisUnavailable):
            return None  # not known: the job is checked again
        return str(found[0]) if found else None

    return newest
