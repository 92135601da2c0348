"""The pure part of the worker SDK: input/output encoding, result messages, bounded caches.

No I/O here: everything is unit-testable without servers (spec cordum-jobpath §5.6-5.9).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from typing import Any, Callable, Generic, TypeVar

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.job_pb2 import JobResult

V = TypeVar("V")

MAX_CONTEXT_BYTES = 2 * 1024 * 1024  # the CAP SDK's default max_context_bytes
MAX_RESULT_BYTES = 2 * 1024 * 1024
RESULT_TTL_SECONDS = 24 * 3600  # REDIS_DATA_TTL default

SUCCEEDED = job_pb2.JOB_STATUS_SUCCEEDED
FAILED = job_pb2.JOB_STATUS_FAILED
CANCELLED = job_pb2.JOB_STATUS_CANCELLED


class JobFailed(Exception):
    """Raise from a handler to fail the job with a chosen status and error code.

    Any other exception fails the job with status FAILED and error code ``handler_error``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str = "handler_error",
        status: int = FAILED,
        code_enum: int = job_pb2.ERROR_CODE_UNSPECIFIED,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.code_enum = code_enum


def context_not_found() -> JobFailed:
    return JobFailed("context not found", code="context_not_found", code_enum=job_pb2.ERROR_CODE_JOB_NOT_FOUND)


def decode_input(raw: str | bytes | None, *, limit: int = MAX_CONTEXT_BYTES) -> Any:
    """The handler's input from the ``ctx:`` value; JobFailed when missing, too big or not JSON."""
    if raw is None:
        raise context_not_found()
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > limit:
        raise JobFailed(
            f"context exceeds max size ({len(data)} > {limit} bytes)",
            code="context_too_large",
            code_enum=job_pb2.ERROR_CODE_JOB_RESOURCE_EXHAUSTED,
        )
    try:
        return json.loads(data)
    except ValueError as exc:
        raise JobFailed(
            f"invalid input: context is not JSON ({exc})",
            code="invalid_input",
            code_enum=job_pb2.ERROR_CODE_JOB_INVALID_INPUT,
        ) from None


def encode_output(value: Any, *, limit: int = MAX_RESULT_BYTES) -> str:
    """JSON of a handler's return value; JobFailed when it is not JSON-able or too big."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise JobFailed(f"handler output is not JSON-serializable: {exc}", code="invalid_output") from None
    size = len(text.encode())
    if size > limit:
        raise JobFailed(
            f"result exceeds max size ({size} > {limit} bytes)",
            code="result_too_large",
            code_enum=job_pb2.ERROR_CODE_JOB_RESOURCE_EXHAUSTED,
        )
    return text


def error_text(exc: BaseException) -> str:
    text = str(exc)
    return text if text else type(exc).__name__


def job_result(
    job_id: str,
    status: int,
    worker_id: str,
    execution_ms: int,
    *,
    result_ptr: str = "",
    error: JobFailed | None = None,
) -> JobResult:
    result = JobResult(
        job_id=job_id,
        status=status,
        worker_id=worker_id,
        execution_ms=max(int(execution_ms), 0),
        result_ptr=result_ptr,
    )
    if error is not None:
        result.error_message = error.message
        result.error_code = error.code
        result.error_code_enum = error.code_enum
    return result


class RecentMap(Generic[V]):
    """A bounded LRU map whose entries also expire after ``ttl`` seconds."""

    def __init__(self, max_entries: int, ttl: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._max = max_entries
        self._ttl = ttl
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored, value = entry
        if self._clock() - stored > self._ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def put(self, key: str, value: V) -> None:
        self._entries[key] = (self._clock(), value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> V | None:
        entry = self._entries.pop(key, None)
        return None if entry is None else entry[1]
