"""The Trio/asyncio bridge: the only place that knows trio-asyncio exists.

Each crossing costs tens of microseconds and is a scheduling point (DESIGN.md §4.1), so hot paths
go through `Batcher`, which turns many Trio-side requests into one crossing per batch: while one
batch runs on the asyncio side, the next one fills up (group commit).
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Sequence, TypeVar

import trio
import trio_asyncio

from cordum.runtime.log import get_logger

T = TypeVar("T")
R = TypeVar("R")
log = get_logger("aio")


@asynccontextmanager
async def open_bridge() -> AsyncIterator[None]:
    """One asyncio loop for the whole process, inside the service's root nursery."""
    async with trio_asyncio.open_loop():
        yield


def run_with_bridge(fn: Callable[..., Awaitable[T]], *args: Any, **trio_run_options: Any) -> T:
    """`trio.run` with the asyncio loop already open (for test runners and one-shot tools)."""
    return trio_asyncio.run(fn, *args, **trio_run_options)


def aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Make an asyncio coroutine function awaitable from Trio (one crossing per call)."""
    return trio_asyncio.aio_as_trio(fn)


def trio_from_aio(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Make a Trio async function awaitable from asyncio code (used by servers' handlers)."""
    return trio_asyncio.trio_as_aio(fn)


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
    """

    def __init__(
        self,
        name: str,
        run_batch: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int = 1024,
    ) -> None:
        self.name = name
        self._run_batch = aio(run_batch)
        self._max_batch = max_batch
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
        await waiter.done.wait()
        if isinstance(waiter.error, _Resend):  # the flusher went away: send it from here
            return await self.submit(item)
        if waiter.error is not None:
            raise waiter.error
        return waiter.result  # type: ignore[return-value]

    def submit_nowait(self, item: T) -> None:
        self._enqueue(item, None)

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
                    continue
                batch = self._items[: self._max_batch]
                del self._items[: self._max_batch]
                await self._flush(batch)
        finally:
            self._running = False
            # Items queued while this task was being cancelled (by a shielded `finally` cancelled
            # in the same sweep, say) would wait for nobody: their callers send them themselves.
            orphans, self._items = self._items, []
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
