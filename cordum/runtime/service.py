"""The shape every service process shares: settings → logging → Trio → asyncio bridge → root
nursery with the signal watcher and the service's own `serve(settings, lifecycle)` tree.

Exit codes: 0 after a clean shutdown, 1 if the service crashed or its shutdown overran the
deadline (CORDUM_SHUTDOWN_TIMEOUT, closes included), 2 for a configuration error (the message
names the variable).
"""

from __future__ import annotations

import faulthandler
import gc
import os
import signal
import sys
import threading
from typing import Awaitable, Callable, Protocol, Sequence

import trio

from cordum.infra.aio import bridge_from_env, open_bridge, run_with_bridge
from cordum.infra.config import ConfigError, Settings, load_settings
from cordum.runtime import log as logging
from cordum.runtime.lifecycle import Lifecycle

log = logging.get_logger("service")

# How long past the shutdown deadline the watchdog lets a stuck process live.
WATCHDOG_MARGIN = 1.0
GC_GEN0_THRESHOLD = 20_000


class ShutdownWatchdog:
    """Last resort: exit code 1 if the process still runs `margin` seconds after the deadline.

    The closes bound themselves by the deadline (`close_scope`), so this fires only when something
    ignores it: a shielded block without `close_scope`, an asyncio task that will not stop, or a
    call blocking the thread. None of those can be interrupted from inside Trio (a shield
    hides cancellation, a blocked thread runs no task), so the guard is another OS thread, a timer
    armed when the shutdown begins. It ends the process with `os._exit`: `sys.exit` in a thread ends
    only that thread, and an exception or signal sent to the main thread waits for the same stuck
    code. Skipping atexit handlers and finalizers is acceptable then: the closes had their time.
    """

    def __init__(self, *, margin: float = WATCHDOG_MARGIN, exit: Callable[[int], object] = os._exit) -> None:
        self.margin = margin
        self._exit = exit
        self._timer: threading.Timer | None = None
        self.fired = False

    def arm(self, seconds: float) -> None:
        if self._timer is None:
            self._timer = threading.Timer(seconds + self.margin, self._fire, args=(seconds,))
            self._timer.daemon = True
            self._timer.name = "shutdown-watchdog"
            self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self, timeout: float) -> None:
        self.fired = True
        log.error("shutdown.deadline_exceeded", phase="watchdog", timeout=timeout, margin=self.margin, exit_code=1)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        self._exit(1)


class Serve(Protocol):
    def __call__(
        self, settings: Settings, lifecycle: Lifecycle, *, task_status: trio.TaskStatus[None] = ...
    ) -> Awaitable[None]: ...


def run_service(name: str, stages: Sequence[str], serve: Serve, *,
                check: Callable[[Settings], object] | None = None) -> None:
    """Entry point of a service's console script; never returns. `check(settings)` validates the
    service's own variables before Trio starts: a ConfigError it raises ends the process with exit
    code 2 and its one-line message (raised from `serve`, it would arrive nested in exception
    groups)."""
    try:
        settings = load_settings()
        bridge = bridge_from_env()
        if check is not None:
            check(settings)
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.configure(service=name, instance=settings.instance_id, level=settings.log_level)
    # `kill -USR1 <pid>` writes every thread's Python stack to stderr: where a stuck process is
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    log.info("service.starting", pid=os.getpid(), bridge=bridge)
    # Each job allocates thousands of short-lived objects (packets, dicts, futures, Trio tasks):
    # at the default gen-0 threshold of 700 the cycle collector ran several times per job, 3–8% of
    # a service's CPU. Garbage here is mostly freed by reference counting; collections can wait.
    gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)
    watchdog = ShutdownWatchdog()
    try:
        code = _run_profiled(os.environ.get("CORDUM_CPROFILE", ""), name,
                             lambda: run_with_bridge(_main, name, stages, serve, settings, watchdog, bridge=bridge))
    finally:
        watchdog.disarm()
    sys.exit(code)


def _run_profiled(directory: str, name: str, run: Callable[[], int]) -> int:
    """`run()`; with CORDUM_CPROFILE=<directory> (a developer's tool, never set in
    production) under cProfile counting CPU time, not wall time (a process preempted in a write
    would otherwise show the wait as the write's cost), the stats written to
    <directory>/<service>-<pid>.prof on the way out."""
    if not directory:
        return run()
    import cProfile
    import time

    profile = cProfile.Profile(time.process_time)
    try:
        return profile.runcall(run)
    finally:
        profile.dump_stats(os.path.join(directory, f"{name}-{os.getpid()}.prof"))


async def _main(name: str, stages: Sequence[str], serve: Serve, settings: Settings, watchdog: ShutdownWatchdog) -> int:
    lifecycle = Lifecycle(name, stages, timeout=settings.shutdown_timeout, on_begin=watchdog.arm)
    started = trio.current_time()
    code = 0
    try:
        async with open_bridge():
            async with trio.open_nursery() as root:
                lifecycle.attach(root.cancel_scope)
                await root.start(lifecycle.watch_signals)
                await root.start(serve, settings, lifecycle)
                # What startup built (modules, clients, policies) lives as long as the process: out
                # of the collector's sight, so full collections only walk what jobs allocate.
                gc.freeze()
                log.info("service.ready", startup_seconds=round(trio.current_time() - started, 3))
    except* ConfigError as group:
        print(f"{name}: configuration error: {_leaves(group)[0]}", file=sys.stderr)
        code = 2
    except* Exception as group:
        for exc in _leaves(group):
            log.error("service.crashed", error=repr(exc))
        code = 1
    if not lifecycle.closes_done() and code == 0:
        code = 1
    log.info("service.stopped", exit_code=code)
    return code


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions inside nested nursery groups."""
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def not_available(name: str, issue: str) -> Callable[[], None]:
    """Console script of a service whose implementation has not landed yet."""

    def main() -> None:
        print(f"{name}: not available yet ({issue})", file=sys.stderr)
        sys.exit(1)

    main.not_available = True  # type: ignore[attr-defined]  # the local stack skips these
    return main
