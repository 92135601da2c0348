"""Workflow definitions: parsing, validation and the DAG helpers the engine needs.

Pure (no I/O, no trio, no redis), like ``safety/evaluate.py``. A definition arrives as JSON or
YAML text, or as an already-decoded mapping (the ``wf:def:<id>`` document, spec §2.2), and leaves
as a frozen :class:`Workflow` whose field names are the spec's JSON names, so
``parse_workflow(wf.to_json()) == wf``.

Errors are :class:`DefinitionError` (a ``ValueError``) naming the origin, the YAML line when the
input was text, the step and the field: ``flow.yaml:12: step 'fetch': field 'topc': unknown
field (did you mean 'topic'?)``. Unknown fields are errors everywhere a typo could silently
change behaviour (workflow, step, ``retry``, ``meta``).

Step types (§2.3): ``worker`` (the default) and its dispatch aliases ``llm, http, container,
script, input`` dispatch a job and need a ``topic``; ``approval, condition, switch, delay,
notify, transform, storage, parallel, loop, subworkflow`` have their own requirements, checked
in :func:`_check_type`. A switch target must depend (directly or through other steps) on its
switch, which skips it when its branch is not taken; switch, parallel and loop steps take no
``for_each``. A parallel child or loop body is started by its parent only: it has no
``depends_on`` or ``on_error``, and a loop body is not a parallel or switch step (their children
and targets have one state per run). Loop settings live in ``input``: ``body_step`` (or ``body``),
``max_iterations`` (default :data:`LOOP_DEFAULT_MAX_ITERATIONS`), ``while`` / ``until``.

Expressions (``condition``, ``for_each``, loop ``while``/``until``, switch ``condition``) are
checked with ``cordum.workflow.expr.parse``; templates (``input``, ``route_labels``) with
``cordum.workflow.expr.template_problems``.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Collection, Iterable, Mapping

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

__all__ = [
    "DISPATCH_TYPES",
    "FOREACH_MAX_ITEMS",
    "ID_MAX_LENGTH",
    "LOOP_DEFAULT_MAX_ITERATIONS",
    "LOOP_MAX_ITERATIONS",
    "MAX_STEPS",
    "STEP_TYPES",
    "DefinitionError",
    "RetryPolicy",
    "Step",
    "Workflow",
    "ancestors",
    "descendants",
    "owned_steps",
    "parse_workflow",
    "ready_steps",
    "subworkflow_cycle",
    "switch_targets",
    "topological_order",
]

# --- limits and vocabularies -------------------------------------------------------------------
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ID_MAX_LENGTH = 64
#: steps per workflow (the tier limit of the Go original, one tier here)
MAX_STEPS = 200
#: the engine caps a ``for_each`` expansion at this many items (``WORKFLOW_FOREACH_MAX_ITEMS``)
FOREACH_MAX_ITEMS = 1000
LOOP_DEFAULT_MAX_ITERATIONS = 100
#: a loop's iterations are kept in its run document: more than this is refused at save
LOOP_MAX_ITERATIONS = 10_000

#: types that dispatch a job through the governed path (``worker`` and its aliases, §2.3)
DISPATCH_TYPES = frozenset({"worker", "llm", "http", "container", "script", "input"})
STEP_TYPES = DISPATCH_TYPES | frozenset(
    {
        "approval",
        "condition",
        "switch",
        "delay",
        "notify",
        "transform",
        "storage",
        "parallel",
        "loop",
        "subworkflow",
    }
)
PARALLEL_STRATEGIES = ("all", "any", "n_of_m")
POLICY_GATES = ("allow", "deny", "require_approval")
STORAGE_OPERATIONS = ("read", "write", "delete")
#: statuses of a step that failed; with a succeeded ``on_error`` handler they unblock dependents
FAILED_STATUSES = frozenset({"failed", "denied", "timed_out"})
NOT_STARTED = frozenset({"", "pending"})

_WORKFLOW_FIELDS = (
    "id",
    "org_id",
    "team_id",
    "name",
    "description",
    "version",
    "timeout_sec",
    "steps",
    "config",
    "input_schema",
    "parameters",
    "policy_override",
    "created_by",
    "created_at",
    "updated_at",
)
_STEP_FIELDS = (
    "id",
    "name",
    "type",
    "worker_id",
    "topic",
    "depends_on",
    "condition",
    "for_each",
    "max_parallel",
    "input",
    "input_schema",
    "input_schema_id",
    "output_path",
    "result_data_path",
    "output_schema",
    "output_schema_id",
    "meta",
    "on_error",
    "retry",
    "timeout_sec",
    "delay_sec",
    "delay_until",
    "route_labels",
    "policy_gate",
)
_RETRY_FIELDS = ("max_retries", "initial_backoff_sec", "max_backoff_sec", "multiplier")
_META_FIELDS = (
    "actor_id",
    "actor_type",
    "idempotency_key",
    "pack_id",
    "capability",
    "risk_tags",
    "requires",
    "labels",
)

Path = tuple[Any, ...]


class DefinitionError(ValueError):
    """A workflow definition is invalid; the message names origin[:line], step and field."""

    def __init__(
        self,
        origin: str,
        problem: str,
        *,
        line: int | None = None,
        step: str | None = None,
        field: str | None = None,
    ) -> None:
        self.origin = origin
        self.line = line
        self.step = step
        self.field = field
        self.problem = problem
        parts = [f"{origin}:{line}" if line is not None else origin]
        if step is not None:
            parts.append(f"step {step!r}")
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(problem)
        super().__init__(": ".join(parts))


# --- model -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """``retry{}`` of a step (§2.8): up to ``max_retries`` + 1 attempts in all."""

    max_retries: int = 0
    initial_backoff_sec: float = 1.0
    #: 0 = no cap
    max_backoff_sec: float = 0.0
    multiplier: float = 2.0

    def backoff(self, attempts: int) -> float:
        """Seconds to wait before the next attempt after ``attempts`` dispatches (§2.8)."""
        initial = self.initial_backoff_sec if self.initial_backoff_sec > 0 else 1.0
        mult = self.multiplier if self.multiplier > 1 else 2.0
        delay = initial * mult ** max(attempts - 1, 0)
        return min(delay, self.max_backoff_sec) if self.max_backoff_sec > 0 else delay

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RETRY_FIELDS}


@dataclass(frozen=True, eq=True)
class Step:
    id: str
    type: str = "worker"
    name: str = ""
    worker_id: str = ""
    topic: str = ""
    depends_on: tuple[str, ...] = ()
    condition: str = ""
    for_each: str = ""
    max_parallel: int = 0
    input: Mapping[str, Any] = field(default_factory=dict)
    input_schema: Mapping[str, Any] | None = None
    input_schema_id: str = ""
    output_path: str = ""
    result_data_path: str = ""
    output_schema: Mapping[str, Any] | None = None
    output_schema_id: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    on_error: str = ""
    retry: RetryPolicy | None = None
    timeout_sec: float = 0
    delay_sec: float = 0
    delay_until: str = ""
    route_labels: Mapping[str, Any] = field(default_factory=dict)
    policy_gate: str = ""

    @property
    def dispatches(self) -> bool:
        """True when the step dispatches a job (worker and its aliases)."""
        return self.type in DISPATCH_TYPES

    def owned(self) -> tuple[str, ...]:
        """Steps orchestrated only by this one (parallel children, loop body)."""
        if self.type == "parallel":
            return tuple(s for s in self.input.get("steps") or () if isinstance(s, str))
        if self.type == "loop":
            body = self.input.get("body_step") or self.input.get("body")
            return (body,) if isinstance(body, str) and body else ()
        return ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _STEP_FIELDS:
            value = getattr(self, name)
            if name == "retry":
                if value is not None:
                    out[name] = value.to_dict()
            elif name == "depends_on":
                if value:
                    out[name] = list(value)
            elif name in ("id", "type") or _present(value):
                out[name] = _plain_copy(value)
        return out


@dataclass(frozen=True, eq=True)
class Workflow:
    id: str
    name: str = ""
    description: str = ""
    version: str = ""
    timeout_sec: float = 0
    #: stepID → Step, in definition order
    steps: Mapping[str, Step] = field(default_factory=dict)
    input_schema: Mapping[str, Any] | None = None
    parameters: Any = None
    config: Mapping[str, Any] | None = None
    policy_override: Any = None
    org_id: str = ""
    team_id: str = ""
    created_by: str = ""
    created_at: str = ""
    updated_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _WORKFLOW_FIELDS:
            value = getattr(self, name)
            if name == "steps":
                out[name] = {sid: step.to_dict() for sid, step in value.items()}
            elif name == "id" or _present(value):
                out[name] = _plain_copy(value)
        return out

    def to_json(self) -> str:
        """The ``wf:def:<id>`` document."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, origin: str = "workflow") -> Workflow:
        return parse_workflow(data, origin=origin)

    @classmethod
    def from_json(cls, text: str | bytes, *, origin: str = "workflow") -> Workflow:
        return parse_workflow(text, origin=origin)


def _present(value: Any) -> bool:
    if value is None or value == "" or isinstance(value, bool) and not value:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    if isinstance(value, (Mapping, list, tuple)):
        return len(value) > 0
    return True


def _plain_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(v) for v in value]
    return value


# --- text → plain data with a line map ---------------------------------------------------------
class _Lines:
    """Maps a path in the decoded document to the 1-based source line (YAML only)."""

    def __init__(self) -> None:
        self.by_path: dict[Path, int] = {}

    def line(self, path: Path) -> int | None:
        while path:
            if path in self.by_path:
                return self.by_path[path]
            path = path[:-1]
        return self.by_path.get(())


def _decode_text(text: str, origin: str) -> tuple[Any, _Lines]:
    lines = _Lines()
    stripped = text.lstrip()
    if stripped.startswith("{") or stripped.startswith("["):
        try:
            data = json.loads(text, object_pairs_hook=_json_pairs(origin))
        except json.JSONDecodeError as exc:
            raise DefinitionError(origin, f"invalid JSON: {exc.msg}", line=exc.lineno) from None
        try:  # JSON is (nearly) YAML: borrow its line numbers for the messages, best effort
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            if root is not None:
                _from_node(root, (), lines, SafeConstructor(), origin)
        except (yaml.YAMLError, DefinitionError):
            lines = _Lines()
        return data, lines
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise DefinitionError(
            origin, f"invalid YAML: {exc.problem or exc.context}", line=line
        ) from None
    except yaml.YAMLError as exc:
        raise DefinitionError(origin, f"invalid YAML: {exc}") from None
    if root is None:
        raise DefinitionError(origin, "empty document")
    return _from_node(root, (), lines, SafeConstructor(), origin), lines


def _json_pairs(origin: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DefinitionError(origin, f"duplicate key {key!r}")
            out[key] = value
        return out

    return hook


def _from_node(node: Node, path: Path, lines: _Lines, ctor: SafeConstructor, origin: str) -> Any:
    lines.by_path.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, MappingNode):
        ctor.flatten_mapping(node)  # YAML merge keys (<<)
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = (
                ctor.construct_object(key_node, deep=True)
                if isinstance(key_node, ScalarNode)
                else None
            )
            if not isinstance(key, (str, int, float, bool)) or key is None:
                raise DefinitionError(
                    origin, "mapping keys must be scalars", line=key_node.start_mark.line + 1
                )
            key = key if isinstance(key, str) else str(key_node.value)
            if key in out:
                raise DefinitionError(
                    origin, f"duplicate key {key!r}", line=key_node.start_mark.line + 1
                )
            lines.by_path[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _from_node(value_node, path + (key,), lines, ctor, origin)
        return out
    if isinstance(node, SequenceNode):
        return [
            _from_node(item, path + (i,), lines, ctor, origin) for i, item in enumerate(node.value)
        ]
    if node.tag == "tag:yaml.org,2002:timestamp":
        return node.value  # keep RFC3339 text as text (delay_until, created_at)
    return ctor.construct_object(node, deep=True)


# --- the validator -----------------------------------------------------------------------------
class _Checker:
    def __init__(self, origin: str, lines: _Lines) -> None:
        self.origin = origin
        self.lines = lines
        self.step_paths: dict[str, Path] = {}

    def fail(
        self, path: Path, problem: str, *, step: str | None = None, fld: str | None = None
    ) -> DefinitionError:
        return DefinitionError(
            self.origin, problem, line=self.lines.line(path), step=step, field=fld
        )

    def step_fail(self, sid: str, fld: str | None, problem: str, *sub: Any) -> DefinitionError:
        base = self.step_paths.get(sid, ("steps", sid))
        path = base + ((fld,) if fld else ()) + sub
        return self.fail(path, problem, step=sid, fld=fld)

    # typed getters ---------------------------------------------------------------------------
    def unknown(
        self,
        data: Mapping[str, Any],
        allowed: Iterable[str],
        path: Path,
        *,
        step: str | None,
        what: str,
    ) -> None:
        allowed = tuple(allowed)
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                tip = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.fail(path + (key,), f"unknown {what}{tip}", step=step, fld=str(key))

    def string(
        self,
        data: Mapping[str, Any],
        key: str,
        path: Path,
        step: str | None,
        *,
        scalar_ok: bool = False,
    ) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        if scalar_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise self.fail(
            path + (key,), f"must be a string, got {_typename(value)}", step=step, fld=key
        )

    def number(
        self,
        data: Mapping[str, Any],
        key: str,
        path: Path,
        step: str | None,
        *,
        integer: bool = False,
    ) -> Any:
        value = data.get(key)
        if value is None:
            return 0
        ok = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok:
            kind = "an integer" if integer else "a number"
            raise self.fail(
                path + (key,), f"must be {kind}, got {_typename(value)}", step=step, fld=key
            )
        if value < 0:
            raise self.fail(path + (key,), f"must not be negative, got {value}", step=step, fld=key)
        return value

    def mapping(
        self,
        data: Mapping[str, Any],
        key: str,
        path: Path,
        step: str | None,
        *,
        default: Any = None,
    ) -> Any:
        """A mapping field; absent, null or empty gives ``default`` (so round trips are exact)."""
        value = data.get(key)
        if value is None:
            return default
        if not isinstance(value, Mapping):
            raise self.fail(
                path + (key,), f"must be a mapping, got {_typename(value)}", step=step, fld=key
            )
        return _plain_copy(value) if value else default

    def check_id(self, value: Any, path: Path, what: str, *, step: str | None, fld: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(
                path,
                f"{what} must be a non-empty string, got {_typename(value)}",
                step=step,
                fld=fld,
            )
        if len(value) > ID_MAX_LENGTH:
            raise self.fail(
                path,
                f"{what} {value[:20]!r}… is longer than {ID_MAX_LENGTH} characters",
                step=step,
                fld=fld,
            )
        if not ID_PATTERN.fullmatch(value):  # fullmatch: "$" alone would allow a trailing "\n"
            raise self.fail(
                path,
                f"{what} {value!r} is invalid (letters, digits, '.', '_', '-'; starting with a letter or digit)",
                step=step,
                fld=fld,
            )
        return value


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), type(value).__name__
    )


def parse_workflow(
    source: str | bytes | Mapping[str, Any], *, origin: str = "workflow"
) -> Workflow:
    """Parse and validate a workflow definition (JSON or YAML text, or a decoded mapping)."""
    lines = _Lines()
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DefinitionError(
                origin, f"not UTF-8 text: {exc.reason} at byte {exc.start}"
            ) from None
    if isinstance(source, str):
        data, lines = _decode_text(source, origin)
    else:
        data = source
    if not isinstance(data, Mapping):
        raise DefinitionError(
            origin, f"a workflow must be a mapping, got {_typename(data)}", line=lines.line(())
        )
    return _build(data, _Checker(origin, lines))


def _build(data: Mapping[str, Any], c: _Checker) -> Workflow:
    c.unknown(data, _WORKFLOW_FIELDS, (), step=None, what="workflow field")
    if "id" not in data:
        raise c.fail((), "missing required field", fld="id")
    wf_id = c.check_id(data["id"], ("id",), "workflow id", step=None, fld="id")
    raw_steps = _normalise_steps(data.get("steps"), c)
    if not raw_steps:
        raise c.fail(("steps",), "a workflow needs at least one step", fld="steps")
    if len(raw_steps) > MAX_STEPS:
        raise c.fail(("steps",), f"{len(raw_steps)} steps; the limit is {MAX_STEPS}", fld="steps")
    steps = {sid: _build_step(sid, raw, c) for sid, raw in raw_steps.items()}
    for step in steps.values():
        _check_refs(step, steps, wf_id, c)
    cycle = _find_cycle(steps)
    if cycle:
        raise c.step_fail(cycle[0], "depends_on", "dependency cycle: " + " → ".join(cycle))
    _check_ownership(steps, c)
    _check_switches(steps, c)
    for step in steps.values():
        _check_expressions(step, c)
    return Workflow(
        id=wf_id,
        name=c.string(data, "name", (), None),
        description=c.string(data, "description", (), None),
        version=c.string(data, "version", (), None, scalar_ok=True),
        timeout_sec=c.number(data, "timeout_sec", (), None),
        steps=steps,
        input_schema=c.mapping(data, "input_schema", (), None),
        parameters=(
            _plain_copy(data.get("parameters")) if _present(data.get("parameters")) else None
        ),
        config=c.mapping(data, "config", (), None),
        policy_override=(
            _plain_copy(data.get("policy_override"))
            if _present(data.get("policy_override"))
            else None
        ),
        org_id=c.string(data, "org_id", (), None),
        team_id=c.string(data, "team_id", (), None),
        created_by=c.string(data, "created_by", (), None),
        created_at=c.string(data, "created_at", (), None),
        updated_at=c.string(data, "updated_at", (), None),
    )


def _normalise_steps(raw: Any, c: _Checker) -> dict[str, Mapping[str, Any]]:
    """``steps`` as a map stepID → step (the spec) or a list of steps with ``id``."""
    out: dict[str, Mapping[str, Any]] = {}
    if raw is None:
        return out
    if isinstance(raw, Mapping):
        for key, step in raw.items():
            path = ("steps", key)
            sid = c.check_id(key, path, "step id", step=str(key), fld="id")
            if not isinstance(step, Mapping):
                raise c.fail(path, f"a step must be a mapping, got {_typename(step)}", step=sid)
            if "id" in step and step["id"] != sid:
                raise c.fail(
                    path + ("id",),
                    f"id {step['id']!r} differs from its key {sid!r}",
                    step=sid,
                    fld="id",
                )
            c.step_paths[sid] = path
            out[sid] = step
        return out
    if isinstance(raw, list):
        for i, step in enumerate(raw):
            path = ("steps", i)
            if not isinstance(step, Mapping):
                raise c.fail(
                    path, f"steps[{i}] must be a mapping, got {_typename(step)}", fld="steps"
                )
            if "id" not in step:
                raise c.fail(path, f"steps[{i}] has no id", fld="id")
            sid = c.check_id(step["id"], path + ("id",), "step id", step=f"steps[{i}]", fld="id")
            if sid in out:
                raise c.fail(path + ("id",), f"duplicate step id {sid!r}", step=sid, fld="id")
            c.step_paths[sid] = path
            out[sid] = step
        return out
    raise c.fail(("steps",), f"must be a mapping or a list, got {_typename(raw)}", fld="steps")


def _build_step(sid: str, raw: Mapping[str, Any], c: _Checker) -> Step:
    path = c.step_paths[sid]
    c.unknown(raw, _STEP_FIELDS, path, step=sid, what="step field")
    stype = c.string(raw, "type", path, sid) or "worker"
    if stype not in STEP_TYPES:
        hint = difflib.get_close_matches(stype, sorted(STEP_TYPES), n=1)
        tip = (
            f" (did you mean {hint[0]!r}?)"
            if hint
            else f" (expected one of: {', '.join(sorted(STEP_TYPES))})"
        )
        raise c.step_fail(sid, "type", f"unknown step type {stype!r}{tip}")
    deps_raw = raw.get("depends_on")
    if deps_raw is None:
        deps: tuple[str, ...] = ()
    elif isinstance(deps_raw, str):
        deps = (deps_raw,)
    elif isinstance(deps_raw, list):
        for i, d in enumerate(deps_raw):
            if not isinstance(d, str) or not d:
                raise c.step_fail(
                    sid, "depends_on", f"item {i} must be a step id, got {_typename(d)}", i
                )
        deps = tuple(dict.fromkeys(deps_raw))
    else:
        raise c.step_fail(
            sid, "depends_on", f"must be a list of step ids, got {_typename(deps_raw)}"
        )
    retry = None
    retry_raw = c.mapping(raw, "retry", path, sid)
    if retry_raw is not None:
        rpath = path + ("retry",)
        c.unknown(retry_raw, _RETRY_FIELDS, rpath, step=sid, what="retry field")
        defaults = RetryPolicy()
        retry = RetryPolicy(
            max_retries=c.number(retry_raw, "max_retries", rpath, sid, integer=True),
            initial_backoff_sec=(
                c.number(retry_raw, "initial_backoff_sec", rpath, sid)
                if "initial_backoff_sec" in retry_raw
                else defaults.initial_backoff_sec
            ),
            max_backoff_sec=c.number(retry_raw, "max_backoff_sec", rpath, sid),
            multiplier=(
                c.number(retry_raw, "multiplier", rpath, sid)
                if "multiplier" in retry_raw
                else defaults.multiplier
            ),
        )
    meta = c.mapping(raw, "meta", path, sid, default={})
    c.unknown(meta, _META_FIELDS, path + ("meta",), step=sid, what="meta field")
    policy_gate = c.string(raw, "policy_gate", path, sid)
    if policy_gate and policy_gate not in POLICY_GATES:
        raise c.step_fail(
            sid, "policy_gate", f"must be one of {', '.join(POLICY_GATES)}, got {policy_gate!r}"
        )
    step = Step(
        id=sid,
        type=stype,
        name=c.string(raw, "name", path, sid),
        worker_id=c.string(raw, "worker_id", path, sid),
        topic=c.string(raw, "topic", path, sid),
        depends_on=deps,
        condition=c.string(raw, "condition", path, sid),
        for_each=c.string(raw, "for_each", path, sid),
        max_parallel=c.number(raw, "max_parallel", path, sid, integer=True),
        input=_plain_copy(c.mapping(raw, "input", path, sid, default={})),
        input_schema=c.mapping(raw, "input_schema", path, sid),
        input_schema_id=c.string(raw, "input_schema_id", path, sid),
        output_path=c.string(raw, "output_path", path, sid),
        result_data_path=c.string(raw, "result_data_path", path, sid),
        output_schema=c.mapping(raw, "output_schema", path, sid),
        output_schema_id=c.string(raw, "output_schema_id", path, sid),
        meta=_plain_copy(meta),
        on_error=c.string(raw, "on_error", path, sid),
        retry=retry,
        timeout_sec=c.number(raw, "timeout_sec", path, sid),
        delay_sec=c.number(raw, "delay_sec", path, sid),
        delay_until=c.string(raw, "delay_until", path, sid),
        route_labels=_plain_copy(c.mapping(raw, "route_labels", path, sid, default={})),
        policy_gate=policy_gate,
    )
    _check_type(step, c)
    return step


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def _check_type(step: Step, c: _Checker) -> None:
    """Type-specific requirements that need only the step itself (§2.3)."""
    sid, inp = step.id, step.input
    if step.dispatches and not step.topic:
        raise c.step_fail(sid, "topic", f"a {step.type} step needs a topic")
    if step.type == "condition" and not step.condition:
        raise c.step_fail(sid, "condition", "a condition step needs a condition expression")
    if step.type == "delay":
        if (
            step.delay_until
            and not _is_template(step.delay_until)
            and not _rfc3339(step.delay_until)
        ):
            raise c.step_fail(
                sid,
                "delay_until",
                f"must be an RFC3339 timestamp with a zone, got {step.delay_until!r}",
            )
        if not (step.delay_sec or step.delay_until or step.timeout_sec):
            raise c.step_fail(
                sid,
                "delay_sec",
                "a delay step needs delay_sec, delay_until (RFC3339) or timeout_sec",
            )
    if step.type == "switch":
        if not step.condition:
            raise c.step_fail(sid, "condition", "a switch step needs a condition expression")
        cases = inp.get("cases")
        if not cases or not isinstance(cases, (list, Mapping)):
            raise c.step_fail(
                sid, "input", "a switch step needs input.cases (a list or a mapping)", "cases"
            )
        if isinstance(cases, list):
            for i, case in enumerate(cases):
                if not isinstance(case, Mapping) or not any(
                    k in case for k in ("next", "step", "target")
                ):
                    raise c.step_fail(
                        sid, "input", f"input.cases[{i}] needs next (or step/target)", "cases", i
                    )
    if step.type == "parallel":
        children = inp.get("steps")
        if (
            not isinstance(children, list)
            or not children
            or not all(isinstance(s, str) for s in children)
        ):
            raise c.step_fail(
                sid, "input", "a parallel step needs input.steps, a list of step ids", "steps"
            )
        strategy = inp.get("strategy", "all")
        if strategy not in PARALLEL_STRATEGIES:
            raise c.step_fail(
                sid,
                "input",
                f"input.strategy must be one of {', '.join(PARALLEL_STRATEGIES)}, got {strategy!r}",
                "strategy",
            )
        limit = inp.get("max_parallel", 0)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise c.step_fail(
                sid,
                "input",
                f"input.max_parallel must be an integer ≥ 0, got {limit!r}",
                "max_parallel",
            )
        if strategy == "n_of_m":
            req = inp.get("required")
            if isinstance(req, bool) or not isinstance(req, int) or not 1 <= req <= len(children):
                raise c.step_fail(
                    sid,
                    "input",
                    f"n_of_m needs input.required between 1 and {len(children)}, got {req!r}",
                    "required",
                )
    if step.type == "loop":
        body = inp.get("body_step", inp.get("body"))
        if not isinstance(body, str) or not body:
            raise c.step_fail(
                sid, "input", "a loop step needs input.body_step (a step id)", "body_step"
            )
        n = inp.get("max_iterations", LOOP_DEFAULT_MAX_ITERATIONS)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= LOOP_MAX_ITERATIONS:
            raise c.step_fail(
                sid,
                "input",
                f"input.max_iterations must be an integer from 1 to {LOOP_MAX_ITERATIONS}, got {n!r}",
                "max_iterations",
            )
    if step.type == "subworkflow":
        target = inp.get("workflow_id")
        if not isinstance(target, str) or not target:
            raise c.step_fail(
                sid, "input", "a subworkflow step needs input.workflow_id", "workflow_id"
            )
        for key in ("input_mapping", "output_mapping"):
            value = inp.get(key)
            if value is not None and not isinstance(value, Mapping) and not _is_template(value):
                raise c.step_fail(
                    sid, "input", f"input.{key} must be a mapping, got {_typename(value)}", key
                )
    if step.type == "storage":
        op = inp.get("operation")
        if op not in STORAGE_OPERATIONS:
            raise c.step_fail(
                sid,
                "input",
                f"input.operation must be one of {', '.join(STORAGE_OPERATIONS)}, got {op!r}",
                "operation",
            )
        if not isinstance(inp.get("key"), str) or not inp.get("key"):
            raise c.step_fail(sid, "input", "a storage step needs input.key (a dot path)", "key")


def _rfc3339(text: str) -> bool:
    if "T" not in text and "t" not in text:
        return False
    try:
        parsed = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        return False
    return parsed.tzinfo is not None


def _check_refs(step: Step, steps: Mapping[str, Step], wf_id: str, c: _Checker) -> None:
    sid = step.id

    def known(target: str, fld: str, what: str, *sub: Any) -> None:
        if target == sid:
            raise c.step_fail(sid, fld, f"{what} refers to the step itself", *sub)
        if target not in steps:
            hint = difflib.get_close_matches(target, list(steps), n=1)
            tip = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise c.step_fail(
                sid, fld, f"{what} {target!r} is not a step of this workflow{tip}", *sub
            )

    for i, dep in enumerate(step.depends_on):
        known(dep, "depends_on", "dependency", i)
    if step.on_error:
        known(step.on_error, "on_error", "on_error target")
    inp = step.input
    if step.type == "parallel":
        for i, child in enumerate(inp["steps"]):
            known(child, "input", "parallel child", "steps", i)
    if step.type == "loop":
        known(inp.get("body_step", inp.get("body")), "input", "loop body", "body_step")
    if step.type == "switch":
        cases = inp["cases"]
        targets = (
            [case.get("next", case.get("step", case.get("target"))) for case in cases]
            if isinstance(cases, list)
            else list(cases.values())
        )
        targets += [inp[k] for k in ("default", "default_step") if inp.get(k)]
        for t in targets:
            if not isinstance(t, str):
                raise c.step_fail(
                    sid, "input", f"switch target must be a step id, got {_typename(t)}", "cases"
                )
            known(t, "input", "switch target", "cases")
    if step.type == "subworkflow" and inp["workflow_id"] == wf_id:
        raise c.step_fail(
            sid,
            "input",
            "circular workflow reference detected (calls its own workflow)",
            "workflow_id",
        )
    if step.type == "subworkflow" and not _is_template(inp["workflow_id"]):
        c.check_id(
            inp["workflow_id"],
            c.step_paths[sid] + ("input", "workflow_id"),
            "input.workflow_id",
            step=sid,
            fld="input",
        )


def _check_ownership(steps: Mapping[str, Step], c: _Checker) -> None:
    """A parallel child or loop body belongs to one parent and must not wait for it. It has no
    ``depends_on`` (its parent starts it: put the dependencies on the parent) and no
    ``on_error`` (its parent decides what its failure means)."""
    owner: dict[str, str] = {}
    for sid, step in steps.items():
        for child in step.owned():
            if child in owner and owner[child] != sid:
                raise c.step_fail(
                    sid, "input", f"step {child!r} is already run by {owner[child]!r}"
                )
            owner[child] = sid
            if step.type == "loop" and steps[child].type in ("parallel", "switch"):
                # their children/targets are steps with one state per run: not repeatable
                raise c.step_fail(
                    sid, "input", f"a loop body cannot be a {steps[child].type} step", "body_step"
                )
            for fld in ("depends_on", "on_error"):
                if getattr(steps[child], fld):
                    raise c.step_fail(
                        child,
                        fld,
                        f"{child!r} is run by {step.type} step {sid!r}, so it cannot have "
                        f"{fld}" + (f" (put it on {sid!r})" if fld == "depends_on" else ""),
                    )
            if child in _closure(sid, {k: s.depends_on for k, s in steps.items()}):
                raise c.step_fail(
                    sid,
                    "depends_on",
                    f"this {step.type} step waits for {child!r}, which only it starts (deadlock)",
                )


def switch_targets(step: Step) -> list[str]:
    """The steps a switch chooses among (cases in order, then the default), without repeats."""
    if step.type != "switch":
        return []
    inp = step.input
    cases = inp.get("cases")
    if isinstance(cases, list):
        targets = [case.get("next", case.get("step", case.get("target"))) for case in cases]
    elif isinstance(cases, Mapping):
        targets = list(cases.values())
    else:
        targets = []
    targets += [inp[k] for k in ("default", "default_step") if inp.get(k)]
    return list(dict.fromkeys(t for t in targets if isinstance(t, str)))


def _check_switches(steps: Mapping[str, Step], c: _Checker) -> None:
    """A switch target must wait for its switch (the switch skips it when not taken, so it must
    not have started), and control steps take no ``for_each`` (one decision per step)."""
    edges = {k: s.depends_on for k, s in steps.items()}
    for sid, step in steps.items():
        if step.for_each and step.type in ("switch", "parallel", "loop"):
            raise c.step_fail(sid, "for_each", f"a {step.type} step cannot have for_each")
        for target in switch_targets(step):
            if sid not in _closure(target, edges):
                raise c.step_fail(
                    sid,
                    "input",
                    f"switch target {target!r} must depend on this switch (add {sid!r} to its "
                    "depends_on)",
                    "cases",
                )


def _check_expressions(step: Step, c: _Checker) -> None:
    from cordum.workflow import expr  # lazily: a sibling pure module

    sid = step.id
    exprs: list[tuple[str, str, tuple[Any, ...]]] = [
        ("condition", step.condition, ()),
        ("for_each", step.for_each, ()),
    ]
    if step.type == "loop":
        for key in ("while", "until"):
            value = step.input.get(key)
            if value is not None and not isinstance(value, str):
                raise c.step_fail(sid, "input", f"input.{key} must be an expression string", key)
            exprs.append(("input", value or "", (key,)))
    for fld, text, sub in exprs:
        if not text:
            continue
        try:
            expr.parse(text)
        except expr.ExprError as exc:
            where = f"input.{sub[0]}" if sub else fld
            raise c.step_fail(sid, fld, f"bad expression in {where}: {exc}", *sub) from None
    for fld in ("input", "route_labels", "delay_until"):
        problems = expr.template_problems(getattr(step, fld))
        if problems:
            raise c.step_fail(sid, fld, "bad template: " + "; ".join(problems))


# --- DAG helpers -------------------------------------------------------------------------------
def _find_cycle(steps: Mapping[str, Step]) -> list[str] | None:
    """The first ``depends_on`` cycle in definition order, as ``[a, b, …, a]``; else None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(sid: str) -> list[str] | None:
        state[sid] = 1
        stack.append(sid)
        for dep in steps[sid].depends_on:
            if dep not in steps:
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[sid] = 2
        return None

    for sid in steps:
        if sid not in state:
            found = visit(sid)
            if found:
                return found
    return None


def topological_order(workflow: Workflow) -> list[str]:
    """Step ids with every dependency before its dependents; ties keep definition order."""
    steps = workflow.steps
    position = {sid: i for i, sid in enumerate(steps)}
    remaining = {sid: len(set(s.depends_on)) for sid, s in steps.items()}
    dependents: dict[str, list[str]] = {sid: [] for sid in steps}
    for sid, s in steps.items():
        for dep in set(s.depends_on):
            dependents[dep].append(sid)
    ready = [sid for sid, n in remaining.items() if n == 0]
    order: list[str] = []
    while ready:
        ready.sort(key=position.__getitem__)
        sid = ready.pop(0)
        order.append(sid)
        for nxt in dependents[sid]:
            remaining[nxt] -= 1
            if remaining[nxt] == 0:
                ready.append(nxt)
    if len(order) != len(steps):
        cycle = _find_cycle(steps) or []
        raise DefinitionError(workflow.id, "dependency cycle: " + " → ".join(cycle))
    return order


def owned_steps(workflow: Workflow) -> set[str]:
    """Steps orchestrated only by a parallel or loop parent (never scheduled on their own)."""
    return {child for s in workflow.steps.values() for child in s.owned()}


def ready_steps(
    workflow: Workflow, statuses: Mapping[str, str], not_taken: Collection[str] = ()
) -> list[str]:
    """Steps the engine may start now, in definition order.

    ``statuses`` maps step id → status (§2.5); a missing id or ``pending`` means not started
    (extra keys such as ``step[0]`` for_each children are ignored). A step is ready when it has not
    started and every dependency ``succeeded`` — or failed/denied/timed_out with an ``on_error``
    handler that succeeded. ``on_error`` targets run only when activated (a step naming them
    failed, was denied or timed out) and then bypass their own dependency check; parallel children
    and loop bodies are left to their parent. Retry timers (``next_attempt_at``) are the caller's.

    ``not_taken``: skipped steps on a switch branch that was not taken. A join after a switch
    treats them as satisfied as long as at least one of its other dependencies succeeded (a step
    all of whose dependencies were not taken is never ready: the run skips it as not taken too).
    """
    steps = workflow.steps
    handlers: dict[str, list[str]] = {}
    for sid, s in steps.items():
        if s.on_error:
            handlers.setdefault(s.on_error, []).append(sid)
    owned = owned_steps(workflow)

    def satisfied(dep: str) -> bool:
        status = statuses.get(dep, "")
        if status == "succeeded":
            return True
        handler = steps[dep].on_error
        return status in FAILED_STATUSES and bool(handler) and statuses.get(handler) == "succeeded"

    out = []
    for sid, s in steps.items():
        if statuses.get(sid, "") not in NOT_STARTED or sid in owned:
            continue
        if sid in handlers:
            if any(statuses.get(src, "") in FAILED_STATUSES for src in handlers[sid]):
                out.append(sid)
            continue
        met = [satisfied(dep) for dep in s.depends_on]
        if all(ok or dep in not_taken for ok, dep in zip(met, s.depends_on)) and (
            any(met) or not met
        ):
            out.append(sid)
    return out


def _closure(start: str, edges: Mapping[str, Iterable[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen and nxt != start:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def descendants(workflow: Workflow, step_id: str) -> set[str]:
    """Steps downstream of ``step_id`` (not itself): its dependents, transitively, plus the
    parallel children / loop bodies they own — what a rerun from ``step_id`` resets."""
    if step_id not in workflow.steps:
        raise KeyError(step_id)
    edges: dict[str, list[str]] = {sid: list(s.owned()) for sid, s in workflow.steps.items()}
    for sid, s in workflow.steps.items():
        for dep in s.depends_on:
            edges[dep].append(sid)
    return _closure(step_id, edges)


def ancestors(workflow: Workflow, step_id: str) -> set[str]:
    """Transitive ``depends_on`` of ``step_id`` (not itself): what a rerun keeps."""
    if step_id not in workflow.steps:
        raise KeyError(step_id)
    return _closure(step_id, {sid: s.depends_on for sid, s in workflow.steps.items()})


def subworkflow_cycle(call_stack: Iterable[str], workflow_id: str) -> bool:
    """True when calling ``workflow_id`` from a run whose call stack is ``call_stack`` would
    recurse (§2.3: ``circular workflow reference detected``)."""
    return workflow_id in set(call_stack)
