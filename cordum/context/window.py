"""The context engine's pure core (spec cordum-services §3): no I/O, no Trio.

- `check_window_request` / `check_update_request`: bad requests → `BadRequest` naming the field:
  payloads over the size limit, id fields over MAX_ID_BYTES, a malformed memory id
  (`memory_id_problems`, also for the gateway and workflow engine to check ids at submit time).
- `read_payload(payload)`: the job input, parsed once: the user's turn (`prompt`, else `message`,
  else `instruction` (+ `code_snippet`), else the payload's own text) and the RAG `file_path`.
- `assemble(...)`: history (CHAT, RAG) + RAG context (matching chunks, else the summary) + the user
  message last, then trimmed to `max_input_tokens` by dropping the oldest messages. Tokens are
  estimated as characters / 4.
- `check_governance(...)`: shared write kinds (and policy-state mutations) need a writer, verified
  provenance and a tenant consistent with the memory id; any write that names a tenant must match
  the tenant a scoped memory id carries (the Go original checked this for shared kinds only).
- `memory_events(...)`: the two history entries an UpdateMemory appends, each within the entry limit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from cordum.store.keys import memory_owner, tenant_token
from cordum.v1 import context_pb2 as pb

HISTORY_LIMIT = 20  # events kept per memory and read into a window
DEFAULT_MAX_INPUT_TOKENS = 8000
DEFAULT_MAX_OUTPUT_TOKENS = 1024
DEFAULT_MAX_PAYLOAD_BYTES = 4 << 20  # logical_payload, model_response (CONTEXT_ENGINE_MAX_PAYLOAD_BYTES)
MAX_ID_BYTES = 512  # memory_id and the other id fields: bounded, so they are safe to log and store
CHARS_PER_TOKEN = 4
# UpdateMemory's UNAVAILABLE when Redis did not take the write: the replica is fine and every
# replica shares that Redis, so clients do not fail over on it.
STORE_UNAVAILABLE = "memory store unavailable"

RAW, CHAT, RAG = pb.CONTEXT_MODE_RAW, pb.CONTEXT_MODE_CHAT, pb.CONTEXT_MODE_RAG
_MODES = {pb.CONTEXT_MODE_UNSPECIFIED: RAW, RAW: RAW, CHAT: CHAT, RAG: RAG}
MODE_NAMES = {RAW: "raw", CHAT: "chat", RAG: "rag"}
_SHARED_KINDS = frozenset({pb.MEMORY_WRITE_KIND_SHARED_POLICY_STATE, pb.MEMORY_WRITE_KIND_SHARED_TRUST_STATE,
                           pb.MEMORY_WRITE_KIND_SHARED_DIRECTIVE})
_WRITE_KINDS = frozenset(pb.MemoryWriteKind.values())
_WINDOW_IDS = ("model",)
_UPDATE_IDS = ("tenant_id", "writer_agent_id", "target_agent_id", "provenance_ref")
# A hostile payload nested deeper than the parser's recursion limit raises RecursionError, not
# ValueError: both mean "not JSON we can use".
_JSON_ERRORS = (ValueError, TypeError, RecursionError)


class BadRequest(ValueError):
    """The request is malformed (gRPC INVALID_ARGUMENT); the message starts with the field."""


class Refused(ValueError):
    """The write breaks the governance contract (gRPC PERMISSION_DENIED)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass
class Window:
    messages: list[Message]
    input_tokens: int
    output_tokens: int
    dropped: int = 0  # messages trimmed to fit max_input_tokens


@dataclass
class MemoryView:
    """What the I/O layer read for a window; `degraded` names why something is missing."""

    history: list[str] = field(default_factory=list)  # raw JSON events, oldest first
    summary: str | None = None
    chunks: list[str] = field(default_factory=list)  # raw JSON chunk records
    degraded: str | None = None


# ---- validation --------------------------------------------------------------------------------


def mode_of(value: int) -> int:
    """The effective mode (UNSPECIFIED → RAW); an unknown number is a bad request."""
    try:
        return _MODES[value]
    except KeyError:
        raise BadRequest(f"mode: unknown context mode {value}") from None


def memory_id_problems(memory_id: str) -> list[str]:
    """What is wrong with a memory id as the engine receives it (after `memory_scope`); [] if it
    is fine. "" is fine too: it means no memory."""
    problems = []
    if len(memory_id.encode()) > MAX_ID_BYTES:
        problems.append(f"longer than {MAX_ID_BYTES} bytes")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in memory_id):
        problems.append("must not contain whitespace or control characters")
    return problems


def _check_ids(request: Any, memory_id: str, names: Sequence[str]) -> None:
    problems = memory_id_problems(memory_id)
    if problems:
        raise BadRequest(f"memory_id: {'; '.join(problems)}")
    for name in names:
        if len(getattr(request, name).encode()) > MAX_ID_BYTES:
            raise BadRequest(f"{name}: longer than {MAX_ID_BYTES} bytes")


def _check_sizes(request: Any, names: Sequence[str], max_bytes: int) -> None:
    for name in names:
        size = len(getattr(request, name))
        if size > max_bytes:
            raise BadRequest(f"{name}: {size} bytes, over the {max_bytes}-byte limit "
                             "(CONTEXT_ENGINE_MAX_PAYLOAD_BYTES)")


def _budget(name: str, value: int, default: int) -> int:
    if value < 0:
        raise BadRequest(f"{name}: must not be negative (0 means the default, {default})")
    return value or default


def check_window_request(request: pb.BuildWindowRequest,
                         max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> tuple[int, int, int]:
    """(mode, max_input_tokens, max_output_tokens) of a valid BuildWindow request."""
    _check_sizes(request, ("logical_payload",), max_payload_bytes)
    _check_ids(request, request.memory_id, _WINDOW_IDS)
    return (mode_of(request.mode),
            _budget("max_input_tokens", request.max_input_tokens, DEFAULT_MAX_INPUT_TOKENS),
            _budget("max_output_tokens", request.max_output_tokens, DEFAULT_MAX_OUTPUT_TOKENS))


def check_update_request(request: pb.UpdateMemoryRequest, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES) -> int:
    """The effective mode of a valid UpdateMemory request."""
    _check_sizes(request, ("logical_payload", "model_response"), max_payload_bytes)
    _check_ids(request, request.memory_id, _UPDATE_IDS)
    if request.write_kind not in _WRITE_KINDS:
        raise BadRequest(f"write_kind: unknown memory write kind {request.write_kind}")
    return mode_of(request.mode)


def check_governance(request: pb.UpdateMemoryRequest) -> None:
    """Raises Refused (or BadRequest for a missing field) if the write may not happen."""
    tenant = request.tenant_id.strip()
    owner = memory_owner(request.memory_id)
    target_owner = memory_owner(request.target_agent_id.strip())
    # Any write: a tenant claim must agree with the tenant a scoped id carries.
    if tenant and owner is not None and owner != tenant_token(tenant):
        raise Refused("tenant_id: does not match the tenant of memory_id")
    if tenant and target_owner is not None and target_owner != tenant_token(tenant):
        raise Refused("tenant_id: does not match the tenant of target_agent_id")
    if not (request.policy_state_mutation or request.write_kind in _SHARED_KINDS):
        return
    if not request.writer_agent_id.strip():
        raise BadRequest("writer_agent_id: required for a shared-memory write")
    if not request.provenance_ref.strip():
        raise BadRequest("provenance_ref: required for a shared-memory write")
    if not request.provenance_verified:
        raise Refused("provenance_verified: a shared-memory write needs verified provenance")
    if not tenant:
        raise BadRequest("tenant_id: required for a shared-memory write")


# ---- building a window -------------------------------------------------------------------------


@dataclass(frozen=True)
class Payload:
    """What the engine uses of a job input (`logical_payload`)."""

    user_message: str
    file_path: str = ""  # RAG: the file whose chunks join the window


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _user_message(obj: dict[str, Any]) -> str:
    for name in ("prompt", "message"):
        if _text(obj.get(name)):
            return obj[name]
    instruction = _text(obj.get("instruction"))
    code = _text(obj.get("code_snippet"))
    if instruction and code:
        return f"Instruction: {instruction}\nCode:\n{code}"
    return instruction


def read_payload(payload: bytes) -> Payload:
    """Parses the payload once (it may be megabytes). The user's message is `prompt`, else
    `message`, else `instruction` (+ `code_snippet`), else the payload's own text."""
    try:
        obj = json.loads(payload)
    except (*_JSON_ERRORS, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        return Payload(payload.decode("utf-8", errors="replace"))
    return Payload(_user_message(obj) or payload.decode("utf-8", errors="replace"),
                   _text(obj.get("file_path")).strip())


def parse_event(raw: str) -> Message | None:
    """A history entry `{role, content, ts}`; None for one that is not (skipped, never fatal)."""
    try:
        event = json.loads(raw)
    except _JSON_ERRORS:
        return None
    if not isinstance(event, dict) or not _text(event.get("role")) or not isinstance(event.get("content"), str):
        return None
    return Message(event["role"], event["content"])


def matching_chunks(records: Iterable[str], file_path: str) -> list[Message]:
    """System messages for the chunk records whose path contains, or is contained in, file_path
    (sorted by path, so replicas answer the same whatever order SSCAN returned)."""
    found: dict[str, str] = {}
    for raw in records:
        try:
            record = json.loads(raw)
        except _JSON_ERRORS:
            continue
        if not isinstance(record, dict):
            continue
        path, content = _text(record.get("path")), _text(record.get("content"))
        if path and (path in file_path or file_path in path):
            found.setdefault(path, content)
    return [Message("system", f"Context from {path}:\n{found[path]}") for path in sorted(found)]


def estimate_tokens(messages: Sequence[Message]) -> int:
    return sum(len(m.content) for m in messages) // CHARS_PER_TOKEN


def trim(messages: list[Message], max_input_tokens: int) -> tuple[list[Message], int]:
    """Drop the oldest messages while over budget; the user's message (last) always stays."""
    total = sum(len(m.content) for m in messages)
    dropped = 0
    while len(messages) - dropped > 1 and total // CHARS_PER_TOKEN > max_input_tokens:
        total -= len(messages[dropped].content)
        dropped += 1
    return messages[dropped:], dropped


def assemble(mode: int, payload: Payload, memory: MemoryView, max_input_tokens: int, max_output_tokens: int) -> Window:
    messages: list[Message] = []
    if mode in (CHAT, RAG):
        messages += [m for m in map(parse_event, memory.history[-HISTORY_LIMIT:]) if m is not None]
    if mode == RAG:
        if payload.file_path:
            messages += matching_chunks(memory.chunks, payload.file_path)
        elif memory.summary:
            messages.append(Message("system", memory.summary))
    messages.append(Message("user", payload.user_message))
    kept, dropped = trim(messages, max_input_tokens)
    return Window(kept, estimate_tokens(kept), max_output_tokens, dropped)


def reads_for(mode: int, payload: Payload) -> tuple[bool, bool, str]:
    """What a window in `mode` needs from Redis: (history, summary, chunk file path)."""
    if mode == RAW:
        return False, False, ""
    if mode == CHAT:
        return True, False, ""
    return True, not payload.file_path, payload.file_path


# ---- recording a turn --------------------------------------------------------------------------


def _event(role: str, content: str, ts: int, field_name: str, max_bytes: int) -> str:
    entry = json.dumps({"role": role, "content": content, "ts": ts}, ensure_ascii=False)
    size = len(entry.encode())
    if size > max_bytes:
        raise BadRequest(f"{field_name}: the {role} entry is {size} bytes, over the "
                         f"{max_bytes}-byte limit (CONTEXT_ENGINE_MAX_ENTRY_BYTES)")
    return entry


def memory_events(request: pb.UpdateMemoryRequest, max_bytes: int, now: float | None = None) -> list[str]:
    """The user and assistant entries to append, oldest first."""
    ts = int(time.time() if now is None else now)
    answer = request.model_response.decode("utf-8", errors="replace")
    return [_event("user", read_payload(request.logical_payload).user_message, ts, "logical_payload", max_bytes),
            _event("assistant", answer, ts, "model_response", max_bytes)]
