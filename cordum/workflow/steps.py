"""What the engine's own step types decide (spec §2.3): the pure part of their handlers.

Pure like ``runstate``: no I/O; time arrives as unix seconds, expressions are evaluated with
``expr`` against the scope the engine builds. Each function returns a decision the engine hands to
a ``runstate`` transition; a problem is a :class:`StepError` whose message becomes the step's error.

- ``delay``: :func:`delay_due` — when the step is due (``delay_sec`` > 0, else ``delay_until`` −
  now, else ``timeout_sec``); a due time at or before now means "succeed at once".
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping

from cordum.workflow import expr
from cordum.workflow.definition import Step

__all__ = ["StepError", "delay_due"]


class StepError(ValueError):
    """The step cannot do its work; the message is the step's error."""


def delay_due(step: Step, scope: Mapping[str, Any], now: float) -> float:
    """The unix time a delay step is due. ``delay_until`` may be a ``${…}`` template; it must
    render to an RFC3339 timestamp with a zone (a past one is due now)."""
    if step.delay_sec > 0:
        return now + step.delay_sec
    if step.delay_until:
        text = expr.render(step.delay_until, scope)
        if not isinstance(text, str):
            raise StepError(f"delay_until rendered to {type(text).__name__}, not an RFC3339 timestamp")
        try:
            when = datetime.fromisoformat(text.strip().replace("z", "Z"))
        except ValueError:
            raise StepError(f"delay_until {text!r} is not an RFC3339 timestamp") from None
        if when.tzinfo is None:
            raise StepError(f"delay_until {text!r} has no time zone")
        return when.timestamp()
    return now + max(step.timeout_sec, 0.0)
