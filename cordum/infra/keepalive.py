"""hypercorn's keep-alive timeout without a task started and cancelled around every request.

hypercorn's Trio worker (0.18) closes a connection left idle for `keep_alive_timeout` with a
task (`TrioSingleTask`) that it starts, through `nursery.start`, each time the connection goes idle
and cancels each time a request comes in: two task starts and a cancellation per request, about
90 µs of CPU a request on a 2-core VM, a fifth of what a bare ASGI app costs there in all. It
offers no setting for it, so `install()` puts, once per process, a subclass of its `TCPServer` in
its place whose connections keep one watcher task each, waiting under a cancel scope whose
deadline moves: `timeout` after the connection went idle, never while it serves a request.

The behaviour stays hypercorn's: a connection idle past the timeout is closed; at shutdown an idle
one is closed at once and a busy one as soon as its response went out. If hypercorn's internals
are not the ones this was written against, nothing is replaced.
"""

from __future__ import annotations

import math
from typing import Any

import trio

from cordum.runtime.log import get_logger

log = get_logger("http.keepalive")


class KeepAliveDeadline:
    """In place of a connection's `TrioSingleTask` (`restart` = idle from now, `stop` = busy)."""

    def __init__(self, server: Any) -> None:
        self._server = server
        self._scope: trio.CancelScope | None = None
        self._deadline = math.inf
        self._idle = trio.Event()  # set while the connection is idle

    async def restart(self, task_group: Any, action: Any) -> None:
        self._deadline = trio.current_time() + self._server.config.keep_alive_timeout
        self._idle.set()
        if self._scope is None:
            self._scope = trio.CancelScope(deadline=self._deadline)
            task_group._nursery.start_soon(self._watch)
        else:
            self._scope.deadline = self._deadline

    async def stop(self) -> None:
        self._deadline = math.inf
        if self._idle.is_set():
            self._idle = trio.Event()
        if self._scope is not None:
            self._scope.deadline = math.inf

    async def _watch(self) -> None:
        terminated = self._server.context.terminated
        while True:
            assert self._scope is not None
            with self._scope:
                await terminated.wait()
            if self._idle.is_set():
                break  # idle past the timeout, or the server is shutting down while it is idle
            # A request came just as the deadline passed, or the server began shutting down while
            # this connection served one: look again once it is idle.
            await self._idle.wait()
            if terminated.is_set():
                break
            self._scope = trio.CancelScope(deadline=self._deadline)
        with trio.CancelScope(shield=True):
            await self._server._initiate_server_close()


def install() -> bool:
    """Serve hypercorn's Trio connections with `KeepAliveDeadline`; whether it is (idempotent)."""
    try:
        from hypercorn.trio import run, tcp_server, worker_context
    except ImportError:
        return False
    current = run.TCPServer
    if getattr(current, "lean_keep_alive", False):
        return True
    base = tcp_server.TCPServer
    known = (current is base and hasattr(worker_context, "TrioSingleTask")
             and all(hasattr(base, name) for name in ("run", "protocol_send", "_initiate_server_close", "_idle_timeout")))
    if not known:
        log.debug("http.keepalive_unchanged", reason="hypercorn's TCPServer is not the one known")
        return False

    class LeanKeepAliveTCPServer(base):  # type: ignore[misc, valid-type]
        lean_keep_alive = True

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if isinstance(getattr(self, "idle_task", None), worker_context.TrioSingleTask):
                self.idle_task = KeepAliveDeadline(self)

    run.TCPServer = LeanKeepAliveTCPServer
    return True
