"""What the output policy left on a job, and which of its output may be served (pure).

The scheduler records its output checks in the job's hash (cordum-jobpath §3.11):

- `output_check`: `due` (set at dispatch: the result will be checked before anyone relies on
  it), `pending` (SUCCEEDED is written, the content check still runs), then `allow`, `redact`,
  `skipped` (the kernel could not be asked and the fail mode is open) or `quarantine`.
- `output_safety`: the verdict as JSON (decision, reason, rule, findings, phase, snapshot).

Readers (gateway, workflow engine, memory routes) go through `served_result_key`: an output
still being checked, or quarantined, is never served, except a quarantined one to an admin who
asks for it; a redacted output is served as its redacted copy.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

from cordum.protocol import pointers
from cordum.store import keys

CHECK_FIELD = "output_check"
SAFETY_FIELD = "output_safety"
HASH_FIELD = "output_sha256"  # of the output the content check read (see `unchanged`)
DUE, PENDING, ALLOWED, REDACTED, SKIPPED, QUARANTINED = "due", "pending", "allow", "redact", "skipped", "quarantine"
UNCHECKED = frozenset({DUE, PENDING})  # an output nobody may rely on yet


class Withheld(Exception):
    """The job's output is not served: `reason` says why (pending check, quarantine)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def served_result_key(meta: Mapping[str, Any], *, include_quarantined: bool = False) -> str | None:
    """The Redis key of the output a reader may see (None: the job has none), or Withheld.

    A SUCCEEDED job's output under check is withheld until the check ends; a quarantined job's
    output only with `include_quarantined` (an admin asking for it explicitly)."""
    job_id = str(meta.get("id") or "")
    check = str(meta.get(CHECK_FIELD) or "")
    state = str(meta.get("state") or "")
    if state == "OUTPUT_QUARANTINED" or check == QUARANTINED:
        if not include_quarantined:
            raise Withheld("output quarantined by the output policy")
        return keys.result(job_id)
    if check in UNCHECKED:
        # Being checked, still running (a worker writes its output before it reports), or ended
        # by the scheduler (timed out, cancelled) with whatever a late worker wrote there since:
        # nothing at res:<id> has been checked. A failure the worker reported clears the mark.
        if state == "SUCCEEDED":
            raise Withheld("output policy check in progress")
        raise Withheld("output not checked" if state in ("FAILED", "CANCELLED", "TIMEOUT", "DENIED")
                       else "output not checked yet")
    ptr = str(meta.get("result_ptr") or "")
    if not ptr:
        return None
    try:
        key = pointers.key_of(ptr)
    except ValueError:
        return keys.result(job_id)
    # Only the job's own output or its redacted copy: a pointer is never a way to read other keys.
    return key if key in (keys.result(job_id), keys.redacted_result(job_id)) else keys.result(job_id)


def unchanged(meta: Mapping[str, Any], key: str, text: str | bytes | None) -> bool:
    """Whether `text`, read at `key`, is the output the content check read (True when no hash was
    recorded, or for the redacted copy, which only the kernel writes)."""
    digest = str(meta.get(HASH_FIELD) or "")
    if not digest or text is None or key != keys.result(str(meta.get("id") or "")):
        return True
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest() == digest


def safety_record(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The stored verdict (`output_safety`) as a dict, or None."""
    raw = meta.get(SAFETY_FIELD)
    if isinstance(raw, dict):
        return raw
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None
