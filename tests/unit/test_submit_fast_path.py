"""The submit fast path's body reading (cordum.gateway.fastpath.read_body): whole, too large, the
client gone, too slow, on a MockClock."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from cordum.gateway.context import MAX_BODY
from cordum.gateway.fastpath import RequestHeaders, read_body


def _receiving(*messages: dict, stall: bool = False):
    queue = list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        if stall:
            await trio.sleep_forever()
        raise AssertionError("read past the last message")

    return receive


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_body_in_chunks_is_read_whole(clock):
    receive = _receiving({"type": "http.request", "body": b'{"a"', "more_body": True},
                         {"type": "http.request", "body": b": 1}"})
    assert await read_body(receive, 60) == ("whole", [b'{"a"', b": 1}"], False)


async def test_a_body_past_the_limit_goes_back_with_what_was_read(clock):
    big = b"x" * (MAX_BODY // 2 + 1)
    receive = _receiving({"type": "http.request", "body": big, "more_body": True},
                         {"type": "http.request", "body": big, "more_body": True})
    assert await read_body(receive, 60) == ("over", [big, big], True)


async def test_a_client_gone_mid_body_is_not_answered(clock):
    receive = _receiving({"type": "http.request", "body": b"{", "more_body": True}, {"type": "http.disconnect"})
    assert (await read_body(receive, 60))[0] == "gone"


async def test_a_body_that_stalls_is_late_after_the_timeout_and_no_later(clock):
    receive = _receiving({"type": "http.request", "body": b"{", "more_body": True}, stall=True)
    assert await read_body(receive, 60) == ("late", [b"{"], True)
    assert trio.current_time() == pytest.approx(60.0)


def test_headers_read_as_quart_reads_them():
    headers = RequestHeaders([(b"X-Tenant-ID", "t\u00e9st".encode()), (b"x-tenant-id", b"second")])
    assert headers.get("x-tenant-id") == "t\u00c3\u00a9st"  # latin-1, the first of a repeated header
    assert headers.get("Content-Length") is None
