"""NATS subjects, queue groups, JetStream streams and msg-ids (spec cordum-jobpath §1.7-1.8,
horizontal-scaling guide "NATS Subject Matrix"). Names are kept exactly: operators rely on them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from cordum.agent.v1.buspacket_pb2 import BusPacket

# --- subjects -------------------------------------------------------------------------------
SUBMIT = "sys.job.submit"
RESULT = "sys.job.result"
CANCEL = "sys.job.cancel"
DLQ = "sys.job.dlq"
PROGRESS = "sys.job.progress"
HEARTBEAT = "sys.heartbeat"
HANDSHAKE = "sys.handshake"
CONFIG_CHANGED = "sys.config.changed"
ALERT = "sys.alert"
WORKFLOW_EVENT = "sys.workflow.event"
AUDIT_EXPORT = "sys.audit.export"
# workflow approval gate: the scheduler auto-completes these, no worker runs them
APPROVAL_GATE = "sys.approval.gate"
APPROVAL_GATE_TOPIC = "job.cordum.approval-gate"
# output-policy events (a JobProgress), seen by the gateway's sys.audit.> tap
AUDIT_OUTPUT_POLICY = "sys.audit.output_policy"
# gateway broadcast taps for WebSocket fan-out
JOB_EVENTS_ALL = "sys.job.>"
AUDIT_ALL = "sys.audit.>"

# --- queue groups (load-balanced consumers) ---------------------------------------------------
QUEUE_SCHEDULER = "cordum-scheduler"
QUEUE_WORKFLOW_ENGINE = "cordum-workflow-engine"
QUEUE_GATEWAY = "cordum-gateway"
QUEUE_AUDIT_EXPORTERS = "audit-exporters"

JOB_PREFIX = "job."
# JobRequest label that overrides the JetStream msg-id (approval resubmits use it)
LABEL_BUS_MSG_ID = "cordum.bus_msg_id"

# NATS header naming the dispatch attempt a job message (or its result) belongs to. CAP packets have
# no field for it, and it must not live in the packet: a worker on the public CAP SDK ignores it, and
# a result without it is taken as one for the job's current attempt.
ATTEMPT_HEADER = "Cordum-Attempt"


# Heartbeat label with which a worker says it is leaving: "draining" (takes no new jobs, finishes the
# ones it started) or "stopped" (gone: whatever was sent to it must go to another worker).
WORKER_STATE_LABEL = "cordum.worker.state"
WORKER_DRAINING = "draining"
WORKER_STOPPED = "stopped"
# Heartbeat label of workers that keep a presence key in Redis (our SDK): the reaper judges them by
# that key, and others (the public CAP SDK) by their heartbeats alone.
WORKER_PRESENCE_LABEL = "cordum.worker.presence"


def attempt_of(headers: Mapping[str, str] | None) -> int | None:
    """The attempt a message's headers name, or None (absent or not a positive number)."""
    raw = (headers or {}).get(ATTEMPT_HEADER, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None

_BAD_CHARS = frozenset(" \t\r\n\f\v")


def validate_subject(subject: str, *, wildcards: bool = False) -> str:
    """Return ``subject`` if it is a well-formed NATS subject, else raise ValueError.

    Tokens are dot-separated, non-empty and free of whitespace. With ``wildcards``, ``*`` may
    stand as a whole token and ``>`` as the whole last token; without, neither may appear.
    """
    if not subject:
        raise ValueError("subject must not be empty")
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            raise ValueError(f"subject {subject!r} has an empty token")
        if _BAD_CHARS & set(token):
            raise ValueError(f"subject {subject!r} contains whitespace")
        if token in ("*", ">") and wildcards:
            if token == ">" and i != len(tokens) - 1:
                raise ValueError(f"subject {subject!r}: '>' must be the last token")
            continue
        if "*" in token or ">" in token:
            raise ValueError(f"subject {subject!r}: wildcard not allowed here")
    return subject


def _token(value: str, what: str) -> str:
    if not value or "." in value:
        raise ValueError(f"{what} {value!r} must be one non-empty subject token")
    validate_subject(value)
    return value


def worker_subject(worker_id: str) -> str:
    """Direct subject of one worker: ``worker.<id>.jobs`` (the id must be a single token, or
    the subject would fall outside the CORDUM_JOBS stream's ``worker.*.jobs``)."""
    return f"worker.{_token(worker_id, 'worker_id')}.jobs"


def job_subject(topic: str) -> str:
    """Pool subject for a topic; a topic already starting with ``job.`` is used as is."""
    subject = topic if topic.startswith(JOB_PREFIX) else JOB_PREFIX + topic
    return validate_subject(subject)


def _durable_part(value: str) -> str:
    return value.strip().replace(".", "_").replace("*", "STAR").replace(">", "GT")


def durable_name(queue: str, subject: str) -> str:
    """Shared JetStream durable of a queue group: ``dur_<queue>__<subject>``.

    ``.`` -> ``_``, ``*`` -> ``STAR``, ``>`` -> ``GT`` in both parts (as the Go bus does), so
    every replica of a group binds the same consumer. Broadcast subscriptions (no queue) are
    ephemeral and have no durable name: an empty queue is an error here.
    """
    validate_subject(subject, wildcards=True)
    if not queue.strip() or _BAD_CHARS & set(queue.strip()):
        raise ValueError(f"queue group {queue!r} must be non-empty, without whitespace")
    return f"dur_{_durable_part(queue)}__{_durable_part(subject)}"


# --- JetStream streams ------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]


STREAM_SYS = "CORDUM_SYS"
STREAM_JOBS = "CORDUM_JOBS"

# Only the durable sys subjects are stored. The Go original stores all of ``sys.>``, which also
# persists every heartbeat/progress broadcast that nobody reads back from the stream.
DURABLE_SYS_SUBJECTS: tuple[str, ...] = (SUBMIT, RESULT, CANCEL, DLQ, AUDIT_EXPORT)
STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec(STREAM_SYS, DURABLE_SYS_SUBJECTS),
    StreamSpec(STREAM_JOBS, ("job.>", "worker.*.jobs")),
)


def is_durable_subject(subject: str) -> bool:
    """True when a stream stores ``subject`` (publish via JetStream, consume with acks)."""
    if subject in DURABLE_SYS_SUBJECTS:
        return True
    tokens = subject.split(".")
    if tokens[0] == "job":
        return len(tokens) >= 2 and all(tokens)
    return len(tokens) == 3 and tokens[0] == "worker" and tokens[2] == "jobs" and bool(tokens[1])


def msg_id_for(packet: BusPacket, subject: str) -> str | None:
    """JetStream msg-id for dedup within the stream's 2-minute window (spec §1.8).

    JobRequest -> ``jobreq:<job_id>`` (no subject: the same job published twice to any stored
    subject is dropped), or ``jobreq:<subject>:<override>`` with label ``cordum.bus_msg_id``;
    JobResult -> ``<subject>:<job_id>``; Heartbeat -> ``<subject>:<worker_id>`` (as the Go bus;
    heartbeats are not stored, so unused); Handshake -> ``handshake:<component_id>``; else None.
    """
    kind = packet.WhichOneof("payload")
    if kind == "job_request":
        req = packet.job_request
        override = req.labels.get(LABEL_BUS_MSG_ID, "").strip()
        if override:
            return f"jobreq:{subject}:{override}"
        return _prefixed("jobreq:", req.job_id)
    if kind == "job_result":
        return _prefixed(subject + ":", packet.job_result.job_id)
    if kind == "heartbeat":
        return _prefixed(subject + ":", packet.heartbeat.worker_id)
    if kind == "handshake":
        return _prefixed("handshake:", packet.handshake.component_id)
    return None


def _prefixed(prefix: str, ident: str) -> str | None:
    ident = ident.strip()
    return prefix + ident if ident else None


def stream_for(subject: str) -> str:
    """Name of the stream that stores ``subject``; ValueError for a subject no stream stores."""
    if subject in DURABLE_SYS_SUBJECTS:
        return STREAM_SYS
    if is_durable_subject(subject):
        return STREAM_JOBS
    raise ValueError(f"no stream stores subject {subject!r}")


# The guide's queue-group matrix for stored subjects. These durables are created together with
# the streams, by whichever service starts first, so a message published before its consumer
# service ever ran is still delivered to it.
WELL_KNOWN_DURABLES: tuple[tuple[str, str], ...] = (
    (QUEUE_SCHEDULER, SUBMIT),
    (QUEUE_SCHEDULER, RESULT),
    (QUEUE_SCHEDULER, CANCEL),
    (QUEUE_WORKFLOW_ENGINE, RESULT),
    (QUEUE_WORKFLOW_ENGINE, DLQ),
    (QUEUE_GATEWAY, DLQ),
    (QUEUE_AUDIT_EXPORTERS, AUDIT_EXPORT),
)
