"""Calling the safety kernel: per-call deadline, and a circuit breaker shared by all replicas.

The breaker lives in Redis (`cordum:cb:safety:failures`): each failure INCRs it (the first one
sets its expiry, the open window); at `threshold` failures every replica stops calling until the
key expires, then the next call probes (half-open); a success deletes it. If Redis itself is
unreachable, a local breaker with the same numbers takes over. A failed or skipped call is never an
exception for the caller: it is a verdict `UNAVAILABLE`, and the caller applies its fail mode.
"""

from __future__ import annotations

import enum
import math
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Sequence

import trio

from cordum.agent.v1 import safety_grpc, safety_pb2
from cordum.infra.config import parse_listen_addr
from cordum.infra.grpc import GrpcClient, RpcError, open_grpc_client
from cordum.infra.redis import Redis, RedisError, RedisUnavailable
from cordum.infra.tls import GrpcTls
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.v1 import output_policy_grpc, output_policy_pb2, policy_batch_grpc, policy_batch_pb2

log = get_logger("safety.client")
STUB = safety_grpc.SafetyKernelStub
BATCH_STUB = policy_batch_grpc.PolicyBatchStub
OUTPUT_STUB = output_policy_grpc.OutputPolicyServiceStub
HEALTHY_LOOK_S = 0.25  # how long a look at the shared breaker that saw no failure stands

_FAIL = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
"""


class Verdict(enum.Enum):
    ALLOW = "ALLOW"
    ALLOW_WITH_CONSTRAINTS = "ALLOW_WITH_CONSTRAINTS"
    DENY = "DENY"
    REQUIRE_APPROVAL = "REQUIRE_APPROVAL"
    THROTTLE = "THROTTLE"
    UNAVAILABLE = "UNAVAILABLE"


_FROM_PROTO = {
    safety_pb2.DECISION_TYPE_ALLOW: Verdict.ALLOW,
    safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS: Verdict.ALLOW_WITH_CONSTRAINTS,
    safety_pb2.DECISION_TYPE_DENY: Verdict.DENY,
    safety_pb2.DECISION_TYPE_REQUIRE_HUMAN: Verdict.REQUIRE_APPROVAL,
    safety_pb2.DECISION_TYPE_THROTTLE: Verdict.THROTTLE,
}


@dataclass(frozen=True)
class SafetyDecision:
    verdict: Verdict
    reason: str
    response: safety_pb2.PolicyCheckResponse | None = None

    @property
    def rule_id(self) -> str:
        return self.response.rule_id if self.response is not None else ""

    @property
    def snapshot(self) -> str:
        return self.response.policy_snapshot if self.response is not None else ""


def verdict_of(response: safety_pb2.PolicyCheckResponse) -> Verdict:
    verdict = _FROM_PROTO.get(response.decision, Verdict.DENY)  # unknown decisions deny
    if response.approval_required and verdict in (Verdict.ALLOW, Verdict.ALLOW_WITH_CONSTRAINTS):
        return Verdict.REQUIRE_APPROVAL
    return verdict


class CircuitBreaker:
    def __init__(self, redis: Redis, key: str = keys.SAFETY_CB_FAILURES, *, threshold: int = 3, open_for: float = 30.0) -> None:
        self._redis = redis
        self._fail = redis.script(_FAIL)
        self.key = key
        self.threshold = threshold
        self.open_for = open_for
        self._local_failures = 0
        self._local_open_until = 0.0
        self._seen = 0  # failures counted in Redis at the last look
        self._healthy_until = -math.inf  # trio time until which a look that saw no failure stands
        self._failures_recorded = 0  # by this replica: a look begun before one is not cached
        self.open = False  # what the last look found (the cordum_safety_breaker_open gauge)

    async def is_open(self) -> bool:
        self.open = await self._look()
        return self.open

    async def _look(self) -> bool:
        # While no failure is counted anywhere, one look stands for HEALTHY_LOOK_S: a check then
        # costs no Redis round trip (two per job otherwise). Once failures are seen, every check
        # looks, so the breaker still opens and closes with the shared count.
        if self._seen == 0 and trio.current_time() < self._healthy_until:
            return False
        try:
            recorded = self._failures_recorded
            self._seen = int(await self._redis.execute("GET", self.key) or 0)
            if self._seen == 0 and recorded == self._failures_recorded:
                self._healthy_until = trio.current_time() + HEALTHY_LOOK_S
            return self._seen >= self.threshold
        except (RedisError, *RedisUnavailable):
            return self._local_failures >= self.threshold and trio.current_time() < self._local_open_until

    async def record_failure(self) -> None:
        self._healthy_until = -math.inf
        self._failures_recorded += 1
        self._local_failures += 1
        if self._local_failures >= self.threshold:
            self._local_open_until = trio.current_time() + self.open_for
        try:
            await self._fail([self.key], [int(self.open_for * 1000)])
        except (RedisError, *RedisUnavailable) as exc:
            log.warning("safety.breaker_redis_unavailable", error=repr(exc))

    async def record_success(self) -> None:
        self._local_failures = 0
        if not self._seen:
            return  # nothing to reset: the common case costs no round trip
        self._seen = 0
        try:
            await self._redis.execute("DEL", self.key)
        except (RedisError, *RedisUnavailable):
            pass


# A replica that answered UNAVAILABLE (down, draining) or not at all in time (frozen, overloaded)
# is tried last for a few seconds; a check is a pure read, so the next replica may answer it. The
# shared breaker counts a failure only when no replica answered.
FAILOVER_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
REPLICA_BACKOFF_S = 5.0


# Coalescing (`PolicyBatch`): the checks asked for while a batch is being sent wait for the next
# one, so batches grow with the load and an idle check goes out alone, as a plain SafetyKernel call.
BATCH_MAX_ITEMS = 64
BATCH_MAX_BYTES = 3 << 20  # input content rides along (up to 2 MiB per check); servers take 4 MiB
BATCH_RETRY_S = 60.0  # kernels that answered UNIMPLEMENTED (older ones) are asked again after this


@dataclass
class _Pending:
    method: str
    request: safety_pb2.PolicyCheckRequest
    done: trio.Event = field(default_factory=trio.Event)
    response: safety_pb2.PolicyCheckResponse | None = None
    error: Exception | None = None

    def answer(self, response: safety_pb2.PolicyCheckResponse | None = None, error: Exception | None = None) -> None:
        self.response, self.error = response, error
        self.done.set()


def _unimplemented(exc: RpcError) -> bool:
    # A grpclib server answers an unknown method without a content-type header, which a grpclib
    # client reports as UNKNOWN "Missing content-type header" instead of UNIMPLEMENTED.
    return exc.code == "UNIMPLEMENTED" or (exc.code == "UNKNOWN" and "content-type" in exc.message)


class _Resend(Exception):
    """The batcher stopped before answering: the caller sends its check itself."""


class SafetyClient:
    """Calls spread over the kernel replicas (round robin); a replica that is down, draining or
    frozen is skipped for the next one, so one kernel's trouble costs no decisions.

    With `batches` (one PolicyBatch client per replica) and `run_batches` running, concurrent
    checks are coalesced into PolicyBatch calls (see BATCH_MAX_ITEMS)."""

    def __init__(self, grpc: GrpcClient | Sequence[GrpcClient], breaker: CircuitBreaker, *, timeout: float = 2.0,
                 batches: Sequence[GrpcClient] = ()) -> None:
        self._replicas = list(grpc) if isinstance(grpc, Sequence) else [grpc]
        self._next = 0
        self._backoff_until = [-math.inf] * len(self._replicas)
        self._breaker = breaker
        self.timeout = timeout
        self._batch_replicas = list(batches)
        self._queue: list[_Pending] = []
        self._wakeup = trio.Event()
        self._batching = False
        self._unbatched_until = -math.inf
        self.batches_sent = 0
        self.checks_batched = 0

    def _order(self) -> list[int]:
        """Round robin, replicas in backoff last."""
        count = len(self._replicas)
        start, self._next = self._next, (self._next + 1) % count
        turn = [(start + offset) % count for offset in range(count)]
        now = trio.current_time()
        return sorted(turn, key=lambda index: self._backoff_until[index] > now)

    async def _call(self, method: str, request: object, *, batch: bool = False, timeout: float | None = None) -> object:
        replicas = self._batch_replicas if batch else self._replicas
        order = self._order()
        for position, index in enumerate(order):
            try:
                return await replicas[index].call(method, request, timeout=timeout or self.timeout)
            except RpcError as exc:
                if exc.code not in FAILOVER_CODES:
                    raise
                self._backoff_until[index] = trio.current_time() + REPLICA_BACKOFF_S
                if position == len(order) - 1:
                    raise
        raise AssertionError("unreachable")

    async def check(self, request: safety_pb2.PolicyCheckRequest, *, method: str = "Check") -> SafetyDecision:
        if await self._breaker.is_open():
            return SafetyDecision(Verdict.UNAVAILABLE, "safety kernel circuit open")
        try:
            response = await self._check(method, request)
        except RpcError as exc:
            await self._breaker.record_failure()
            log.warning("safety.check_failed", method=method, code=exc.code, error=exc.message)
            return SafetyDecision(Verdict.UNAVAILABLE, f"safety kernel unavailable: {exc.code}")
        await self._breaker.record_success()
        return SafetyDecision(verdict_of(response), response.reason, response)

    async def _check(self, method: str, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        if not self._batching:
            return await self._call(method, request)  # type: ignore[return-value]
        pending = _Pending(method, request)
        self._queue.append(pending)
        self._wakeup.set()
        await pending.done.wait()
        if isinstance(pending.error, _Resend):
            return await self._call(method, request)  # type: ignore[return-value]
        if pending.error is not None:
            raise pending.error
        return pending.response  # type: ignore[return-value]

    async def run_batches(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sends queued checks, one batch per free slot (one slot per kernel replica, at least
        two), until cancelled; checks still queued or in flight then go back to their callers."""
        slots = trio.Semaphore(max(2, len(self._replicas)))
        try:
            async with trio.open_nursery() as nursery:
                self._batching = bool(self._batch_replicas)
                task_status.started()
                while self._batching:
                    await self._wakeup.wait()
                    await slots.acquire()
                    batch = self._take_batch() if self._queue else ()
                    if not self._queue:
                        self._wakeup = trio.Event()
                    if batch:
                        nursery.start_soon(self._send_batch, batch, slots)
                    else:
                        slots.release()
        finally:
            self._batching = False
            for pending in self._queue:
                pending.answer(error=_Resend())
            self._queue.clear()

    def _take_batch(self) -> tuple[_Pending, ...]:
        """The oldest queued checks that share its method, within the batch limits."""
        method = self._queue[0].method
        taken: list[_Pending] = []
        size = 0
        for pending in self._queue:
            if pending.method != method:
                continue
            size += pending.request.ByteSize()
            if taken and (len(taken) >= BATCH_MAX_ITEMS or size > BATCH_MAX_BYTES):
                break
            taken.append(pending)
        chosen = set(map(id, taken))
        self._queue = [pending for pending in self._queue if id(pending) not in chosen]
        return tuple(taken)

    async def _send_batch(self, batch: tuple[_Pending, ...], slots: trio.Semaphore) -> None:
        try:
            if len(batch) == 1 or trio.current_time() < self._unbatched_until:
                await self._send_each(batch)
                return
            request = policy_batch_pb2.PolicyCheckBatchRequest(method=batch[0].method,
                                                               requests=[p.request for p in batch])
            try:
                reply = await self._call("CheckBatch", request, batch=True)
            except Exception as exc:  # not only RpcError: a bad reply must fail its checks, not the batcher
                exc = exc if isinstance(exc, RpcError) else RpcError("UNAVAILABLE", repr(exc))
                if not _unimplemented(exc):
                    for pending in batch:
                        pending.answer(error=exc)
                    return
                log.info("safety.batch_unsupported", note=f"one call per check for {BATCH_RETRY_S:.0f}s")
                self._unbatched_until = trio.current_time() + BATCH_RETRY_S
                await self._send_each(batch)
                return
            self.batches_sent += 1
            self.checks_batched += len(batch)
            items = reply.items  # type: ignore[attr-defined]
            if len(items) != len(batch):
                error = RpcError("INTERNAL", f"batch answer has {len(items)} items for {len(batch)} checks")
                for pending in batch:
                    pending.answer(error=error)
                return
            for pending, item in zip(batch, items):
                if item.error:
                    pending.answer(error=RpcError("INTERNAL", item.error))
                else:
                    pending.answer(item.response)
        finally:
            slots.release()
            for pending in batch:  # cancelled on the way: its callers send their checks themselves
                if not pending.done.is_set():
                    pending.answer(error=_Resend())

    async def _send_each(self, batch: tuple[_Pending, ...]) -> None:
        async def send(pending: _Pending) -> None:
            try:
                pending.answer(await self._call(pending.method, pending.request))  # type: ignore[arg-type]
            except RpcError as exc:
                pending.answer(error=exc)
            except Exception as exc:  # a bad reply fails its check only
                pending.answer(error=RpcError("UNAVAILABLE", repr(exc)))

        async with trio.open_nursery() as nursery:
            for pending in batch:
                nursery.start_soon(send, pending)

    def output_client(self, breaker: CircuitBreaker) -> "OutputClient":
        """An OutputClient over the same kernel connections (the same failover), with its own breaker."""
        replicas = SafetyClient([replica.with_stub(OUTPUT_STUB) for replica in self._replicas], breaker,
                                timeout=self.timeout)
        return OutputClient(replicas, breaker)

    async def call(self, method: str, request: object, *, timeout: float | None = None) -> object:
        """Any other kernel method (Explain, Simulate, ListSnapshots), errors raised as RpcError."""
        return await self._call(method, request, timeout=timeout)


# Answers that say the kernel is in trouble (count toward the breaker); any other error refuses one
# request only (a malformed one), and one tenant's bad requests must not open it for everybody.
KERNEL_TROUBLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED",
                            "UNIMPLEMENTED", "CANCELLED"})


class OutputDecision(enum.Enum):
    ALLOW = "allow"
    QUARANTINE = "quarantine"
    REDACT = "redact"
    UNAVAILABLE = "unavailable"  # the kernel could not be asked: the caller applies its fail mode


_OUTPUT_FROM_PROTO = {
    output_policy_pb2.OUTPUT_DECISION_ALLOW: OutputDecision.ALLOW,
    output_policy_pb2.OUTPUT_DECISION_QUARANTINE: OutputDecision.QUARANTINE,
    output_policy_pb2.OUTPUT_DECISION_REDACT: OutputDecision.REDACT,
}


@dataclass(frozen=True)
class OutputVerdict:
    decision: OutputDecision
    reason: str
    response: output_policy_pb2.OutputCheckResponse | None = None


class OutputClient:
    """`cordum.v1.OutputPolicyService.CheckOutput` on the kernel replicas, behind its own breaker
    (`cordum:cb:safety:output:failures`, shared by the scheduler replicas): a kernel that fails
    output checks does not stop input checks, and the other way round."""

    def __init__(self, replicas: SafetyClient, breaker: CircuitBreaker) -> None:
        self._replicas = replicas
        self.breaker = breaker

    async def check(self, request: output_policy_pb2.OutputCheckRequest, *, timeout: float,
                    retries: int = 0) -> OutputVerdict:
        """One check within `timeout` per try; a try that ran out of time is repeated `retries`
        times (the metadata phase: one retry on a deadline)."""
        if await self.breaker.is_open():
            return OutputVerdict(OutputDecision.UNAVAILABLE, "safety kernel output circuit open")
        for attempt in range(retries + 1):
            try:
                response = await self._replicas.call("CheckOutput", request, timeout=timeout)
            except RpcError as exc:
                if exc.code == "DEADLINE_EXCEEDED" and attempt < retries:
                    continue
                if exc.code in KERNEL_TROUBLE:  # not a refusal of this one request: the kernel's state
                    await self.breaker.record_failure()
                log.warning("safety.output_check_failed", job_id=request.job_id, code=exc.code, error=exc.message)
                return OutputVerdict(OutputDecision.UNAVAILABLE, f"safety kernel unavailable for output checks: {exc.code}")
            await self.breaker.record_success()
            decision = _OUTPUT_FROM_PROTO.get(response.decision, OutputDecision.QUARANTINE)  # unknown: the cautious one
            return OutputVerdict(decision, response.reason, response)
        raise AssertionError("unreachable")


def parse_kernel_addrs(raw: str) -> list[tuple[str, int]]:
    """`SAFETY_KERNEL_ADDR`: one `host:port` or several, comma separated (one per kernel replica);
    `:port` and 0.0.0.0 mean this machine."""
    addrs = []
    for part in raw.split(","):
        if part.strip():
            host, port = parse_listen_addr(part)
            addrs.append(("127.0.0.1" if host in ("0.0.0.0", "") else host, port))
    if not addrs:
        raise ValueError("expected host:port, or several separated by commas")
    return addrs


def kernel_client_tls(settings: Any) -> GrpcTls:
    """SAFETY_KERNEL_TLS_* as the kernel's clients read them (files checked now: exit 2 if bad)."""
    tls = GrpcTls.from_env(settings.extra, "SAFETY_KERNEL")
    tls.client_context()
    return tls


@asynccontextmanager
async def open_safety_client(addrs: Sequence[tuple[str, int]], breaker: CircuitBreaker, *, timeout: float = 2.0,
                             batch: bool = True, tls: GrpcTls | None = None) -> AsyncIterator[SafetyClient]:
    """Clients of every kernel replica (over TLS per `tls`, SAFETY_KERNEL_TLS_*); with `batch`,
    concurrent checks are coalesced."""
    context = tls.client_context() if tls is not None else None
    server_name = tls.server_name if tls is not None else ""
    async with AsyncExitStack() as stack:
        replicas = [await stack.enter_async_context(open_grpc_client(STUB, host, port, ssl=context, server_name=server_name))
                    for host, port in addrs]
        batches = [replica.with_stub(BATCH_STUB) for replica in replicas] if batch else []
        client = SafetyClient(replicas, breaker, timeout=timeout, batches=batches)
        async with trio.open_nursery() as nursery:
            if batch:
                await nursery.start(client.run_batches)
            yield client
            nursery.cancel_scope.cancel()


