"""Keep-alive connections of our HTTP servers (cordum.infra.keepalive), over real sockets."""

from __future__ import annotations

import trio

from cordum.infra import keepalive
from cordum.infra.http import HttpServer, answer_lifespan

REQUEST = b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n", b"GET /fast HTTP/1.1\r\nHost: t\r\n\r\n"
SLOW_STARTED: dict[str, trio.Event] = {}  # set once the app serves /slow


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["path"] == "/slow":
        SLOW_STARTED["event"].set()
        await trio.sleep(1.0)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _answer(stream: trio.SocketStream) -> bytes:
    """One response (they are all 2-byte bodies), or b"" when the server closed the connection."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = await stream.receive_some(4096)
        if not chunk:
            return data
        data += chunk
    return data


async def _serve(nursery: trio.Nursery, keep_alive: float) -> HttpServer:
    server = HttpServer(app, "127.0.0.1", 0, graceful_timeout=5.0)
    server.config.keep_alive_timeout = keep_alive
    await nursery.start(server.serve)
    return server


async def test_the_lean_keep_alive_serves_our_http_servers():
    assert keepalive.install() and keepalive.install()  # idempotent
    from hypercorn.trio import run

    assert run.TCPServer.lean_keep_alive


async def test_each_request_moves_the_idle_deadline_and_an_idle_connection_is_closed_after_it():
    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, keep_alive=4.0)
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        with trio.fail_after(30):
            # Six requests a second apart: the connection lives well past one timeout, since
            # each request moves its deadline (a deadline set once would close it after 4 s).
            for _ in range(6):
                await stream.send_all(REQUEST[1])
                assert (await _answer(stream)).startswith(b"HTTP/1.1 200")
                await trio.sleep(1.0)
            await stream.send_all(REQUEST[1])
            assert (await _answer(stream)).startswith(b"HTTP/1.1 200")
            idle_from = trio.current_time()
            assert await _answer(stream) == b""  # closed by the server ...
            assert trio.current_time() - idle_from >= 3.9  # ... once idle for the timeout
        await server.drain()
        nursery.cancel_scope.cancel()


async def test_shutdown_closes_an_idle_connection_at_once_and_a_busy_one_after_its_response():
    SLOW_STARTED["event"] = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await _serve(nursery, keep_alive=60.0)
        idle = await trio.open_tcp_stream("127.0.0.1", server.port)
        busy = await trio.open_tcp_stream("127.0.0.1", server.port)
        with trio.fail_after(30):
            await idle.send_all(REQUEST[1])
            assert (await _answer(idle)).startswith(b"HTTP/1.1 200")
            await busy.send_all(REQUEST[0])  # answered a second after the app took it
            await SLOW_STARTED["event"].wait()  # in flight when the shutdown begins
            started = trio.current_time()
            async with trio.open_nursery() as draining:
                draining.start_soon(server.drain)
                assert await _answer(idle) == b""  # idle: closed without waiting out its 60 s
                assert trio.current_time() - started < 30
                answer = await _answer(busy)
                assert answer.startswith(b"HTTP/1.1 200"), answer  # the request in flight is answered
                assert await _answer(busy) == b""  # and then the connection closes
        nursery.cancel_scope.cancel()
