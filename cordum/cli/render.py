"""Human output for cordumctl: aligned tables, key/value blocks, a text progress bar. Pure functions."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any, Iterable, Sequence

TERMINAL_STATES = frozenset(
    {"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED", "OUTPUT_QUARANTINED"}
)
_PREFIXES = ("JOB_STATE_", "JOB_STATUS_", "DECISION_TYPE_")


def short_enum(value: Any) -> str:
    """`JOB_STATUS_SUCCEEDED` → `SUCCEEDED`; `DECISION_TYPE_ALLOW` → `ALLOW`; `running` → `RUNNING`."""
    text = str(value or "").strip().upper()
    for prefix in _PREFIXES:
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def cell(value: Any) -> str:
    """One table cell: `-` for empty, compact JSON for structures, no newlines."""
    if value is None or value == "" or value == [] or value == {}:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}".rstrip("0").rstrip(".") if value != int(value) else str(int(value))
    if isinstance(value, dict):
        if all(not isinstance(v, (dict, list)) for v in value.values()):
            return ",".join(f"{k}={v}" for k, v in value.items())
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    if isinstance(value, list):
        return ",".join(cell(v) for v in value)
    return " ".join(str(value).split())


MIN_COLUMN = 8  # a column squeezed to fit a terminal keeps at least this many characters


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, max_width: int = 60,
          fit: int | None = None) -> str:
    """An aligned plain-text table; cells wider than `max_width` are cut with `…`. With `fit` (a
    terminal's width), the widest columns are narrowed until each line fits, if they can be."""
    body = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], min(len(text), max_width))
    if fit is not None:
        widths = fit_widths(widths, fit)
    lines = [_line([_clip(h, w) for h, w in zip(headers, widths)], widths)]
    lines.extend(_line([_clip(text, w) for text, w in zip(row, widths)], widths) for row in body)
    return "\n".join(lines)


def fit_widths(widths: Sequence[int], total: int, gap: int = 2) -> list[int]:
    """Column widths whose line (columns joined by `gap` spaces) fits in `total`: the widest column
    gives up a character at a time, none below MIN_COLUMN (so a very narrow terminal still wraps)."""
    out = list(widths)
    while sum(out) + gap * (len(out) - 1) > total:
        widest = max(range(len(out)), key=lambda i: out[i])
        if out[widest] <= MIN_COLUMN:
            break
        out[widest] -= 1
    return out


def key_values(pairs: Iterable[tuple[str, Any]], *, max_width: int = 200) -> str:
    """`key  value` lines, keys aligned; pairs whose value is None are left out."""
    items = [(k, _clip(cell(v), max_width)) for k, v in pairs if v is not None]
    if not items:
        return ""
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k.ljust(width)}  {v}".rstrip() for k, v in items)


def progress_bar(percent: float | None, *, width: int = 30, state: str = "", message: str = "") -> str:
    """`[###############---------------]  50% RUNNING  step 2`; without a percent: `[?]` bar."""
    if percent is None:
        bar = "[" + "?".center(width) + "]"
        pct = "   -"
    else:
        p = max(0.0, min(100.0, float(percent)))
        filled = int(round(width * p / 100.0))
        bar = "[" + "#" * filled + "-" * (width - filled) + "]"
        pct = f"{int(p):3d}%"
    parts = [bar, pct]
    if state:
        parts.append(state)
    if message:
        parts.append(" " + " ".join(str(message).split()))
    return " ".join(parts)


def timestamp(value: Any, *, ms: bool = False) -> str:
    """Unix seconds, ms or µs (auto-detected) or an RFC 3339 string → `2024-05-01 12:00:00Z`
    (`12:00:00.123Z` with `ms`); other strings pass through."""
    if value is None or value == "" or value == 0:
        return "-"
    seconds = epoch(value)
    if seconds is None:
        return str(value)
    try:
        moment = _dt.datetime.fromtimestamp(seconds, tz=_dt.timezone.utc)
    except (OverflowError, OSError, ValueError):
        return str(value)
    if ms:
        return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def epoch(value: Any) -> float | None:
    """Unix seconds of a time given as s/ms/µs/ns since the epoch or as RFC 3339; None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            try:  # the workflow routes answer RFC 3339, as the public SDK expects
                moment = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
            except ValueError:
                return None
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=_dt.timezone.utc)
            return moment.timestamp()
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if number > 1e17:  # ns
        number /= 1e9
    elif number > 1e14:  # µs
        number /= 1e6
    elif number > 1e11:  # ms
        number /= 1e3
    return number


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def _line(values: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(str(v).ljust(w) for v, w in zip(values, widths)).rstrip()
