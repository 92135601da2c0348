"""CAP wire protocol helpers: packets, subjects, pointers. Pure code, no I/O."""

from cordum.protocol.packets import (
    PAYLOAD_FIELDS,
    PROTOCOL_VERSION,
    PacketError,
    Payload,
    decode,
    encode,
    job_id_of,
    new_packet,
    payload_kind,
    payload_of,
)
from cordum.protocol.pointers import context_key, key_of, ptr, result_key
from cordum.protocol.subjects import (
    STREAM_JOBS,
    STREAM_SYS,
    STREAMS,
    StreamSpec,
    durable_name,
    is_durable_subject,
    job_subject,
    msg_id_for,
    validate_subject,
    worker_subject,
)

__all__ = [
    "PAYLOAD_FIELDS",
    "PROTOCOL_VERSION",
    "PacketError",
    "Payload",
    "STREAMS",
    "STREAM_JOBS",
    "STREAM_SYS",
    "StreamSpec",
    "context_key",
    "decode",
    "durable_name",
    "encode",
    "is_durable_subject",
    "job_id_of",
    "job_subject",
    "key_of",
    "msg_id_for",
    "new_packet",
    "payload_kind",
    "payload_of",
    "ptr",
    "result_key",
    "validate_subject",
    "worker_subject",
]
