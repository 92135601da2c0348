"""The shape every service process shares: settings → logging → Trio → asyncio bridge → root
nursery with the signal watcher and the service's own `serve(settings, lifecycle)` tree.

Exit codes: 0 after a clean shutdown, 1 if the service crashed or its shutdown overran the
deadline, 2 for a configuration error (the message names the variable).
"""

from __future__ import annotations

import sys
from typing import Awaitable, Callable, Protocol, Sequence

import trio

from cordum.infra.aio import open_bridge
from cordum.infra.config import ConfigError, Settings, load_settings
from cordum.runtime import log as logging
from cordum.runtime.lifecycle import Lifecycle

log = logging.get_logger("service")


class Serve(Protocol):
    def __call__(
        self, settings: Settings, lifecycle: Lifecycle, *, task_status: trio.TaskStatus[None] = ...
    ) -> Awaitable[None]: ...


def run_service(name: str, stages: Sequence[str], serve: Serve) -> None:
    """Entry point of a service's console script; never returns."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)
    logging.configure(service=name, instance=settings.instance_id, level=settings.log_level)
    sys.exit(trio.run(_main, name, stages, serve, settings))


async def _main(name: str, stages: Sequence[str], serve: Serve, settings: Settings) -> int:
    lifecycle = Lifecycle(name, stages, timeout=settings.shutdown_timeout)
    started = trio.current_time()
    code = 0
    try:
        async with open_bridge():
            async with trio.open_nursery() as root:
                lifecycle.attach(root.cancel_scope)
                await root.start(lifecycle.watch_signals)
                await root.start(serve, settings, lifecycle)
                log.info("service.ready", startup_seconds=round(trio.current_time() - started, 3))
    except* ConfigError as group:
        print(f"{name}: configuration error: {_leaves(group)[0]}", file=sys.stderr)
        code = 2
    except* Exception as group:
        for exc in _leaves(group):
            log.error("service.crashed", error=repr(exc))
        code = 1
    if code == 0 and not lifecycle.completed_in_time:
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
