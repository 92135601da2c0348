"""Wire compatibility with the public CAP Python SDK (cap-sdk-python 2.17.0), across processes.

Our .proto files define the CAP v2.13.1 field set; the SDK is newer. Checked here:
* our descriptors are a subset of the SDK's with identical number/type/label/type/oneof, and
  what we leave out is exactly the list of newer-CAP fields below (so nothing is forgotten);
* every payload kind, fully populated, encoded by us decodes with the SDK to the same values,
  and the SDK's encoding of those values decodes with ours to the same values;
* packets made by our ``new_packet`` pass the envelope checks SDK workers apply on receipt.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.protobuf import json_format, unknown_fields
from google.protobuf.message import Message

from cordum.agent.v1 import (
    alert_pb2,
    buspacket_pb2,
    handshake_pb2,
    heartbeat_pb2,
    job_pb2,
    safety_pb2,
)
from cordum.protocol import new_packet
from .sdk_codec import describe_files

pytestmark = pytest.mark.slow

OUR_MODULES = (job_pb2, heartbeat_pb2, handshake_pb2, alert_pb2, buspacket_pb2, safety_pb2)
P = "cordum.agent.v1."

# Newer CAP (after v2.13.1) that we deliberately do not define; unknown fields round-trip.
NEWER_MESSAGES = {
    P + n for n in (
        "IdentityBinding", "DispatchIdentity", "ResourceRef", "SignatureMetadata",
        "WorkerHandshakeChallengeRequest", "WorkerHandshakeChallenge",
        "WorkerHandshakeAuthenticate", "WorkerHandshakeResult",
    )
}
NEWER_ENUMS = {
    P + n for n in (
        "WorkerHandshakePurpose", "WorkerHandshakeProofAlgorithm", "WorkerHandshakeRejectionReason",
    )
}
NEWER_FIELDS = {
    P + "Compensation": {"identity", "dispatch", "context_ref"},
    P + "JobRequest": {"identity", "dispatch", "context_ref"},
    P + "JobResult": {"dispatch", "identity", "result_ref", "artifact_refs"},
    P + "JobProgress": {"dispatch", "identity", "result_ref", "artifact_refs"},
    P + "JobCancel": {"dispatch", "identity"},
    P + "Heartbeat": {"auth_token", "agent_name"},
    P + "Handshake": {"agent_name"},
    P + "BusPacket": {
        "signature_metadata", "identity", "auth_token", "worker_handshake_challenge_request",
        "worker_handshake_challenge", "worker_handshake_authenticate", "worker_handshake_result",
    },
    P + "PolicyCheckRequest": {"identity", "input_ref"},
    P + "PolicyCheckResponse": {"redacted_context_ref", "identity"},
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --- fully populated samples ------------------------------------------------------------------
def _hints() -> job_pb2.ContextHints:
    return job_pb2.ContextHints(
        max_input_tokens=2048, allow_summarization=True, allow_retrieval=True, tags=["repo", "docs"]
    )


def _budget(scale: int = 1) -> job_pb2.Budget:
    return job_pb2.Budget(
        max_input_tokens=4000 * scale, max_output_tokens=1000 * scale,
        max_total_tokens=5_000_000_000 * scale, deadline_ms=60000 * scale,  # > 2**32: int64
    )


def _meta(actor: int = job_pb2.ACTOR_TYPE_HUMAN) -> job_pb2.JobMetadata:
    return job_pb2.JobMetadata(
        tenant_id="tenant-1", actor_id="user-99", actor_type=actor, idempotency_key="idem-1",
        capability="repo.review", risk_tags=["code", "secrets"], requires=["git", "net"],
        pack_id="pack-1", labels={"source": "interop", "ünï": "cødé"},
    )


def _job_request() -> job_pb2.JobRequest:
    return job_pb2.JobRequest(
        job_id="job-1", topic="job.tools", priority=job_pb2.JOB_PRIORITY_CRITICAL,
        context_ptr="redis://ctx:job-1", adapter_id="adapter-1",
        env={"tenant_id": "tenant-1", "memory_id": "mem-1"}, parent_job_id="parent-0",
        workflow_id="wf-1", step_index=7, memory_id="mem-1", context_hints=_hints(),
        budget=_budget(), tenant_id="tenant-1", principal_id="user-99",
        labels={"cordum.bus_msg_id": "approval:job-1", "_source": "api"}, meta=_meta(),
        compensation=job_pb2.Compensation(
            topic="job.rollback", context_ptr="redis://ctx:job-1:rb",
            priority=job_pb2.JOB_PRIORITY_BATCH, adapter_id="adapter-rb", env={"reason": "failure"},
            memory_id="mem-rb", context_hints=_hints(), budget=_budget(2), tenant_id="tenant-1",
            principal_id="svc-1", labels={"rollback": "true"},
            meta=_meta(job_pb2.ACTOR_TYPE_SERVICE),
        ),
    )


def _packets() -> dict[str, buspacket_pb2.BusPacket]:
    payloads: dict[str, Message] = {
        "job_request": _job_request(),
        "job_result": job_pb2.JobResult(
            job_id="job-1", status=job_pb2.JOB_STATUS_FAILED_FATAL, result_ptr="redis://res:job-1",
            worker_id="worker-1", execution_ms=-1 + 2**40, error_code="policy_denied",
            error_message="denied", artifact_ptrs=["redis://art:1", "redis://art:2"],
            error_code_enum=job_pb2.ERROR_CODE_TRANSPORT_CONNECTION_LOST,
        ),
        "job_progress": job_pb2.JobProgress(
            job_id="job-1", step_id="step-2", percent=50, message="halfway",
            result_ptr="redis://res:job-1", artifact_ptrs=["redis://art:p"],
            status=job_pb2.JOB_STATUS_RUNNING,
        ),
        "job_cancel": job_pb2.JobCancel(job_id="job-1", reason="user_request", requested_by="u-7"),
        "heartbeat": heartbeat_pb2.Heartbeat(
            worker_id="worker-1", region="eu-west-1", type="gpu", cpu_load=33.5,
            gpu_utilization=87.25, active_jobs=3, capabilities=["git", "docker"], pool="job.tools",
            max_parallel_jobs=8, labels={"zone": "a"}, memory_load=45.75, progress_pct=60,
            last_memo="step-3",
        ),
        "handshake": handshake_pb2.Handshake(
            component_id="cordum-scheduler-0", role=handshake_pb2.COMPONENT_ROLE_CONTROLLER,
            supported_versions=[1, 2], capabilities={"safety_check": True, "routing": False},
            sdk_version="0.1.0", ready_topics=["job.tools", "job.default"],
        ),
        "alert": alert_pb2.SystemAlert(
            level="CRITICAL", message="config changed", component="gateway", code="CFG",
            severity=alert_pb2.ALERT_SEVERITY_ERROR,
            error_code_enum=job_pb2.ERROR_CODE_SAFETY_RISK_TAG_BLOCKED,
            source_component="api-gateway-1", details={"scope": "tenant", "scope_id": "t-1"},
            trace_id="trace-x",
        ),
    }
    packets = {}
    for kind, payload in payloads.items():
        pkt = new_packet(payload, sender_id="interop", trace_id=f"trace-{kind}")
        pkt.signature = bytes(range(256))
        packets[kind] = pkt
    return packets


def _policy_messages() -> dict[str, Message]:
    req = safety_pb2.PolicyCheckRequest(
        job_id="job-1", topic="job.tools", tenant="tenant-1",
        priority=job_pb2.JOB_PRIORITY_INTERACTIVE, estimated_cost=0.125, budget=_budget(),
        principal_id="user-99", labels={"a": "b"}, memory_id="mem-1",
        effective_config=b'{"x": 1}', meta=_meta(), input_content=b"\x00\xffprompt",
        input_content_type="application/json", input_size_bytes=3 * 2**30,
    )
    resp = safety_pb2.PolicyCheckResponse(
        decision=safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS, reason="ok with limits",
        redacted_context_ptr="redis://ctx:job-1:redacted", policy_snapshot="snap-1",
        rule_id="rule-7",
        constraints=safety_pb2.PolicyConstraints(
            budgets=safety_pb2.BudgetConstraints(
                max_runtime_ms=2**33, max_retries=3, max_artifact_bytes=2**31, max_concurrent_jobs=4
            ),
            sandbox=safety_pb2.SandboxProfile(
                isolated=True, network_allowlist=["example.com"], fs_read_only=["/ro"],
                fs_read_write=["/rw"],
            ),
            toolchain=safety_pb2.ToolchainConstraints(allowed_tools=["git"], allowed_commands=["ls"]),
            diff=safety_pb2.DiffConstraints(max_files=10, max_lines=500, deny_path_globs=["*.pem"]),
            redaction_level="strict",
        ),
        approval_required=True, approval_ref="appr-1",
        remediations=[
            safety_pb2.PolicyRemediation(
                id="r1", title="use read-only", summary="s", replacement_topic="job.ro",
                replacement_capability="repo.read", add_labels={"ro": "1"}, remove_labels=["rw"],
            ),
            safety_pb2.PolicyRemediation(id="r2", title="second"),
        ],
    )
    snaps = safety_pb2.ListSnapshotsResponse(snapshots=["snap-1", "snap-2"])
    return {"policy_check_request": req, "policy_check_response": resp, "list_snapshots": snaps}


SAMPLES: dict[str, Message] = {**_packets(), **_policy_messages()}


def _as_dict(msg: Message) -> dict:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _set_fields(msg: Message, seen: set[tuple[str, str]]) -> None:
    for field, value in msg.ListFields():
        seen.add((msg.DESCRIPTOR.full_name, field.name))
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        for item in value if field.is_repeated else [value]:
            _set_fields(item, seen)


def _unknown_count(msg: Message) -> int:
    count = len(unknown_fields.UnknownFieldSet(msg))
    for field, value in msg.ListFields():
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            count += sum(_unknown_count(v) for v in (value if field.is_repeated else [value]))
    return count


# --- descriptors ------------------------------------------------------------------------------
OURS = describe_files(m.DESCRIPTOR for m in OUR_MODULES)


def test_samples_populate_every_field_we_define():
    seen: set[tuple[str, str]] = set()
    for msg in SAMPLES.values():
        _set_fields(msg, seen)
    unset = [
        f"{name}.{field}"
        for name, desc in OURS["messages"].items()
        if not name.endswith("Entry") and name != P + "ListSnapshotsRequest"
        for field in desc["fields"]
        if (name, field) not in seen
    ]
    assert not unset, f"interop samples leave these fields unset: {unset}"


def test_messages_are_a_subset_of_the_sdk(sdk_descriptors):
    theirs = sdk_descriptors["messages"]
    for name, ours in OURS["messages"].items():
        assert name in theirs, f"{name} is not a CAP message"
        assert ours["file"] == theirs[name]["file"], f"{name} lives in another .proto file"
        for field, spec in ours["fields"].items():
            assert field in theirs[name]["fields"], f"{name}.{field} is not in CAP"
            assert spec == theirs[name]["fields"][field], (
                f"{name}.{field}: ours [number, type, label, type_name, oneof] = {spec}, "
                f"SDK = {theirs[name]['fields'][field]}"
            )


def test_we_leave_out_only_newer_cap(sdk_descriptors):
    theirs = sdk_descriptors["messages"]
    cap_files = {m.DESCRIPTOR.name for m in OUR_MODULES}
    missing_messages = {n for n, d in theirs.items() if d["file"] in cap_files} - set(OURS["messages"])
    assert missing_messages == NEWER_MESSAGES
    missing_fields = {
        name: set(theirs[name]["fields"]) - set(ours["fields"])
        for name, ours in OURS["messages"].items()
        if set(theirs[name]["fields"]) - set(ours["fields"])
    }
    assert missing_fields == NEWER_FIELDS


def test_enums_match_the_sdk(sdk_descriptors):
    theirs = sdk_descriptors["enums"]
    assert set(theirs) - set(OURS["enums"]) == NEWER_ENUMS
    for name, values in OURS["enums"].items():
        assert values == theirs[name], f"enum {name}: ours {values}, SDK {theirs[name]}"


def test_safety_kernel_service_matches_the_sdk(sdk_descriptors):
    assert OURS["services"] == sdk_descriptors["services"]
    assert set(OURS["services"][P + "SafetyKernel"]) == {
        "Check", "Evaluate", "Explain", "Simulate", "ListSnapshots",
    }


# --- bytes across implementations -------------------------------------------------------------
def test_our_bytes_decode_with_the_sdk(sdk):
    names = list(SAMPLES)
    request = [
        {"type": SAMPLES[n].DESCRIPTOR.full_name, "b64": b64(SAMPLES[n].SerializeToString())}
        for n in names
    ]
    decoded = sdk("decode", request)
    for name, got in zip(names, decoded):
        assert got == _as_dict(SAMPLES[name]), f"SDK reads our {name} differently"


def test_sdk_bytes_decode_with_ours(sdk):
    names = list(SAMPLES)
    request = [
        {"type": SAMPLES[n].DESCRIPTOR.full_name, "dict": _as_dict(SAMPLES[n])} for n in names
    ]
    encoded = sdk("encode", request)
    for name, item in zip(names, encoded):
        ours = type(SAMPLES[name]).FromString(base64.b64decode(item["b64"]))
        assert _unknown_count(ours) == 0, f"SDK's {name} carries fields we do not define"
        assert ours == SAMPLES[name], f"we read the SDK's {name} differently"


def test_newer_sdk_fields_survive_our_round_trip(sdk):
    """A newer-CAP field we do not define (BusPacket.auth_token, JobRequest.identity) passes
    through our decode/encode unchanged, so relaying packets loses nothing."""
    newer: dict[str, Any] = {
        "trace_id": "t", "sender_id": "w", "protocol_version": 1, "auth_token": "tok",
        "job_request": {"job_id": "j", "identity": {"tenant_id": "t1", "principal_id": "p"}},
    }
    (item,) = sdk("encode", [{"type": P + "BusPacket", "dict": newer}])
    ours = buspacket_pb2.BusPacket.FromString(base64.b64decode(item["b64"]))
    assert ours.job_request.job_id == "j" and _unknown_count(ours) == 2
    (back,) = sdk("decode", [{"type": P + "BusPacket", "b64": b64(ours.SerializeToString())}])
    assert back == newer


# --- the SDK's receive-side validation --------------------------------------------------------
def test_new_packet_output_passes_sdk_validation(sdk):
    """SDK workers silently drop packets failing cap.validate.validate_bus_packet: trace_id,
    sender_id, created_at present, protocol_version == 1, and per-payload rules (JobCancel needs
    requested_by; JobResult.worker_id, Heartbeat.worker_id and Handshake.component_id must equal
    sender_id; a structured alert's source_component must equal sender_id)."""
    packets = [
        new_packet(_job_request(), sender_id="cordum-scheduler", trace_id="trace-1"),
        new_packet(job_pb2.JobRequest(job_id="j", topic="job.default"), sender_id="cordum-scheduler"),
        new_packet(
            job_pb2.JobCancel(job_id="j", reason="user", requested_by="api-gateway"),
            sender_id="api-gateway", trace_id="j",
        ),
        new_packet(
            job_pb2.JobResult(job_id="j", status=job_pb2.JOB_STATUS_SUCCEEDED, worker_id="w1"),
            sender_id="w1",
        ),
        new_packet(
            handshake_pb2.Handshake(component_id="cordum-scheduler-0", supported_versions=[1],
                                    role=handshake_pb2.COMPONENT_ROLE_SCHEDULER),
            sender_id="cordum-scheduler-0",
        ),
        new_packet(
            alert_pb2.SystemAlert(message="config changed", details={"scope": "system"},
                                  severity=alert_pb2.ALERT_SEVERITY_INFO,
                                  error_code_enum=job_pb2.ERROR_CODE_JOB_INVALID_INPUT,
                                  source_component="api-gateway"),
            sender_id="api-gateway",
        ),
    ]
    errors = sdk("validate", [b64(p.SerializeToString()) for p in packets])
    assert errors == [[] for _ in packets]


def test_sdk_validation_catches_what_workers_would_drop(sdk):
    bad = [
        new_packet(job_pb2.JobCancel(job_id="j"), sender_id="api-gateway"),  # no requested_by
        new_packet(job_pb2.JobRequest(job_id="j"), sender_id="s"),  # no topic
        new_packet(job_pb2.JobRequest(job_id="j", topic="job.x"), sender_id="s", trace_id=""),
    ]
    errors = sdk("validate", [b64(p.SerializeToString()) for p in bad])
    assert ["job_cancel.requested_by: must not be empty"] == errors[0]
    assert ["topic: must not be empty"] == errors[1]
    assert ["trace_id: must not be empty"] == errors[2]
