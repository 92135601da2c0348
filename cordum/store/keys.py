"""Every Redis key name the control plane uses, in one place.

The names operators rely on (the guide's lock key table) are kept exactly. Keys we add carry a
`{hash tag}` when a Lua script must touch them together with another key, so scripts stay within
one slot on Redis Cluster.
"""

from __future__ import annotations

import hashlib

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


INSTANCE_PREFIX = "cordum:instance:"


def instance(service: str, instance_id: str) -> str:
    """A live replica's registration (TTL, renewed while it runs): /api/v1/status lists them."""
    return f"{INSTANCE_PREFIX}{service}:{instance_id}"


def job_lock(job_id: str) -> str:
    return f"cordum:scheduler:job:{job_id}"


def workflow_run_lock(run_id: str) -> str:
    return f"cordum:wf:run:lock:{run_id}"


def workflow_run_admission(org: str) -> str:
    """Serialises run starts of one tenant while its concurrent-run limit is checked (TTL 10 s)."""
    return f"cordum:wf:run:admission:{org}"


def rate_limit(key: str, unix_second: int) -> str:
    return f"cordum:rl:{key}:{unix_second}"


def rate_limit_tat(tenant: str, limit: str) -> str:
    """A GCRA limit's theoretical arrival time (`cordum:rl:{<tenant>}:tenant`,
    `cordum:rl:{<tenant>}:key:<sha256 prefix>`). The tenant is the hash tag, so the one script
    that checks a tenant's limit and its key's limit together stays in one cluster slot; a tenant
    name that cannot be a tag (empty, or with braces) is tagged by its SHA-256 instead."""
    tag = tenant
    if not tenant or "{" in tenant or "}" in tenant:
        tag = "t-" + hashlib.sha256(tenant.encode()).hexdigest()[:32]
    return "cordum:rl:{" + tag + "}:" + limit


# Fence counters outlive any record they protect (job data is kept for days, not weeks).
FENCE_TTL_MS = 30 * 24 * 3600 * 1000


def fence_counter(lock_key: str) -> str:
    """The fencing-token counter of a lock. Tagged with the whole lock key, so it hashes to the
    lock's own slot (a key without braces hashes as a whole) and one script can touch both."""
    return "{" + lock_key + "}:fence"


# ---- jobs (spec cordum-jobpath §2.4) ----------------------------------------------------------
JOB_RECENT = "job:recent"
JOB_DEADLINE = "job:deadline"
JOB_OUTPUT_PENDING = "job:output:pending"  # SUCCEEDED jobs whose output content check is still due (zset, µs)
JOB_DLQ_PENDING = "job:dlq:pending"  # finished jobs whose DLQ event is still to be sent (zset, µs)


def job_meta(job_id: str) -> str:
    return f"job:meta:{job_id}"


def job_state(job_id: str) -> str:
    """Legacy mirror of the state, kept for operators' scripts."""
    return f"job:state:{job_id}"


def job_request(job_id: str) -> str:
    return f"job:req:{job_id}"


def job_events(job_id: str) -> str:
    return f"job:events:{job_id}"


def job_decisions(job_id: str) -> str:
    return f"job:decisions:{job_id}"


def job_index(state: str) -> str:
    return f"job:index:{state.lower()}"


def tenant_recent(tenant: str) -> str:
    """Our addition: each tenant's recently updated jobs, so listings never scan other tenants."""
    return f"job:recent:tenant:{tenant}"


def tenant_state_index(tenant: str, state: str) -> str:
    """Ours: one tenant's jobs held in `state` (jobs.TENANT_INDEXED_STATES only), so listing them
    never walks the tenant's other jobs or another tenant's."""
    return f"job:index:tenant:{tenant}:{state.lower()}"


def tenant_active(tenant: str) -> str:
    return f"job:tenant:active:{tenant}"


def trace(trace_id: str) -> str:
    return f"trace:{trace_id}"


def worker_jobs(worker_id: str) -> str:
    return f"worker:jobs:{worker_id}"


def worker_inflight(worker_id: str) -> str:
    """Jobs dispatched to a worker and not finished (zset job id → dispatch µs): what is re-routed
    when the worker leaves."""
    return f"cordum:worker:{worker_id}:inflight"


def worker_alive(worker_id: str) -> str:
    """A worker's presence (our SDK's workers): set with the schedulers' WORKER_TTL, renewed every
    heartbeat interval, deleted when it stops. Its absence is what the worker reaper acts on."""
    return f"cordum:worker:{worker_id}:alive"


# Workers that have (or had) jobs in flight (zset worker id → last dispatch µs): where the reaper looks.
WORKERS_INFLIGHT = "cordum:workers:inflight"
WORKER_REAPER_LEADER = "cordum:scheduler:worker:reaper"


def idempotency(tenant: str, key: str) -> str:
    return f"job:idempotency:{tenant}:{key}"


def context(job_id: str) -> str:
    return f"ctx:{job_id}"


def result(job_id: str) -> str:
    return f"res:{job_id}"


def redacted_result(job_id: str) -> str:
    """The copy of a job's output the output policy redacted (written by the safety kernel)."""
    return f"res:{job_id}:redacted"


# ---- DLQ ---------------------------------------------------------------------------------------
DLQ_INDEX = "dlq:index"  # Cordum's: every tenant's entries (kept for its readers)
DLQ_TENANTS = "dlq:tenants"  # ours: the tenants that have a DLQ index


def dlq_tenant_index(tenant: str) -> str:
    """Ours: one tenant's entries, so its cap and its listings never touch another tenant's."""
    return f"dlq:index:tenant:{tenant}"


def dlq_entry(job_id: str) -> str:
    return f"dlq:entry:{job_id}"


# ---- configuration documents -------------------------------------------------------------------
def config_doc(scope: str, scope_id: str) -> str:
    return f"cfg:{scope}:{scope_id}"


# ---- workflows (spec cordum-services §2.12) -----------------------------------------------------
# The spec's names are kept. None is hash-tagged: every script touches one of them alone (the run
# hash, a definition, the timer zset, an idempotency key); the indexes follow in pipelines of
# single-key commands. A workflow id cannot contain ':' (definition.ID_PATTERN), so `wf:runs:<id>`
# never meets `wf:runs:status:*`/`wf:runs:active:*`/`wf:runs:org:*`; a workflow named "all" shares
# `wf:runs:all`, which is why run listings re-check each run's own workflow_id.
WF_INDEX_ALL = "wf:index:all"
WF_RUNS_ALL = "wf:runs:all"
WF_DELAY_TIMERS = "cordum:wf:delay:timers"


def wf_def(workflow_id: str) -> str:
    return f"wf:def:{workflow_id}"


def wf_index_org(org: str) -> str:
    return f"wf:index:org:{org}"


def wf_run(run_id: str) -> str:
    """A run: a hash (`doc` = run JSON, `_fence`, and `status`/`tenant`/`workflow_id`/`updated`
    copies for cheap reads), so the fence lives in the same single key as the document."""
    return f"wf:run:{run_id}"


def wf_runs(workflow_id: str) -> str:
    return f"wf:runs:{workflow_id}"


def wf_runs_org(org: str) -> str:
    """Our addition: each tenant's runs (zset by update µs), so listings never scan other tenants."""
    return f"wf:runs:org:{org}"


def wf_runs_status(status: str) -> str:
    return f"wf:runs:status:{status}"


def wf_runs_active(org: str) -> str:
    return f"wf:runs:active:{org}"


def wf_run_timeline(run_id: str) -> str:
    return f"wf:run:timeline:{run_id}"


def wf_run_job(job_id: str) -> str:
    return f"wf:run:job:{job_id}"


def wf_run_idempotency(tenant: str, key: str) -> str:
    """Tenant-scoped, unlike the spec's `wf:run:idempotency:<key>`: with one global namespace two
    tenants choosing the same key would collide, and the second would be handed the first tenant's
    run id (a cross-tenant leak and a silently skipped run)."""
    return f"wf:run:idempotency:{tenant}:{key}"


# ---- context-engine memory (spec cordum-services §3) ------------------------------------------
# The engine stores what its callers name: it never scopes a memory id itself. Callers that act
# for a tenant (the worker SDK's helper, the gateway's memory routes) bind an id to its tenant
# with `memory_scope`, the Go original's "<tenant>/<memory id>" convention, so one tenant's
# "conv-1" and another's are different keys and no tenant can name another's.


def memory_events(memory_id: str) -> str:
    """The conversation history: a list of JSON `{role, content, ts}`, the newest 20 kept."""
    return f"mem:{memory_id}:events"


def memory_chunks(memory_id: str) -> str:
    """A set naming the keys of RAG chunk records (JSON `{path, language, bytes, loc, content}`)."""
    return f"mem:{memory_id}:chunks"


def memory_summary(memory_id: str) -> str:
    return f"mem:{memory_id}:summary"


def tenant_token(tenant: str) -> str:
    """A tenant name as the first segment of a memory id: `%` and `/` escaped, so the first `/`
    always ends it and tenant "a/b" can never share ids with tenant "a"."""
    return tenant.replace("%", "%25").replace("/", "%2F")


def memory_scope(tenant: str, memory_id: str) -> str:
    """`memory_id` of `tenant` as stored: `<tenant>/<memory id>` (already scoped ids unchanged;
    no tenant: unchanged)."""
    if not tenant or not memory_id:
        return memory_id
    prefix = tenant_token(tenant) + "/"
    return memory_id if memory_id.startswith(prefix) else prefix + memory_id


def memory_owner(memory_id: str) -> str | None:
    """The tenant token a scoped memory id starts with, None for an unscoped id."""
    head, sep, _ = memory_id.partition("/")
    return head if sep and head else None


def artifact(artifact_id: str) -> str:
    """An uploaded artifact (spec cordum-jobpath §1.6 `art:<id>`): a hash of content and metadata."""
    return f"art:{artifact_id}"


# ---- auth --------------------------------------------------------------------------------------
# Ours: the secret API keys are named under (gateway.auth.keyed_fingerprint), made once.
KEY_FINGERPRINT_SECRET = "cordum:auth:fingerprint_secret"


def oidc_jwks(issuer_hash: str) -> str:
    """The guide's cross-replica cache of an OIDC issuer's JWKS (1 h)."""
    return f"cordum:auth:jwks:{issuer_hash}"


def tenant_bytes(tenant: str, hour: int) -> str:
    """Ours: input bytes a tenant stored in one hour (unix time // 3600), for its allowance."""
    return f"cordum:quota:bytes:{tenant}:{hour}"
