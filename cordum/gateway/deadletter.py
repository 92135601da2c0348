"""Writing a DLQ entry: the one code path shared by the queue-grouped DLQ writer (`dlq.py`, one
write per `sys.job.dlq` event) and the gateway's own dead-lettering (a policy DENY at submit, an
approval reject), which writes the entry directly and only then publishes the event, best effort.

`record` builds `dlq:entry:<job_id>` from the job's meta (tenant/topic/state/attempts) and, if the
job has no result yet, a synthetic `res:<job_id>` with the error (SET NX) and its `result_ptr`.
It is idempotent per job id: writing the same job's entry twice (direct write, then the writer
consuming the event) leaves one entry and one result; once the entry was retried (the job's meta
has `retried_as`), a late event does not bring it back.
"""

from __future__ import annotations

import json
import time

from cordum.agent.v1 import job_pb2
from cordum.gateway.context import SENDER, Gateway
from cordum.protocol import subjects
from cordum.protocol.packets import encode
from cordum.protocol.pointers import ptr, result_key
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.store.dlq import dlq_entry, dlq_packet
from cordum.store.jobs import JobNotFound

log = get_logger("gateway.dlq")


def status_name(status: int) -> str:
    return job_pb2.JobStatus.Name(status) if status in job_pb2.JobStatus.values() else str(status)


async def record(gw: Gateway, job_id: str, *, status: int, reason_code: str, reason: str) -> None:
    """Persist the DLQ entry of `job_id` (and its synthetic error result); raises on a Redis error."""
    meta = await gw.jobs.get(job_id)
    if meta is not None and meta.get("retried_as"):  # retried from the DLQ already: a late event
        log.info("dlq.already_retried", job_id=job_id, retried_as=meta["retried_as"], reason_code=reason_code)
        return
    name = status_name(status)
    entry = dlq_entry(
        job_id=job_id,
        tenant=str(meta.get("tenant", "")) if meta else "",
        topic=str(meta.get("topic", "")) if meta else "",
        status=name,
        reason=reason,
        reason_code=reason_code,
        last_state=str(meta.get("state", "")) if meta else "",
        attempts=int(meta.get("attempts", 0) or 0) if meta else 0,
    )
    # The synthetic result first: whoever sees the entry can read the result it points at.
    if meta is None:
        log.warning("dlq.unknown_job", job_id=job_id, reason_code=reason_code)
    elif not meta.get("result_ptr"):
        result = {
            "job_id": job_id, "status": name,
            "error": {"message": reason, "code": reason_code},
            "processed_by": SENDER,
            "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        await gw.redis.execute("SET", keys.result(job_id), json.dumps(result), "NX", "EX", gw.jobs.data_ttl)
        try:
            await gw.jobs.set_fields(job_id, {"result_ptr": ptr(result_key(job_id))})
        except JobNotFound:
            pass
    await gw.dlq.put(entry)
    gw.dlq_written.inc()


async def publish(gw: Gateway, job_id: str, *, status: int, reason_code: str, reason: str) -> None:
    packet = dlq_packet(job_id, status=status, reason_code=reason_code, reason=reason, sender_id=SENDER)
    await gw.bus.publish(subjects.DLQ, encode(packet), msg_id=subjects.msg_id_for(packet, subjects.DLQ))


async def dead_letter(gw: Gateway, job_id: str, *, status: int, reason_code: str, reason: str) -> None:
    """A job the gateway itself ended badly: write its DLQ entry, then announce it on `sys.job.dlq`
    (best effort: the entry is already stored, so a bus failure loses nothing). Raises only when
    neither the write nor the publish worked."""
    try:
        await record(gw, job_id, status=status, reason_code=reason_code, reason=reason)
    except Exception as exc:
        # The event still lets the queue-grouped writer (with redelivery) write it; only if both
        # fail is the caller told.
        log.error("dlq.write_failed", job_id=job_id, reason_code=reason_code, error=repr(exc))
        await publish(gw, job_id, status=status, reason_code=reason_code, reason=reason)
        return
    try:
        await publish(gw, job_id, status=status, reason_code=reason_code, reason=reason)
    except Exception as exc:
        log.warning("dlq.publish_failed", job_id=job_id, reason_code=reason_code, error=repr(exc))
