"""A tiny synchronous WebSocket client (wsproto over a plain socket) for the gateway's event stream.

`GET /api/v1/stream` sends JSON text frames, each a protobuf-JSON `BusPacket`. The stream has no replay:
it is used for progress only; the job's REST record stays the source of truth.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.parse
from typing import Any, Iterator

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

STREAM_PATH = "/api/v1/stream"


class StreamError(Exception):
    """The stream could not be opened or broke."""


def stream_url(addr: str, path: str = STREAM_PATH) -> str:
    """`http://h:8081` → `ws://h:8081/api/v1/stream` (https → wss)."""
    parts = urllib.parse.urlsplit(addr)
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class WebSocketClient:
    """One client connection: `connect()`, then iterate `messages()`; `close()` from any thread."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, timeout: float = 10.0) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._ws = WSConnection(ConnectionType.CLIENT)
        self._closed = False

    def connect(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        secure = parts.scheme == "wss"
        host = parts.hostname or "localhost"
        port = parts.port or (443 if secure else 80)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout)
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        except OSError as exc:
            raise StreamError(f"cannot connect to {host}:{port} ({exc})") from None
        self._sock = sock
        extra = [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]
        self._send(self._ws.send(Request(host=parts.netloc or host, target=target, extra_headers=extra)))
        while True:
            for event in self._events():
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    self.close()
                    raise StreamError(f"stream refused: HTTP {event.status_code}")

    def messages(self, *, idle_timeout: float | None = None) -> Iterator[str]:
        """Yield each text message until the server closes, or the connection breaks or is closed."""
        if self._sock is None:
            raise StreamError("not connected")
        self._sock.settimeout(idle_timeout)
        parts: list[str] = []
        while not self._closed:
            try:
                events = list(self._events())
            except StreamError:
                if self._closed:
                    return
                raise
            for event in events:
                if isinstance(event, TextMessage):
                    parts.append(event.data)
                    if event.message_finished:
                        yield "".join(parts)
                        parts = []
                elif isinstance(event, BytesMessage):
                    continue
                elif isinstance(event, Ping):
                    self._send(self._ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    try:
                        self._send(self._ws.send(event.response()))
                    except StreamError:
                        pass
                    self.close()
                    return

    def packets(self, *, idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The JSON object of each text message (others are skipped)."""
        for text in self.messages(idle_timeout=idle_timeout):
            try:
                value = json.loads(text)
            except ValueError:
                continue
            if isinstance(value, dict):
                yield value

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()

    def __enter__(self) -> "WebSocketClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise StreamError("connection closed")
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise StreamError(f"send failed ({exc})") from None

    def _events(self) -> Iterator[Any]:
        """Events already buffered (e.g. frames that arrived with the handshake), else one read's worth."""
        pending = [e for e in self._ws.events() if not isinstance(e, RejectData)]
        if pending:
            yield from pending
            return
        sock = self._sock
        if sock is None:
            raise StreamError("connection closed")
        try:
            data = sock.recv(65536)
        except (socket.timeout, TimeoutError):
            raise StreamError("stream idle timeout") from None
        except OSError as exc:
            raise StreamError(f"receive failed ({exc})") from None
        if not data:
            self._ws.receive_data(None)
            if self._closed:
                return
            self.close()
            raise StreamError("connection closed by the gateway")
        self._ws.receive_data(data)
        for event in self._ws.events():
            if isinstance(event, RejectData):
                continue
            yield event
