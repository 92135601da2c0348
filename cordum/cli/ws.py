"""A synchronous client of the gateway's event stream, on the `websockets` library.

`GET /api/v1/stream` sends JSON text frames, each a protobuf-JSON `BusPacket`. The stream has no replay:
it is used for progress only; the job's REST record stays the source of truth.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.parse
from contextlib import ExitStack
from typing import Any, Iterator

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI, SecurityError
from websockets.sync.client import ClientConnection, connect

STREAM_PATH = "/api/v1/stream"


class StreamError(Exception):
    """The stream could not be opened or broke."""


def stream_url(addr: str, path: str = STREAM_PATH) -> str:
    """`http://h:8081` → `ws://h:8081/api/v1/stream` (https → wss)."""
    parts = urllib.parse.urlsplit(addr)
    scheme = "wss" if parts.scheme in ("https", "wss") else "ws"
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


class WebSocketClient:
    """One client connection: `connect()`, then iterate `messages()`; `close()` from any thread.
    A `Sec-WebSocket-Protocol` among `headers` is offered as the subprotocols (a browser's way of
    sending the API key); `tls` is what a wss:// server's certificate is checked with
    (`cordum.cli.http.tls_verify`: a context, or False for none)."""

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, timeout: float = 10.0,
                 tls: ssl.SSLContext | bool = True) -> None:
        self.url = url
        self.headers = dict(headers or {})
        self.timeout = timeout
        self.tls = tls
        self._ws: ClientConnection | None = None
        self._exit = ExitStack()  # the connection as a context manager: the library's preferred form
        self._closed = False

    def connect(self) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() != "sec-websocket-protocol"}
        offered = [p.strip() for k, v in self.headers.items() if k.lower() == "sec-websocket-protocol"
                   for p in v.split(",") if p.strip()]
        parts = urllib.parse.urlsplit(self.url)
        secure = parts.scheme == "wss"
        options: dict[str, Any] = {"ssl": self._ssl_context(), "server_hostname": parts.hostname} if secure else {}
        try:
            try:
                # Our own socket: the library then follows no redirect (it would send X-API-Key
                # to wherever a redirect points; it strips only Authorization and cookies).
                sock = socket.create_connection((parts.hostname or "localhost", parts.port or (443 if secure else 80)),
                                                timeout=self.timeout)
                self._exit.callback(sock.close)
                self._ws = self._exit.enter_context(connect(
                    self.url, sock=sock, additional_headers=headers, subprotocols=offered or None,  # type: ignore[arg-type]
                    open_timeout=self.timeout, close_timeout=1, user_agent_header="cordumctl", **options))
            except BaseException:
                self._exit.close()  # the socket of a failed handshake
                raise
        except InvalidStatus as exc:
            raise StreamError(f"stream refused: HTTP {exc.response.status_code}") from None
        except (SecurityError, ValueError) as exc:  # the library's refusal to follow a redirect
            if not isinstance(exc.__cause__, InvalidStatus):
                raise StreamError(f"stream handshake failed ({exc})") from None
            raise StreamError(f"stream refused: HTTP {exc.__cause__.response.status_code} (a redirect: not followed, "
                              "the stream's credentials stay with the gateway they were given for)") from None
        except (InvalidHandshake, InvalidURI) as exc:
            raise StreamError(f"stream handshake failed ({exc})") from None
        except TimeoutError:
            raise StreamError(f"no stream handshake within {self.timeout:g}s") from None
        except OSError as exc:
            raise StreamError(f"cannot connect to {self.url} ({exc.strerror or exc})") from None

    def _ssl_context(self) -> ssl.SSLContext:
        if isinstance(self.tls, ssl.SSLContext):
            return self.tls
        context = ssl.create_default_context()
        if self.tls is False:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def messages(self, *, idle_timeout: float | None = None) -> Iterator[str]:
        """Yield each text message until the server closes, or the connection breaks or is closed."""
        ws = self._ws
        if ws is None:
            raise StreamError("not connected")
        while not self._closed:
            try:
                message = ws.recv(timeout=idle_timeout)
            except TimeoutError:
                raise StreamError("stream idle timeout") from None
            except ConnectionClosed as exc:
                if self._closed or exc.rcvd is not None:  # closed by us, or a clean close by the server
                    return
                raise StreamError("connection closed by the gateway") from None
            if isinstance(message, str):
                yield message

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
        self._ws = None
        self._exit.close()

    def __enter__(self) -> "WebSocketClient":
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
