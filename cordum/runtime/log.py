"""Structured logs: one JSON object per line on stderr.

`log.info("stage.begin", stage="http drain")` writes
`{"ts": ..., "level": "info", "service": ..., "instance": ..., "event": "stage.begin", "stage": ...}`.
Field values whose names look secret are masked, and credentials inside URLs are stripped, so a
caller cannot leak a key by logging its settings.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
# Names of secret-bearing fields (a bare `key` is a Redis key or lock name, not a secret).
_SECRET_NAME = re.compile(r"(api[_-]?key|private[_-]?key|secret|password|passwd|token|credential|authorization)", re.I)
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.I)

_context: dict[str, Any] = {}
_threshold = _LEVELS["info"]
_stream: TextIO | None = None


def configure(*, service: str, instance: str, level: str = "info", stream: TextIO | None = None) -> None:
    global _threshold, _stream
    _context.update(service=service, instance=instance)
    _threshold = _LEVELS.get(level, 20)
    _stream = stream


def redact_urls(text: str) -> str:
    """`text` with the credentials of every URL in it masked (`redis://***@host`): for errors and
    output that show a URL."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)


def redact(name: str, value: Any) -> Any:
    if isinstance(value, str):
        if _SECRET_NAME.search(name) and value:
            return "***"
        return redact_urls(value)
    return value


class Logger:
    def __init__(self, component: str) -> None:
        self.component = component

    def _write(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < _threshold:
            return
        record = {"ts": round(time.time(), 6), "level": level, **_context}
        record["component"] = self.component
        record["event"] = event
        for name, value in fields.items():
            record[name] = redact(name, value)
        line = json.dumps(record, default=str, separators=(",", ":"))
        stream = _stream or sys.stderr
        try:
            stream.write(line + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the service down

    def debug(self, event: str, **fields: Any) -> None:
        self._write("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._write("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._write("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._write("error", event, fields)


def get_logger(component: str) -> Logger:
    return Logger(component)
