"""The worker SDK on Trio (spec cordum-jobpath §5): subscribe, handshake, heartbeat, run jobs.

    worker = Worker("echo-1", "default", ["job.default"], max_parallel_jobs=4)

    @worker.handler("job.default")
    async def echo(job: JobContext) -> dict:
        await job.progress(50, "halfway")
        return {"echo": job.input}

    await worker.run()              # until cancelled (or `await worker.drain(10)`)
    run_worker(build)               # a worker process: run_service with WORKER_STAGES

One nursery holds the whole worker:

    serve ─┬─ cancel listener       sys.job.cancel (broadcast)
           ├─ heartbeats            sys.heartbeat every `heartbeat_interval`   ┐ cancelled by
           ├─ intake ─┬─ worker.<id>.jobs   (queue = subject)                  ┘ stop_intake()
           │          └─ job.<x> …          (queue = subject)
           └─ one task per job ── keep-alive (in_progress every 10 s) + handler

At-least-once delivery, run once: before running, the worker claims the dispatched attempt in the
job's hash (cordum/worker/claims.py), so a message for an attempt that was superseded, finished or
cancelled, or that another worker runs, is dropped; one whose result is already stored is answered
with that result. A result is committed to the job's hash before it is published, and the message is
acked only after the publish; a publish that failed is retried from the stored result, never by
running again. Results carry their attempt (header Cordum-Attempt, in the message id too), so a
retry's result is never taken for a duplicate of the first one. A job still running when the
shutdown deadline comes is given back (nak). A handler also stops when this worker may have been
silent for longer than the schedulers' worker TTL (a frozen process): by then its jobs may run
elsewhere. Stopping, the worker tells the schedulers (heartbeat label cordum.worker.state) so they
stop routing to it at once and re-route what it did not start.
"""

from __future__ import annotations

import os
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping

import trio

from cordum import __version__
from cordum.agent.v1.buspacket_pb2 import BusPacket
from cordum.agent.v1.handshake_pb2 import COMPONENT_ROLE_WORKER, Handshake
from cordum.agent.v1.heartbeat_pb2 import Heartbeat
from cordum.agent.v1.job_pb2 import JOB_STATUS_RUNNING, JobProgress, JobRequest, JobResult
from cordum.infra.bus import Bus, Message, open_bus
from cordum.infra.config import Settings, env_value, load_settings, parse_positive_duration
from cordum.infra.redis import Redis, open_redis
from cordum.protocol import pointers, subjects
from cordum.protocol.packets import PROTOCOL_VERSION, PacketError, decode, encode, new_packet
from cordum.runtime.lifecycle import CLOSE_RESERVE, Lifecycle, close_scope
from cordum.runtime.log import get_logger
from cordum.store import keys
from cordum.worker import context as context_engine
from cordum.worker.claims import Claim, ClaimOutcome, RunClaims
from cordum.worker.core import (
    CANCELLED,
    MAX_CONTEXT_BYTES,
    MAX_RESULT_BYTES,
    RESULT_TTL_SECONDS,
    SUCCEEDED,
    JobFailed,
    RecentMap,
    decode_input,
    encode_output,
    error_text,
    job_result,
)

log = get_logger("worker")

SDK_VERSION = f"cordum-python/{__version__}"
WORKER_STAGES = ("stop intake", "finish jobs", "close")
IO_TIMEOUT = 5.0  # per Redis call / result publish (spec §5.7)
GIVE_BACK_MARGIN = 0.5  # kept before the shutdown deadline to nak the jobs still running
RETRY_DELAY = 1.0  # nak delay when Redis or the bus failed while running a job
AHEAD_DELAY = 5.0  # nak delay for a message the job's record (or this worker) is not ready for yet
PULL_BATCH = 16  # at most this many messages per pull request (fewer when fewer slots are free)
HEARTBEAT_MIN_GAP = 0.2  # load-change heartbeats: at most five a second
LIVENESS_TTL = 30.0  # the schedulers' WORKER_TTL: silent this long, a worker's jobs go elsewhere

Handler = Callable[["JobContext"], Awaitable[Any]]


class WorkerStats:
    """Counters, readable by tests and the embedding program."""

    __slots__ = ("received", "malformed", "ignored", "duplicates", "handler_runs", "succeeded", "failed",
                 "cancelled", "given_back", "superseded", "republished")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Job:
    """One job in flight: its bus message(s), the scope its work runs in, why it was stopped."""

    __slots__ = ("packet", "request", "messages", "token", "scope", "cancelled", "cancel_reason", "give_back",
                 "started", "attempt", "replayed")

    def __init__(self, packet: BusPacket, msg: Message) -> None:
        self.packet = packet
        self.request: JobRequest = packet.job_request
        self.messages = [msg]  # duplicates delivered while it runs are settled with it
        self.token = msg  # the limiter borrower
        self.scope = trio.CancelScope()
        self.cancelled = trio.Event()
        self.cancel_reason = ""
        self.give_back = False
        self.started = trio.current_time()
        # The scheduler's dispatch attempt (header); a message without it (another producer) counts
        # its deliveries instead.
        self.attempt = subjects.attempt_of(msg.headers) or max(msg.num_delivered, 1)
        self.replayed = False  # its result came from the job's record, not from running it here

    @property
    def job_id(self) -> str:
        return self.request.job_id


class JobContext:
    """What a handler gets: the job, its decoded input, progress reporting, cancellation."""

    def __init__(self, worker: "Worker", job: _Job, input: Any) -> None:
        self._worker = worker
        self._job = job
        self.job_id: str = job.request.job_id
        self.topic: str = job.request.topic
        self.input: Any = input
        self.request: JobRequest = job.request
        self.packet: BusPacket = job.packet
        self.trace_id: str = job.packet.trace_id
        self.worker_id: str = worker.worker_id
        self.attempt: int = job.attempt  # the scheduler's dispatch attempt, 1 for the first run

    @property
    def redis(self) -> Redis:
        """The worker's Redis client, for handlers that keep state of their own."""
        assert self._worker._redis is not None
        return self._worker._redis

    @property
    def cancelled(self) -> trio.Event:
        """Set when a JobCancel for this job arrived (the handler is being cancelled too)."""
        return self._job.cancelled

    @property
    def cancel_reason(self) -> str:
        return self._job.cancel_reason

    @property
    def env(self) -> Mapping[str, str]:
        return self.request.env

    @property
    def labels(self) -> Mapping[str, str]:
        return self.request.labels

    async def progress(self, percent: float, message: str = "") -> None:
        """Publish a JobProgress on sys.job.progress (fire-and-forget)."""
        self._worker._publish_progress(self._job, percent, message)
        await trio.lowlevel.checkpoint()

    async def build_window(self, *, mode: str | None = None, model: str = "", max_input_tokens: int | None = None,
                           max_output_tokens: int | None = None) -> context_engine.ContextWindow:
        """The model window for this job from the context engine: the memory's earlier turns
        (chat, rag), RAG context, and this job's message last (cordum/worker/context.py)."""
        return await context_engine.build_window(
            self._worker.context_engine, self.request, self.input, mode=mode, model=model,
            max_input_tokens=max_input_tokens, max_output_tokens=max_output_tokens)

    async def record_answer(self, answer: str | bytes, *, mode: str | None = None) -> bool:
        """Record this job's message and the model's `answer` in the job's memory."""
        return await context_engine.record_answer(self._worker.context_engine, self.request, self.input, answer,
                                                  mode=mode, writer=self.worker_id)


def _process_cpu_sampler() -> Callable[[], float]:
    last = [time.monotonic(), time.process_time()]

    def sample() -> float:
        now, cpu = time.monotonic(), time.process_time()
        wall = now - last[0]
        used = cpu - last[1]
        last[0], last[1] = now, cpu
        return 0.0 if wall <= 0 else max(0.0, min(100.0, 100.0 * used / wall))

    return sample


def _memory_percent() -> float:
    """Resident memory of this process as a percentage of physical memory (0 if unknown)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        total_pages = os.sysconf("SC_PHYS_PAGES")
        return 100.0 * resident_pages / total_pages if total_pages > 0 else 0.0
    except (OSError, ValueError, IndexError):
        return 0.0


class _SlotRoom:
    """What this worker's pull requests ask for: its free job slots, shared evenly by the
    subjects it pulls from. A subject asks for nothing while its own requests already cover every
    slot not running a job (its messages asked for, on their way, would take them), so a full
    worker asks for nothing; what other subjects asked for only makes its requests smaller, so an
    idle subject's open request never holds a busy one off (at most one message per subject may
    then wait for a slot, kept alive meanwhile)."""

    def __init__(self, limiter: trio.CapacityLimiter, subjects: Callable[[], int]) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._expected: dict[str, int] = {}  # per subject: asked for, not yet arrived
        self._changed = trio.Event()

    def of(self, subject: str) -> "_SubjectRoom":
        """The bus.PullRoom of `subject`'s pull requests."""
        return _SubjectRoom(self, subject)

    async def claim(self, subject: str, most: int) -> int:
        while int(self._limiter.available_tokens) - self._expected.get(subject, 0) < 1:
            changed = self._changed
            await changed.wait()
        free = int(self._limiter.available_tokens) - sum(self._expected.values())
        count = min(most, max(1, free // max(1, self._subjects())))
        self._expected[subject] = self._expected.get(subject, 0) + count
        return count

    def unclaim(self, subject: str, count: int) -> None:
        self._expected[subject] = max(0, self._expected.get(subject, 0) - count)
        self.changed()

    def arrived(self, subject: str) -> None:
        """A message of `subject` was taken off its channel (a slot is taken for it next)."""
        self._expected[subject] = max(0, self._expected.get(subject, 0) - 1)

    def changed(self) -> None:
        self._changed.set()
        self._changed = trio.Event()


class _SubjectRoom:
    def __init__(self, room: _SlotRoom, subject: str) -> None:
        self._room, self._subject = room, subject

    async def claim(self, most: int) -> int:
        return await self._room.claim(self._subject, most)

    def unclaim(self, count: int) -> None:
        self._room.unclaim(self._subject, count)


class Worker:
    def __init__(
        self,
        worker_id: str,
        pool: str = "default",
        topics: Iterable[str] = (),
        *,
        max_parallel_jobs: int = 4,
        settings: Settings | None = None,
        heartbeat_interval: float = 5.0,
        labels: Mapping[str, str] | None = None,
        capabilities: Iterable[str] | None = None,
        worker_type: str = "",
        region: str = "",
        in_progress_interval: float = 10.0,
        result_ttl: int = RESULT_TTL_SECONDS,
        max_context_bytes: int = MAX_CONTEXT_BYTES,
        max_result_bytes: int = MAX_RESULT_BYTES,
        result_cache_size: int = 4096,
        result_cache_ttl: float = 600.0,
        liveness_ttl: float | None = None,
        context_engine_addr: str | None = None,
    ) -> None:
        self.direct_subject = subjects.worker_subject(worker_id)  # validates the id (one token)
        if max_parallel_jobs < 1:
            raise ValueError("max_parallel_jobs must be >= 1")
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        if not pool:
            raise ValueError("pool must not be empty")
        self.worker_id = worker_id
        self.pool = pool
        self.topics: list[str] = []
        for topic in topics:
            self._add_topic(subjects.job_subject(topic))
        self.max_parallel_jobs = max_parallel_jobs
        self.heartbeat_interval = heartbeat_interval
        self.labels = dict(labels or {})
        self.capabilities = list(capabilities or [])
        self.worker_type = worker_type or pool
        self.region = region
        self.in_progress_interval = in_progress_interval
        self.result_ttl = result_ttl
        self._liveness_ttl = liveness_ttl  # None: the schedulers' WORKER_TTL, read when serving starts
        self.liveness_ttl = self._resolve_liveness(settings)
        # Until when this worker's presence key surely lives (sent time of its last renewal + the
        # TTL, less a margin): running handlers are cut off there, before a reaper can act.
        self._live_until = float("inf")
        self._state = ""  # "", then draining, then stopped (the heartbeat label)
        self.max_context_bytes = max_context_bytes
        self.max_result_bytes = max_result_bytes
        self.stats = WorkerStats()
        self._settings = settings
        # JobContext.build_window/record_answer: CONTEXT_ENGINE_ADDR, connected on first use.
        self.context_engine = context_engine.ContextEngineAccess.from_env(
            context_engine_addr, settings.extra if settings is not None else None)
        self._handlers: dict[str, Handler] = {}
        self._default: Handler | None = None
        self._limiter = trio.CapacityLimiter(max_parallel_jobs)
        self._jobs: dict[str, _Job] = {}
        self._jobs_changed = trio.Event()
        self._room = _SlotRoom(self._limiter, lambda: len(self.subjects))
        self._results: RecentMap[tuple[int, bytes]] = RecentMap(result_cache_size, result_cache_ttl)
        self._early_cancels: RecentMap[str] = RecentMap(1024, result_cache_ttl)
        # Results whose saving failed (Redis trouble), by job: (attempt, result, output to store).
        self._unsaved: RecentMap[tuple[int, JobResult, str | None]] = RecentMap(1024, result_cache_ttl)
        self._intake_scope = trio.CancelScope()
        self._heartbeat_scope = trio.CancelScope()
        self._presence_scope = trio.CancelScope()
        self._load_changed = trio.Event()
        self._intake_stopped = trio.Event()
        self._serve_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._redis: Redis | None = None
        self._claims: RunClaims | None = None
        self._bus: Bus | None = None
        self._cpu = _process_cpu_sampler()
        self.ready = trio.Event()

    # ---- configuration ---------------------------------------------------------------------

    def _resolve_liveness(self, settings: Settings | None) -> float:
        ttl = self._liveness_ttl
        if ttl is None:  # the schedulers' setting, when this process shares their environment
            ttl = LIVENESS_TTL if settings is None else env_value(settings, "WORKER_TTL", "30s", parse_positive_duration)
        if ttl - _liveness_margin(ttl) < 2 * self.heartbeat_interval:
            raise ValueError(f"WORKER_TTL / liveness_ttl ({ttl:g}s) is too short for a heartbeat every "
                             f"{self.heartbeat_interval:g}s: at least {2 * self.heartbeat_interval / 0.8:g}s")
        return ttl

    def _add_topic(self, subject: str) -> None:
        if subject not in self.topics:
            self.topics.append(subject)

    def handler(self, topic: str | None = None) -> Callable[[Handler], Handler]:
        """Register `async def fn(job: JobContext) -> JSON-able` for `topic` (``job.<x>``; it is
        subscribed too), or, without a topic, as the handler of every topic without its own."""

        def register(fn: Handler) -> Handler:
            if topic is None:
                self._default = fn
            else:
                subject = subjects.job_subject(topic)
                self._handlers[subject] = fn
                self._add_topic(subject)
            return fn

        return register

    @property
    def subjects(self) -> list[str]:
        """Everything consumed: the direct subject and every topic (queue group = subject)."""
        return [self.direct_subject, *self.topics]

    @property
    def active_jobs(self) -> int:
        return len(self._jobs)

    def _handler_for(self, topic: str) -> Handler | None:
        try:
            subject = subjects.job_subject(topic) if topic else ""
        except ValueError:
            subject = topic
        return self._handlers.get(subject) or self._default

    # ---- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (settings from the constructor or the environment) and serve until cancelled
        or drained. Prefer `drain()` to cancelling: a cancel gives running jobs back at once, and
        acks/naks still queued when the bus's scope is cancelled are lost (redelivered after the
        ack wait)."""
        settings = self._settings or load_settings()
        self.liveness_ttl = self._resolve_liveness(settings)
        async with open_redis(settings) as redis, open_bus(settings, name=f"cordum-worker:{self.worker_id}") as bus:
            await self.serve(redis, bus, task_status=task_status)

    async def serve(
        self, redis: Redis, bus: Bus, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve on connections owned by the caller; returns after `drain()` or when cancelled."""
        try:
            await self._serve(redis, bus, task_status=task_status)
        finally:
            with close_scope(2):
                await self.context_engine.aclose()

    async def _serve(self, redis: Redis, bus: Bus, *, task_status: trio.TaskStatus[None]) -> None:
        if self._nursery is not None:
            raise RuntimeError(f"worker {self.worker_id} is already serving")
        if self._default is None and not self._handlers:
            raise ValueError(f"worker {self.worker_id} has no handler")
        self._redis, self._bus = redis, bus
        self._claims = RunClaims(redis)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._serve_scope = nursery.cancel_scope
            await nursery.start(self._listen_cancels)
            # Subscribed before announcing: a new durable only gets messages published after it
            # exists, and the scheduler dispatches to a worker once it has heard from it.
            await nursery.start(self._intake)
            await self._handshake()
            await nursery.start(self._keep_presence)
            await nursery.start(self._heartbeats)
            nursery.start_soon(self._keep_jobs_alive)
            self.ready.set()
            log.info("worker.ready", worker_id=self.worker_id, pool=self.pool, subjects=self.subjects,
                     max_parallel_jobs=self.max_parallel_jobs)
            task_status.started()

    async def stop_intake(self) -> None:
        """Take no more jobs: tell the schedulers (they stop routing here at once, and re-route
        what was sent here but not started) and leave the consumers (fetched, unhandled messages
        are nak'ed by the bus). Heartbeats go on, saying "draining": the jobs running here go on."""
        self._state = subjects.WORKER_DRAINING
        self._load_changed.set()
        self._intake_scope.cancel()
        if self._nursery is not None:
            with trio.move_on_after(3):
                await self._intake_stopped.wait()
        log.info("worker.intake_stopped", worker_id=self.worker_id, active_jobs=self.active_jobs)

    async def finish_jobs(self, deadline: float) -> None:
        """Wait for the jobs in flight until `deadline` (trio time); give back the rest."""
        with trio.move_on_at(deadline):
            await self._wait_idle()
        if not self._jobs:
            return
        log.warning("worker.giving_back", worker_id=self.worker_id, jobs=list(self._jobs))
        for job in list(self._jobs.values()):
            job.give_back = True
            job.scope.cancel()
        with trio.move_on_after(IO_TIMEOUT):
            await self._wait_idle()

    async def close(self) -> None:
        """Say this worker is gone (whatever it holds is re-routed at once), and push out what is
        queued (results, acks, naks) before the connections close."""
        if self._bus is None:
            return
        self._heartbeat_scope.cancel()
        self._presence_scope.cancel()
        self._state = subjects.WORKER_STOPPED
        self._publish_nowait(subjects.HEARTBEAT, self._packet(self.heartbeat(), trace_id=self.worker_id))
        if self._redis is not None:
            try:
                with trio.move_on_after(2):
                    await self._redis.execute("DEL", keys.worker_alive(self.worker_id))
            except Exception as exc:  # it expires by itself
                log.warning("worker.presence_release_failed", worker_id=self.worker_id, error=repr(exc))
        try:
            with trio.move_on_after(3):
                await self._bus.flush()
        except Exception as exc:
            log.warning("worker.flush_failed", worker_id=self.worker_id, error=repr(exc))

    async def drain(self, timeout: float = 10.0) -> None:
        """Graceful stop for a worker run with `run()`/`serve()`: stop intake, let jobs finish for
        up to `timeout` seconds (the rest is given back), then end `serve()`."""
        deadline = trio.current_time() + timeout
        await self.stop_intake()
        await self.finish_jobs(deadline)
        await self.close()
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    def cancel(self, job_id: str, reason: str = "cancelled") -> bool:
        """Cancel a job's handler (as a JobCancel does); True if it was running here."""
        job = self._jobs.get(job_id)
        if job is None:
            if job_id and self._results.get(job_id) is None:
                self._early_cancels.put(job_id, reason)  # not here yet: don't run it when it comes
            return False
        if not job.cancel_reason:
            job.cancel_reason = reason or "cancelled"
            job.cancelled.set()
            job.scope.cancel()
        return True

    async def _wait_idle(self) -> None:
        while self._jobs:
            changed = self._jobs_changed
            await changed.wait()

    def _job_done(self, job: _Job) -> None:
        if self._jobs.get(job.job_id) is job:
            del self._jobs[job.job_id]
        self._free_slot(job.token)
        self._jobs_changed.set()
        self._jobs_changed = trio.Event()
        self._load_changed.set()

    # ---- announcing ------------------------------------------------------------------------

    def _packet(self, payload: Any, trace_id: str | None = None) -> BusPacket:
        return new_packet(payload, sender_id=self.worker_id, trace_id=trace_id)

    async def _handshake(self) -> None:
        handshake = Handshake(
            component_id=self.worker_id,
            role=COMPONENT_ROLE_WORKER,
            supported_versions=[PROTOCOL_VERSION],
            capabilities={name: True for name in self.capabilities},
            sdk_version=SDK_VERSION,
            ready_topics=self.topics,
        )
        packet = self._packet(handshake)
        assert self._bus is not None
        try:  # non-fatal (spec §1.3)
            with trio.fail_after(IO_TIMEOUT):
                await self._bus.publish(
                    subjects.HANDSHAKE, encode(packet), msg_id=subjects.msg_id_for(packet, subjects.HANDSHAKE)
                )
        except (Exception, trio.TooSlowError) as exc:
            log.warning("worker.handshake_failed", worker_id=self.worker_id, error=repr(exc))

    def heartbeat(self) -> Heartbeat:
        # CAP has no message for "leaving": a label on the heartbeat says it.
        labels = {**self.labels, subjects.WORKER_PRESENCE_LABEL: "redis"}
        if self._state:
            labels[subjects.WORKER_STATE_LABEL] = self._state
        return Heartbeat(
            worker_id=self.worker_id,
            region=self.region,
            type=self.worker_type,
            cpu_load=self._cpu(),
            active_jobs=self.active_jobs,
            capabilities=self.capabilities,
            pool=self.pool,
            max_parallel_jobs=self.max_parallel_jobs,
            labels=labels,
            memory_load=_memory_percent(),
        )

    async def _heartbeats(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        with self._heartbeat_scope:
            self._beat()
            task_status.started()
            started = True
            while True:
                # Every interval, and soon after the load changed: the schedulers route by the
                # active-jobs count in the last heartbeat, so a stale one starves or overloads us.
                with trio.move_on_after(self.heartbeat_interval):
                    await self._load_changed.wait()
                self._load_changed = trio.Event()
                self._beat()
                await trio.sleep(min(HEARTBEAT_MIN_GAP, self.heartbeat_interval))
        if not started:  # stopped before it started
            task_status.started()

    def _beat(self) -> None:
        self._publish_nowait(subjects.HEARTBEAT, self._packet(self.heartbeat(), trace_id=self.worker_id))

    async def _keep_presence(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep `cordum:worker:<id>:alive` (TTL = the schedulers' WORKER_TTL) while serving: the
        worker reaper re-routes this worker's jobs once it is gone. Each renewal that succeeds
        lets the running handlers go on until it could have expired (less a margin); a worker
        that cannot renew it (frozen, cut off from Redis) stops them first. One store and one
        clock decide both sides, so NATS trouble alone never moves a job that is running."""
        started = False
        with self._presence_scope:
            await self._renew_presence()
            task_status.started()
            started = True
            while True:
                await trio.sleep(self.heartbeat_interval)
                await self._renew_presence()
        if not started:  # close() came first
            task_status.started()

    async def _renew_presence(self) -> None:
        assert self._redis is not None
        sent = trio.current_time()
        try:
            with trio.fail_after(min(IO_TIMEOUT, self.heartbeat_interval)):
                await self._redis.execute("SET", keys.worker_alive(self.worker_id), self.worker_id,
                                          "PX", int(self.liveness_ttl * 1000))
        except (Exception, trio.TooSlowError) as exc:
            log.warning("worker.presence_renewal_failed", worker_id=self.worker_id, error=repr(exc))
            return
        self._live_until = sent + self.liveness_ttl - _liveness_margin(self.liveness_ttl)
        for job in self._jobs.values():
            job.scope.deadline = self._live_until

    def _publish_nowait(self, subject: str, packet: BusPacket) -> None:
        assert self._bus is not None
        try:
            self._bus.publish_nowait(subject, encode(packet))
        except trio.ClosedResourceError:
            pass  # closing

    def _publish_progress(self, job: _Job, percent: float, message: str) -> None:
        progress = JobProgress(
            job_id=job.job_id,
            percent=int(max(0, min(100, percent))),
            message=message,
            status=JOB_STATUS_RUNNING,
        )
        self._publish_nowait(subjects.PROGRESS, self._packet(progress, trace_id=job.packet.trace_id or job.job_id))

    # ---- cancels ---------------------------------------------------------------------------

    async def _listen_cancels(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._bus is not None
        async with self._bus.subscribe(subjects.CANCEL) as messages:
            task_status.started()
            async for msg in messages:
                try:
                    packet = decode(msg.data)
                except PacketError as exc:
                    self.stats.malformed += 1
                    log.warning("worker.malformed_packet", subject=msg.subject, error=str(exc))
                    continue
                if packet.WhichOneof("payload") != "job_cancel":
                    continue
                cancel = packet.job_cancel
                if self.cancel(cancel.job_id, cancel.reason or "cancelled"):
                    log.info("worker.job_cancelled", job_id=cancel.job_id, reason=cancel.reason,
                             requested_by=cancel.requested_by)

    # ---- intake ----------------------------------------------------------------------------

    async def _intake(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            with self._intake_scope:
                async with trio.open_nursery() as nursery:
                    for subject in self.subjects:
                        await nursery.start(self._consume, subject)
                    task_status.started()
                    started = True
            if not started:  # stopped before it started
                task_status.started()
        finally:
            self._intake_stopped.set()

    async def _consume(self, subject: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self._bus is not None
        # A pull request asks for as many messages as there are free slots (shared by the
        # subjects): each can start when it comes. A message waiting in the bus's buffer for a
        # slot would not be kept alive on the durable; with none free, nothing is asked for (the
        # job waits in the stream, where another replica may take it).
        async with self._bus.consume(subject, subject, batch=PULL_BATCH, room=self._room.of(subject)) as messages:
            task_status.started()
            async for msg in messages:
                self._room.arrived(subject)
                await self._accept(msg)

    async def _accept(self, msg: Message) -> None:
        self.stats.received += 1
        try:
            packet = decode(msg.data)
        except PacketError as exc:
            self.stats.malformed += 1
            log.warning("worker.malformed_packet", subject=msg.subject, size=len(msg.data), error=str(exc))
            await msg.term()
            return
        if packet.WhichOneof("payload") != "job_request" or not packet.job_request.job_id:
            self.stats.ignored += 1
            log.warning("worker.ignored_packet", subject=msg.subject, payload=packet.WhichOneof("payload"))
            await msg.term()
            return
        job_id = packet.job_request.job_id
        attempt = subjects.attempt_of(msg.headers)
        if await self._duplicate(job_id, attempt, msg):
            return
        await self._acquire(msg)
        if await self._duplicate(job_id, attempt, msg):  # it came in again while we waited for a slot
            self._free_slot(msg)
            return
        job = _Job(packet, msg)
        self._jobs[job_id] = job
        self._load_changed.set()
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job)

    def _free_slot(self, token: object) -> None:
        self._limiter.release_on_behalf_of(token)
        self._room.changed()

    async def _duplicate(self, job_id: str, attempt: int | None, msg: Message) -> bool:
        """Settle a message for a job this worker has run or is running (True), or let it run."""
        cached = self._results.get(job_id)
        if cached is not None and (attempt is None or attempt == cached[0]):
            self.stats.duplicates += 1
            log.info("worker.duplicate_delivery", job_id=job_id, attempt=cached[0], action="republish")
            assert self._nursery is not None
            self._nursery.start_soon(self._republish, job_id, cached[0], cached[1], [msg])
            return True
        if cached is not None and attempt < cached[0]:
            self.stats.superseded += 1  # an older attempt than one already finished here
            await msg.ack()
            return True
        running = self._jobs.get(job_id)
        if running is None:
            return False
        self.stats.duplicates += 1
        if attempt is None or attempt == running.attempt:
            log.info("worker.duplicate_delivery", job_id=job_id, action="attach")
            running.messages.append(msg)
        else:  # another attempt of a job still running here: after this one ends
            log.info("worker.duplicate_delivery", job_id=job_id, action="later", attempt=attempt)
            await msg.nak(AHEAD_DELAY)
        return True

    async def _acquire(self, msg: Message) -> None:
        try:
            self._limiter.acquire_on_behalf_of_nowait(msg)
            return
        except trio.WouldBlock:
            pass
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep_alive, [msg])
                await self._limiter.acquire_on_behalf_of(msg)
                nursery.cancel_scope.cancel()
        except BaseException:
            try:
                self._free_slot(msg)
            except RuntimeError:
                pass  # it never got the slot
            msg.give_back()  # intake stopped while it waited: back to the stream at once
            raise

    async def _keep_jobs_alive(self) -> None:
        """Tell JetStream the running jobs are still being worked on, so it does not redeliver
        them: one task for all of them (a task per job cost more than most jobs do). A job gets
        its first word between half an interval and an interval after it started."""
        half = self.in_progress_interval / 2
        while True:
            await trio.sleep(half)
            now = trio.current_time()
            for job in list(self._jobs.values()):
                if now - job.started >= half:
                    for msg in list(job.messages):
                        await msg.in_progress()

    async def _keep_alive(self, messages: list[Message]) -> None:
        """Tell JetStream we are still working on these, so it does not redeliver them."""
        while True:
            await trio.sleep(self.in_progress_interval)
            for msg in list(messages):
                await msg.in_progress()

    async def _publish_result(self, job_id: str, attempt: int, data: bytes) -> None:
        """One result message per attempt: the id names the attempt (JetStream drops a repeat of
        it for two minutes, so a retry's result must not look like the first one's), and so does
        the header the scheduler reads."""
        assert self._bus is not None
        with trio.fail_after(IO_TIMEOUT):
            await self._bus.publish(subjects.RESULT, data, msg_id=f"{subjects.RESULT}:{job_id}:{attempt}",
                                    headers={subjects.ATTEMPT_HEADER: str(attempt)})

    async def _republish(self, job_id: str, attempt: int, data: bytes, messages: list[Message]) -> bool:
        """Publish a result again (its first publish may or may not have landed: the message id
        makes a second copy harmless), then settle the messages."""
        published = await self._try_publish(job_id, attempt, data)
        await self._settle(messages, published)
        return published

    async def _try_publish(self, job_id: str, attempt: int, data: bytes) -> bool:
        try:
            await self._publish_result(job_id, attempt, data)
        except (Exception, trio.TooSlowError) as exc:
            log.warning("worker.result_publish_failed", job_id=job_id, attempt=attempt, error=repr(exc))
            return False
        return True

    @staticmethod
    async def _settle(messages: list[Message], published: bool) -> None:
        """Acked once the result is out; else given back: the redelivery publishes the stored
        result again, it never runs the job again. (Settling does not yield to other tasks.)"""
        for msg in messages:
            if published:
                await msg.ack()
            else:
                await msg.nak(RETRY_DELAY)

    # ---- running a job ---------------------------------------------------------------------

    async def _run_job(self, job: _Job) -> None:
        settled = False
        try:
            outcome = await self._execute(job)  # kept alive meanwhile by _keep_jobs_alive
            published = False
            if isinstance(outcome, JobResult):
                log.debug("job.ran", job_id=job.job_id, trace_id=job.packet.trace_id or job.job_id,
                          attempt=job.attempt, worker_id=self.worker_id, status=outcome.status)
                data = encode(self._packet(outcome, trace_id=job.packet.trace_id or job.job_id))
                # Cached before publishing: a redelivery publishes it again, never runs the job again.
                self._results.put(job.job_id, (job.attempt, data))
                published = await self._try_publish(job.job_id, job.attempt, data)
                if published and not job.replayed:
                    self._count(outcome)
            # No checkpoint from here on: a duplicate cannot attach after the messages are settled.
            self._job_done(job)
            settled = True
            if isinstance(outcome, JobResult):
                await self._settle(job.messages, published)
            elif outcome is None:  # superseded, finished elsewhere, or not ours to run
                for msg in job.messages:
                    await msg.ack()
            else:  # a number: give it back after that delay
                for msg in job.messages:
                    await msg.nak(outcome)
                self.stats.given_back += 1
                log.info("worker.job_given_back", job_id=job.job_id, delay=outcome)
        except Exception as exc:  # a bug here must not take the worker down: give the job back
            log.error("worker.job_crashed", job_id=job.job_id, error=repr(exc))
        finally:
            if not settled:  # cancelled from outside (hard stop) or crashed: give it back
                self._job_done(job)
                for msg in job.messages:
                    await msg.nak(RETRY_DELAY)
                self.stats.given_back += 1

    def _count(self, result: JobResult) -> None:
        if result.status == SUCCEEDED:
            self.stats.succeeded += 1
        elif result.status == CANCELLED:
            self.stats.cancelled += 1
        else:
            self.stats.failed += 1

    async def _claim(self, job: _Job) -> ClaimOutcome | float:
        """Claim the dispatched attempt (or a nak delay when Redis failed)."""
        assert self._claims is not None
        try:
            with trio.fail_after(IO_TIMEOUT):
                return await self._claims.claim(job.job_id, subjects.attempt_of(job.token.headers), self.worker_id)
        except (Exception, trio.TooSlowError) as exc:
            log.error("worker.claim_failed", job_id=job.job_id, error=repr(exc))
            return RETRY_DELAY

    async def _execute(self, job: _Job) -> JobResult | float | None:
        """Run one job. Returns the result to publish, a nak delay to give it back, or None when
        it is not this worker's to run (the message is acked)."""
        # The input is read in the claim's round trip; a claim that says "not yours" wastes a GET.
        context = self._read_context_later(job)
        claim = await self._claim(job)
        if isinstance(claim, float):
            return claim
        if claim.claim is Claim.FINISHED:
            self.stats.republished += 1
            job.attempt, job.replayed = claim.attempt, True
            log.info("worker.result_stored_already", job_id=job.job_id, attempt=job.attempt)
            return claim.stored
        if claim.claim is Claim.AHEAD:
            log.warning("worker.attempt_not_recorded_yet", job_id=job.job_id, attempt=job.attempt)
            return AHEAD_DELAY
        if not claim.runs:
            self.stats.superseded += 1
            log.info("worker.not_running", job_id=job.job_id, attempt=job.attempt, claim=claim.claim.value,
                     state=claim.state)
            return None
        job.attempt = claim.attempt or job.attempt
        done = self._unsaved.pop(job.job_id)
        if done is not None and done[0] == job.attempt:  # ran already; only saving its result failed
            result, output = done[1], done[2]
        else:
            ran = await self._run_handler(job, context)
            if not isinstance(ran, tuple):
                return ran
            result, output = ran
        committed = await self._save(job, claim, result, output)
        if committed is None:
            self._unsaved.put(job.job_id, (job.attempt, result, output))
            return RETRY_DELAY
        if not committed:
            self.stats.superseded += 1  # re-routed while it ran (this worker was cut off): not ours now
            log.warning("worker.result_superseded", job_id=job.job_id, attempt=job.attempt)
            return None
        return result

    async def _save(self, job: _Job, claim: ClaimOutcome, result: JobResult, output: str | None) -> bool | None:
        """Write the output (`res:<id>`) and commit the result to the job's record: whether the
        commit held (False: the claim was lost), or None when Redis failed (the caller keeps the
        result and saves it again on the redelivery: the job is not run again)."""
        assert self._redis is not None and self._claims is not None
        try:
            with trio.fail_after(IO_TIMEOUT):
                if output is not None and claim.claim is Claim.CLAIMED and not self._redis.cluster:
                    return await self._claims.commit_with_output(job.job_id, claim, result, output, self.result_ttl)
                if output is not None:
                    await self._redis.execute("SET", pointers.result_key(job.job_id), output, "EX", self.result_ttl)
                return await self._claims.commit(job.job_id, claim, result)
        except (Exception, trio.TooSlowError) as exc:
            log.error("worker.result_save_failed", job_id=job.job_id, error=repr(exc))
            return None

    def _read_context_later(self, job: _Job) -> Callable[[], Awaitable[Any]] | None:
        assert self._redis is not None
        try:
            return self._redis.execute_later("GET", pointers.key_of(job.request.context_ptr))
        except ValueError:
            return None  # an invalid pointer: _run_handler fails the job naming it

    async def _run_handler(self, job: _Job, context: Callable[[], Awaitable[Any]] | None = None
                           ) -> tuple[JobResult, str | None] | float | None:
        """The handler's run: (result, output to store or None), or a nak delay, or None.
        `context`: the input's read, already queued (else it is read here)."""
        assert self._redis is not None
        request = job.request
        early = self._early_cancels.pop(job.job_id)
        if early is not None:
            job.cancel_reason = early
            job.cancelled.set()
            job.scope.cancel()
        failure: JobFailed | None = None
        text: str | None = None
        # The handler stops when this worker's presence may have expired (see _keep_presence).
        job.scope.deadline = self._live_until
        with job.scope:
            try:
                key = pointers.key_of(request.context_ptr)
            except ValueError as exc:
                failure = JobFailed(f"invalid context pointer: {exc}", code="invalid_input")
            else:
                try:
                    with trio.fail_after(IO_TIMEOUT):
                        raw = await (context() if context is not None else self._redis.execute("GET", key))
                except (Exception, trio.TooSlowError) as exc:
                    log.error("worker.context_read_failed", job_id=job.job_id, error=repr(exc))
                    return RETRY_DELAY
                try:
                    input = decode_input(raw, limit=self.max_context_bytes)
                except JobFailed as exc:
                    failure = exc
            if failure is None:
                handler = self._handler_for(request.topic)
                if handler is None:
                    failure = JobFailed(f"no handler for topic {request.topic!r}", code="no_handler")
            if failure is None:
                assert handler is not None
                self.stats.handler_runs += 1
                try:
                    output = await handler(JobContext(self, job, input))
                    text = encode_output(output, limit=self.max_result_bytes)
                except JobFailed as exc:
                    failure = exc
                except Exception as exc:
                    log.warning("worker.handler_failed", job_id=job.job_id, topic=request.topic, error=repr(exc))
                    failure = JobFailed(error_text(exc), code="handler_error")
        elapsed_ms = int((trio.current_time() - job.started) * 1000)
        if job.scope.cancelled_caught:
            if job.cancel_reason:
                error = JobFailed(f"cancelled: {job.cancel_reason}", code="cancelled", status=CANCELLED)
                return job_result(job.job_id, CANCELLED, self.worker_id, elapsed_ms, error=error), None
            if not job.give_back:  # cut off: if the job was not re-routed meanwhile, it runs again here
                log.warning("worker.liveness_lost", job_id=job.job_id, attempt=job.attempt)
                return RETRY_DELAY
            return 0.0  # shutdown deadline: give it back, to be redelivered at once
        if failure is not None:
            return job_result(job.job_id, failure.status, self.worker_id, elapsed_ms, error=failure), None
        ptr = pointers.ptr(pointers.result_key(job.job_id))
        return job_result(job.job_id, SUCCEEDED, self.worker_id, elapsed_ms, result_ptr=ptr), text


# ---- a worker process ----------------------------------------------------------------------


async def serve_worker(
    worker: Worker,
    settings: Settings,
    lifecycle: Lifecycle,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `worker` inside `run_service` with the stages of WORKER_STAGES."""

    async def finish_jobs() -> None:
        await worker.finish_jobs(lifecycle.deadline - CLOSE_RESERVE - GIVE_BACK_MARGIN)

    lifecycle.on("stop intake", worker.stop_intake)
    lifecycle.on("finish jobs", finish_jobs)
    lifecycle.on("close", worker.close)
    async with open_redis(settings) as redis, open_bus(settings, name=f"cordum-worker:{worker.worker_id}") as bus:
        await worker.serve(redis, bus, task_status=task_status)


def run_worker(build: Callable[[Settings], Worker], *, name: str = "cordum-worker") -> None:
    """Entry point of a worker process: `build(settings)` makes the worker; never returns."""
    from cordum.runtime.service import run_service

    async def serve(settings: Settings, lifecycle: Lifecycle, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await serve_worker(build(settings), settings, lifecycle, task_status=task_status)

    run_service(name, WORKER_STAGES, serve)


def _liveness_margin(ttl: float) -> float:
    """Kept back from the presence TTL for the renewal's own round trip and scheduling delays."""
    return min(2.0, ttl / 5)


def parse_worker_id(raw: str) -> str:
    value = raw.strip()
    subjects.worker_subject(value)  # ValueError unless one subject token
    return value


def parse_topics(raw: str) -> list[str]:
    topics = [subjects.job_subject(t.strip()) for t in raw.split(",") if t.strip()]
    return topics


def sanitize_id(value: str) -> str:
    """Make a string usable as one subject token (hostnames carry dots)."""
    cleaned = "".join("-" if (c in ".*>" or c.isspace()) else c for c in value).strip("-")
    return cleaned or "worker"


__all__ = [
    "Handler",
    "JobContext",
    "JobFailed",
    "SDK_VERSION",
    "WORKER_STAGES",
    "Worker",
    "WorkerStats",
    "parse_topics",
    "parse_worker_id",
    "run_worker",
    "sanitize_id",
    "serve_worker",
]
