"""`cordum.v1.OutputPolicyService` on the safety kernel: output rules applied to what a job produced
(cordum-jobpath §4.7; the rules and their evaluation are `safety.output_rules`, pure).

The metadata phase evaluates the rules on what the scheduler sends (topic, tenant, labels, error,
sizes). The first rule that needs the content (or the size) stops it: then a small output
(SAFETY_OUTPUT_INLINE_BYTES, 64 KiB; 0 = never) is read and checked whole in the same call, and a
larger one is left to the content phase (`metadata_suffices` false), as Cordum does for all. The
content phase (`content_phase`) scans the job's own output at `res:<job_id>` (the only key ever
read, whatever `result_ptr` names), read with its size in one round trip; `output_content`, if a
caller sends it, is scanned instead. A REDACT verdict on an output the kernel read whole stores
the redacted copy at `res:<job_id>:redacted` (a day, like outputs) and answers its pointer. A
policy without output rules answers ALLOW at once and says so (`no_output_rules`): schedulers then
stop asking until the policy changes.

Scanning is CPU work: outputs over INLINE_SCAN_BYTES are scanned on a worker thread, so input
checks keep being answered meanwhile.
"""

from __future__ import annotations

import hashlib
import time

import trio

from cordum.infra.grpc import RpcError
from cordum.infra.metrics import BoundedLabel, Metrics
from cordum.infra.redis import Redis
from cordum.protocol import pointers
from cordum.runtime.log import get_logger
from cordum.safety.kernel import Kernel
from cordum.safety.output_rules import OutputFacts, OutputPolicy, OutputVerdict, evaluate_output
from cordum.store import keys
from cordum.store.jobs import DATA_TTL
from cordum.v1 import output_policy_pb2 as pb

log = get_logger("safety.output")
INLINE_SCAN_BYTES = 64 * 1024  # larger outputs are scanned on a worker thread
DEFAULT_INLINE_BYTES = 64 * 1024  # SAFETY_OUTPUT_INLINE_BYTES: checked whole in the metadata call
MAX_OUTPUT_READ = 16 << 20  # larger outputs: only the scanned head is read, and cannot be redacted
READ_TIMEOUT = 5.0

_DECISIONS = {"allow": pb.OUTPUT_DECISION_ALLOW, "quarantine": pb.OUTPUT_DECISION_QUARANTINE,
              "redact": pb.OUTPUT_DECISION_REDACT}

# The whole output if it is at most ARGV[1] bytes, else its first ARGV[2] bytes (none for 0); and
# its size.
_READ = """
local n = redis.call('STRLEN', KEYS[1])
if n <= tonumber(ARGV[1]) then return {n, redis.call('GET', KEYS[1]) or ''} end
if tonumber(ARGV[2]) == 0 then return {n, ''} end
return {n, redis.call('GETRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)}
"""


class OutputKernelMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.topic = BoundedLabel()
        self.evaluations = metrics.counter("cordum_output_evaluations_total",
                                           "Total output policy evaluations executed per topic", ["topic"])
        self.denials = metrics.counter("cordum_output_denials_total",
                                       "Output policy evaluations that denied or quarantined a result per topic", ["topic"])
        self.redactions = metrics.counter("cordum_output_redactions_total",
                                          "Output policy evaluations that required redaction per topic", ["topic"])
        self.duration = metrics.histogram("cordum_output_eval_duration_seconds", "Duration of output policy evaluation",
                                          buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5))


class OutputPolicyServicer:
    def __init__(self, kernel: Kernel, redis: Redis, counters: OutputKernelMetrics, *,
                 inline_bytes: int = DEFAULT_INLINE_BYTES) -> None:
        self._kernel = kernel
        self._inline_bytes = inline_bytes
        self._redis = redis
        self._counters = counters

    async def CheckOutput(self, request: pb.OutputCheckRequest) -> pb.OutputCheckResponse:
        policy = self._kernel.policy
        rules = policy.output if policy is not None else OutputPolicy()
        response = pb.OutputCheckResponse(policy_snapshot=self._kernel.snapshot, no_output_rules=not rules.has_rules,
                                          metadata_suffices=not rules.needs_content)
        if not rules.has_rules:
            response.reason = "no output rules"
            return response
        size = int(request.output_size_bytes) if request.output_size_bytes > 0 else -1
        if request.output_content:  # the caller's own copy: checked, never stored (see _finish)
            content = bytes(request.output_content)
            return await self._finish(request, response, rules, content, len(content) if size < 0 else size)
        if request.content_phase:
            problem = _foreign_pointer(request)
            if problem:  # a per-job verdict: the kernel is fine, this output cannot be checked
                return _with(response, pb.OUTPUT_DECISION_QUARANTINE, problem)
            try:
                content, size, whole = await self._output_of(request, rules.max_scan_bytes, MAX_OUTPUT_READ)
            except _Unreadable as exc:
                return self._unreadable(response, rules, str(exc))
            return await self._finish(request, response, rules, content, size, read_here=True, whole=whole)
        verdict = self._evaluate_now(rules, _facts(request, None, size))
        if verdict.deferred and self._inline_bytes and request.result_ptr and not _foreign_pointer(request):
            # A small output is checked whole right now: one call instead of two, and the job's
            # SUCCEEDED comes with its output already cleared. Larger ones: the content phase.
            try:
                content, size, whole = await self._output_of(request, 0, self._inline_bytes)
            except _Unreadable:
                whole = False
            if whole:
                return await self._finish(request, response, rules, content, size, read_here=True)
        response.metadata_suffices = not verdict.deferred  # first match decided, or the content must
        return self._answer(response, verdict)

    def _evaluate_now(self, rules: OutputPolicy, facts: OutputFacts) -> OutputVerdict:
        started = time.perf_counter()
        verdict = evaluate_output(rules, facts)
        self._counted(facts.topic, verdict, time.perf_counter() - started)
        return verdict

    async def _finish(self, request: pb.OutputCheckRequest, response: pb.OutputCheckResponse, rules: OutputPolicy,
                      content: bytes, size: int, *, read_here: bool = False, whole: bool = True) -> pb.OutputCheckResponse:
        """The verdict on the content (scanned off the event loop when large); a redaction stored
        only of what the kernel itself read whole from the job's output: a caller's own
        `output_content` never lands where the gateway serves from."""
        facts = _facts(request, content, size)
        if len(content) > INLINE_SCAN_BYTES:
            started = time.perf_counter()
            verdict = await trio.to_thread.run_sync(evaluate_output, rules, facts)
            self._counted(request.topic, verdict, time.perf_counter() - started)
        else:
            verdict = self._evaluate_now(rules, facts)
        if read_here and whole:
            response.content_sha256 = hashlib.sha256(content).hexdigest()
        response.metadata_suffices = True  # decided on the content itself
        if verdict.decision == "redact":
            if not whole:
                verdict = OutputVerdict("quarantine", f"{verdict.reason}; the output is larger than "
                                        f"{MAX_OUTPUT_READ} bytes and cannot be redacted", verdict.rule_id, verdict.findings)
            elif verdict.redacted is not None and read_here:
                response.redacted_ptr = await self._store_redacted(request.job_id, verdict.redacted)
        return self._answer(response, verdict)

    @staticmethod
    def _answer(response: pb.OutputCheckResponse, verdict: OutputVerdict) -> pb.OutputCheckResponse:
        response.decision = _DECISIONS.get(verdict.decision, pb.OUTPUT_DECISION_QUARANTINE)
        response.reason = verdict.reason
        response.rule_id = verdict.rule_id
        for finding in verdict.findings:
            response.findings.add(type=finding.type, severity=finding.severity, detail=finding.detail,
                                  offset=finding.offset, length=finding.length, scanner=finding.scanner,
                                  confidence=finding.confidence, matched_pattern=finding.matched_pattern)
        return response

    def _counted(self, topic: str, verdict: OutputVerdict, elapsed: float) -> None:
        label = self._counters.topic(topic)
        self._counters.evaluations.labels(topic=label).inc()
        self._counters.duration.observe(elapsed)
        if verdict.decision == "quarantine":
            self._counters.denials.labels(topic=label).inc()
        elif verdict.decision == "redact" and verdict.redacted is not None:  # not the metadata phase's intent
            self._counters.redactions.labels(topic=label).inc()

    def _unreadable(self, response: pb.OutputCheckResponse, rules: OutputPolicy, why: str) -> pb.OutputCheckResponse:
        """The output could not be read here: the policy's own `output_policy.fail_mode` decides
        if it names one, else the scheduler's (this answer is then an error it counts)."""
        if rules.fail_mode == "closed":
            return _with(response, pb.OUTPUT_DECISION_QUARANTINE, f"{why} (output_policy.fail_mode: closed)")
        if rules.fail_mode == "open":
            return _with(response, pb.OUTPUT_DECISION_ALLOW, f"{why}; let through unchecked (output_policy.fail_mode: open)")
        raise RpcError("UNAVAILABLE", why)

    async def _output_of(self, request: pb.OutputCheckRequest, prefix: int, whole_up_to: int) -> tuple[bytes, int, bool]:
        """(content, size, whether content is all of it) of the job's stored output: all of it up
        to `whole_up_to` bytes, else its first `prefix` bytes."""
        try:
            with trio.fail_after(READ_TIMEOUT):
                # As bytes: an output need not be UTF-8 (the rules decide what that means).
                size, value = await self._redis.execute_bytes("EVAL", _READ, 1, keys.result(request.job_id),
                                                              whole_up_to, prefix)
        except Exception as exc:
            log.warning("safety.output_read_failed", job_id=request.job_id, error=repr(exc))
            raise _Unreadable("the job's output could not be read") from None
        data = value.encode() if isinstance(value, str) else bytes(value or b"")
        size = int(size)
        return data, size, len(data) >= size

    async def _store_redacted(self, job_id: str, redacted: bytes) -> str:
        key = keys.redacted_result(job_id)
        try:
            with trio.fail_after(READ_TIMEOUT):
                await self._redis.execute("SET", key, redacted, "EX", DATA_TTL)
        except Exception as exc:
            log.warning("safety.redacted_store_failed", job_id=job_id, error=repr(exc))
            raise RpcError("UNAVAILABLE", "the redacted copy could not be stored") from None
        return pointers.ptr(key)


class _Unreadable(Exception):
    """The job's output could not be read (Redis away or too slow)."""


def _foreign_pointer(request: pb.OutputCheckRequest) -> str:
    """Why the content phase cannot check this job's output ("" when it can): only the job's own
    output (`res:<job_id>`) is ever read, whatever `result_ptr` names."""
    if not request.job_id:
        return "a content check needs the job's id"
    if not request.result_ptr:
        return ""
    own = keys.result(request.job_id)
    try:
        named = pointers.key_of(request.result_ptr)
    except ValueError as exc:
        return f"the result pointer cannot be checked: {exc}"
    if named != own:
        return f"the result pointer names {named!r}, not the job's output {own!r}: it cannot be checked"
    return ""


def _with(response: pb.OutputCheckResponse, decision: int, reason: str) -> pb.OutputCheckResponse:
    response.decision = decision
    response.reason = reason
    return response


def _facts(request: pb.OutputCheckRequest, content: bytes | None, size: int) -> OutputFacts:
    return OutputFacts(
        job_id=request.job_id, topic=request.topic, tenant=request.tenant, labels=dict(request.labels),
        capabilities=tuple(request.capabilities), risk_tags=tuple(request.risk_tags),
        error_message=request.error_message, error_code=request.error_code, output_size_bytes=size,
        content_type=request.content_type or request.labels.get("content_type", ""), content=content,
    )
