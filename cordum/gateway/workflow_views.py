"""The shapes of the workflow routes (pure): definitions in (the public cordum-sdk's shape included)
and definitions, runs, steps and timeline events out.

Out, the documents match the models of the public `cordum-sdk` 0.1.0 (generated from Cordum's
OpenAPI), which parse them strictly in places:
- a definition (`WorkflowDefinition`) always has `id`, `name` and `steps`, each step `id` and `type`;
- a run (`RunSummary`/`RunDetail`) has a lowercase `status`, times as RFC 3339 strings (the store
  keeps unix seconds), `started_at` absent until the run started (the SDK does not accept null
  there), `completed_at` null until it ended, `created_by` (who triggered it);
- a step (`RunStepStatus`) has `error` as a string (the message; the whole object stays in
  `error_detail`);
- a timeline event (`TimelineEvent`) has `timestamp`.
Our other fields ride along (the SDK keeps unknown fields).

In, the SDK's `WorkflowStep` has `config` (a map) and `retry{max_attempts, backoff_sec}`, and its
docs name the job-dispatching type `job`. `normalise_definition` turns those into our definition
fields (`worker`; `config` keys become step fields; `max_retries = max_attempts - 1`,
`initial_backoff_sec = backoff_sec`), so the strict definition parser names any real problem.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any, Mapping

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)

#: the SDK's name for the job-dispatching step type
SDK_JOB_TYPE = "job"


class ShapeError(ValueError):
    """A definition in the SDK's shape that cannot be mapped onto ours (the message names it)."""


def iso(seconds: Any) -> str | None:
    """Unix seconds → RFC 3339 in UTC to the microsecond; None stays None (so does a non-number)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return None
    moment = _EPOCH + datetime.timedelta(microseconds=round(seconds * 1_000_000))
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ---- definitions ----------------------------------------------------------------------------------


def normalise_definition(doc: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A definition with the SDK-only step fields mapped onto ours; True when anything changed."""
    out = dict(doc)
    steps = out.get("steps")
    if not isinstance(steps, Mapping):
        return out, False
    changed = False
    mapped: dict[str, Any] = {}
    for sid, raw in steps.items():
        if isinstance(raw, Mapping):
            step, step_changed = _normalise_step(str(sid), raw)
            changed = changed or step_changed
            mapped[sid] = step
        else:
            mapped[sid] = raw
    out["steps"] = mapped
    return out, changed


def _normalise_step(sid: str, raw: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    step = dict(raw)
    changed = False
    if step.get("type") == SDK_JOB_TYPE:
        step["type"] = "worker"
        changed = True
    config = step.pop("config", None)
    if config is not None:
        changed = True
        if not isinstance(config, Mapping):
            raise ShapeError(f"step {sid!r}: field 'config' must be an object")
        for key, value in config.items():
            if key in step and step[key] != value:
                raise ShapeError(f"step {sid!r}: field {key!r} is given twice (in config, differently)")
            step[key] = copy.deepcopy(value)
    retry = step.get("retry")
    if isinstance(retry, Mapping) and ("max_attempts" in retry or "backoff_sec" in retry):
        step["retry"] = _normalise_retry(sid, retry)
        changed = True
    return step, changed


def _normalise_retry(sid: str, retry: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in retry.items() if k not in ("max_attempts", "backoff_sec")}
    attempts = retry.get("max_attempts")
    if attempts is not None:
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ShapeError(f"step {sid!r}: retry.max_attempts must be a whole number >= 1")
        out.setdefault("max_retries", attempts - 1)
    backoff = retry.get("backoff_sec")
    if backoff is not None:
        out.setdefault("initial_backoff_sec", backoff)
    return out


def definition_view(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A stored definition as the SDK's `WorkflowDefinition` reads it."""
    view = dict(doc)
    view.setdefault("name", "")
    steps = view.get("steps") if isinstance(view.get("steps"), Mapping) else {}
    view["steps"] = {sid: {"id": sid, "type": "worker", **step} for sid, step in steps.items()}
    return view


# ---- runs --------------------------------------------------------------------------------------


def _times(doc: Mapping[str, Any], view: dict[str, Any], *, started_optional: bool) -> None:
    started = iso(doc.get("started_at"))
    if started is not None:
        view["started_at"] = started
    elif not started_optional:
        view["started_at"] = None
    else:
        view.pop("started_at", None)
    view["completed_at"] = iso(doc.get("completed_at"))


def run_summary(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A run as listed (`RunSummary`): no steps, input or context."""
    view: dict[str, Any] = {
        "id": doc.get("id", ""), "workflow_id": doc.get("workflow_id", ""), "org_id": doc.get("org_id", ""),
        "status": doc.get("status", "pending"), "error": doc.get("error"),
        "created_by": doc.get("triggered_by", ""), "created_at": iso(doc.get("created_at")),
        "updated_at": iso(doc.get("updated_at")), "dry_run": bool(doc.get("dry_run")),
    }
    for name in ("team_id", "rerun_of", "rerun_step", "idempotency_key"):
        if doc.get(name):
            view[name] = doc[name]
    _times(doc, view, started_optional=True)
    return view


def run_detail(doc: Mapping[str, Any], timers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A run document (`RunDetail`): every stored field, times and steps in the SDK's shape."""
    view = dict(doc)
    view.update(run_summary(doc))
    metadata = doc.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("started_by"), Mapping):
        # the starter's key name is kept for the self-approval check of its steps, never shown
        view["metadata"] = {**metadata, "started_by": {k: v for k, v in metadata["started_by"].items() if k != "key"}}
    view["triggered_by"] = doc.get("triggered_by", "")
    view["input"] = doc.get("input") or {}
    view["context"] = doc.get("context") or {}
    view.setdefault("output", None)
    steps = doc.get("steps") if isinstance(doc.get("steps"), Mapping) else {}
    view["steps"] = {path: step_view(path, step) for path, step in steps.items()}
    if timers is not None:
        view["timers"] = timers
    return view


def step_view(path: str, step: Mapping[str, Any]) -> dict[str, Any]:
    view = dict(step)
    view.setdefault("step_id", path)
    view.setdefault("status", "pending")
    view["job_id"] = step.get("job_id") or None
    _times(step, view, started_optional=False)
    if step.get("next_attempt_at") is not None:
        view["next_attempt_at"] = iso(step["next_attempt_at"])
    error = step.get("error")
    if isinstance(error, Mapping):
        view["error"] = str(error.get("message") or "")
        view["error_detail"] = dict(error)
    elif error is not None:
        view["error"] = str(error)
    return view


def timer_view(workflow_id: str, run_id: str, fires_at: float, now: float) -> dict[str, Any]:
    return {"workflow_id": workflow_id, "run_id": run_id, "fires_at": iso(fires_at),
            "remaining_ms": max(0, int((fires_at - now) * 1000))}


def timeline_view(event: Mapping[str, Any], run_id: str, workflow_id: str) -> dict[str, Any]:
    """A stored timeline event (`at` in unix seconds) as the SDK's `TimelineEvent`."""
    view = {k: v for k, v in event.items() if k != "at"}
    stamp = iso(event.get("at"))
    if stamp is not None:  # the SDK reads `timestamp` as a date-time: never null
        view["timestamp"] = view["time"] = stamp
    view.setdefault("run_id", run_id)
    view.setdefault("workflow_id", workflow_id)
    view.setdefault("message", "")
    return view
