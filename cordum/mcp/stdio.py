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
import re
import stat
from typing import AsyncIterator, Awaitable, Callable

import anyio
import mcp_types as types
import trio
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server
from mcp.shared.message import SessionMessage

from cordum.mcp.server import InFlight, RequestId
from cordum.runtime.log import get_logger

log = get_logger("mcp.stdio")

MAX_LINE = 4 << 20  # one JSON-RPC message; a longer one is answered with -32600 and skipped
ID_SCAN = 1024  # bytes of a too-long message searched for its id
# The id of a message whose first members are "jsonrpc"/"method" strings and then "id", as clients
# write them; read from the first bytes only, so a too-long message's answer can carry its id. A
# message in any other shape is answered with id null (a nested "id" is never mistaken for it).
_LEADING_ID = re.compile(rb'\s*\{\s*(?:"(?:jsonrpc|method)"\s*:\s*"[^"\\]{0,128}"\s*,\s*)*'
                         rb'"id"\s*:\s*(-?[0-9]{1,18}|"[^"\\]{0,256}")\s*[,}]')


def leading_id(head: bytes) -> RequestId:
    """The request id at the start of a (truncated) JSON-RPC message, or None."""
    found = _LEADING_ID.match(head)
    if found is None:
        return None
    raw = found.group(1).decode("utf-8", "replace")
    return raw[1:-1] if raw.startswith('"') else int(raw)


def too_large(request_id: RequestId) -> SessionMessage:
    return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(
        code=types.INVALID_REQUEST, message=f"message too large: a line may carry at most {MAX_LINE} bytes")))


class StdinLines:
    """The lines of stdin, readable from Trio. `stop()` stops the reading but holds the session
    open until `close()`, so the calls in progress can still answer. A line over MAX_LINE is
    skipped and handed to `on_too_long` (with its id if it can be read from its start)."""

    def __init__(self, fd: int = 0) -> None:
        self._stream = trio.lowlevel.FdStream(os.dup(fd))
        self._reading: trio.CancelScope | None = None
        self._stopped = False
        self._closed = trio.Event()
        self.on_too_long: Callable[[RequestId], Awaitable[None]] | None = None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        buffer = bytearray()
        searched = 0  # bytes of buffer known to hold no newline
        dropping = False  # inside a too-long line: skip to its newline
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
            start = 0
            while (end := buffer.find(b"\n", max(start, searched))) >= 0:
                line, start, searched = bytes(buffer[start:end]), end + 1, 0
                if dropping:
                    dropping = False
                elif len(line) > MAX_LINE:
                    await self._too_long(line)
                elif line.strip():
                    yield line.decode("utf-8", "replace")
            del buffer[:start]
            searched = len(buffer)
            if len(buffer) > MAX_LINE:
                if not dropping:
                    dropping = True
                    await self._too_long(bytes(buffer[:ID_SCAN]))
                buffer.clear()
                searched = 0
        if buffer.strip() and not dropping:
            yield buffer.decode("utf-8", "replace")

    async def _too_long(self, head: bytes) -> None:
        request_id = leading_id(head[:ID_SCAN])
        log.error("stdio.message_too_large", limit=MAX_LINE, id=request_id)
        if self.on_too_long is not None:
            await self.on_too_long(request_id)

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


async def serve_stdio(server: Server, in_flight: InFlight | None = None, *,
                      task_status: trio.TaskStatus[StdinLines | None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve one client until stdin ends or `close()` is called on the started value. With
    `in_flight` (the server's middleware), the answers written are counted."""
    lines = StdinLines() if pollable_stdin() else None
    async with stdio_server(stdin=lines) as (read, write):  # type: ignore[arg-type]
        if lines is not None:
            async def refuse(request_id: RequestId) -> None:
                try:
                    await write.send(too_large(request_id))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass  # the session is over (the SDK's streams are anyio's)

            lines.on_too_long = refuse
        task_status.started(lines)
        log.info("stdio.serving")
        session_write = in_flight.answers(write) if in_flight is not None else write
        await server.run(read, session_write, server.create_initialization_options())
    if lines is not None:
        await lines.close()
    log.info("stdio.closed")
