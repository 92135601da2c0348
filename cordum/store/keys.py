"""Every Redis key name the control plane uses, in one place.

The names operators rely on (the guide's lock key table) are kept exactly. Keys we add carry a
`{hash tag}` when a Lua script must touch them together with another key, so scripts stay within
one slot on Redis Cluster.
"""

from __future__ import annotations

# ---- locks and leader election (the guide's table) ----------------------------------------
RECONCILER_LEADER = "cordum:reconciler:default"
REPLAYER_LEADER = "cordum:replayer:pending"
SNAPSHOT_WRITER_LEADER = "cordum:scheduler:snapshot:writer"
WORKFLOW_RECONCILER_LEADER = "cordum:workflow-engine:reconciler:default"
WORKFLOW_DELAY_POLLER_LEADER = "cordum:wf:delay:poller"
DLQ_CLEANUP_LEADER = "cordum:dlq:cleanup"
SAFETY_CB_FAILURES = "cordum:cb:safety:failures"
SAFETY_CB_OUTPUT_FAILURES = "cordum:cb:safety:output:failures"
SAFETY_SNAPSHOTS = "cordum:safety:snapshots"
WORKERS_SNAPSHOT = "sys:workers:snapshot"


def job_lock(job_id: str) -> str:
    return f"cordum:scheduler:job:{job_id}"


def workflow_run_lock(run_id: str) -> str:
    return f"cordum:wf:run:lock:{run_id}"


def rate_limit(key: str, unix_second: int) -> str:
    return f"cordum:rl:{key}:{unix_second}"


def fence_counter(lock_key: str) -> str:
    """The fencing-token counter of a lock. Tagged with the whole lock key, so it hashes to the
    lock's own slot (a key without braces hashes as a whole) and one script can touch both."""
    return "{" + lock_key + "}:fence"
