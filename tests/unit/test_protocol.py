"""Pure CAP protocol helpers: packets, subjects, durable names, msg-ids, pointers."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

import pytest

from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.handshake_pb2 import Handshake
from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.agent.v1.job_pb2 import JobCancel, JobProgress, JobRequest, JobResult
from cordum.protocol import packets, pointers, subjects
from cordum.protocol import (
    PacketError,
    decode,
    encode,
    job_id_of,
    new_packet,
    payload_kind,
    payload_of,
)

T0 = datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


# --- packets ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("payload", "kind", "job_id"),
    [
        (JobRequest(job_id="j1", topic="job.x"), "job_request", "j1"),
        (JobResult(job_id="j2"), "job_result", "j2"),
        (JobProgress(job_id="j3"), "job_progress", "j3"),
        (JobCancel(job_id="j4"), "job_cancel", "j4"),
        (Heartbeat(worker_id="w1"), "heartbeat", None),
        (SystemAlert(message="m"), "alert", None),
        (Handshake(component_id="c1"), "handshake", None),
    ],
)
def test_new_packet_picks_oneof_and_round_trips(payload, kind, job_id):
    pkt = new_packet(payload, sender_id="cordum-scheduler", trace_id="t-1", created_at=T0)
    assert payload_kind(pkt) == kind
    assert payload_of(pkt) == payload
    assert job_id_of(pkt) == job_id
    assert pkt.protocol_version == packets.PROTOCOL_VERSION == 1
    assert pkt.sender_id == "cordum-scheduler" and pkt.trace_id == "t-1"
    assert pkt.created_at.ToDatetime(tzinfo=timezone.utc) == T0
    assert decode(encode(pkt)) == pkt


def test_new_packet_defaults_trace_id_and_time():
    before = datetime.now(timezone.utc).replace(microsecond=0)
    pkt = new_packet(JobCancel(job_id="j"), sender_id="gw")
    uuid.UUID(pkt.trace_id)  # a fresh UUID
    assert pkt.trace_id != new_packet(JobCancel(job_id="j"), sender_id="gw").trace_id
    assert pkt.created_at.ToDatetime(tzinfo=timezone.utc) >= before


def test_new_packet_copies_payload():
    req = JobRequest(job_id="j")
    pkt = new_packet(req, sender_id="gw")
    req.job_id = "changed"
    assert pkt.job_request.job_id == "j"


def test_new_packet_rejects_bad_input():
    with pytest.raises(TypeError, match="BusPacket"):
        new_packet(BusPacket(), sender_id="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sender_id"):
        new_packet(JobCancel(job_id="j"), sender_id="")


def test_decode_empty():
    with pytest.raises(PacketError, match="empty"):
        decode(b"")


def test_decode_garbage_is_a_packet_error_and_value_error():
    with pytest.raises(PacketError, match="undecodable BusPacket") as info:
        decode(b"\xff\xff\xff\xff")
    assert isinstance(info.value, ValueError)


def test_decode_truncated():
    data = encode(new_packet(JobRequest(job_id="j" * 50), sender_id="s", trace_id="t"))
    with pytest.raises(PacketError, match="undecodable"):
        decode(data[:-10])


def test_decode_missing_payload():
    data = BusPacket(trace_id="t", sender_id="s", protocol_version=1).SerializeToString()
    with pytest.raises(PacketError, match="payload"):
        decode(data)


def test_decode_unknown_newer_payload_kind():
    # field 19 (a newer CAP worker-handshake payload) is unknown to us: nothing to act on
    data = BusPacket(trace_id="t", sender_id="s", protocol_version=1).SerializeToString()
    data += b"\x9a\x01\x00"  # field 19, wire type 2, length 0
    with pytest.raises(PacketError, match="without a known payload"):
        decode(data)


def test_decode_missing_protocol_version():
    pkt = new_packet(JobCancel(job_id="j"), sender_id="s")
    pkt.protocol_version = 0
    with pytest.raises(PacketError, match="protocol_version 0"):
        decode(encode(pkt))


def test_decode_accepts_newer_version_and_keeps_unknown_fields():
    pkt = new_packet(JobCancel(job_id="j"), sender_id="s")
    pkt.protocol_version = 2
    data = encode(pkt) + b"\x92\x01\x03tok"  # field 18 auth_token (newer CAP)
    got = decode(data)
    assert got.protocol_version == 2
    assert encode(got).endswith(b"\x92\x01\x03tok")  # unknown field survives re-encoding


def test_decode_accepts_memoryview():
    pkt = new_packet(Heartbeat(worker_id="w"), sender_id="w")
    assert decode(memoryview(encode(pkt))) == pkt


def test_payload_kind_without_payload():
    with pytest.raises(PacketError):
        payload_kind(BusPacket())
    assert job_id_of(BusPacket()) is None


def test_job_id_of_empty_job_id_is_none():
    assert job_id_of(new_packet(JobResult(), sender_id="s")) is None


# --- subjects ---------------------------------------------------------------------------------
def test_subject_constants():
    s = subjects
    assert (s.SUBMIT, s.RESULT, s.CANCEL, s.DLQ, s.PROGRESS) == (
        "sys.job.submit", "sys.job.result", "sys.job.cancel", "sys.job.dlq", "sys.job.progress",
    )
    assert (s.HEARTBEAT, s.HANDSHAKE, s.CONFIG_CHANGED, s.ALERT, s.WORKFLOW_EVENT, s.AUDIT_EXPORT) == (
        "sys.heartbeat", "sys.handshake", "sys.config.changed", "sys.alert",
        "sys.workflow.event", "sys.audit.export",
    )
    assert (s.QUEUE_SCHEDULER, s.QUEUE_WORKFLOW_ENGINE, s.QUEUE_GATEWAY, s.QUEUE_AUDIT_EXPORTERS) == (
        "cordum-scheduler", "cordum-workflow-engine", "cordum-gateway", "audit-exporters",
    )


def test_worker_and_job_subjects():
    assert subjects.worker_subject("w-1") == "worker.w-1.jobs"
    assert subjects.job_subject("job.default") == "job.default"
    assert subjects.job_subject("tools.git") == "job.tools.git"
    for bad in ("", "a.b", "a b", "*", ">"):
        with pytest.raises(ValueError):
            subjects.worker_subject(bad)
    for bad in ("", "job..x", "job.a b", "job.*", "x.>", "job."):
        with pytest.raises(ValueError):
            subjects.job_subject(bad)


@pytest.mark.parametrize(
    ("subject", "wild"),
    [("sys.job.submit", False), ("job.>", True), ("worker.*.jobs", True), ("a", False)],
)
def test_validate_subject_ok(subject, wild):
    assert subjects.validate_subject(subject, wildcards=wild) == subject


@pytest.mark.parametrize(
    ("subject", "wild", "msg"),
    [
        ("", True, "empty"),
        ("sys..job", True, "empty token"),
        (".sys", True, "empty token"),
        ("sys.", True, "empty token"),
        ("sys.job submit", True, "whitespace"),
        ("sys.\tjob", True, "whitespace"),
        ("job.>.x", True, "last token"),
        ("job.a*", True, "wildcard"),
        ("job.*", False, "wildcard"),
        ("job.>", False, "wildcard"),
    ],
)
def test_validate_subject_errors(subject, wild, msg):
    with pytest.raises(ValueError, match=msg):
        subjects.validate_subject(subject, wildcards=wild)


@pytest.mark.parametrize(
    ("queue", "subject", "name"),
    [
        ("cordum-scheduler", "sys.job.submit", "dur_cordum-scheduler__sys_job_submit"),
        ("cordum-scheduler", "sys.job.result", "dur_cordum-scheduler__sys_job_result"),
        ("cordum-workflow-engine", "sys.job.result", "dur_cordum-workflow-engine__sys_job_result"),
        ("cordum-gateway", "sys.job.dlq", "dur_cordum-gateway__sys_job_dlq"),
        ("audit-exporters", "sys.audit.export", "dur_audit-exporters__sys_audit_export"),
        ("q", "worker.*.jobs", "dur_q__worker_STAR_jobs"),
        ("q", "job.>", "dur_q__job_GT"),
        # workers use the subject as the queue group: dots in the queue are replaced too
        ("job.default", "job.default", "dur_job_default__job_default"),
    ],
)
def test_durable_name(queue, subject, name):
    assert subjects.durable_name(queue, subject) == name


def test_durable_name_errors():
    with pytest.raises(ValueError, match="queue"):
        subjects.durable_name("", "sys.job.submit")
    with pytest.raises(ValueError, match="queue"):
        subjects.durable_name("a b", "sys.job.submit")
    with pytest.raises(ValueError, match="empty token"):
        subjects.durable_name("q", "sys..x")


def test_streams():
    by_name = {s.name: s.subjects for s in subjects.STREAMS}
    assert by_name == {
        "CORDUM_SYS": (
            "sys.job.submit", "sys.job.result", "sys.job.cancel", "sys.job.dlq", "sys.audit.export",
        ),
        "CORDUM_JOBS": ("job.>", "worker.*.jobs"),
    }
    assert subjects.STREAM_SYS == "CORDUM_SYS" and subjects.STREAM_JOBS == "CORDUM_JOBS"
    for stream in subjects.STREAMS:
        for subject in stream.subjects:
            subjects.validate_subject(subject, wildcards=True)


def test_stream_for():
    for subject in ("sys.job.submit", "sys.job.result", "sys.job.cancel", "sys.job.dlq",
                    "sys.audit.export"):
        assert subjects.stream_for(subject) == "CORDUM_SYS"
    for subject in ("job.default", "job.a.b", "worker.w1.jobs"):
        assert subjects.stream_for(subject) == "CORDUM_JOBS"
    for subject in ("sys.heartbeat", "sys.job.progress", "worker.a.b.jobs"):
        with pytest.raises(ValueError, match="no stream stores"):
            subjects.stream_for(subject)


def test_well_known_durables():
    assert set(subjects.WELL_KNOWN_DURABLES) == {
        ("cordum-scheduler", "sys.job.submit"),
        ("cordum-scheduler", "sys.job.result"),
        ("cordum-scheduler", "sys.job.cancel"),
        ("cordum-workflow-engine", "sys.job.result"),
        ("cordum-workflow-engine", "sys.job.dlq"),
        ("cordum-gateway", "sys.job.dlq"),
        ("audit-exporters", "sys.audit.export"),
    }
    for queue, subject in subjects.WELL_KNOWN_DURABLES:
        assert subjects.stream_for(subject) == "CORDUM_SYS"
        assert subjects.durable_name(queue, subject).startswith("dur_")


@pytest.mark.parametrize(
    "subject",
    ["sys.job.submit", "sys.job.result", "sys.job.cancel", "sys.job.dlq", "sys.audit.export",
     "job.default", "job.tools.git", "job.cordum.approval-gate", "worker.w1.jobs"],
)
def test_durable_subjects(subject):
    assert subjects.is_durable_subject(subject)


@pytest.mark.parametrize(
    "subject",
    ["sys.heartbeat", "sys.handshake", "sys.config.changed", "sys.alert", "sys.job.progress",
     "sys.workflow.event", "sys.approval.gate", "sys.audit.output_policy", "job", "job.",
     "worker.a.b.jobs", "worker..jobs", "worker.w1.other", "jobs.x"],
)
def test_broadcast_subjects_not_durable(subject):
    assert not subjects.is_durable_subject(subject)


# --- msg ids ----------------------------------------------------------------------------------
def _pkt(payload):
    return new_packet(payload, sender_id="s", trace_id="t")


def test_msg_id_job_request():
    pkt = _pkt(JobRequest(job_id="j1", topic="job.x"))
    assert subjects.msg_id_for(pkt, "sys.job.submit") == "jobreq:j1"
    assert subjects.msg_id_for(pkt, "worker.w.jobs") == "jobreq:j1"  # subject not part of it


def test_msg_id_job_request_override():
    pkt = _pkt(JobRequest(job_id="j1", labels={"cordum.bus_msg_id": " approval:j1 "}))
    assert subjects.msg_id_for(pkt, "sys.job.submit") == "jobreq:sys.job.submit:approval:j1"
    blank = _pkt(JobRequest(job_id="j1", labels={"cordum.bus_msg_id": "  "}))
    assert subjects.msg_id_for(blank, "sys.job.submit") == "jobreq:j1"


def test_msg_id_other_payloads():
    assert subjects.msg_id_for(_pkt(JobResult(job_id="j2")), "sys.job.result") == "sys.job.result:j2"
    assert subjects.msg_id_for(_pkt(JobResult(job_id="j2")), "sys.job.dlq") == "sys.job.dlq:j2"
    assert subjects.msg_id_for(_pkt(Handshake(component_id="c")), "sys.handshake") == "handshake:c"
    assert subjects.msg_id_for(_pkt(Heartbeat(worker_id="w")), "sys.heartbeat") == "sys.heartbeat:w"
    for payload in (JobCancel(job_id="j"), JobProgress(job_id="j"), SystemAlert(message="m")):
        assert subjects.msg_id_for(_pkt(payload), "sys.x") is None


def test_msg_id_empty_ids():
    assert subjects.msg_id_for(_pkt(JobRequest()), "sys.job.submit") is None
    assert subjects.msg_id_for(_pkt(JobResult(job_id="  ")), "sys.job.result") is None
    assert subjects.msg_id_for(_pkt(Handshake()), "sys.handshake") is None
    assert subjects.msg_id_for(BusPacket(), "sys.job.submit") is None


# --- pointers ---------------------------------------------------------------------------------
def test_pointers():
    assert pointers.ptr("ctx:j1") == "redis://ctx:j1"
    assert pointers.key_of("redis://res:j1") == "res:j1"
    assert pointers.context_key("j1") == "ctx:j1"
    assert pointers.result_key("j1") == "res:j1"
    assert pointers.key_of(pointers.ptr(pointers.context_key("a:b"))) == "ctx:a:b"


@pytest.mark.parametrize("bad", ["", "ctx:j1", "s3://bucket/x", "REDIS://ctx:j", "redis:/ctx", "redis://"])
def test_pointer_errors(bad):
    with pytest.raises(ValueError):
        pointers.key_of(bad)


def test_pointer_builders_reject_empty():
    for fn in (pointers.ptr, pointers.context_key, pointers.result_key):
        with pytest.raises(ValueError):
            fn("")
