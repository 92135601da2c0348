"""The worker SDK's way to cordum-context-engine: a handler builds its model window from the job
and the conversation's memory, and records the model's answer into that memory.

    @worker.handler("job.chat")
    async def chat(job: JobContext) -> dict:
        window = await job.build_window()            # earlier turns + this job's prompt
        answer = await call_my_model(window.messages)  # [{"role": ..., "content": ...}, ...]
        await job.record_answer(answer)               # this turn joins the memory
        return {"answer": answer}

- Memory: the job's memory id (JobRequest.memory_id, else env `memory_id`), bound to the job's
  tenant as `<tenant>/<memory id>` (`cordum.store.keys.memory_scope`): the id the gateway's
  memory routes show that tenant, and one no other tenant's job can reach. A job with a memory id
  but no tenant is refused (FAILED, `context_memory_needs_tenant`) unless its mode is raw (no
  memory): unscoped, its id could name any tenant's memory (`acme/conv`).
- Mode: the argument (`"raw"`, `"chat"`, `"rag"`), else env `context_mode`, else chat when the job
  has a memory id and raw when it has none. Token budgets: the job's budget, else the engine's
  defaults (8000 in, 1024 out).
- Connection: `CONTEXT_ENGINE_ADDR` (one address or a comma-separated list, one per replica; the
  calls spread over them and skip one that is down), opened on first use and closed when the
  worker stops. Unset: `ContextEngineNotConfigured`.
- Failures are `JobFailed`: the engine unreachable → FAILED_RETRYABLE (`context_engine_unavailable`),
  a request it refuses → FAILED (`context_engine_rejected`). A handler may catch them and go on.
"""

from __future__ import annotations

import json
import os
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Mapping

import trio

from cordum.agent.v1 import job_pb2
from cordum.agent.v1.job_pb2 import JobRequest
from cordum.context.client import DEFAULT_TIMEOUT, ContextClient, open_context_client, parse_engine_addrs
from cordum.infra.tls import GrpcTls
from cordum.infra.grpc import RpcError
from cordum.store.keys import memory_scope
from cordum.v1 import context_pb2 as pb
from cordum.worker.core import JobFailed

MODES = {"raw": pb.CONTEXT_MODE_RAW, "chat": pb.CONTEXT_MODE_CHAT, "rag": pb.CONTEXT_MODE_RAG}
_RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


class ContextEngineNotConfigured(RuntimeError):
    """build_window/record_answer without CONTEXT_ENGINE_ADDR."""


@dataclass(frozen=True)
class ContextWindow:
    messages: list[dict[str, str]]  # oldest first, the job's own message last
    input_tokens: int
    output_tokens: int


class ContextEngineAccess:
    """The worker's client of the context engine, opened on first use (one per worker)."""

    def __init__(self, addrs: list[tuple[str, int]], *, timeout: float = DEFAULT_TIMEOUT,
                 tls: GrpcTls | None = None) -> None:
        self.addrs = addrs
        self.timeout = timeout
        self.tls = tls
        self._client: ContextClient | None = None
        self._stack: AsyncExitStack | None = None
        self._lock = trio.Lock()

    @classmethod
    def from_env(cls, explicit: str | None, env: Mapping[str, str] | None, *,
                 timeout: float = DEFAULT_TIMEOUT) -> "ContextEngineAccess":
        """`explicit`, else CONTEXT_ENGINE_ADDR of `env` (the process environment if None)."""
        source = os.environ if env is None else env
        raw = explicit if explicit is not None else source.get("CONTEXT_ENGINE_ADDR", "")
        if not raw.strip():
            return cls([], timeout=timeout)
        tls = GrpcTls.from_env(source, "CONTEXT_ENGINE")  # CONTEXT_ENGINE_TLS_CA etc.: exit 2 if bad
        tls.client_context()
        try:
            return cls(parse_engine_addrs(raw), timeout=timeout, tls=tls)
        except ValueError as exc:
            raise ValueError(f"CONTEXT_ENGINE_ADDR={raw!r} is invalid: {exc}") from None

    async def client(self) -> ContextClient:
        if not self.addrs:
            raise ContextEngineNotConfigured("CONTEXT_ENGINE_ADDR is not set: this worker has no context engine")
        async with self._lock:
            if self._client is None:
                stack = AsyncExitStack()
                self._client = await stack.enter_async_context(open_context_client(self.addrs, timeout=self.timeout,
                                                                                   tls=self.tls))
                self._stack = stack
        return self._client

    async def aclose(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def job_memory(request: JobRequest, mode: str | None) -> tuple[str, int, str]:
    """(the job's memory id bound to its tenant, the effective mode, the tenant). The id is "" when
    the job has none or its mode is raw (no memory is read or written)."""
    tenant = request.tenant_id or request.env.get("tenant_id", "")
    memory_id = request.memory_id or request.env.get("memory_id", "")
    name = (mode or request.env.get("context_mode") or ("chat" if memory_id else "raw")).strip().lower()
    if name not in MODES:
        raise ValueError(f"context mode {name!r}: expected raw, chat or rag")
    if not memory_id or MODES[name] == pb.CONTEXT_MODE_RAW:
        return "", MODES[name], tenant
    if not tenant:
        raise JobFailed("the job names a memory id but has no tenant: memory is only reachable within a tenant",
                        code="context_memory_needs_tenant")
    return memory_scope(tenant, memory_id), MODES[name], tenant


def _budget(budget: int, env: Mapping[str, str], name: str) -> int:
    if budget > 0:
        return budget
    raw = env.get(name, "")
    return int(raw) if raw.isdigit() else 0


def _payload(job_input: Any) -> bytes:
    return job_input if isinstance(job_input, bytes) else json.dumps(job_input, ensure_ascii=False).encode()


def _failed(exc: RpcError) -> JobFailed:
    if exc.code in _RETRYABLE:
        return JobFailed(f"context engine unavailable: {exc}", code="context_engine_unavailable",
                         status=job_pb2.JOB_STATUS_FAILED_RETRYABLE)
    return JobFailed(f"context engine refused the request: {exc}", code="context_engine_rejected")


async def build_window(access: ContextEngineAccess, request: JobRequest, job_input: Any, *, mode: str | None,
                       model: str, max_input_tokens: int | None, max_output_tokens: int | None) -> ContextWindow:
    memory_id, chosen, _ = job_memory(request, mode)
    call = pb.BuildWindowRequest(
        memory_id=memory_id, mode=chosen, model=model, logical_payload=_payload(job_input),
        max_input_tokens=max_input_tokens or _budget(request.budget.max_input_tokens, request.env, "max_input_tokens"),
        max_output_tokens=max_output_tokens or _budget(request.budget.max_output_tokens, request.env, "max_output_tokens"))
    client = await access.client()
    try:
        reply = await client.build_window(call)
    except RpcError as exc:
        raise _failed(exc) from None
    return ContextWindow([{"role": m.role, "content": m.content} for m in reply.messages],
                         reply.input_tokens, reply.output_tokens)


async def record_answer(access: ContextEngineAccess, request: JobRequest, job_input: Any, answer: str | bytes, *,
                        mode: str | None, writer: str) -> bool:
    """Append this turn to the job's memory; False when there was nothing to record (no memory
    id, or raw mode: the engine would not keep it)."""
    memory_id, chosen, tenant = job_memory(request, mode)
    if not memory_id:
        return False
    call = pb.UpdateMemoryRequest(
        memory_id=memory_id, logical_payload=_payload(job_input), mode=chosen, tenant_id=tenant,
        model_response=answer.encode() if isinstance(answer, str) else answer, writer_agent_id=writer,
        write_kind=pb.MEMORY_WRITE_KIND_CHAT)
    client = await access.client()
    try:
        await client.update_memory(call)
    except RpcError as exc:
        raise _failed(exc) from None
    return True
