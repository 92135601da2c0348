"""Safety policy documents: strict YAML parsing into frozen dataclasses (spec §4.3, §4.4).

Pure: the only work done is parsing a string.  Every mistake raises :class:`PolicyError` whose
message names the source, the 1-based line and what is wrong, so typos never widen a policy.

Format (field names follow the Go ``config/safety.yaml``)::

    version: "2024-06-01"
    default_decision: deny          # allow|permit -> allow, deny|block -> deny (default deny)
    default_tenant: default
    rules:
      - id: allow-read
        match:
          topics: ["job.read.*"]    # Go path.Match globs, case-insensitive
          tenants: [acme]
          labels: {env: "prod*"}    # each k=v must hold (value may be a glob)
        decision: allow_with_constraints
        reason: reads are fine
        constraints:
          budgets: {max_runtime_ms: 60000, max_retries: 2}
          redaction_level: standard
      - id: slow-down
        match: {capabilities: [bulk.export]}
        decision: throttle
        retry_after: 30

``output_policy`` / ``output_rules`` (what a job produced) are parsed by
:mod:`cordum.safety.output_rules` into :attr:`Policy.output`.

Criteria that this implementation cannot enforce (``velocity``, ``mcp``, ``predicate``, tier
scoping...) are rejected rather than ignored: ignoring a criterion would make a rule match more
than its author intended.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from cordum.safety.output_rules import OutputPolicy, parse_output_section

__all__ = [
    "DECISIONS",
    "Budgets",
    "Constraints",
    "Diff",
    "Glob",
    "Match",
    "Policy",
    "PolicyError",
    "Remediation",
    "Rule",
    "Sandbox",
    "TenantPolicy",
    "Toolchain",
    "compile_glob",
    "parse_policy",
]


class PolicyError(ValueError):
    """A policy document is malformed; the message names ``source:line``."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source = source
        self.line = line
        self.problem = message
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


# --- decisions ---------------------------------------------------------------------------------
#: canonical decision names; aliases from the Go loader map onto them
DECISIONS = ("allow", "deny", "require_approval", "throttle", "allow_with_constraints")
_DECISION_ALIASES = {
    "allow": "allow",
    "permit": "allow",
    "deny": "deny",
    "block": "deny",
    "require_approval": "require_approval",
    "require-approval": "require_approval",
    "require_human": "require_approval",
    "throttle": "throttle",
    "allow_with_constraints": "allow_with_constraints",
}
_DEFAULT_DECISIONS = {"allow": "allow", "permit": "allow", "deny": "deny", "block": "deny"}


# --- globs (Go path.Match) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Glob:
    """A Go ``path.Match`` pattern, matched case-insensitively against the whole string."""

    pattern: str
    regex: re.Pattern[str] = field(compare=False, repr=False)

    def matches(self, value: str) -> bool:
        return self.regex.fullmatch(value) is not None


def compile_glob(pattern: str) -> Glob:
    """Translate a Go ``path.Match`` pattern; raises ``ValueError`` for a bad pattern.

    ``*`` matches any run of non-``/`` characters, ``?`` one non-``/`` character, ``[...]`` a
    character class (``^`` negates), ``\\`` escapes the next character.
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\":
            i += 1
            if i >= n:
                raise ValueError(f"bad glob {pattern!r}: trailing backslash")
            out.append(re.escape(pattern[i]))
        elif c == "[":
            j = i + 1
            negate = j < n and pattern[j] == "^"
            if negate:
                j += 1
            parts: list[str] = []
            first = True
            while True:
                if j >= n:
                    raise ValueError(f"bad glob {pattern!r}: unterminated '['")
                ch = pattern[j]
                if ch == "]" and not first:
                    break
                first = False
                if ch == "\\":
                    j += 1
                    if j >= n:
                        raise ValueError(f"bad glob {pattern!r}: trailing backslash")
                    ch = pattern[j]
                lo = ch
                j += 1
                if j + 1 < n and pattern[j] == "-" and pattern[j + 1] != "]":
                    hi = pattern[j + 1]
                    if hi == "\\":
                        if j + 2 >= n:
                            raise ValueError(f"bad glob {pattern!r}: trailing backslash")
                        hi = pattern[j + 2]
                        j += 1
                    if hi < lo:
                        raise ValueError(f"bad glob {pattern!r}: bad range {lo}-{hi}")
                    parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    j += 2
                else:
                    parts.append(re.escape(lo))
            body = "".join(parts)
            out.append(f"[^/{body}]" if negate else f"[{body}]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return Glob(pattern, re.compile("".join(out), re.IGNORECASE | re.DOTALL))


# --- dataclasses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budgets:
    max_runtime_ms: int = 0
    max_retries: int = 0
    max_artifact_bytes: int = 0
    max_concurrent_jobs: int = 0


@dataclass(frozen=True)
class Sandbox:
    isolated: bool = False
    network_allowlist: tuple[str, ...] = ()
    fs_read_only: tuple[str, ...] = ()
    fs_read_write: tuple[str, ...] = ()


@dataclass(frozen=True)
class Toolchain:
    allowed_tools: tuple[str, ...] = ()
    allowed_commands: tuple[str, ...] = ()


@dataclass(frozen=True)
class Diff:
    max_files: int = 0
    max_lines: int = 0
    deny_path_globs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Constraints:
    """Same shape as the ``PolicyConstraints`` proto message."""

    budgets: Budgets = Budgets()
    sandbox: Sandbox = Sandbox()
    toolchain: Toolchain = Toolchain()
    diff: Diff = Diff()
    redaction_level: str = ""


@dataclass(frozen=True)
class Remediation:
    id: str
    title: str = ""
    summary: str = ""
    replacement_topic: str = ""
    replacement_capability: str = ""
    add_labels: tuple[tuple[str, str], ...] = ()
    remove_labels: tuple[str, ...] = ()


@dataclass(frozen=True)
class Match:
    """All present criteria must hold; an empty tuple is a wildcard.

    Strings are compared case-insensitively (stored casefolded).
    """

    topics: tuple[Glob, ...] = ()
    tenants: tuple[str, ...] = ()
    capabilities: tuple[str, ...] = ()
    risk_tags: tuple[str, ...] = ()  # any of them present
    requires: tuple[str, ...] = ()  # all of them present
    pack_ids: tuple[str, ...] = ()
    actor_ids: tuple[str, ...] = ()
    actor_types: tuple[str, ...] = ()
    labels: tuple[tuple[str, Glob], ...] = ()  # each label must equal (glob-match) the value
    label_allowlist: tuple[tuple[str, tuple[str, ...]], ...] = ()  # fires if value not listed
    label_threshold: tuple[tuple[str, float], ...] = ()  # fires if numeric value > max
    secrets_present: bool | None = None


@dataclass(frozen=True)
class Rule:
    id: str
    decision: str  # one of DECISIONS
    match: Match = Match()
    reason: str = ""
    constraints: Constraints | None = None
    remediations: tuple[Remediation, ...] = ()
    retry_after: float | None = None  # seconds, throttle only
    line: int = 0  # 1-based line of the rule in its source


@dataclass(frozen=True)
class TenantPolicy:
    name: str
    allow_topics: tuple[Glob, ...] = ()
    deny_topics: tuple[Glob, ...] = ()
    allowed_repo_hosts: tuple[str, ...] = ()
    denied_repo_hosts: tuple[str, ...] = ()
    max_concurrent_jobs: int = 0


@dataclass(frozen=True)
class Policy:
    version: str
    rules: tuple[Rule, ...]
    default_decision: str = "deny"  # "allow" or "deny"
    default_tenant: str = ""
    tenants: tuple[TenantPolicy, ...] = ()
    content_hash: str = ""  # sha256 hex of the raw document text
    source: str = "<policy>"
    #: sections kept verbatim for later stages (input scanning), not interpreted here
    extras: tuple[tuple[str, Any], ...] = field(default=(), compare=False, repr=False)
    #: output_policy + output_rules (spec §4.7); disabled and empty when neither is present
    output: OutputPolicy = field(default_factory=OutputPolicy)

    @property
    def snapshot(self) -> str:
        """Spec §4.4 file part: ``<version>:<sha256>`` or just the hash without a version."""
        return f"{self.version}:{self.content_hash}" if self.version else self.content_hash

    def rule(self, rule_id: str) -> Rule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None


# --- node helpers ------------------------------------------------------------------------------
_MISSING: Any = object()


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self._constructor = SafeConstructor()

    def error(self, node: Node | None, message: str) -> PolicyError:
        line = node.start_mark.line + 1 if node is not None else None
        return PolicyError(self.source, line, message)

    # scalars
    def scalar(self, node: Node, what: str) -> Any:
        if not isinstance(node, ScalarNode):
            kind = "a mapping" if isinstance(node, MappingNode) else "a list"
            raise self.error(node, f"{what} must be a scalar, got {kind}")
        return self._constructor.construct_object(node, deep=True)

    def string(self, node: Node, what: str, *, allow_empty: bool = True) -> str:
        value = self.scalar(node, what)
        if value is None and allow_empty:
            return ""
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error(node, f"{what} must be a string, got {_typename(value)}")
        text = value if isinstance(value, str) else str(node.value)
        if not text and not allow_empty:
            raise self.error(node, f"{what} must not be empty")
        return text

    def integer(self, node: Node, what: str) -> int:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(node, f"{what} must be an integer, got {_typename(value)}")
        if value < 0:
            raise self.error(node, f"{what} must not be negative")
        return value

    def number(self, node: Node, what: str) -> float:
        value = self.scalar(node, what)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(node, f"{what} must be a number, got {_typename(value)}")
        return float(value)

    def boolean(self, node: Node, what: str) -> bool:
        value = self.scalar(node, what)
        if not isinstance(value, bool):
            raise self.error(node, f"{what} must be true or false, got {_typename(value)}")
        return value

    # collections
    def mapping(
        self, node: Node, what: str, allowed: frozenset[str] | None = None
    ) -> dict[str, tuple[Node, Node]]:
        """Return ``{key: (key_node, value_node)}``; rejects duplicates and unknown keys."""
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, MappingNode):
            raise self.error(node, f"{what} must be a mapping, got {_nodekind(node)}")
        out: dict[str, tuple[Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, f"key in {what}", allow_empty=False)
            if key in out:
                raise self.error(key_node, f"duplicate key {key!r} in {what}")
            if allowed is not None and key not in allowed:
                raise self.error(
                    key_node,
                    f"unknown key {key!r} in {what} (expected one of: {', '.join(sorted(allowed))})",
                )
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: Node, what: str) -> list[Node]:
        if isinstance(node, ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return []
        if not isinstance(node, SequenceNode):
            raise self.error(node, f"{what} must be a list, got {_nodekind(node)}")
        return list(node.value)

    def strings(self, node: Node, what: str, *, fold: bool = False) -> tuple[str, ...]:
        items = [self.string(n, f"item of {what}", allow_empty=False) for n in self.sequence(node, what)]
        return tuple(s.casefold() for s in items) if fold else tuple(items)

    def globs(self, node: Node, what: str) -> tuple[Glob, ...]:
        out = []
        for n in self.sequence(node, what):
            text = self.string(n, f"item of {what}", allow_empty=False)
            out.append(self.glob(n, text, what))
        return tuple(out)

    def glob(self, node: Node, text: str, what: str) -> Glob:
        try:
            return compile_glob(text)
        except ValueError as exc:
            raise self.error(node, f"{what}: {exc}") from None


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(
        type(value), type(value).__name__
    )


def _nodekind(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    return f"scalar {node.value!r}"


# --- sections ----------------------------------------------------------------------------------
_TOP_KEYS = frozenset(
    {
        "version",
        "default_decision",
        "default_tenant",
        "rules",
        "tenants",
        # kept verbatim for a later stage (input content scanning, §4.2 step 9)
        "input_policy",
        "input_rules",
        "require_human",
        # parsed by cordum.safety.output_rules (§4.7)
        "output_policy",
        "output_rules",
    }
)
_EXTRA_KEYS = ("input_policy", "input_rules", "require_human")
_UNSUPPORTED_TOP = {"tier": "tier scoping", "selector": "tier scoping"}

_RULE_KEYS = frozenset(
    {"id", "match", "decision", "reason", "constraints", "remediations", "retry_after"}
)
_UNSUPPORTED_RULE = {"velocity": "velocity rules"}

_MATCH_KEYS = frozenset(
    {
        "topics",
        "tenants",
        "capabilities",
        "risk_tags",
        "requires",
        "pack_ids",
        "actor_ids",
        "actor_types",
        "labels",
        "label_allowlist",
        "label_threshold",
        "secrets_present",
    }
)
_UNSUPPORTED_MATCH = {
    "mcp": "MCP match lists",
    "predicate": "predicates",
    "delegation": "delegation matching",
    "agent_risk_tiers": "agent identity matching",
    "agent_data_classifications": "agent identity matching",
}

_TENANT_KEYS = frozenset(
    {"allow_topics", "deny_topics", "allowed_repo_hosts", "denied_repo_hosts", "max_concurrent_jobs"}
)
_UNSUPPORTED_TENANT = {"mcp": "tenant MCP filters"}

_BUDGET_KEYS = ("max_runtime_ms", "max_retries", "max_artifact_bytes", "max_concurrent_jobs")
_CONSTRAINT_KEYS = frozenset({"budgets", "sandbox", "toolchain", "diff", "redaction_level", *_BUDGET_KEYS})
_SANDBOX_KEYS = frozenset({"isolated", "network_allowlist", "fs_read_only", "fs_read_write"})
_TOOLCHAIN_KEYS = frozenset({"allowed_tools", "allowed_commands"})
_DIFF_KEYS = frozenset({"max_files", "max_lines", "deny_path_globs"})
_REMEDIATION_KEYS = frozenset(
    {
        "id",
        "title",
        "summary",
        "replacement_topic",
        "replacement_capability",
        "add_labels",
        "remove_labels",
    }
)


def _reject_unsupported(
    p: _Parser, node: Node, what: str, unsupported: Mapping[str, str], allowed: frozenset[str]
) -> dict[str, tuple[Node, Node]]:
    entries = p.mapping(node, what, allowed | frozenset(unsupported))
    for key, (key_node, _) in entries.items():
        if key in unsupported:
            raise p.error(
                key_node,
                f"{what}: {key!r} ({unsupported[key]}) is not supported by this safety kernel; "
                "refusing to ignore it",
            )
    return entries


def _parse_match(p: _Parser, node: Node, where: str) -> Match:
    what = f"{where}.match"
    m = _reject_unsupported(p, node, what, _UNSUPPORTED_MATCH, _MATCH_KEYS)
    kw: dict[str, Any] = {}
    for key in ("tenants", "capabilities", "risk_tags", "requires", "pack_ids", "actor_ids", "actor_types"):
        if key in m:
            kw[key] = p.strings(m[key][1], f"{what}.{key}", fold=True)
    if "topics" in m:
        kw["topics"] = p.globs(m["topics"][1], f"{what}.topics")
    if "labels" in m:
        labels = []
        for k, (_, vnode) in p.mapping(m["labels"][1], f"{what}.labels").items():
            text = p.string(vnode, f"{what}.labels.{k}")
            labels.append((k, p.glob(vnode, text, f"{what}.labels.{k}")))
        kw["labels"] = tuple(labels)
    if "label_allowlist" in m:
        kw["label_allowlist"] = tuple(
            (k, p.strings(v, f"{what}.label_allowlist.{k}", fold=True))
            for k, (_, v) in p.mapping(m["label_allowlist"][1], f"{what}.label_allowlist").items()
        )
    if "label_threshold" in m:
        kw["label_threshold"] = tuple(
            (k, p.number(v, f"{what}.label_threshold.{k}"))
            for k, (_, v) in p.mapping(m["label_threshold"][1], f"{what}.label_threshold").items()
        )
    if "secrets_present" in m:
        kw["secrets_present"] = p.boolean(m["secrets_present"][1], f"{what}.secrets_present")
    return Match(**kw)


def _parse_constraints(p: _Parser, node: Node, where: str) -> Constraints:
    what = f"{where}.constraints"
    c = p.mapping(node, what, _CONSTRAINT_KEYS)
    budgets: dict[str, int] = {}
    if "budgets" in c:
        b = p.mapping(c["budgets"][1], f"{what}.budgets", frozenset(_BUDGET_KEYS))
        budgets = {k: p.integer(v, f"{what}.budgets.{k}") for k, (_, v) in b.items()}
    for key in _BUDGET_KEYS:  # flat shorthand: constraints.max_runtime_ms == constraints.budgets...
        if key in c:
            key_node, value_node = c[key]
            if key in budgets:
                raise p.error(key_node, f"{what}: {key!r} given both flat and under 'budgets'")
            budgets[key] = p.integer(value_node, f"{what}.{key}")
    sandbox = Sandbox()
    if "sandbox" in c:
        s = p.mapping(c["sandbox"][1], f"{what}.sandbox", _SANDBOX_KEYS)
        sandbox = Sandbox(
            isolated=p.boolean(s["isolated"][1], f"{what}.sandbox.isolated") if "isolated" in s else False,
            **{
                k: p.strings(s[k][1], f"{what}.sandbox.{k}")
                for k in ("network_allowlist", "fs_read_only", "fs_read_write")
                if k in s
            },
        )
    toolchain = Toolchain()
    if "toolchain" in c:
        t = p.mapping(c["toolchain"][1], f"{what}.toolchain", _TOOLCHAIN_KEYS)
        toolchain = Toolchain(**{k: p.strings(v, f"{what}.toolchain.{k}") for k, (_, v) in t.items()})
    diff = Diff()
    if "diff" in c:
        d = p.mapping(c["diff"][1], f"{what}.diff", _DIFF_KEYS)
        diff = Diff(
            max_files=p.integer(d["max_files"][1], f"{what}.diff.max_files") if "max_files" in d else 0,
            max_lines=p.integer(d["max_lines"][1], f"{what}.diff.max_lines") if "max_lines" in d else 0,
            deny_path_globs=(
                p.strings(d["deny_path_globs"][1], f"{what}.diff.deny_path_globs")
                if "deny_path_globs" in d
                else ()
            ),
        )
    redaction = p.string(c["redaction_level"][1], f"{what}.redaction_level") if "redaction_level" in c else ""
    return Constraints(Budgets(**budgets), sandbox, toolchain, diff, redaction)


def _parse_remediation(p: _Parser, node: Node, what: str) -> Remediation:
    r = p.mapping(node, what, _REMEDIATION_KEYS)
    if "id" not in r:
        raise p.error(node, f"{what} has no 'id'")
    kw: dict[str, Any] = {}
    for key in ("id", "title", "summary", "replacement_topic", "replacement_capability"):
        if key in r:
            kw[key] = p.string(r[key][1], f"{what}.{key}", allow_empty=key != "id")
    if "add_labels" in r:
        kw["add_labels"] = tuple(
            (k, p.string(v, f"{what}.add_labels.{k}"))
            for k, (_, v) in p.mapping(r["add_labels"][1], f"{what}.add_labels").items()
        )
    if "remove_labels" in r:
        kw["remove_labels"] = p.strings(r["remove_labels"][1], f"{what}.remove_labels")
    return Remediation(**kw)


def _parse_rule(p: _Parser, node: Node, index: int) -> Rule:
    where = f"rules[{index}]"
    r = _reject_unsupported(p, node, where, _UNSUPPORTED_RULE, _RULE_KEYS)
    if "id" not in r:
        raise p.error(node, f"{where} has no 'id'")
    rule_id = p.string(r["id"][1], f"{where}.id", allow_empty=False)
    where = f"rule {rule_id!r}"
    if "decision" not in r:
        raise p.error(node, f"{where} has no 'decision'")
    dnode = r["decision"][1]
    raw = p.string(dnode, f"{where}.decision", allow_empty=False)
    decision = _DECISION_ALIASES.get(raw.strip().lower())
    if decision is None:
        raise p.error(
            dnode,
            f"{where}: unknown decision {raw!r} (expected one of: {', '.join(sorted(_DECISION_ALIASES))})",
        )
    match = _parse_match(p, r["match"][1], where) if "match" in r else Match()
    reason = p.string(r["reason"][1], f"{where}.reason") if "reason" in r else ""
    constraints = _parse_constraints(p, r["constraints"][1], where) if "constraints" in r else None
    remediations: tuple[Remediation, ...] = ()
    if "remediations" in r:
        remediations = tuple(
            _parse_remediation(p, n, f"{where}.remediations[{i}]")
            for i, n in enumerate(p.sequence(r["remediations"][1], f"{where}.remediations"))
        )
    retry_after = None
    if "retry_after" in r:
        key_node, value_node = r["retry_after"]
        if decision != "throttle":
            raise p.error(key_node, f"{where}: 'retry_after' only applies to decision throttle")
        retry_after = p.number(value_node, f"{where}.retry_after")
        if retry_after <= 0:
            raise p.error(value_node, f"{where}.retry_after must be positive")
    return Rule(
        id=rule_id,
        decision=decision,
        match=match,
        reason=reason,
        constraints=constraints,
        remediations=remediations,
        retry_after=retry_after,
        line=node.start_mark.line + 1,
    )


def _parse_tenant(p: _Parser, name: str, node: Node) -> TenantPolicy:
    what = f"tenants.{name}"
    t = _reject_unsupported(p, node, what, _UNSUPPORTED_TENANT, _TENANT_KEYS)
    kw: dict[str, Any] = {}
    for key in ("allow_topics", "deny_topics"):
        if key in t:
            kw[key] = p.globs(t[key][1], f"{what}.{key}")
    for key in ("allowed_repo_hosts", "denied_repo_hosts"):
        if key in t:
            kw[key] = p.strings(t[key][1], f"{what}.{key}", fold=True)
    if "max_concurrent_jobs" in t:
        kw["max_concurrent_jobs"] = p.integer(t["max_concurrent_jobs"][1], f"{what}.max_concurrent_jobs")
    return TenantPolicy(name=name.casefold(), **kw)


def _legacy_rules(tenants: tuple[TenantPolicy, ...]) -> tuple[Rule, ...]:
    """Spec §4.2 step 5: without ``rules``, deny_topics then allow_topics per tenant."""
    out: list[Rule] = []
    for t in tenants:
        if t.deny_topics:
            out.append(
                Rule(
                    id=f"tenant:{t.name}:deny_topics",
                    decision="deny",
                    match=Match(topics=t.deny_topics, tenants=(t.name,)),
                    reason=f"topic denied for tenant {t.name}",
                )
            )
        if t.allow_topics:
            out.append(
                Rule(
                    id=f"tenant:{t.name}:allow_topics",
                    decision="allow",
                    match=Match(topics=t.allow_topics, tenants=(t.name,)),
                    reason=f"topic allowed for tenant {t.name}",
                )
            )
    return tuple(out)


def _plain(p: _Parser, node: Node) -> Any:
    """Construct a verbatim (uninterpreted) section as plain Python data."""
    return p._constructor.construct_object(node, deep=True)


# --- entry point -------------------------------------------------------------------------------
def parse_policy(text: str, source: str = "<policy>") -> Policy:
    """Parse a policy document; raises :class:`PolicyError` naming the offending line."""
    content_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
    p = _Parser(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(source, line, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, None, f"invalid YAML: {exc}") from None
    if root is None:
        return Policy(version="", rules=(), content_hash=content_hash, source=source)

    top = _reject_unsupported(p, root, "policy", _UNSUPPORTED_TOP, _TOP_KEYS)
    version = p.string(top["version"][1], "version") if "version" in top else ""
    default_decision = "deny"
    if "default_decision" in top:
        dnode = top["default_decision"][1]
        raw = p.string(dnode, "default_decision")
        if raw:
            resolved = _DEFAULT_DECISIONS.get(raw.strip().lower())
            if resolved is None:
                raise p.error(dnode, f"unknown default_decision {raw!r} (expected allow or deny)")
            default_decision = resolved
    default_tenant = p.string(top["default_tenant"][1], "default_tenant") if "default_tenant" in top else ""

    tenants: tuple[TenantPolicy, ...] = ()
    if "tenants" in top:
        tenants = tuple(
            _parse_tenant(p, name, vnode)
            for name, (_, vnode) in p.mapping(top["tenants"][1], "tenants").items()
        )

    rules: list[Rule] = []
    has_rules = "rules" in top
    if has_rules:
        seen: dict[str, int] = {}
        for i, rnode in enumerate(p.sequence(top["rules"][1], "rules")):
            rule = _parse_rule(p, rnode, i)
            if rule.id in seen:
                raise p.error(
                    rnode, f"duplicate rule id {rule.id!r} (first defined on line {seen[rule.id]})"
                )
            seen[rule.id] = rule.line
            rules.append(rule)
    final_rules = tuple(rules) if rules else _legacy_rules(tenants)

    extras = tuple((k, _plain(p, top[k][1])) for k in _EXTRA_KEYS if k in top)
    output = parse_output_section(p, top)
    return Policy(
        version=version,
        rules=final_rules,
        default_decision=default_decision,
        default_tenant=default_tenant,
        tenants=tenants,
        content_hash=content_hash,
        source=source,
        extras=extras,
        output=output,
    )

