"""Graceful shutdown as data: declared stages, run in order, under one absolute deadline.

A service declares its stages (the guide's per-service sequence), components hook into them
(`lifecycle.on("http drain", server.drain)`), and the first SIGTERM/SIGINT runs them in order.
A second signal is logged and ignored: it must not cut a drain short. When the stages are done
(or the deadline leaves only the reserve for closing connections) the service's root scope is
cancelled, and the shielded `finally` blocks of its resources release locks and close clients.
"""

from __future__ import annotations

import signal
from typing import Awaitable, Callable, Sequence

import trio

from cordum.runtime.log import get_logger

log = get_logger("lifecycle")

Hook = Callable[[], Awaitable[None]]

# Kept back from the stages for closing clients and releasing leases after them.
CLOSE_RESERVE = 1.0


class Lifecycle:
    def __init__(self, service: str, stages: Sequence[str], *, timeout: float = 15.0) -> None:
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
        log.info("shutdown.begin", reason=reason, timeout=self.timeout, stages=self.stages)
        with trio.move_on_at(self.deadline - CLOSE_RESERVE) as scope:
            for index, stage in enumerate(self.stages):
                self._record("stage.begin", stage, index=index)
                async with trio.open_nursery() as nursery:
                    for hook in self._hooks[stage]:
                        nursery.start_soon(hook)
                self._record("stage.end", stage, index=index)
        if scope.cancelled_caught:
            self.completed_in_time = False
            log.error("shutdown.deadline_exceeded", timeout=self.timeout)
        self.finished.set()
        if self._root is not None:
            self._root.cancel()

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
