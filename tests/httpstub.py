"""Small pieces for the tests' stand-in HTTP servers (http.server handlers)."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from typing import Any


def send_json(handler: BaseHTTPRequestHandler, status: int, body: Any) -> None:
    payload = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def early_answer_then_next(port: int, head: bytes, body: bytes, second: bytes) -> list[bytes]:
    """On one keep-alive connection: a request's head, its body only after the server had a
    second to answer from the head alone, then a `second` request. The status lines of both
    answers (b"" for one that never came)."""
    import socket

    buffer = b""

    def answer(sock: socket.socket, wait: float) -> bytes:
        """One whole answer (head and Content-Length body): its status line."""
        nonlocal buffer
        sock.settimeout(wait)
        try:
            while b"\r\n\r\n" not in buffer:
                chunk = sock.recv(65536)
                if not chunk:
                    return b""
                buffer += chunk
            head_end = buffer.index(b"\r\n\r\n") + 4
            length = next((int(line.split(b":", 1)[1]) for line in buffer[:head_end].split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(buffer) < head_end + length:
                buffer += sock.recv(65536)
        except TimeoutError:
            return b""
        status, buffer = buffer.split(b"\r\n", 1)[0], buffer[head_end + length:]
        return status

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        early = answer(sock, 1.0)
        sock.sendall(body)
        first = early or answer(sock, 10.0)
        sock.sendall(second)
        return [first, answer(sock, 10.0)]
