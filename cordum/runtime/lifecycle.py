"""Graceful shutdown as data: declared stages, run in order, under one absolute deadline.

A service declares its stages (the guide's per-service sequence), components hook into them
(`lifecycle.on("http drain", server.drain)`), and the first SIGTERM/SIGINT runs them in order.
A second signal is logged and ignored: it must not cut a drain short. When the stages are done
(or the deadline leaves only the reserve for closing connections) the service's root scope is
cancelled, and the shielded `finally` blocks of its resources release locks and close clients.

The deadline bounds the whole shutdown, closes included: every shielded close block opens
`close_scope(timeout)`, which ends at its own small timeout or at the shutdown deadline, whichever
comes first. Infra code has no Lifecycle object, so the deadline is kept per Trio run (a RunVar:
process-wide for a service, fresh for each test's `trio.run`). After the closes, `closes_done()`
tells whether the deadline was overrun (the service then exits with code 1).
"""

from __future__ import annotations

import math
import signal
from typing import Awaitable, Callable, Sequence

import trio

from cordum.runtime.log import get_logger

log = get_logger("lifecycle")

Hook = Callable[[], Awaitable[None]]

# Kept back from the stages for closing clients and releasing leases after them.
CLOSE_RESERVE = 1.0

_shutdown_deadline: trio.lowlevel.RunVar[float] = trio.lowlevel.RunVar("cordum_shutdown_deadline", default=math.inf)


def shutdown_deadline() -> float:
    """The absolute (Trio clock) deadline of the shutdown in progress; +inf before one begins."""
    return _shutdown_deadline.get()


def close_scope(timeout: float) -> trio.CancelScope:
    """A shielded scope for closing a resource in a `finally`: it survives the cancellation that
    brought it there, and ends after `timeout` seconds or at the shutdown deadline, whichever is
    first (so the closes, one after another, can never carry the shutdown past its deadline).

        with close_scope(2):
            await client.close()
    """
    return trio.CancelScope(shield=True, deadline=min(trio.current_time() + timeout, shutdown_deadline()))


class Lifecycle:
    def __init__(
        self, service: str, stages: Sequence[str], *, timeout: float = 15.0,
        on_begin: Callable[[float], None] | None = None,
    ) -> None:
        """`on_begin(seconds)` is called as the shutdown begins, with the seconds to its deadline."""
        if len(set(stages)) != len(stages):
            raise ValueError(f"{service}: duplicate shutdown stage names in {list(stages)}")
        self.service = service
        self.stages = list(stages)
        self.timeout = timeout
        self._hooks: dict[str, list[Hook]] = {stage: [] for stage in stages}
        self.events: list[tuple[str, str]] = []
        self.started = trio.Event()
        self.finished = trio.Event()
        self.deadline = float("inf")
        self.completed_in_time = True
        self._root: trio.CancelScope | None = None
        self._on_begin = on_begin

    def on(self, stage: str, hook: Hook) -> None:
        """Run `hook` during `stage`; hooks of one stage run concurrently."""
        if stage not in self._hooks:
            raise ValueError(f"{self.service}: unknown shutdown stage {stage!r}; declared: {self.stages}")
        self._hooks[stage].append(hook)

    def attach(self, root: trio.CancelScope) -> None:
        """The scope cancelled once the stages are done: the service's root nursery."""
        self._root = root

    def _record(self, event: str, stage: str, **fields: object) -> None:
        self.events.append((event, stage))
        log.info(event, stage=stage, **fields)

    async def shutdown(self, reason: str) -> None:
        """Run the stages once; later calls wait for the first to finish."""
        if self.started.is_set():
            await self.finished.wait()
            return
        self.started.set()
        self.deadline = trio.current_time() + self.timeout
        _shutdown_deadline.set(min(self.deadline, shutdown_deadline()))
        log.info("shutdown.begin", reason=reason, timeout=self.timeout, stages=self.stages)
        if self._on_begin is not None:
            self._on_begin(self.timeout)
        with trio.move_on_at(self.deadline - CLOSE_RESERVE) as scope:
            for index, stage in enumerate(self.stages):
                self._record("stage.begin", stage, index=index)
                async with trio.open_nursery() as nursery:
                    for hook in self._hooks[stage]:
                        nursery.start_soon(hook)
                self._record("stage.end", stage, index=index)
        if scope.cancelled_caught:
            self._overran("stages")
        self.finished.set()
        if self._root is not None:
            self._root.cancel()

    def closes_done(self) -> bool:
        """Call once the resources are closed: False (and logged) if the shutdown overran."""
        if self.started.is_set() and self.completed_in_time and trio.current_time() >= self.deadline:
            self._overran("closes")
        return self.completed_in_time

    def _overran(self, phase: str) -> None:
        self.completed_in_time = False
        log.error("shutdown.deadline_exceeded", phase=phase, timeout=self.timeout)

    async def watch_signals(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async with trio.open_nursery() as nursery:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if self.started.is_set():
                        log.warning("signal.ignored", signal=name, reason="shutdown already in progress")
                        continue
                    nursery.start_soon(self.shutdown, f"signal {name}")
