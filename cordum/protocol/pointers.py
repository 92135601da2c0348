"""Pointers into the Redis memory fabric: ``redis://<key>`` (spec cordum-jobpath §1.6)."""

from __future__ import annotations

SCHEME = "redis://"


def ptr(key: str) -> str:
    if not key:
        raise ValueError("pointer key must not be empty")
    return SCHEME + key


def key_of(pointer: str) -> str:
    """The Redis key a pointer names; any scheme but ``redis://`` is an error."""
    if not pointer.startswith(SCHEME):
        raise ValueError(f"unsupported pointer {pointer!r}: want {SCHEME}<key>")
    key = pointer[len(SCHEME):]
    if not key:
        raise ValueError(f"pointer {pointer!r} names no key")
    return key


def _require_id(job_id: str) -> str:
    if not job_id:
        raise ValueError("job_id must not be empty")
    return job_id


def context_key(job_id: str) -> str:
    """Job input written by the producer before it publishes the request."""
    return "ctx:" + _require_id(job_id)


def result_key(job_id: str) -> str:
    """Worker output (JSON)."""
    return "res:" + _require_id(job_id)
