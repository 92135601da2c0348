"""Memory and artifact routes: what the public cordum-sdk 0.1.0 calls in its generated `memory`
operations (`cordum_sdk._generated.api.memory`: get_memory, create_artifact, get_artifact).

- `GET /api/v1/memory?ptr=redis://<key>` or `?key=<key>` (viewer) → `{key, ptr, type, size_bytes,
  value[, encoding]}`. Readable keys: `mem:<memory id>:events` (list: the conversation, each entry
  decoded), `mem:<memory id>:chunks` (set: the chunk keys, sorted), `mem:<memory id>:summary`,
  `ctx:<job id>` and `res:<job id>` (strings: JSON decoded, else text), `art:<id>`.
- `POST /api/v1/artifacts {content_base64, content_type, retention?, labels?}` (operator) →
  `{artifact_ptr, size_bytes}`; retention `30d` (default), `<n>d|h|m|s` or `permanent`.
- `GET /api/v1/artifacts/<ptr>` (viewer) → `{artifact_ptr, content_base64, metadata{content_type,
  size_bytes, created_at, retention, labels, expires_at}}`; `<ptr>` may be `redis://art:<id>` (as
  returned; a client that collapses the `//` is understood), `art:<id>` or `<id>`.

How memory is bound to a tenant: a memory id names a memory within the caller's tenant. The
gateway reads `mem:<tenant>/<memory id>:…` (`keys.memory_scope`), where the worker SDK's helper
writes a job's memory (the job's tenant, the job's memory id), so a tenant only ever reaches its own
memories: another tenant's id (even spelled with that tenant's prefix) names a different, empty
memory → 404. `ctx:`/`res:` keys are readable when the job belongs to the caller's tenant, an
artifact when its record does; otherwise 404, as for a key that does not exist.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from quart import Quart, request

from cordum.gateway.context import Gateway, caller, json_body, optional_str_map, require
from cordum.gateway.errors import ApiError, not_found
from cordum.gateway.jobs import checked_job_id
from cordum.protocol.pointers import SCHEME
from cordum.store import keys
from cordum.store import output as output_check

MEMORY_PARTS = ("events", "chunks", "summary")
DEFAULT_RETENTION = "30d"
MAX_RETENTION_S = 3650 * 86400
_RETENTION = re.compile(r"^(\d+)([dhms])$")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_ARTIFACT_ID = re.compile(r"^[0-9a-f]{32}$")


# ---- the pure part -------------------------------------------------------------------------------


def requested_key() -> str:
    """The key named by `ptr` (a `redis://` pointer) or `key`: exactly one of them."""
    ptr, key = (request.args.get("ptr") or "").strip(), (request.args.get("key") or "").strip()
    if ptr and key:
        raise ApiError(400, "give ptr or key, not both")
    if key:
        return key
    if not ptr:
        raise ApiError(400, "ptr or key is required")
    if not ptr.startswith(SCHEME) or len(ptr) == len(SCHEME):
        raise ApiError(400, f"ptr must be a pointer {SCHEME}<key>")
    return ptr[len(SCHEME):]


def memory_key(tenant: str, key: str) -> tuple[str, str]:
    """(`mem:<memory id>:<part>` → the tenant's stored key, part)."""
    memory_id, _, part = key[len("mem:"):].rpartition(":")
    if part not in MEMORY_PARTS or not memory_id:
        raise ApiError(400, "key: a memory key is mem:<memory id>:events, :chunks or :summary")
    if any(ch.isspace() or ord(ch) < 32 for ch in memory_id) or len(memory_id.encode()) > 512:
        raise ApiError(400, "key: the memory id must be at most 512 bytes, without spaces or control characters")
    scoped = keys.memory_scope(tenant, memory_id)
    return {"events": keys.memory_events, "chunks": keys.memory_chunks, "summary": keys.memory_summary}[part](scoped), part


def _decoded(text: str) -> tuple[Any, str]:
    try:
        return json.loads(text), "json"
    except ValueError:
        return text, "text"


def memory_view(key: str, kind: str, value: Any) -> dict[str, Any]:
    """The answer for a found key: lists and sets as arrays, strings JSON-decoded where they are JSON."""
    view: dict[str, Any] = {"key": key, "ptr": SCHEME + key, "type": kind}
    if kind == "string":
        view["size_bytes"] = len(value.encode())
        view["value"], view["encoding"] = _decoded(value)
    else:
        items = sorted(value) if kind == "set" else list(value)
        view["size_bytes"] = sum(len(item.encode()) for item in items)
        view["value"] = [_decoded(item)[0] for item in items] if kind == "list" else items
    return view


def retention_seconds(raw: str) -> int | None:
    """Seconds an artifact is kept; None for `permanent`."""
    if raw == "permanent":
        return None
    match = _RETENTION.match(raw)
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_RETENTION_S:
        raise ApiError(400, "retention: expected permanent or a duration such as 30d, 12h, 90m, 3600s "
                            "(at most 3650d)")
    return seconds


def artifact_id_of(pointer: str) -> str:
    """The id in `redis://art:<id>` (also `redis:/art:<id>`, `art:<id>`, `<id>`); 404 if none."""
    text = pointer.strip()
    for prefix in (SCHEME, "redis:/"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    text = text.removeprefix("art:")
    if not _ARTIFACT_ID.match(text):
        raise not_found("artifact not found")
    return text


def iso_utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def artifact_view(artifact_id: str, record: dict[str, str]) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "content_type": record.get("content_type", ""), "size_bytes": int(record.get("size_bytes") or 0),
        "created_at": record.get("created_at", ""), "retention": record.get("retention", ""),
        "labels": json.loads(record.get("labels") or "{}"),
    }
    if record.get("expires_at"):
        metadata["expires_at"] = record["expires_at"]
    return {"artifact_ptr": SCHEME + keys.artifact(artifact_id), "content_base64": record.get("content_base64", ""),
            "metadata": metadata}


def artifact_record(body: dict[str, Any], tenant: str, principal: str, now: float) -> tuple[dict[str, str], int | None]:
    """The hash to store for an upload, and its TTL; 400 naming the field when the body is wrong."""
    content = body.get("content_base64")
    if not isinstance(content, str):
        raise ApiError(400, "content_base64 is required (a base64 string)")
    try:
        size = len(base64.b64decode(content, validate=True))
    except (binascii.Error, ValueError):
        raise ApiError(400, "content_base64 is not valid base64") from None
    content_type = body.get("content_type")
    if not isinstance(content_type, str) or not content_type.strip() or len(content_type) > 255:
        raise ApiError(400, "content_type is required (a MIME type, at most 255 characters)")
    retention = body.get("retention", DEFAULT_RETENTION)
    if not isinstance(retention, str):
        raise ApiError(400, "retention must be a string")
    ttl = retention_seconds(retention.strip())
    record = {"tenant": tenant, "principal": principal, "content_type": content_type.strip(),
              "content_base64": content, "size_bytes": str(size), "retention": retention.strip(),
              "labels": json.dumps(optional_str_map(body, "labels")), "created_at": iso_utc(now)}
    if ttl is not None:
        record["expires_at"] = iso_utc(now + ttl)
    return record, ttl


# ---- routes ------------------------------------------------------------------------------------


async def _read(gw: Gateway, stored: str, part: str) -> tuple[str, Any]:
    """(type, value) of a stored key, by the shape the engine gives it; value None if missing."""
    if part == "events":
        return "list", await gw.redis.execute("LRANGE", stored, 0, -1) or None
    if part == "chunks":
        return "set", await gw.redis.execute("SMEMBERS", stored) or None
    return "string", await gw.redis.execute("GET", stored)


async def read_memory(gw: Gateway, tenant: str, key: str) -> dict[str, Any]:
    kind, _, rest = key.partition(":")
    if kind == "mem":
        stored, part = memory_key(tenant, key)
    elif kind in ("ctx", "res"):
        meta = await gw.jobs.get(checked_job_id(rest), tenant=tenant)
        if meta is None:
            raise not_found("memory not found")
        stored, part = key, "string"
        if kind == "res":  # what the output policy has not cleared is not served here either
            try:
                _, value = await gw.jobs.served_output(meta, unpointed=True)
            except output_check.Withheld as withheld:
                raise ApiError(403, f"{withheld.reason}: the job's output is withheld", code="output_withheld") from None
            if value is None:
                raise not_found("memory not found")
            return memory_view(key, "string", value)
    elif kind == "art":
        return await _artifact_memory(gw, tenant, key, rest)
    else:
        raise ApiError(400, "key: readable keys are mem:<memory id>:{events,chunks,summary}, ctx:<job id>, "
                            "res:<job id> and art:<id>")
    found, value = await _read(gw, stored, part)
    if value is None:
        raise not_found("memory not found")
    return memory_view(key, found, value)


async def _artifact_memory(gw: Gateway, tenant: str, key: str, artifact_id: str) -> dict[str, Any]:
    record = await _owned_artifact(gw, tenant, artifact_id_of(artifact_id))
    content = base64.b64decode(record["content_base64"])
    view: dict[str, Any] = {"key": key, "ptr": SCHEME + key, "type": "artifact", "size_bytes": len(content),
                            "content_type": record.get("content_type", "")}
    try:
        view["value"], view["encoding"] = _decoded(content.decode())
    except UnicodeDecodeError:
        view["value"], view["encoding"] = record["content_base64"], "base64"
    return view


async def _owned_artifact(gw: Gateway, tenant: str, artifact_id: str) -> dict[str, str]:
    record = await gw.redis.execute("HGETALL", keys.artifact(artifact_id))
    if not record or record.get("tenant") != tenant:
        raise not_found("artifact not found")
    return record


def register(app: Quart, gw: Gateway) -> None:
    @app.get("/api/v1/memory")
    @require("viewer")
    async def get_memory() -> Any:
        return await read_memory(gw, caller().tenant, requested_key())

    @app.post("/api/v1/artifacts")
    @require("operator")
    async def create_artifact() -> Any:
        who = caller()
        record, ttl = artifact_record(await json_body(), who.tenant, who.principal_id, time.time())
        artifact_id = uuid.uuid4().hex
        key = keys.artifact(artifact_id)
        commands: list[tuple[Any, ...]] = [("HSET", key, *[part for item in record.items() for part in item])]
        if ttl is not None:
            commands.append(("EXPIRE", key, ttl))
        for result in await gw.redis.pipeline(commands, transaction=True):
            if isinstance(result, Exception):
                raise result
        return {"artifact_ptr": SCHEME + key, "size_bytes": int(record["size_bytes"])}

    @app.get("/api/v1/artifacts/<path:ptr>")
    @require("viewer")
    async def get_artifact(ptr: str) -> Any:
        artifact_id = artifact_id_of(ptr)
        return artifact_view(artifact_id, await _owned_artifact(gw, caller().tenant, artifact_id))
