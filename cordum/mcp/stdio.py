"""cordum-mcp over stdio: newline-delimited JSON-RPC on stdin/stdout, one client per process.

The SDK's `stdio_server` reads stdin in a worker thread, which a shutdown cannot interrupt (a
blocked `readline` ignores cancellation, so SIGTERM would wait for the client's next line). Here
stdin is read by Trio itself, non-blocking (`FdStream` on a duplicate of fd 0), so `close()` ends
the reading at once: the server then finishes what it is doing and returns. stdout stays the SDK's
(it points fd 1 at stderr while serving, so nothing but protocol reaches the client); logs go to
stderr.
"""

from __future__ import annotations

import os
import stat
from typing import AsyncIterator

import trio
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

from cordum.runtime.log import get_logger

log = get_logger("mcp.stdio")

MAX_LINE = 4 << 20  # one JSON-RPC message; a longer line is dropped with an error


class StdinLines:
    """The lines of stdin, readable from Trio. `stop()` stops the reading but holds the session
    open until `close()`, so the calls in progress can still answer."""

    def __init__(self, fd: int = 0) -> None:
        self._stream = trio.lowlevel.FdStream(os.dup(fd))
        self._reading: trio.CancelScope | None = None
        self._stopped = False
        self._closed = trio.Event()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        buffer = bytearray()
        dropping = False
        while True:
            chunk = b""
            with trio.CancelScope() as self._reading:
                if self._stopped:
                    self._reading.cancel()
                try:
                    chunk = await self._stream.receive_some(65536)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # closed by a shutdown: the end of input
            if self._stopped:
                await self._closed.wait()  # stopped: the session ends when close() says so
                return
            if not chunk:
                break
            buffer += chunk
            while (end := buffer.find(b"\n")) >= 0:
                line, buffer = bytes(buffer[:end]), buffer[end + 1:]
                if dropping:
                    dropping = False
                elif line.strip():
                    yield line.decode("utf-8", "replace")
            if len(buffer) > MAX_LINE:
                log.error("stdio.line_too_long", limit=MAX_LINE)
                buffer.clear()
                dropping = True
        if buffer.strip() and not dropping:
            yield buffer.decode("utf-8", "replace")

    def stop(self) -> None:
        self._stopped = True
        if self._reading is not None:
            self._reading.cancel()

    async def close(self) -> None:
        self.stop()
        self._closed.set()
        await self._stream.aclose()


def pollable_stdin() -> bool:
    """A pipe, socket or terminal (epoll cannot wait on a regular file)."""
    try:
        return not stat.S_ISREG(os.fstat(0).st_mode)
    except OSError:
        return False


async def serve_stdio(server: Server, *, task_status: trio.TaskStatus[StdinLines | None] = trio.TASK_STATUS_IGNORED,
                      ) -> None:
    """Serve one client until stdin ends or `close()` is called on the started value."""
    lines = StdinLines() if pollable_stdin() else None
    async with stdio_server(stdin=lines) as (read, write):  # type: ignore[arg-type]
        task_status.started(lines)
        log.info("stdio.serving")
        await server.run(read, write, server.create_initialization_options())
    if lines is not None:
        await lines.close()
    log.info("stdio.closed")
