"""grpclib's frame writes of one event-loop turn leave as one socket write."""

from __future__ import annotations

import asyncio

from cordum.infra.aio import aio
from cordum.infra.grpc import _CoalescingTransport


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default=None):
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def _one_turn_then_next() -> tuple[list[bytes], list[bytes], int]:
    real = RecordingTransport()
    transport = _CoalescingTransport(real)
    for frame in (b"headers", b"", b"message", b"trailers"):
        transport.write(frame)
    buffered = transport.get_write_buffer_size()
    assert real.writes == []  # nothing leaves before the turn ends
    await asyncio.sleep(0)
    first = list(real.writes)
    transport.write(b"next")
    await asyncio.sleep(0)
    return first, real.writes[1:], buffered


async def _close_sends_what_is_pending() -> tuple[list[bytes], bool, object]:
    real = RecordingTransport()
    transport = _CoalescingTransport(real)
    transport.write(b"goaway")
    transport.close()
    await asyncio.sleep(0)  # the scheduled flush finds the transport closed and writes nothing
    return real.writes, real.closed, transport.get_extra_info("peername")


async def test_writes_of_one_turn_are_joined() -> None:
    first, later, buffered = await aio(_one_turn_then_next)()
    assert first == [b"headersmessagetrailers"]
    assert buffered == len(b"headersmessagetrailers")
    assert later == [b"next"]


async def test_close_flushes_first_and_other_calls_pass_through() -> None:
    writes, closed, peer = await aio(_close_sends_what_is_pending)()
    assert writes == [b"goaway"] and closed
    assert peer == ("127.0.0.1", 1)
