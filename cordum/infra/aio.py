"""The Trio/asyncio bridge: the only place that knows how Trio and asyncio share a thread.

redis-py, nats-py and grpclib are asyncio libraries; every service is written in Trio. By default
Trio runs as a *guest* of a native asyncio event loop (uvloop when installed) in the same thread
(`trio.lowlevel.start_guest_run`): the asyncio libraries run at full speed on their own loop, and
a crossing is one asyncio task plus one Trio reschedule (DESIGN.md §3, issue 11).
`CORDUM_BRIDGE` picks the runtime for a process:

- `uvloop` (default when uvloop is installed): Trio as a guest of uvloop;
- `asyncio`: Trio as a guest of the standard library's loop (default without uvloop);
- `trio-asyncio`: the emulated asyncio loop inside Trio (the round-1 bridge, about 1.5× the CPU
  per job; kept to measure against). Imported only when chosen: it swaps asyncio's loop policy
  for the whole process.

Crossings keep Trio's cancellation strict: a cancelled Trio caller cancels its asyncio task and
waits for it to stop before it sees `Cancelled`; an asyncio caller of Trio code cancels the Trio
task and waits for it likewise. Each crossing costs tens of microseconds and is a scheduling point
(DESIGN.md §4.1), so hot paths go through `Batcher`, which turns many Trio-side requests into one
crossing per batch: while one batch runs on the asyncio side, the next one fills up (group commit).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import importlib.util
import math
import os
import threading
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Generic, Sequence, TypeVar

import outcome
import trio

from cordum.infra.config import ConfigError
from cordum.runtime.log import get_logger

T = TypeVar("T")
R = TypeVar("R")
log = get_logger("aio")

BRIDGE_ENV = "CORDUM_BRIDGE"
BRIDGES = ("uvloop", "asyncio", "trio-asyncio")
_TRIO_ASYNCIO = "trio-asyncio"

# The runtime of the current `run_with_bridge` (one per process at a time; tests run one by one),
# and its host loop: asyncio.get_running_loop() costs a getpid() syscall on Python 3.11.
_active: str | None = None
_loop: asyncio.AbstractEventLoop | None = None
_ticks: "_ThreadlessTicks | None" = None  # the guest run's ticks (uvloop/asyncio host)


class BridgeCounts:
    """What the bridge did in this process, for /metrics (`cordum_bridge_*_total`): calls from
    Trio into asyncio, and wake-ups of an idle Trio by its host loop. Per job, these two are most
    of what a service's CPU tracks (README, Measured). Plain ints: counting costs ~50 ns."""

    __slots__ = ("crossings", "wakeups")

    def __init__(self) -> None:
        self.crossings = 0
        self.wakeups = 0


COUNTS = BridgeCounts()


class BridgeError(RuntimeError):
    """The bridge is not open, or its asyncio side went away under a call."""


class BridgeConfigError(ConfigError):
    """`CORDUM_BRIDGE` names no runtime this process can run."""


def _uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def bridge_from_env(env: dict[str, str] | None = None) -> str:
    """The runtime `CORDUM_BRIDGE` names (default: uvloop if installed, else asyncio)."""
    value = (os.environ if env is None else env).get(BRIDGE_ENV, "").strip().lower()
    if not value:
        return "uvloop" if _uvloop_installed() else "asyncio"
    if value not in BRIDGES:
        raise BridgeConfigError(f"{BRIDGE_ENV}={value!r} is not one of {', '.join(BRIDGES)}")
    if value == "uvloop" and not _uvloop_installed():
        raise BridgeConfigError(f"{BRIDGE_ENV}=uvloop but uvloop is not installed (pip install uvloop)")
    return value


def run_with_bridge(fn: Callable[..., Awaitable[T]], *args: Any, bridge: str | None = None, **trio_run_options: Any) -> T:
    """`trio.run` with asyncio available: the entry point of every process and test run."""
    global _active
    chosen = bridge or bridge_from_env()
    if chosen not in BRIDGES:
        raise BridgeConfigError(f"bridge {chosen!r} is not one of {', '.join(BRIDGES)}")
    previous, _active = _active, chosen
    try:
        if chosen == _TRIO_ASYNCIO:
            import trio_asyncio

            return trio_asyncio.run(fn, *args, **trio_run_options)
        return _run_as_guest(_new_loop(chosen), chosen == "uvloop", fn, args, trio_run_options)
    finally:
        _active = previous


def _new_loop(chosen: str) -> asyncio.AbstractEventLoop:
    if chosen == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    # Not asyncio.new_event_loop(): once trio_asyncio is imported, the policy makes its loops.
    return asyncio.SelectorEventLoop()


def _run_as_guest(
    loop: asyncio.AbstractEventLoop, uvloop: bool, fn: Callable[..., Awaitable[T]], args: tuple, options: dict[str, Any]
) -> T:
    global _loop, _ticks
    asyncio.set_event_loop(loop)
    previous, _loop = _loop, loop
    done: asyncio.Future[outcome.Outcome[T]] = loop.create_future()

    def finished(result: outcome.Outcome[T]) -> None:
        if not done.done():
            done.set_result(result)

    ticks = _ticks = _ThreadlessTicks(loop)
    try:
        trio.lowlevel.start_guest_run(
            fn,
            *args,
            run_sync_soon_threadsafe=loop.call_soon_threadsafe,
            run_sync_soon_not_threadsafe=ticks.first_call,
            done_callback=finished,
            # uvloop owns the signal wakeup fd while it runs; Trio's handlers still wake Trio
            # through its token. The standard loop leaves the fd to Trio.
            host_uses_signal_set_wakeup_fd=uvloop,
            **options,
        )
        result = loop.run_until_complete(done)
    finally:
        try:
            _ticks = None
            ticks.close()
            _stop_leftovers(loop)
        except Exception as exc:  # never hide the run's own outcome behind a cleanup failure
            log.warning("bridge.leftover_tasks", error=repr(exc))
        finally:
            _loop = previous
            asyncio.set_event_loop(None)
            loop.close()
    return result.unwrap()


class _ThreadlessTicks:
    """Trio's guest ticks without its I/O thread.

    Stock guest mode waits for Trio's I/O in a helper thread whenever Trio has nothing to run, and
    every wake-up from the host (an asyncio reply rescheduling a Trio task) costs a write to wake
    that thread, a thread switch and a `call_soon_threadsafe` back: about a fifth of a service's
    CPU under load. Trio's I/O manager polls through one epoll (kqueue) descriptor, which is itself
    pollable, so the host loop can wait on it instead: Trio parks as a reader of that descriptor
    plus a timer for its next deadline, and a reschedule from the host (which writes Trio's wakeup
    socket, registered in that descriptor) makes it readable on the same thread.

    This drives Trio's guest generator the way `GuestState.guest_tick` does (trio's private
    attributes, checked on the first tick): if they are not there, the stock tick runs instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._state: Any = None
        self._fd: int | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._parked = False
        self._wake_queued = False  # a host-side wake is on its way (one is enough)
        self._thread = threading.get_ident()

    def first_call(self, callback: Callable[[], object]) -> None:
        """Trio's first `run_sync_soon_not_threadsafe(guest_state.guest_tick)`: take over."""
        state = getattr(callback, "__self__", None)
        fd = _poll_fd(state)
        if state is None or fd is None or self._state is not None:
            self._loop.call_soon(callback)
            return
        # Registered once for the whole run (not per park: two epoll_ctl calls a wake-up); while
        # Trio is not parked its own ticks poll the descriptor, and the callback does nothing. A
        # duplicate: Trio closes its own descriptor in its last tick, and a number the host loop
        # still watched could be reused by a socket opened meanwhile.
        self._state, self._fd = state, os.dup(fd)
        self._loop.add_reader(self._fd, self._wake)
        self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        from sniffio import thread_local as sniffio_library  # what Trio's own tick sets

        state = self._state
        previous, sniffio_library.name = sniffio_library.name, "trio"
        try:
            timeout = state.unrolled_run_next_send.send(state.unrolled_run_gen)
        except StopIteration:
            state.done_callback(state.runner.main_task_outcome)
            return
        except trio.TrioInternalError as exc:
            state.done_callback(outcome.Error(exc))
            return
        finally:
            sniffio_library.name = previous
        events = outcome.capture(state.runner.io_manager.get_events, 0)
        if timeout <= 0 or isinstance(events, outcome.Error) or events.value:
            state.unrolled_run_next_send = events
            state.runner.guest_tick_scheduled = True
            self._loop.call_soon(self._tick)
        else:
            state.runner.guest_tick_scheduled = False
            self._park(timeout)

    def _park(self, timeout: float) -> None:
        self._parked = True
        if not math.isinf(timeout):  # Trio caps it at a day; it re-checks then, as its own tick does
            # Rounded up to the next millisecond, plus one: uvloop's timers have millisecond
            # resolution on a clock cached per loop iteration, and one that fires early finds
            # no deadline due and parks again (dozens of ticks for a sub-millisecond sleep).
            # Trio's own tick rounds its epoll timeout up the same way.
            self._timer = self._loop.call_later(math.ceil(timeout * 1000) / 1000 + 0.001, self._wake)

    def unpark(self) -> None:
        if self._parked:
            self._parked = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def close(self) -> None:
        self.unpark()
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = None

    def wake_soon(self) -> None:
        """Called on the host's side just before it reschedules a Trio task (an asyncio reply, a
        message handed over): a parked Trio is woken by a callback on this loop, and Trio, told
        its tick is scheduled, skips the write to its wake-up socket (and the read that drains
        it, and the loop iteration that notices it)."""
        if self._parked and not self._wake_queued and threading.get_ident() == self._thread:
            self._wake_queued = True
            self._state.runner.guest_tick_scheduled = True
            self._loop.call_soon(self._queued_wake)

    def _queued_wake(self) -> None:
        self._wake_queued = False
        self._wake()

    def _wake(self) -> None:
        if not self._parked:
            return
        COUNTS.wakeups += 1
        self.unpark()
        state = self._state
        state.unrolled_run_next_send = outcome.capture(state.runner.io_manager.get_events, 0)
        state.runner.guest_tick_scheduled = True
        self._tick()


def host_wakes_trio() -> None:
    """Call on the host loop's side right before rescheduling a Trio task from there (waking a
    parked Trio without a round trip through its wake-up socket); a no-op on other bridges."""
    if _ticks is not None:
        _ticks.wake_soon()


def _poll_fd(state: Any) -> int | None:
    """The descriptor Trio's I/O manager polls through, if this Trio's internals are as known."""
    try:
        runner = state.runner
        manager = runner.io_manager
        state.unrolled_run_gen, state.unrolled_run_next_send, state.done_callback  # noqa: B018
        runner.guest_tick_scheduled, manager.get_events  # noqa: B018
        poller = getattr(manager, "_epoll", None) or getattr(manager, "_kqueue", None)
        return int(poller.fileno())
    except (AttributeError, TypeError, ValueError):
        return None


def _stop_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel asyncio tasks a library left running (a client's reader after its close) and let
    them finish, so the loop closes without 'Task was destroyed but it is pending'."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        gather = asyncio.gather(*pending, return_exceptions=True)
        loop.run_until_complete(asyncio.wait_for(gather, 5))
    loop.run_until_complete(loop.shutdown_asyncgens())


@asynccontextmanager
async def open_bridge() -> AsyncIterator[None]:
    """Make sure asyncio is usable from this Trio run (a service's root nursery opens it)."""
    if _active == _TRIO_ASYNCIO:
        import trio_asyncio

        async with trio_asyncio.open_loop():
            yield
        return
    _host_loop()
    yield


def _host_loop() -> asyncio.AbstractEventLoop:
    if _loop is not None:
        return _loop
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise BridgeError(
            "no asyncio loop hosts this Trio run: start it with cordum.infra.aio.run_with_bridge, not trio.run"
        ) from None


def aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Make an asyncio coroutine function awaitable from Trio (one crossing per call)."""

    emulated: list[Callable[..., Awaitable[T]]] = []

    @functools.wraps(fn)
    async def bridged(*args: Any, **kwargs: Any) -> T:
        if _active == _TRIO_ASYNCIO:
            if not emulated:
                import trio_asyncio

                emulated.append(trio_asyncio.aio_as_trio(fn))
            COUNTS.crossings += 1
            return await emulated[0](*args, **kwargs)
        await trio.lowlevel.checkpoint_if_cancelled()
        COUNTS.crossings += 1
        task = _host_loop().create_task(fn(*args, **kwargs))  # type: ignore[arg-type]
        return await _wait_for_task(task)

    return bridged


async def _wait_for_task(task: asyncio.Task[T]) -> T:
    """Block this Trio task until the asyncio task ends; a Trio cancel cancels the asyncio task
    and still waits for it (its cleanup runs before the caller moves on)."""
    trio_task = trio.lowlevel.current_task()
    raise_cancel: Callable[[], Any] | None = None

    def on_done(done: asyncio.Task[T]) -> None:
        if done.cancelled():
            if raise_cancel is not None:
                result: outcome.Outcome[T] = outcome.capture(raise_cancel)
            else:
                result = outcome.Error(BridgeError("the asyncio side cancelled this call (its loop is closing)"))
        elif (exc := done.exception()) is not None:
            result = outcome.Error(exc)
        else:
            result = outcome.Value(done.result())
        host_wakes_trio()
        trio.lowlevel.reschedule(trio_task, result)

    def abort(cancel: Callable[[], Any]) -> trio.lowlevel.Abort:
        nonlocal raise_cancel
        raise_cancel = cancel
        task.cancel()
        return trio.lowlevel.Abort.FAILED  # on_done reschedules us once the task has stopped

    task.add_done_callback(on_done)
    return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]


def trio_from_aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Coroutine[Any, Any, T]]:
    """Make a Trio async function awaitable from asyncio code (used by servers' handlers)."""

    @functools.wraps(fn)
    async def bridged(*args: Any, **kwargs: Any) -> T:
        if _active == _TRIO_ASYNCIO:
            import trio_asyncio

            return await trio_asyncio.trio_as_aio(fn)(*args, **kwargs)
        return await _run_in_trio(fn, args, kwargs)

    return bridged


async def _run_in_trio(fn: Callable[..., Awaitable[T]], args: tuple, kwargs: dict[str, Any]) -> T:
    loop = _host_loop()
    result: asyncio.Future[T] = loop.create_future()
    stopped: asyncio.Future[None] = loop.create_future()
    scope = trio.CancelScope()

    async def in_trio() -> None:
        try:
            with scope:
                value = await fn(*args, **kwargs)
                if not result.done():
                    result.set_result(value)
        except Exception as exc:
            if not result.done():
                result.set_exception(exc)
        except trio.Cancelled:  # the run is ending (our own scope's cancel is caught by `with`)
            pass
        finally:
            if not result.done():
                result.cancel()
            stopped.set_result(None)

    # A system task: it needs no nursery open around the asyncio server, and it copies the
    # caller's context like a child task would. It never raises (errors go to `result`).
    trio.lowlevel.spawn_system_task(in_trio, context=contextvars.copy_context())
    try:
        return await result
    except asyncio.CancelledError:
        scope.cancel()
        while not stopped.done():  # strict: the Trio side has stopped before we report cancelled
            try:
                await asyncio.shield(stopped)
            except asyncio.CancelledError:
                continue
        raise


def timeout_left() -> float | None:
    """Seconds to the current Trio deadline, for asyncio APIs that take timeouts."""
    deadline = trio.current_effective_deadline()
    if math.isinf(deadline):
        return None
    return max(deadline - trio.current_time(), 0.001)


class _Waiter(Generic[R]):
    __slots__ = ("done", "result", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None


class _Resend(Exception):
    """Marks an item the flusher could not see through (queued or in flight as it was cancelled):
    its caller, if it still runs (a shielded close), sends it itself. Items sent on the way out are
    closes and releases, which may run twice."""


class Batcher(Generic[T, R]):
    """Group commit across the bridge.

    `run_batch` is an asyncio coroutine function taking a list of items and returning one result
    (or exception instance) per item, in order. `submit` waits for its item's result;
    `submit_nowait` is fire-and-forget (failures are logged). `run` is the flusher task.
    `linger`: how long the flusher waits, once an item came, for more to join its batch (for
    items nobody waits for, such as acks: fewer, larger writes).
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 1024,
        linger: float = 0.0,
    ) -> None:
        self.name = name
        self._run_batch = aio(run_batch)
        self._max_batch = max_batch
        self._linger = linger
        self._items: list[tuple[T, _Waiter[R] | None]] = []
        self._wakeup = trio.Event()
        self._closed = False
        self._idle = trio.Event()
        self._idle.set()
        self._running = False
        self.batches = 0
        self.items_sent = 0

    async def submit(self, item: T) -> R:
        if not self._running:
            # No flusher (not started yet, or cancelled during a shutdown, as in a shielded
            # `finally`): send this one item from the caller's own task.
            result = (await self._run_batch([item]))[0]
            if isinstance(result, BaseException):
                raise result
            return result  # type: ignore[return-value]
        waiter: _Waiter[R] = _Waiter()
        self._enqueue(item, waiter)
        return await self._outcome(item, waiter)

    async def _outcome(self, item: T, waiter: _Waiter[R]) -> R:
        await waiter.done.wait()
        if isinstance(waiter.error, _Resend):  # the flusher went away: send it from here
            return await self.submit(item)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def submit_nowait(self, item: T) -> None:
        self._enqueue(item, None)

    def submit_from_host(self, item: T) -> None:
        """`submit_nowait` from a callback on the host loop: wakes the flusher without a trip
        through Trio's wake-up socket, and wakes Trio only if the flusher is waiting for items."""
        if not self._wakeup.is_set():
            host_wakes_trio()
        self._enqueue(item, None)

    def submit_later(self, item: T) -> Callable[[], Awaitable[R]]:
        """Queue `item` now; await the returned function for its result later. Items queued
        before the caller's next checkpoint go in one batch, in the order queued (one round trip
        for a command and the read that must follow it)."""
        if not self._running:
            return functools.partial(self.submit, item)
        waiter: _Waiter[R] = _Waiter()
        self._enqueue(item, waiter)
        return functools.partial(self._outcome, item, waiter)

    def _enqueue(self, item: T, waiter: _Waiter[R] | None) -> None:
        if self._closed:
            raise trio.ClosedResourceError(f"{self.name} is closed")
        self._items.append((item, waiter))
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                if not self._items:
                    self._idle.set()
                    if self._closed:
                        return
                    self._wakeup = trio.Event()
                    await self._wakeup.wait()
                    if self._linger and not self._closed:
                        await trio.sleep(self._linger)  # let more items join this batch
                    continue
                batch = self._items[: self._max_batch]
                del self._items[: self._max_batch]
                await self._flush(batch)
        finally:
            self._running = False
            # Items queued while this task was being cancelled (by a shielded `finally` cancelled
            # in the same sweep, say) would wait for nobody: their callers send them themselves.
            # Items nobody waits for (acks) stay queued: the final `flush_now` sends them.
            orphans = self._items
            self._items = [(item, waiter) for item, waiter in orphans if waiter is None]
            for _, waiter in orphans:
                if waiter is not None:
                    waiter.error = _Resend()
                    waiter.done.set()

    async def _flush(self, batch: list[tuple[T, _Waiter[R] | None]]) -> None:
        self.batches += 1
        self.items_sent += len(batch)
        try:
            results: Sequence[R | BaseException] = await self._run_batch([item for item, _ in batch])
        except Exception as exc:  # the whole batch failed (connection lost, ...)
            results = [exc] * len(batch)
        except BaseException:  # cancelled mid-flight: its callers must not wait for it forever
            for _, waiter in batch:
                if waiter is not None and not waiter.done.is_set():
                    waiter.error = _Resend()
                    waiter.done.set()
            raise
        for (item, waiter), result in zip(batch, results):
            if waiter is None:
                if isinstance(result, BaseException):
                    log.warning("batch.item_failed", batcher=self.name, error=repr(result))
                continue
            if isinstance(result, BaseException):
                waiter.error = result
            else:
                waiter.result = result
            waiter.done.set()

    async def flush_now(self, *, close: bool = False) -> None:
        """Send what is queued, from this task (so it works even if the `run` task is gone,
        cancelled with its nursery); with `close`, take no more items afterwards."""
        if close:
            self._closed = True
            self._wakeup.set()
        while self._items:
            batch = self._items[: self._max_batch]
            del self._items[: self._max_batch]
            await self._flush(batch)
        if self._closed:
            self._idle.set()
