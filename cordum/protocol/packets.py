"""Build, encode and decode CAP ``BusPacket`` envelopes (spec cordum-jobpath §1.1-1.3).

Pure functions: no I/O, no asyncio. Every NATS message body is one binary ``BusPacket``.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Union

from google.protobuf.message import DecodeError

from cordum.agent.v1.alert_pb2 import SystemAlert
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.handshake_pb2 import Handshake
from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.agent.v1.job_pb2 import JobCancel, JobProgress, JobRequest, JobResult

PROTOCOL_VERSION = 1

Payload = Union[JobRequest, JobResult, Heartbeat, SystemAlert, JobProgress, JobCancel, Handshake]

# payload class -> name of its field in the BusPacket ``payload`` oneof
PAYLOAD_FIELDS: dict[type, str] = {
    JobRequest: "job_request",
    JobResult: "job_result",
    Heartbeat: "heartbeat",
    SystemAlert: "alert",
    JobProgress: "job_progress",
    JobCancel: "job_cancel",
    Handshake: "handshake",
}

_JOB_PAYLOADS = frozenset({"job_request", "job_result", "job_progress", "job_cancel"})


class PacketError(ValueError):
    """A bus message that is not a usable BusPacket; the message says what is wrong."""


def new_packet(
    payload: Payload,
    *,
    sender_id: str,
    trace_id: str | None = None,
    created_at: datetime | None = None,
) -> BusPacket:
    """Wrap ``payload`` in a BusPacket (protocol_version 1), copying it into the oneof.

    ``trace_id`` defaults to a fresh UUID4 string (as the Go gateway mints per submit); callers
    continuing a job's conversation pass the request's trace id, and DLQ/cancel packets the job id.
    ``created_at`` defaults to now (UTC); a naive datetime is taken as UTC.
    """
    field = PAYLOAD_FIELDS.get(type(payload))
    if field is None:
        raise TypeError(f"not a BusPacket payload type: {type(payload).__name__}")
    if not sender_id:
        raise ValueError("sender_id must not be empty")
    packet = BusPacket(
        trace_id=trace_id if trace_id is not None else str(uuid.uuid4()),
        sender_id=sender_id,
        protocol_version=PROTOCOL_VERSION,
    )
    if created_at is None:
        packet.created_at.GetCurrentTime()
    else:
        packet.created_at.FromDatetime(created_at)
    getattr(packet, field).CopyFrom(payload)
    return packet


def encode(packet: BusPacket) -> bytes:
    return packet.SerializeToString()


def decode(data: bytes | bytearray | memoryview) -> BusPacket:
    """Parse a NATS message body; raise :class:`PacketError` unless it carries a known payload.

    A packet whose payload is a kind we do not define (newer CAP) is rejected too: nobody here
    could act on it. protocol_version 0 means "missing" (CAP requires > 0); versions above 1
    are accepted, since protobuf keeps newer fields as unknown fields.
    """
    if not data:
        raise PacketError("empty bus message: no BusPacket")
    packet = BusPacket()
    try:
        packet.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise PacketError(f"undecodable BusPacket ({len(data)} bytes): {exc}") from None
    if packet.WhichOneof("payload") is None:
        raise PacketError(
            f"BusPacket without a known payload (trace_id={packet.trace_id!r}, "
            f"sender_id={packet.sender_id!r})"
        )
    if packet.protocol_version <= 0:
        raise PacketError(
            f"BusPacket protocol_version {packet.protocol_version} is missing or invalid "
            f"(want {PROTOCOL_VERSION})"
        )
    return packet


def payload_kind(packet: BusPacket) -> str:
    """Name of the oneof field set, e.g. ``"job_request"``."""
    kind = packet.WhichOneof("payload")
    if kind is None:
        raise PacketError("BusPacket has no payload")
    return kind


def payload_of(packet: BusPacket) -> Payload:
    return getattr(packet, payload_kind(packet))


def job_id_of(packet: BusPacket) -> str | None:
    """The job id of a job payload (request, result, progress, cancel), else None."""
    kind = packet.WhichOneof("payload")
    if kind not in _JOB_PAYLOADS:
        return None
    return getattr(packet, kind).job_id or None
