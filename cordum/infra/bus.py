"""NATS and JetStream, Trio-native.

Two ways to receive, as the guide's subject matrix says:
- `consume(subject, queue)`: work distribution. With JetStream, all replicas of a queue group
  share one pull durable `dur_<queue>__<subject>`, so each message goes to exactly one replica and
  is redelivered if that replica dies before acking. Each replica keeps one pull request of a
  batch open and gets messages as they come (`_StreamingPull`). Without JetStream: a core NATS
  queue group.
- `subscribe(subject)`: broadcast over core NATS; every replica gets every message.

Publishing goes through a `Batcher`: concurrent publishes share one bridge crossing, and the
JetStream acks of a batch are awaited together. Acks, naks and terms of received messages are
batched the same way. Durable subjects (the ones a stream stores) are published through JetStream
and awaited until the stream has stored them; broadcast subjects are plain core NATS.
"""

from __future__ import annotations

import asyncio
import json
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Mapping, Protocol, Sequence

import nats
import trio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg as NatsMsg
from nats.js import api as js_api
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, NotFoundError

from cordum.infra.aio import Batcher, aio, host_wakes_trio
from cordum.infra.config import Settings
from cordum.protocol import subjects
from cordum.runtime.lifecycle import close_scope
from cordum.runtime.log import get_logger, redact_urls

log = get_logger("bus")

MSG_ID_HEADER = "Nats-Msg-Id"
WORKER_DURABLE_IDLE = 3600.0  # seconds
_PUBLISH_ACK_TIMEOUT = 5.0
ACK_LINGER = 0.01  # seconds acks wait for company (ack waits are 30 s and more)


# A consumer's test of a message body, run where the message arrives (on the host loop, before Trio
# is woken): True when its handler would drop the message unread. Such a message is acked there
# and never reaches the consumer, so a service that needs few of a subject's messages (the workflow
# engine on `sys.job.result`) costs no task and no Trio wake-up for the rest. Must not raise or block.
Skip = Callable[[bytes], bool]


def _skips(skip: "Skip | None", data: bytes) -> bool:
    if skip is None:
        return False
    try:
        return bool(skip(data))
    except Exception as exc:  # a faulty test must not drop messages: the handler decides
        log.warning("bus.skip_failed", error=repr(exc))
        return False


@dataclass(frozen=True, slots=True)
class Outgoing:
    subject: str
    data: bytes
    msg_id: str | None = None
    headers: Mapping[str, str] | None = None


class _PullRelease:
    """How a pull subscription stops without stranding a message until the ack wait.

    A message handed back (naked) while the subscription is still open would be redelivered
    straight into this subscription's own open pull request, where nobody reads it any more. So
    give-backs, and whatever arrives once `closing`, are `held` and naked only after the server
    has confirmed the UNSUB (which also drops the open request).
    """

    __slots__ = ("open", "held", "closing")

    def __init__(self) -> None:
        self.open = True
        self.held: list[NatsMsg] = []
        self.closing = False


@dataclass(frozen=True, slots=True)
class _Action:
    kind: str  # "ack" | "nak" | "term" | "progress"
    msg: NatsMsg
    delay: float | None = None


class Message:
    """A received message. Acks are queued and sent in batches (they are fire-and-forget in
    JetStream anyway); on core NATS they are no-ops."""

    __slots__ = ("subject", "data", "headers", "reply", "num_delivered", "stream_seq", "_raw", "_bus", "_settled",
                 "_release")

    def __init__(self, raw: NatsMsg, bus: "Bus", *, jetstream: bool, release: _PullRelease | None = None) -> None:
        self.subject = raw.subject
        self.data = raw.data
        self.headers = raw.headers
        self.reply = raw.reply
        self._raw = raw if jetstream else None
        self._bus = bus
        self._settled = False
        self._release = release
        if jetstream:
            meta = raw.metadata
            self.num_delivered = meta.num_delivered
            self.stream_seq = meta.sequence.stream
        else:
            self.num_delivered = 1
            self.stream_seq = None

    @property
    def is_jetstream(self) -> bool:
        return self._raw is not None

    def _settle(self, kind: str, delay: float | None = None) -> None:
        if self._raw is None or (self._settled and kind != "progress"):
            return
        if kind != "progress":
            self._settled = True
        try:
            self._bus._acks.submit_nowait(_Action(kind, self._raw, delay))
        except trio.ClosedResourceError:
            pass  # the bus is closing: unsettled messages are redelivered after the ack wait

    async def ack(self) -> None:
        self._settle("ack")

    async def nak(self, delay: float | None = None) -> None:
        self._settle("nak", delay)

    async def term(self) -> None:
        self._settle("term")

    async def in_progress(self) -> None:
        self._settle("progress")

    def give_back(self) -> None:
        """Redeliver now (to any replica): for a message taken but not handled, e.g. on shutdown.
        Synchronous so that it also works in a cancelled scope."""
        if self._raw is None or self._settled:
            return
        if self._release is not None and self._release.open:
            self._settled = True
            self._release.held.append(self._raw)
        else:
            self._settle("nak")


class PullRoom(Protocol):
    """How much a consumer can take, for pull requests that ask for no more than that."""

    async def claim(self, most: int) -> int:
        """Wait until the consumer can start a message; hold and return how many (1 to `most`)
        the next request asks for. Each message delivered gives one back (the consumer's own
        accounting); `unclaim` the rest."""

    def unclaim(self, count: int) -> None:
        """A request ended with `count` of what it asked for undelivered."""


class _StreamingPull:
    """A durable's messages, pulled a batch at a time and handed over as they arrive.

    One pull request (`batch` messages, expiring after `expires` seconds) is kept open on the
    durable; the server delivers to this replica's inbox as messages come, and the request ends
    when `batch` were delivered, or it expired (status 408) or was refused (another 4xx). Then the
    next one goes out, once the consumer has taken all but `batch` of what it was handed. A
    message costs one delivery and one ack: no request of its own, no empty reply, no bridge
    crossing (the inbox callback feeds the Trio channel directly).
    """

    def __init__(self, bus: "Bus", stream: str, durable: str, subject: str, release: _PullRelease,
                 send: trio.MemorySendChannel[Message], batch: int, expires: float,
                 room: "PullRoom | None" = None, skip: Skip | None = None) -> None:
        self.bus, self.release, self.send, self.skip = bus, release, send, skip
        self.stream, self.durable, self.subject = stream, durable, subject
        self.batch = max(1, batch)
        self.room = room
        self.size = self.batch  # what the open request asked for
        self.delivered = 0  # of it, delivered so far
        self.expires = expires
        self.api_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self.inbox = ""
        self.left = 0  # messages the open request may still deliver
        self.ended = trio.Event()
        self.refused = ""  # why the server refused the last request ("" = it did not)

    async def on_message(self, raw: NatsMsg) -> None:
        """The inbox callback, on the asyncio side (never blocks, never raises)."""
        status = JetStreamContext.is_status_msg(raw)
        if status:
            if status == "100":  # an idle heartbeat: the request goes on
                return
            if status not in ("404", "408"):  # 408: it expired, 404: nothing to deliver
                self.refused = f"{status} {(raw.headers or {}).get('Description', '')}".strip()
            self._end()
            return
        if not raw.reply:
            return
        self.left -= 1
        self.delivered += 1
        if self.left <= 0:
            self._end()
        if _skips(self.skip, raw.data):
            try:
                self.bus._acks.submit_from_host(_Action("ack", raw))
            except trio.ClosedResourceError:
                pass  # closing: it is redelivered after the ack wait, and skipped again
            return
        try:
            message = Message(raw, self.bus, jetstream=True, release=self.release)
        except Exception as exc:  # not a JetStream delivery (its reply is no ack subject)
            log.warning("bus.not_a_stream_message", subject=raw.subject, reply=raw.reply, error=repr(exc))
            return
        if self.release.closing:
            message.give_back()  # held until the UNSUB is confirmed (see _PullRelease)
            return
        try:
            host_wakes_trio()
            self.send.send_nowait(message)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            message.give_back()

    def _end(self) -> None:
        self.left = 0
        self.ended.set()

    async def run(self) -> None:
        request = aio(self._request)
        backoff = 0.0
        while not self.release.closing:
            if self.refused:
                # The durable is gone (503 no responders, 409 consumer deleted, no answer), the
                # server is shutting down or has too many waiting requests: wait, put the durable
                # back, and ask again, instead of asking thousands of times a second.
                backoff = min(max(backoff * 2, 0.5), 10.0)
                log.warning("bus.pull_refused", subject=self.api_subject, status=self.refused, retry_in=backoff)
                self.refused = ""
                await trio.sleep(backoff)
                try:
                    await aio(self.bus._ensure_consumer)(self.stream, self.durable, self.subject)
                except Exception as exc:
                    log.warning("bus.consumer_restore_failed", durable=self.durable, error=repr(exc))
                    continue
            if self.send.statistics().current_buffer_used > self.batch:  # the consumer is behind
                await trio.sleep(0.005)
                continue
            # As many as the consumer can start now (waits for one), held for this request.
            size = self.batch if self.room is None else await self.room.claim(self.batch)
            self.ended = trio.Event()
            self.left = self.size = size
            self.delivered = 0
            try:
                await request()
            except Exception as exc:  # connection trouble: back off, the client reconnects
                self._unclaim()
                log.warning("bus.fetch_failed", subject=self.api_subject, error=repr(exc))
                await trio.sleep(1)
                continue
            try:
                with trio.move_on_after(self.expires + 1.0) as waited:
                    await self.ended.wait()
            finally:
                self._unclaim()
            if waited.cancelled_caught and not self.release.closing:
                # Not even the expiry's 408 came back: the request was lost (a reconnect) or the
                # durable is gone (deleted before the request reached it). Check before asking again.
                self.refused = "no answer"
            elif not self.refused:
                backoff = 0.0

    def _unclaim(self) -> None:
        """The request ended (or never went out): what it did not deliver is not coming."""
        if self.room is not None:
            self.room.unclaim(self.size - self.delivered)

    async def _request(self) -> None:
        body = json.dumps({"batch": self.size, "expires": int(self.expires * 1e9)}).encode()
        await self.bus._nc.publish(self.api_subject, body, reply=self.inbox)


class Bus:
    def __init__(self, nc: NatsClient, settings: Settings) -> None:
        self._nc = nc
        self._js = nc.jetstream() if settings.nats_use_jetstream else None
        self._settings = settings
        self._publisher: Batcher[Outgoing, None] = Batcher("publish", self._publish_batch)
        # Nobody waits for an ack: gathered for a few ms, they go out many to a write instead of
        # one write (and one wake-up of the server) each.
        self._acks: Batcher[_Action, None] = Batcher("acks", self._ack_batch, linger=ACK_LINGER)
        self.dropped = 0  # broadcast messages dropped because a subscriber fell behind

    @property
    def jetstream(self) -> bool:
        return self._js is not None

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def state(self) -> str:
        """The connection's state, as status and /health show it: connected, draining (closing;
        still connected), reconnecting, connecting, closed or disconnected."""
        nc = self._nc
        if nc.is_draining:
            return "draining"
        if nc.is_connected:
            return "connected"
        if nc.is_reconnecting:
            return "reconnecting"
        if nc.is_connecting:
            return "connecting"
        return "closed" if nc.is_closed else "disconnected"

    @property
    def server_url(self) -> str | None:
        """The server connected to now (NATS_URL may list several), credentials masked."""
        url = self._nc.connected_url
        return redact_urls(url.geturl()) if url is not None else None

    def _uses_jetstream(self, subject: str) -> bool:
        return self._js is not None and subjects.is_durable_subject(subject)

    # ---- publishing -------------------------------------------------------------------------

    async def publish(
        self, subject: str, data: bytes, *, msg_id: str | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        """Publish one message; for a durable subject, returns once the stream stored it."""
        await self._publisher.submit(Outgoing(subject, data, msg_id, headers))

    def publish_nowait(self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None) -> None:
        """Fire-and-forget (heartbeats, progress): queued for the next batch."""
        self._publisher.submit_nowait(Outgoing(subject, data, None, headers))

    async def publish_many(self, items: Sequence[Outgoing]) -> list[BaseException | None]:
        """Publish many in one crossing; returns one error (or None) per item."""
        return list(await aio(self._publish_batch)(list(items)))

    async def _publish_batch(self, items: list[Outgoing]) -> list[BaseException | None]:
        results: list[BaseException | None] = [None] * len(items)
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        for i, item in enumerate(items):
            headers = dict(item.headers) if item.headers else {}
            if item.msg_id:
                headers[MSG_ID_HEADER] = item.msg_id
            try:
                if self._uses_jetstream(item.subject):
                    assert self._js is not None
                    future = await self._js.publish_async(item.subject, item.data, headers=headers or None)
                    pending.append((i, future))
                else:
                    await self._nc.publish(item.subject, item.data, headers=headers or None)
            except Exception as exc:
                results[i] = exc
        if pending:
            futures = [f for _, f in pending]
            _, not_done = await asyncio.wait(futures, timeout=_PUBLISH_ACK_TIMEOUT)
            for i, future in pending:
                if future in not_done:
                    future.cancel()
                    results[i] = TimeoutError(f"no JetStream ack for {items[i].subject} within {_PUBLISH_ACK_TIMEOUT}s")
                elif future.exception() is not None:
                    results[i] = future.exception()
        return results

    async def _ack_batch(self, actions: list[_Action]) -> list[BaseException | None]:
        results: list[BaseException | None] = []
        for action in actions:
            try:
                if action.kind == "ack":
                    await action.msg.ack()
                elif action.kind == "nak":
                    await action.msg.nak(delay=action.delay)
                elif action.kind == "term":
                    await action.msg.term()
                else:
                    await action.msg.in_progress()
                results.append(None)
            except Exception as exc:
                results.append(exc)
        return results

    # ---- receiving --------------------------------------------------------------------------

    @asynccontextmanager
    async def subscribe(
        self, subject: str, *, queue: str | None = None, capacity: int = 10_000, skip: Skip | None = None,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Message]]:
        """Core NATS: broadcast (no queue) or a core queue group. Messages are handed over
        without a bridge crossing: the asyncio-side callback feeds a Trio channel. `skip`: see
        `Skip`."""
        send, receive = trio.open_memory_channel[Message](capacity)

        async def on_message(raw: NatsMsg) -> None:
            if _skips(skip, raw.data):
                return
            try:
                host_wakes_trio()
                send.send_nowait(Message(raw, self, jetstream=False))
            except trio.WouldBlock:
                self.dropped += 1
                if self.dropped % 1000 == 1:
                    log.warning("bus.slow_subscriber", subject=subject, dropped=self.dropped)
            except trio.ClosedResourceError:
                pass

        sub = await aio(self._nc.subscribe)(subject, queue=queue or "", cb=on_message)
        try:
            yield receive
        finally:
            send.close()
            with close_scope(2):
                try:
                    await aio(sub.unsubscribe)()
                except Exception as exc:
                    log.debug("bus.unsubscribe_failed", subject=subject, error=repr(exc))

    @asynccontextmanager
    async def consume(
        self, subject: str, queue: str, *, batch: int = 64, fetch_timeout: float = 2.0,
        room: "PullRoom | None" = None, skip: Skip | None = None,
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Message]]:
        """Work distribution: each message to exactly one member of `queue`. `room`, on a
        JetStream subject: what each pull request asks for (see PullRoom) instead of `batch`.
        `skip`: messages the consumer would drop unread are acked without reaching it (`Skip`)."""
        if room is not None and skip is not None:
            raise ValueError("a consumer that claims room cannot skip messages it never sees")
        if not self._uses_jetstream(subject):
            async with self.subscribe(subject, queue=queue, skip=skip) as receive:
                yield receive
            return
        durable = subjects.durable_name(queue, subject)
        stream = subjects.stream_for(subject)
        release = _PullRelease()
        # Unbounded: what is in flight is bounded by the pull requests instead (_StreamingPull).
        send, receive = trio.open_memory_channel[Message](math.inf)
        pull = _StreamingPull(self, stream, durable, subject, release, send, batch, fetch_timeout, room, skip)
        await aio(self._ensure_consumer)(stream, durable, subject)
        sub = await aio(self._nc.subscribe)(self._nc.new_inbox(), cb=pull.on_message)
        pull.inbox = sub.subject
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pull.run)
                try:
                    yield receive
                finally:
                    release.closing = True
                    nursery.cancel_scope.cancel()
                    with trio.CancelScope(shield=True), close_scope(2):
                        try:
                            await aio(self._stop_pulling)(sub)
                        except Exception as exc:
                            log.debug("bus.pull_stop_failed", durable=durable, error=repr(exc))
        finally:
            send.close()
            # Give back what was fetched but not handled, so another replica gets it now
            # instead of after the ack wait.
            leftovers = []
            while True:
                try:
                    leftovers.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            for msg in leftovers:
                msg.give_back()
            with close_scope(2):
                try:
                    await aio(self._release_pull)(sub, release)
                except Exception as exc:
                    log.debug("bus.pull_release_failed", durable=durable, error=repr(exc))
            if release.open:  # the release never ran (the bridge is closing, or it timed out)
                release.open = False
                for raw in release.held:
                    self._acks.submit_nowait(_Action("nak", raw))
                release.held = []

    async def consumer_backlog(self, subject: str, queue: str) -> tuple[int, int] | None:
        """(messages not yet delivered, delivered but not acked) of the queue group's durable on
        `subject`: one request to the server, the same answer on every replica of the group. None
        without JetStream (core NATS keeps no backlog)."""
        if not self._uses_jetstream(subject):
            return None
        return await aio(self._consumer_backlog)(subjects.stream_for(subject), subjects.durable_name(queue, subject))

    async def _consumer_backlog(self, stream: str, durable: str) -> tuple[int, int]:
        assert self._js is not None
        info = await self._js.consumer_info(stream, durable, timeout=2.0)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)

    async def _stop_pulling(self, sub: Any) -> None:
        # UNSUB, and wait for the server's answer to a PING sent after it: from then on the server
        # sends this subscription nothing and has dropped its waiting pulls, and whatever it had
        # sent already is in the pending queue (the subscription is removed locally only in
        # `_release_pull`, so nothing in flight is discarded).
        await self._nc._send_unsubscribe(sub._id)
        await self._nc.flush(timeout=1)

    async def _release_pull(self, sub: Any, release: _PullRelease) -> None:
        # Held give-backs, plus what arrived but was never handed over, go back to the stream.
        release.open = False
        raws, release.held = release.held, []
        queue = sub._pending_queue
        while not queue.empty():
            raw = queue.get_nowait()
            if raw.reply and not JetStreamContext.is_status_msg(raw):
                raws.append(raw)
        try:
            await sub.unsubscribe()
        finally:
            for raw in raws:
                try:
                    await raw.nak()
                except Exception:
                    pass
            await self._nc.flush(timeout=1)

    async def _ensure_consumer(self, stream: str, durable: str, subject: str) -> None:
        config = js_api.ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=self._settings.nats_js_ack_wait,
            max_ack_pending=2048,
            max_deliver=100,
            # A new durable starts from messages published from now on; the well-known
            # durables are created together with the streams so nothing falls in between.
            deliver_policy=js_api.DeliverPolicy.NEW,
            # A worker's own subject outlives the worker: its id changes across restarts, and
            # the schedulers re-route what was left there. The server drops such a durable after
            # an idle hour instead of keeping one per worker that ever ran.
            inactive_threshold=WORKER_DURABLE_IDLE if subject.startswith("worker.") else None,
        )
        assert self._js is not None
        try:
            await self._js.consumer_info(stream, durable)
        except NotFoundError:
            try:
                await self._js.add_consumer(stream, config)
            except BadRequestError as exc:  # another replica created it first
                if "already" not in str(exc).lower():
                    raise

    # ---- setup ------------------------------------------------------------------------------

    async def ensure_streams(self) -> None:
        if self._js is not None:
            await aio(self._ensure_streams)()

    async def _ensure_streams(self) -> None:
        assert self._js is not None
        for spec in subjects.STREAMS:
            name, stream_subjects = spec.name, spec.subjects
            config = js_api.StreamConfig(
                name=name,
                subjects=list(stream_subjects),
                retention=js_api.RetentionPolicy.LIMITS,
                storage=js_api.StorageType.FILE,
                max_age=self._settings.nats_js_max_age,
                num_replicas=self._settings.nats_js_replicas,
                duplicate_window=120.0,
            )
            try:
                await self._js.stream_info(name)
            except NotFoundError:
                try:
                    await self._js.add_stream(config)
                    log.info("bus.stream_created", stream=name, subjects=list(stream_subjects))
                    continue
                except BadRequestError as exc:
                    if "already" not in str(exc).lower():
                        raise
            await self._js.update_stream(config)
        for queue, subject in subjects.WELL_KNOWN_DURABLES:
            await self._ensure_consumer(subjects.stream_for(subject), subjects.durable_name(queue, subject), subject)

    async def sync(self) -> None:
        """Wait until the server has processed everything this connection sent (subscriptions
        included): a PING answered by its PONG."""
        await aio(self._nc.flush)()

    async def flush(self, *, close: bool = False) -> None:
        """Send everything queued (publishes, acks) and wait until the server has it. Works even
        when the batchers' own tasks were already cancelled (a hard stop); `close` is the final
        flush, after which nothing more is sent."""
        await self._publisher.flush_now(close=close)
        await self._acks.flush_now(close=close)
        await self.sync()


class _ConnectionEvents:
    """The NATS client's connection callbacks, logged (errors at most once per `every` seconds:
    the client retries every couple of seconds while the server is away)."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last_error = -math.inf
        self._suppressed = 0

    async def error(self, exc: Exception) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._last_error < self.every:
            self._suppressed += 1
            return
        log.warning("bus.connection_error", error=repr(exc), repeated=self._suppressed)
        self._last_error, self._suppressed = now, 0

    async def reconnected(self) -> None:
        log.info("bus.reconnected")


def _credentials(settings: Settings) -> dict[str, str]:
    """NATS_USER/NATS_PASSWORD or NATS_TOKEN (credentials in NATS_URL, if any, are used as given)."""
    if settings.nats_token:
        return {"token": settings.nats_token}
    if settings.nats_user:
        return {"user": settings.nats_user, "password": settings.nats_password}
    return {}


@asynccontextmanager
async def open_bus(settings: Settings, *, name: str) -> AsyncIterator[Bus]:
    """Connect (reconnecting forever), create the streams, run the batchers; drain on exit."""

    events = _ConnectionEvents()

    async def _connect() -> NatsClient:
        # NATS_URL may list every member of a cluster: the client connects to one (in a random
        # order, so replicas spread over the members) and, on losing it, reconnects to another.
        # It also learns the other members from the server's INFO (cluster gossip).
        return await nats.connect(
            servers=list(settings.nats_servers),
            name=name,
            max_reconnect_attempts=-1,
            reconnect_time_wait=2,
            ping_interval=30,
            connect_timeout=5,
            allow_reconnect=True,
            # nats-py retries a failed first connect forever and silently: say so in the log
            error_cb=events.error,
            reconnected_cb=events.reconnected,
            **_credentials(settings),
        )

    nc = await aio(_connect)()
    bus = Bus(nc, settings)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(bus._publisher.run)
            await nursery.start(bus._acks.run)
            try:
                await bus.ensure_streams()
                yield bus
            finally:
                with close_scope(3):
                    try:
                        await bus.flush(close=True)
                    except Exception as exc:
                        log.warning("bus.flush_failed", error=repr(exc))
                nursery.cancel_scope.cancel()
    finally:
        with close_scope(2):
            try:
                await aio(nc.drain)()
            except Exception as exc:
                log.debug("bus.close_failed", error=repr(exc))
