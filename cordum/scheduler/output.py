"""The scheduler's output policy (cordum-jobpath §2.9, §3.11): what a job produced is checked
before anyone relies on it.

- At dispatch the job is marked `output_check=due`, unless the kernel told us that the policy in
  force (its snapshot) has no output rule: then nothing is checked and nothing is spent.
- Metadata phase, under the job's lock, before SUCCEEDED is written (CORDUM_OUTPUT_META_TIMEOUT_MS,
  500 ms, one retry on a deadline): QUARANTINE ends the job OUTPUT_QUARANTINED (DLQ
  `output_quarantined`, an event on `sys.audit.output_policy`); REDACT runs the content check at
  once, which stores a redacted copy that `result_ptr` then names (no copy → quarantine); a kernel
  that cannot be asked lets the job through to the content phase, which applies the fail mode.
  When a rule needs the content, our kernel checks a small output whole in this same call (the
  answer carries the hash of what it read): the job is settled here, with no content phase.
- Content phase, after SUCCEEDED is written with `output_check=pending` (the job is listed in
  `job:output:pending`): the kernel scans the output (CORDUM_OUTPUT_CONTENT_TIMEOUT, 30 s). Its
  verdict is written only while the job is still SUCCEEDED and pending (the write checks it):
  QUARANTINE → OUTPUT_QUARANTINED (DLQ `output_quarantined_async`), REDACT → `result_ptr` swapped,
  ALLOW → done; unavailable → quarantine with OUTPUT_POLICY_FAIL_MODE=closed, else `skipped`
  (counted). A scheduler that dies mid-check leaves the job listed: the reconciler's leader checks
  it again once the content timeout has passed.
- Until the check ends nobody is served the output (`store.output.served_result_key`), and the
  workflow engine does not take the worker's result as the step's outcome: the scheduler
  publishes the checked result on `sys.job.result` itself when the check ends.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import trio
from google.protobuf import json_format

from cordum.agent.v1.job_pb2 import JobProgress, JobResult, JobStatus
from cordum.infra.metrics import Metrics
from cordum.protocol import subjects
from cordum.protocol.packets import encode, new_packet
from cordum.runtime.audit import new_event
from cordum.runtime.consumer import Retry
from cordum.runtime.log import get_logger
from cordum.scheduler.engine import SENDER
from cordum.safety.client import OutputClient, OutputDecision, OutputVerdict
from cordum.store import keys
from cordum.store.jobs import ConditionFailed, InvalidTransition, JobNotFound, JobStore, now_us
from cordum.store.jobstate import JobState
from cordum.store.output import (
    ALLOWED, CHECK_FIELD, DUE, HASH_FIELD, PENDING, QUARANTINED, REDACTED, SAFETY_FIELD, SKIPPED,
)
from cordum.v1.output_policy_pb2 import OutputCheckRequest, OutputCheckResponse

if TYPE_CHECKING:
    from cordum.scheduler.engine import Engine

log = get_logger("scheduler.output")
S = JobState
RULE_FREE_SNAPSHOTS = 8  # policy snapshots remembered as having no output rule
MAX_REVIEWS = 64  # content checks in flight per replica; the next waits for a free one
SWEEP_LIMIT = 100  # jobs per page of the sweep
SWEEP_PAGES = 20  # pages per reconciler pass at most (the rest on the next pass)


@dataclass
class OutputSettings:
    enabled: bool = True  # OUTPUT_POLICY_ENABLED
    fail_closed: bool = False  # OUTPUT_POLICY_FAIL_MODE=closed
    meta_timeout: float = 0.5  # CORDUM_OUTPUT_META_TIMEOUT_MS
    content_timeout: float = 30.0  # CORDUM_OUTPUT_CONTENT_TIMEOUT


class OutputMetrics:
    def __init__(self, metrics: Metrics, topic_label: Any) -> None:
        self._topic = topic_label
        self.checked = metrics.counter("cordum_output_policy_checked_total", "Output policy checks executed per topic", ["topic"])
        self.quarantined = metrics.counter("cordum_output_policy_quarantined_total",
                                           "Output policy checks that quarantined a result per topic", ["topic"])
        self.skipped = metrics.counter("cordum_output_policy_skipped_total",
                                       "Output policy checks skipped (the kernel could not be asked, fail mode open) per topic",
                                       ["topic"])
        self.async_timeout = metrics.counter("cordum_output_policy_async_timeout_total",
                                             "Content-phase output checks that timed out or errored per topic", ["topic"])
        self.latency = metrics.histogram("cordum_output_check_latency_seconds",
                                         "Latency of output policy checks by topic and phase", ["topic", "phase"],
                                         buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30))

    def topic(self, topic: str) -> str:
        return self._topic(topic)


@dataclass
class Outcome:
    """What the metadata phase decided: the state to write instead of (or as) SUCCEEDED."""

    state: JobState
    fields: dict
    code: str = ""
    reason: str = ""
    after: list = field(default_factory=list)
    record: dict | None = None  # the verdict (output_safety), for the audit trail

    @property
    def pending(self) -> bool:
        return self.fields.get(CHECK_FIELD) == PENDING


class OutputReview:
    def __init__(self, engine: "Engine", client: OutputClient, settings: OutputSettings, metrics: OutputMetrics) -> None:
        self.engine = engine
        self.client = client
        self.settings = settings
        self.metrics = metrics
        self._rule_free: OrderedDict[str, None] = OrderedDict()
        self._nursery: trio.Nursery | None = None
        self._reviewing: set[str] = set()
        self._slots = trio.Semaphore(MAX_REVIEWS)

    # ---- dispatch ---------------------------------------------------------------------------

    def dispatch_fields(self, snapshot: str) -> dict:
        """The mark a dispatch writes: `due` unless this policy snapshot has no output rule."""
        if not self.settings.enabled:
            return {}
        return {CHECK_FIELD: "" if snapshot and snapshot in self._rule_free else DUE}

    def _learn(self, response: OutputCheckResponse | None) -> None:
        if response is None or not response.policy_snapshot:
            return
        snapshot = response.policy_snapshot
        if response.no_output_rules:
            self._rule_free[snapshot] = None
            self._rule_free.move_to_end(snapshot)
            while len(self._rule_free) > RULE_FREE_SNAPSHOTS:
                self._rule_free.popitem(last=False)
        else:
            self._rule_free.pop(snapshot, None)

    # ---- metadata phase ---------------------------------------------------------------------

    async def before_success(self, meta: Mapping[str, Any], result: JobResult) -> Outcome:
        """The metadata phase for a SUCCEEDED result of a job marked `due` (under its lock)."""
        job_id, topic = meta["id"], str(meta.get("topic", ""))
        request = _request(meta, result)
        verdict = await self._check(request, topic, "metadata", timeout=self.settings.meta_timeout, retries=1)
        response = verdict.response
        if response is not None and response.content_sha256:
            # The kernel checked the output itself already (a small one: SAFETY_OUTPUT_INLINE_BYTES).
            return self._settled(job_id, verdict, "content", sync=True)
        if verdict.decision is OutputDecision.QUARANTINE:
            return self._quarantine(job_id, "output_quarantined", verdict, "metadata", listed=False)
        if verdict.decision is OutputDecision.REDACT:
            content = await self._check(_content_request(request), topic, "content", timeout=self.settings.content_timeout)
            return self._settled(job_id, content, "content", sync=True)
        if verdict.decision is OutputDecision.UNAVAILABLE or response is None or not response.metadata_suffices:
            # The content phase decides (and applies the fail mode if the kernel stays away). The
            # job is listed for the sweep in the same script as its SUCCEEDED write; on a cluster,
            # where that script touches the job's hash only, it is listed first (listed but not
            # pending, the sweep just unlists it).
            listing = [("ZADD", keys.JOB_OUTPUT_PENDING, now_us(), job_id)]
            if self.engine.store.on_cluster:
                if not await self.engine.store.run_repeatable(listing):
                    raise Retry(1.0, f"job {job_id} could not be listed for its output check")
                listing = []
            return Outcome(S.SUCCEEDED, {CHECK_FIELD: PENDING}, after=listing)
        return Outcome(S.SUCCEEDED, {CHECK_FIELD: ALLOWED, SAFETY_FIELD: json.dumps(_record(verdict, "metadata"))})

    def _quarantine(self, job_id: str, code: str, verdict: OutputVerdict, phase: str, *, listed: bool,
                    reason: str = "") -> Outcome:
        record = _record(verdict, phase)
        reason = reason or verdict.reason or "output quarantined by the output policy"
        record["reason"] = reason
        return Outcome(S.OUTPUT_QUARANTINED, {CHECK_FIELD: QUARANTINED, SAFETY_FIELD: json.dumps(record)},
                       code=code, reason=reason, after=_unlist(job_id) if listed else [], record=record)

    def _settled(self, job_id: str, verdict: OutputVerdict, phase: str, *, sync: bool = False) -> Outcome:
        """A verdict on the content as the job's ending (SUCCEEDED with its mark, or quarantine);
        `sync`: decided before SUCCEEDED was written (Cordum's codes tell the two apart; the job
        was never listed for a content check)."""
        code = "output_quarantined" if sync else "output_quarantined_async"
        after = [] if sync else _unlist(job_id)
        response = verdict.response
        record = _record(verdict, phase)
        fields = {SAFETY_FIELD: json.dumps(record)}
        if verdict.decision is OutputDecision.QUARANTINE:
            return self._quarantine(job_id, code, verdict, phase, listed=not sync)
        if verdict.decision is OutputDecision.REDACT:
            if response is None or not response.redacted_ptr:
                return self._quarantine(job_id, code, verdict, phase, listed=not sync,
                                        reason=f"{verdict.reason or 'redaction required'}; no redacted copy was stored")
            return Outcome(S.SUCCEEDED, {**fields, CHECK_FIELD: REDACTED, "result_ptr": response.redacted_ptr},
                           after=after, record=record)
        if verdict.decision is OutputDecision.UNAVAILABLE:
            if self.settings.fail_closed or sync:  # sync: only a redaction asks, and it could not be made
                why = "OUTPUT_POLICY_FAIL_MODE=closed" if self.settings.fail_closed else "a redaction could not be made"
                return self._quarantine(job_id, code, verdict, phase, listed=not sync, reason=f"{verdict.reason} ({why})")
            return Outcome(S.SUCCEEDED, {**fields, CHECK_FIELD: SKIPPED}, after=after)
        fields[CHECK_FIELD] = ALLOWED
        if response is not None and response.content_sha256:
            fields[HASH_FIELD] = response.content_sha256  # readers serve only this very output
        return Outcome(S.SUCCEEDED, fields, after=after)

    async def _check(self, request: OutputCheckRequest, topic: str, phase: str, *, timeout: float,
                     retries: int = 0) -> OutputVerdict:
        started = trio.current_time()
        verdict = await self.client.check(request, timeout=timeout, retries=retries)
        label = self.metrics.topic(topic)
        self.metrics.latency.labels(topic=label, phase=phase).observe(trio.current_time() - started)
        self.metrics.checked.labels(topic=label).inc()
        if verdict.decision is OutputDecision.UNAVAILABLE and phase == "content":
            self.metrics.async_timeout.labels(topic=label).inc()
        self._learn(verdict.response)
        return verdict

    # ---- after the write --------------------------------------------------------------------

    async def after_write(self, meta: Mapping[str, Any], outcome: Outcome) -> None:
        """Tell whoever waits: the audit trail and `sys.audit.output_policy` for a quarantine,
        the checked result on `sys.job.result` for an output that may now be used, or start the
        content phase."""
        job_id, topic = meta["id"], str(meta.get("topic", ""))
        label = self.metrics.topic(topic)
        if outcome.state is S.OUTPUT_QUARANTINED:
            self.metrics.quarantined.labels(topic=label).inc()
            await self._announce_quarantine(meta, outcome)
        elif outcome.pending:
            await self.schedule(job_id)
        else:
            if outcome.fields.get(CHECK_FIELD) == SKIPPED:
                self.metrics.skipped.labels(topic=label).inc()
            await self.engine.publish_checked(meta, str(outcome.fields.get("result_ptr") or meta.get("result_ptr") or ""))

    async def _announce_quarantine(self, meta: Mapping[str, Any], outcome: Outcome) -> None:
        job_id, tenant = meta["id"], str(meta.get("tenant", ""))
        record = outcome.record or {}
        log.info("job.output_quarantined", job_id=job_id, trace_id=meta.get("trace_id") or job_id,
                 rule_id=record.get("rule_id", ""), reason=outcome.reason, code=outcome.code)
        if self.engine.audit is not None:
            self.engine.audit.record(new_event(tenant, "output_policy", "quarantine", job_id=job_id,
                                               topic=meta.get("topic", ""), rule_id=record.get("rule_id", ""),
                                               reason=outcome.reason, phase=record.get("phase", "")))
        progress = JobProgress(job_id=job_id, message=outcome.reason, status=JobStatus.JOB_STATUS_DENIED,
                               result_ptr=str(meta.get("result_ptr") or ""))
        try:
            await self.engine.bus.publish(subjects.AUDIT_OUTPUT_POLICY, encode(new_packet(
                progress, sender_id=SENDER, trace_id=meta.get("trace_id") or job_id)))
        except Exception as exc:  # the job's state and DLQ entry say it all; the event is a notice
            log.warning("scheduler.output_event_failed", job_id=job_id, error=repr(exc))

    # ---- content phase ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Runs content checks until cancelled (those cut short stay listed for the sweep)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def schedule(self, job_id: str) -> bool:
        """Start the content check of a job, waiting for a free slot (MAX_REVIEWS): a slow kernel
        slows the results consumer down rather than leaving checks to the sweep. Not running (not
        yet, or stopping): the job stays listed and the sweep comes back to it."""
        if self._nursery is None or job_id in self._reviewing:
            return False
        self._reviewing.add(job_id)
        try:
            await self._slots.acquire()
        except BaseException:
            self._reviewing.discard(job_id)
            raise
        if self._nursery is None:
            self._slots.release()
            self._reviewing.discard(job_id)
            return False
        self._nursery.start_soon(self._review_guarded, job_id)
        return True

    async def sweep(self) -> int:
        """(Reconciler leader) content checks whose scheduler went away: listed longer than the
        content timeout, page after page. Returns how many were started here."""
        started = 0
        for _ in range(SWEEP_PAGES):
            ids = await self.engine.store.output_pending(listed_before_us=overdue_before(self.settings.content_timeout),
                                                         limit=SWEEP_LIMIT)
            fresh = [job_id for job_id in ids if job_id not in self._reviewing]
            for job_id in fresh:
                started += await self.schedule(job_id)
            if len(ids) < SWEEP_LIMIT or not fresh:
                break
        return started

    async def _review_guarded(self, job_id: str) -> None:
        try:
            await self.review(job_id)
        except Exception as exc:  # stays listed: the sweep tries again
            log.warning("scheduler.output_review_failed", job_id=job_id, error=repr(exc))
        finally:
            self._reviewing.discard(job_id)
            self._slots.release()

    async def review(self, job_id: str) -> bool:
        """The content phase of one job; True when it settled the job's output.

        No job lock: the verdict is written only while the job is still SUCCEEDED and `pending`
        (checked by the write itself), and nothing else writes a SUCCEEDED job but this. Two
        checks of one job (a sweep meeting a slow first one) settle it once."""
        store = self.engine.store
        meta = await store.get(job_id)
        if not _awaiting(meta):
            await store.run_repeatable(_unlist(job_id))
            return False
        assert meta is not None
        request = _content_request(_request(meta, None))
        verdict = await self._check(request, str(meta.get("topic", "")), "content", timeout=self.settings.content_timeout)
        return await self._write(meta, self._settled(job_id, verdict, "content"))

    async def _write(self, meta: Mapping[str, Any], outcome: Outcome) -> bool:
        job_id, dlq = meta["id"], None
        if outcome.state is not S.OUTPUT_QUARANTINED:
            if not await _settle_success(self.engine.store, job_id, outcome.fields, outcome.after):
                return False
        else:
            try:
                dlq = await self.engine.end_job(job_id, S.OUTPUT_QUARANTINED, fence=0, code=outcome.code,
                                                reason=outcome.reason, tenant=str(meta.get("tenant", "")),
                                                fields={**outcome.fields, "failure_reason": outcome.reason},
                                                after=outcome.after, allowed_from=[S.SUCCEEDED], send_dlq=False,
                                                expect={CHECK_FIELD: PENDING})
            except (InvalidTransition, ConditionFailed, JobNotFound) as exc:
                await _moot(self.engine.store, job_id, exc)
                return False
            self.engine.metrics.finished.labels(topic=str(meta.get("topic", "")), state=S.OUTPUT_QUARANTINED.value).inc()
        await self.after_write(meta, outcome)
        if dlq is not None:  # after the audit record: a failed publish (retried) must not lose it
            await self.engine.send_dlq(job_id, *dlq, topic=str(meta.get("topic", "")))
        return True


def overdue_before(content_timeout: float) -> int:
    """µs: a check listed before then is past the time it may take (failing over between two
    kernel replicas included); a second check of a job still being checked is only wasted."""
    return now_us() - int((2 * content_timeout + 15) * 1_000_000)


async def skip_unchecked(engine: "Engine", content_timeout: float) -> int:
    """(Reconciler leader of a replica told not to check outputs) jobs left `pending` by replicas
    that did: settled `skipped`, their checked result sent, as `apply_result` does for `due` ones.
    Returns how many."""
    store, settled = engine.store, 0
    for _ in range(SWEEP_PAGES):
        ids = await store.output_pending(listed_before_us=overdue_before(content_timeout), limit=SWEEP_LIMIT)
        for job_id in ids:
            meta = await store.get(job_id)
            if not _awaiting(meta):
                await store.run_repeatable(_unlist(job_id))
            elif await _settle_success(store, job_id, {CHECK_FIELD: SKIPPED}, _unlist(job_id)):
                settled += 1
                await engine.publish_checked(meta, str(meta.get("result_ptr") or ""))
        if len(ids) < SWEEP_LIMIT:
            break
    return settled


def _unlist(job_id: str) -> list[tuple]:
    return [("ZREM", keys.JOB_OUTPUT_PENDING, job_id)]


async def _settle_success(store: JobStore, job_id: str, fields: dict, after: list) -> bool:
    """Write a SUCCEEDED job's cleared output mark, only while it is still `pending` (the write
    checks it; `after` unlists it in the same script). False: settled by someone else first."""
    try:
        await store.set_fields(job_id, fields, expect={"state": S.SUCCEEDED.value, CHECK_FIELD: PENDING}, after=after)
    except (ConditionFailed, JobNotFound) as exc:
        await _moot(store, job_id, exc)
        return False
    return True


async def _moot(store: JobStore, job_id: str, why: Exception) -> None:
    log.info("scheduler.output_review_moot", job_id=job_id, error=str(why))
    await store.run_repeatable(_unlist(job_id))


def _awaiting(meta: Mapping[str, Any] | None) -> bool:
    return meta is not None and meta.get("state") == S.SUCCEEDED.value and meta.get(CHECK_FIELD) == PENDING


def _request(meta: Mapping[str, Any], result: JobResult | None) -> OutputCheckRequest:
    labels = meta.get("labels") or {}
    request = OutputCheckRequest(
        job_id=str(meta["id"]), topic=str(meta.get("topic", "")), tenant=str(meta.get("tenant", "")),
        labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {},
        capabilities=[str(meta["capability"])] if meta.get("capability") else [],
        risk_tags=[str(tag) for tag in meta.get("risk_tags") or []],
        principal_id=str(meta.get("principal") or ""),
        content_type=str(labels.get("content_type", "")) if isinstance(labels, Mapping) else "",
    )
    if result is not None:
        request.result_ptr = result.result_ptr
        request.error_message = result.error_message
        request.error_code = result.error_code
        request.worker_id = result.worker_id
        request.execution_ms = int(result.execution_ms)
        request.artifact_ptrs.extend(result.artifact_ptrs)
    else:
        request.result_ptr = str(meta.get("result_ptr") or "")
        request.worker_id = str(meta.get("worker_id") or "")
        request.execution_ms = int(meta.get("execution_ms") or 0)
    return request


def _content_request(request: OutputCheckRequest) -> OutputCheckRequest:
    content = OutputCheckRequest()
    content.CopyFrom(request)
    content.content_phase = True
    return content


def _record(verdict: OutputVerdict, phase: str) -> dict:
    record: dict[str, Any] = {"decision": verdict.decision.value, "reason": verdict.reason, "phase": phase,
                              "checked_at": now_us()}
    response = verdict.response
    if response is not None:
        record.update(rule_id=response.rule_id, policy_snapshot=response.policy_snapshot,
                      findings=[json_format.MessageToDict(f, preserving_proto_field_name=True) for f in response.findings])
        if response.redacted_ptr:
            record["redacted_ptr"] = response.redacted_ptr
    return record

