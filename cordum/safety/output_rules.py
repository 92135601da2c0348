"""Output policy: what a job produced, checked against ``output_rules`` (spec §4.3, §4.7).

Pure: parsing helpers used by :func:`cordum.safety.policy.parse_policy`, frozen dataclasses and
:func:`evaluate_output`.  No I/O, no Trio, no logging; findings never carry the text they matched
(it may be the secret), only detector names, pattern sources, offsets and lengths.

Policy format (top level of the safety policy file)::

    output_policy:
      enabled: true            # default true when the block exists; false = no output rules apply
      fail_mode: open          # open|closed; "" when absent (the scheduler's env decides then)
      max_scan_bytes: 1048576  # content beyond this is not scanned (an info finding says so)
      regex_timeout_ms: 50     # per pattern search
      detectors:               # custom detectors, referable by name from rules
        ticket_id: {pattern: 'TCK-[0-9]{6}', scanner: custom, severity: medium}
    output_rules:
      - id: no-secrets
        severity: critical     # info|low|medium|high|critical (default medium)
        match:
          topics: ["job.chat.*"]
          scanners: [secret]   # secret|pii|unsafe_instruction|custom (+ aliases)
        decision: quarantine   # allow | quarantine | deny | block | redact
        reason: secret in output

Every pattern runs under the third-party ``regex`` module with ``timeout=`` (stdlib ``re`` cannot
be interrupted); a search that times out quarantines the output.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import regex

from cordum.safety.detectors import (
    BUILTIN_DETECTORS,
    BUILTIN_SCANNERS,
    SCANNER_ALIASES,
    Detector,
)

if TYPE_CHECKING:  # policy.py imports this module; only type names are needed from it
    from yaml.nodes import Node

    from cordum.safety.policy import Glob, _Parser

__all__ = [
    "OUTPUT_DECISIONS",
    "SEVERITIES",
    "ContentPattern",
    "Finding",
    "OutputFacts",
    "OutputMatch",
    "OutputPolicy",
    "OutputRule",
    "OutputVerdict",
    "evaluate_output",
    "parse_output_section",
]

SEVERITIES = ("info", "low", "medium", "high", "critical")
OUTPUT_DECISIONS = ("allow", "quarantine", "redact")
_DECISION_ALIASES = {
    "allow": "allow",
    "quarantine": "quarantine",
    "deny": "quarantine",
    "block": "quarantine",
    "redact": "redact",
}

DEFAULT_MAX_SCAN_BYTES = 1 << 20
DEFAULT_REGEX_TIMEOUT = 0.05  # seconds
#: findings listed in one verdict; redaction still uses every span
MAX_FINDINGS = 100


# --- dataclasses -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Finding:
    type: str  # detector name, "pattern", "keyword", "regex_timeout", "truncated", ...
    severity: str
    detail: str  # human text; never the matched text itself
    offset: int  # character offset in the scanned text (0 without a span)
    length: int  # characters (0 without a span)
    scanner: str  # "secret" | "pii" | "unsafe_instruction" | "custom" | "limits"
    confidence: float  # 0..1
    matched_pattern: str  # detector name or the rule's pattern source, never the match


@dataclass(frozen=True)
class ContentPattern:
    """A rule's ``content_patterns`` entry, compiled at parse time."""

    source: str
    compiled: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class OutputMatch:
    """All present metadata criteria must hold (empty = wildcard); the content part holds when at
    least one content criterion (scanners, detectors, content_patterns, keywords) finds something."""

    tenants: tuple[str, ...] = ()  # casefolded
    topics: tuple[Glob, ...] = ()
    capabilities: tuple[str, ...] = ()  # casefolded; any
    risk_tags: tuple[str, ...] = ()  # casefolded; any
    labels: tuple[tuple[str, Glob], ...] = ()  # each must hold
    content_types: tuple[Glob, ...] = ()  # media type without parameters
    output_size_gt: int | None = None
    max_output_bytes: int | None = None  # fires when the output is larger
    has_error: bool | None = None
    scanners: tuple[str, ...] = ()  # canonical scanner names
    detectors: tuple[str, ...] = ()  # detector names as listed
    content_patterns: tuple[ContentPattern, ...] = ()
    keywords: tuple[str, ...] = ()
    #: the detectors that ``scanners`` and ``detectors`` resolve to, catalogue order, no repeats
    scan_detectors: tuple[Detector, ...] = field(default=(), compare=False, repr=False)
    keyword_patterns: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def has_content_criteria(self) -> bool:
        return bool(self.scanners or self.detectors or self.content_patterns or self.keywords)

    @property
    def has_size_criteria(self) -> bool:
        return self.output_size_gt is not None or self.max_output_bytes is not None


@dataclass(frozen=True)
class OutputRule:
    id: str
    decision: str  # one of OUTPUT_DECISIONS
    severity: str = "medium"
    enabled: bool = True
    description: str = ""
    match: OutputMatch = OutputMatch()
    reason: str = ""
    line: int = 0  # 1-based line of the rule in its source
    #: redact without content criteria: what the built-in scanners find
    redact_detectors: tuple[Detector, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class OutputPolicy:
    enabled: bool = False
    fail_mode: str = ""  # "open" | "closed" | ""
    max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES
    regex_timeout: float = DEFAULT_REGEX_TIMEOUT  # seconds
    rules: tuple[OutputRule, ...] = ()
    #: custom detectors from ``output_policy.detectors`` (already resolved into the rules)
    detectors: tuple[Detector, ...] = ()

    @property
    def has_rules(self) -> bool:
        return self.enabled and any(r.enabled for r in self.rules)

    @property
    def needs_content(self) -> bool:
        # Sizes are known for sure in the content phase (the kernel reads the output).
        return self.enabled and any(
            r.enabled and (r.match.has_content_criteria or r.match.has_size_criteria or r.decision == "redact")
            for r in self.rules
        )


@dataclass(frozen=True)
class OutputFacts:
    """What is known about one job's result."""

    job_id: str = ""
    topic: str = ""
    tenant: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    capabilities: tuple[str, ...] = ()
    risk_tags: tuple[str, ...] = ()
    error_message: str = ""
    error_code: str = ""
    output_size_bytes: int = -1  # -1 = unknown
    content_type: str = ""
    content: bytes | None = None  # None = the metadata phase


@dataclass(frozen=True)
class OutputVerdict:
    decision: str  # "allow" | "quarantine" | "redact"
    reason: str
    rule_id: str = ""
    findings: tuple[Finding, ...] = ()
    redacted: bytes | None = None
    deferred: bool = False  # metadata phase: a rule needs the content to decide (the allow is provisional)


# --- parsing -----------------------------------------------------------------------------------
_POLICY_KEYS = frozenset({"enabled", "fail_mode", "max_scan_bytes", "regex_timeout_ms", "detectors"})
_DETECTOR_KEYS = frozenset({"pattern", "scanner", "severity", "confidence", "description"})
_RULE_KEYS = frozenset({"id", "severity", "enabled", "description", "match", "decision", "reason"})
_MATCH_KEYS = frozenset(
    {
        "tenants",
        "topics",
        "capabilities",
        "risk_tags",
        "labels",
        "content_types",
        "output_size_gt",
        "max_output_bytes",
        "has_error",
        "scanners",
        "detectors",
        "content_patterns",
        "keywords",
    }
)
_FAIL_MODES = ("", "open", "closed")
_NAME = regex.compile(r"[a-z0-9_][a-z0-9_.\-]*")


def _compile(p: _Parser, node: Node, source: str, what: str) -> Any:
    try:
        compiled = regex.compile(source)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise p.error(node, f"{what}: bad regex {source!r}: {exc}") from None
    try:
        empty = compiled.search("", timeout=DEFAULT_REGEX_TIMEOUT) is not None
    except TimeoutError:
        empty = False
    if empty:
        raise p.error(node, f"{what}: regex {source!r} matches the empty string")
    return compiled


def _severity(p: _Parser, node: Node, what: str) -> str:
    raw = p.string(node, what, allow_empty=False)
    value = raw.strip().lower()
    if value not in SEVERITIES:
        raise p.error(node, f"{what}: unknown severity {raw!r} (expected one of: {', '.join(SEVERITIES)})")
    return value


def _scanner(p: _Parser, node: Node, what: str) -> str:
    raw = p.string(node, what, allow_empty=False)
    value = SCANNER_ALIASES.get(raw.strip().lower())
    if value is None:
        raise p.error(
            node, f"{what}: unknown scanner {raw!r} (expected one of: {', '.join(sorted(SCANNER_ALIASES))})"
        )
    return value


def _parse_detector(p: _Parser, name_node: Node, node: Node, raw_name: str) -> Detector:
    name = raw_name.strip().lower()
    what = f"output_policy.detectors.{raw_name}"
    if not _NAME.fullmatch(name):
        raise p.error(name_node, f"{what}: detector names use letters, digits, '_', '.', '-'")
    if name in BUILTIN_DETECTORS:
        raise p.error(name_node, f"{what}: {name!r} is a built-in detector; choose another name")
    d = p.mapping(node, what, _DETECTOR_KEYS)
    if "pattern" not in d:
        raise p.error(node, f"{what} has no 'pattern'")
    pnode = d["pattern"][1]
    source = p.string(pnode, f"{what}.pattern", allow_empty=False)
    compiled = _compile(p, pnode, source, f"{what}.pattern")
    scanner = _scanner(p, d["scanner"][1], f"{what}.scanner") if "scanner" in d else "custom"
    severity = _severity(p, d["severity"][1], f"{what}.severity") if "severity" in d else "medium"
    confidence = 0.8
    if "confidence" in d:
        cnode = d["confidence"][1]
        confidence = p.number(cnode, f"{what}.confidence")
        if not 0.0 <= confidence <= 1.0:
            raise p.error(cnode, f"{what}.confidence must be between 0 and 1")
    description = p.string(d["description"][1], f"{what}.description") if "description" in d else ""
    return Detector(
        name=name,
        scanner=scanner,
        severity=severity,
        confidence=confidence,
        patterns=(source,),
        description=description or f"custom detector {name}",
        compiled=(compiled,),
    )


def _unique(detectors: Iterable[Detector]) -> tuple[Detector, ...]:
    seen: dict[str, Detector] = {}
    for d in detectors:
        seen.setdefault(d.name, d)
    return tuple(seen.values())


def _parse_match(
    p: _Parser, node: Node, where: str, catalogue: Mapping[str, Detector]
) -> OutputMatch:
    what = f"{where}.match"
    m = p.mapping(node, what, _MATCH_KEYS)
    kw: dict[str, Any] = {}
    for key in ("tenants", "capabilities", "risk_tags"):
        if key in m:
            kw[key] = p.strings(m[key][1], f"{what}.{key}", fold=True)
    for key in ("topics", "content_types"):
        if key in m:
            kw[key] = p.globs(m[key][1], f"{what}.{key}")
    if "labels" in m:
        labels = []
        for k, (_, vnode) in p.mapping(m["labels"][1], f"{what}.labels").items():
            text = p.string(vnode, f"{what}.labels.{k}")
            labels.append((k, p.glob(vnode, text, f"{what}.labels.{k}")))
        kw["labels"] = tuple(labels)
    for key in ("output_size_gt", "max_output_bytes"):
        if key in m:
            kw[key] = p.integer(m[key][1], f"{what}.{key}")
    if "has_error" in m:
        kw["has_error"] = p.boolean(m["has_error"][1], f"{what}.has_error")

    resolved: list[Detector] = []
    if "scanners" in m:
        scanners: list[str] = []
        for n in p.sequence(m["scanners"][1], f"{what}.scanners"):
            s = _scanner(p, n, f"{what}.scanners")
            if s not in scanners:
                scanners.append(s)
        kw["scanners"] = tuple(scanners)
        resolved.extend(d for d in catalogue.values() if d.scanner in scanners)
    if "detectors" in m:
        names: list[str] = []
        for n in p.sequence(m["detectors"][1], f"{what}.detectors"):
            raw = p.string(n, f"item of {what}.detectors", allow_empty=False)
            name = raw.strip().lower()
            if name not in catalogue:
                raise p.error(n, f"{what}.detectors: unknown detector {raw!r}")
            names.append(name)
            resolved.append(catalogue[name])
        kw["detectors"] = tuple(names)
    kw["scan_detectors"] = _unique(resolved)
    if "content_patterns" in m:
        patterns = []
        for n in p.sequence(m["content_patterns"][1], f"{what}.content_patterns"):
            source = p.string(n, f"item of {what}.content_patterns", allow_empty=False)
            patterns.append(ContentPattern(source, _compile(p, n, source, f"{what}.content_patterns")))
        kw["content_patterns"] = tuple(patterns)
    if "keywords" in m:
        keywords = p.strings(m["keywords"][1], f"{what}.keywords")
        kw["keywords"] = keywords
        kw["keyword_patterns"] = tuple(regex.compile(regex.escape(k), regex.IGNORECASE) for k in keywords)
    return OutputMatch(**kw)


def _parse_rule(p: _Parser, node: Node, index: int, catalogue: Mapping[str, Detector]) -> OutputRule:
    where = f"output_rules[{index}]"
    r = p.mapping(node, where, _RULE_KEYS)
    if "id" not in r:
        raise p.error(node, f"{where} has no 'id'")
    rule_id = p.string(r["id"][1], f"{where}.id", allow_empty=False)
    where = f"output rule {rule_id!r}"
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
    match = _parse_match(p, r["match"][1], where, catalogue) if "match" in r else OutputMatch()
    redact_detectors: tuple[Detector, ...] = ()
    if decision == "redact" and not match.has_content_criteria:
        redact_detectors = tuple(d for d in catalogue.values() if d.scanner in BUILTIN_SCANNERS)
    return OutputRule(
        id=rule_id,
        decision=decision,
        severity=_severity(p, r["severity"][1], f"{where}.severity") if "severity" in r else "medium",
        enabled=p.boolean(r["enabled"][1], f"{where}.enabled") if "enabled" in r else True,
        description=p.string(r["description"][1], f"{where}.description") if "description" in r else "",
        match=match,
        reason=p.string(r["reason"][1], f"{where}.reason") if "reason" in r else "",
        line=node.start_mark.line + 1,
        redact_detectors=redact_detectors,
    )


def parse_output_section(p: _Parser, top: Mapping[str, tuple[Node, Node]]) -> OutputPolicy:
    """Parse ``output_policy`` and ``output_rules`` from the top-level mapping of a policy document.

    Neither present: a disabled, empty policy.  ``output_rules`` without ``output_policy``: enabled.
    """
    if "output_policy" not in top and "output_rules" not in top:
        return OutputPolicy()
    enabled = True
    fail_mode = ""
    max_scan_bytes = DEFAULT_MAX_SCAN_BYTES
    regex_timeout = DEFAULT_REGEX_TIMEOUT
    custom: list[Detector] = []
    if "output_policy" in top:
        s = p.mapping(top["output_policy"][1], "output_policy", _POLICY_KEYS)
        if "enabled" in s:
            enabled = p.boolean(s["enabled"][1], "output_policy.enabled")
        if "fail_mode" in s:
            fnode = s["fail_mode"][1]
            raw = p.string(fnode, "output_policy.fail_mode")
            fail_mode = raw.strip().lower()
            if fail_mode not in _FAIL_MODES:
                raise p.error(fnode, f"unknown output_policy.fail_mode {raw!r} (expected open or closed)")
        if "max_scan_bytes" in s:
            vnode = s["max_scan_bytes"][1]
            max_scan_bytes = p.integer(vnode, "output_policy.max_scan_bytes")
            if max_scan_bytes <= 0:
                raise p.error(vnode, "output_policy.max_scan_bytes must be positive")
        if "regex_timeout_ms" in s:
            vnode = s["regex_timeout_ms"][1]
            ms = p.number(vnode, "output_policy.regex_timeout_ms")
            if ms <= 0:
                raise p.error(vnode, "output_policy.regex_timeout_ms must be positive")
            regex_timeout = ms / 1000.0
        if "detectors" in s:
            for raw_name, (name_node, dnode) in p.mapping(
                s["detectors"][1], "output_policy.detectors"
            ).items():
                detector = _parse_detector(p, name_node, dnode, raw_name)
                if any(d.name == detector.name for d in custom):
                    raise p.error(name_node, f"duplicate detector {detector.name!r} in output_policy.detectors")
                custom.append(detector)

    catalogue: dict[str, Detector] = dict(BUILTIN_DETECTORS)
    catalogue.update((d.name, d) for d in custom)
    rules: list[OutputRule] = []
    if "output_rules" in top:
        seen: dict[str, int] = {}
        for i, rnode in enumerate(p.sequence(top["output_rules"][1], "output_rules")):
            rule = _parse_rule(p, rnode, i, catalogue)
            if rule.id in seen:
                raise p.error(
                    rnode, f"duplicate output rule id {rule.id!r} (first defined on line {seen[rule.id]})"
                )
            seen[rule.id] = rule.line
            rules.append(rule)
    return OutputPolicy(
        enabled=enabled,
        fail_mode=fail_mode,
        max_scan_bytes=max_scan_bytes,
        regex_timeout=regex_timeout,
        rules=tuple(rules),
        detectors=tuple(custom),
    )


# --- evaluation --------------------------------------------------------------------------------
class _Timeout(Exception):
    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.label = label


def _span_group(compiled: Any) -> int | str:
    return "secret" if "secret" in compiled.groupindex else 0


class _Scan:
    """The content of one evaluation: decoded lazily, each search run once and cached."""

    def __init__(self, policy: OutputPolicy, facts: OutputFacts) -> None:
        self.policy = policy
        self.facts = facts
        self._text: str | None = None
        self.valid_utf8 = True
        self.truncated = False
        self._spans: dict[tuple[str, str], list[tuple[int, int]]] = {}

    @property
    def text(self) -> str:
        if self._text is None:
            content = self.facts.content or b""
            limit = self.policy.max_scan_bytes
            # Cut here, or given only its head (a reader took the first bytes of a larger output)
            if len(content) > limit or self.facts.output_size_bytes > len(content):
                self.truncated = True
                prefix = content[:limit]
                try:  # a character cut at the limit is simply not scanned
                    self._text = codecs.getincrementaldecoder("utf-8")().decode(prefix, final=False)
                except UnicodeDecodeError:
                    self.valid_utf8 = False
                    self._text = prefix.decode("utf-8", errors="replace")
            else:
                try:
                    self._text = content.decode("utf-8")
                except UnicodeDecodeError:
                    self.valid_utf8 = False
                    self._text = content.decode("utf-8", errors="replace")
        return self._text

    def full_text(self) -> str | None:
        """The whole content as text, or None if it is not valid UTF-8."""
        text = self.text
        if not self.valid_utf8:
            return None
        if not self.truncated:
            return text
        try:
            return (self.facts.content or b"").decode("utf-8")
        except UnicodeDecodeError:
            return None

    def info(self) -> tuple[Finding, ...]:
        """The truncation notice, once the content has been decoded for scanning."""
        if not self.truncated:
            return ()
        size = max(len(self.facts.content or b""), self.facts.output_size_bytes)
        return (
            Finding(
                type="truncated",
                severity="info",
                detail=f"output is {size} bytes; only the first {self.policy.max_scan_bytes} bytes were scanned",
                offset=0,
                length=0,
                scanner="limits",
                confidence=1.0,
                matched_pattern="",
            ),
        )

    def spans(self, key: tuple[str, str], compiled: Any, label: str, validator: Any = None) -> list[tuple[int, int]]:
        cached = self._spans.get(key)
        if cached is not None:
            return cached
        text = self.text
        group = _span_group(compiled)
        try:
            if group == 0:
                raw = [m.span() for m in compiled.finditer(text, timeout=self.policy.regex_timeout)]
            else:
                raw = [
                    m.span(group) if m.start(group) >= 0 else m.span()
                    for m in compiled.finditer(text, timeout=self.policy.regex_timeout)
                ]
        except TimeoutError:
            raise _Timeout(label) from None
        if validator is not None:
            raw = [(s, e) for s, e in raw if validator(text[s:e])]
        self._spans[key] = raw
        return raw

    def detector(self, d: Detector) -> list[Finding]:
        spans: set[tuple[int, int]] = set()
        for i, compiled in enumerate(d.compiled):
            spans.update(self.spans(("detector", f"{d.name}#{i}"), compiled, d.name, d.validator))
        return [
            Finding(
                type=d.name,
                severity=d.severity,
                detail=d.description or d.name,
                offset=s,
                length=e - s,
                scanner=d.scanner,
                confidence=d.confidence,
                matched_pattern=d.name,
            )
            for s, e in sorted(spans)
        ]


def _content_findings(scan: _Scan, rule: OutputRule, *, exhaustive: bool) -> list[Finding]:
    """Findings of the rule's content criteria; stops at the first hit unless ``exhaustive``."""
    m = rule.match
    out: list[Finding] = []
    # Findings name a keyword or pattern by its place in the rule, never by its text: a policy
    # may list literal secrets as keywords, and findings are shown to every viewer of the job.
    for index, (keyword, compiled) in enumerate(zip(m.keywords, m.keyword_patterns)):
        label = f"{rule.id}.keywords[{index}]"
        found = scan.spans(("keyword", keyword.casefold()), compiled, label)
        out.extend(
            Finding("keyword", rule.severity, f"output contains a keyword of output rule {rule.id!r}",
                    s, e - s, "custom", 1.0, label)
            for s, e in found
        )
        if out and not exhaustive:
            return out
    for d in m.scan_detectors:
        out.extend(scan.detector(d))
        if out and not exhaustive:
            return out
    for index, cp in enumerate(m.content_patterns):
        label = f"{rule.id}.content_patterns[{index}]"
        found = scan.spans(("pattern", cp.source), cp.compiled, label)
        out.extend(
            Finding("pattern", rule.severity, f"output matches a content pattern of output rule {rule.id!r}",
                    s, e - s, "custom", 1.0, label)
            for s, e in found
        )
        if out and not exhaustive:
            return out
    return out


def _size_unknown(facts: OutputFacts) -> bool:
    return facts.output_size_bytes < 0 and facts.content is None


def _metadata_matches(m: OutputMatch, facts: OutputFacts, *, ignore_size: bool = False) -> bool:
    if m.tenants and facts.tenant.casefold() not in m.tenants:
        return False
    if m.topics and not any(g.matches(facts.topic) for g in m.topics):
        return False
    if m.capabilities and not any(c.casefold() in m.capabilities for c in facts.capabilities):
        return False
    if m.risk_tags and not any(t.casefold() in m.risk_tags for t in facts.risk_tags):
        return False
    for key, glob in m.labels:
        value = facts.labels.get(key)
        if value is None or not glob.matches(value):
            return False
    if m.content_types:
        media = facts.content_type.split(";", 1)[0].strip()
        if not media or not any(g.matches(media) for g in m.content_types):
            return False
    if m.has_size_criteria and not ignore_size:
        size = facts.output_size_bytes
        if size < 0:
            if facts.content is None:
                return False
            size = len(facts.content)
        if m.output_size_gt is not None and not size > m.output_size_gt:
            return False
        if m.max_output_bytes is not None and not size > m.max_output_bytes:
            return False
    if m.has_error is not None and bool(facts.error_message or facts.error_code) != m.has_error:
        return False
    return True


def _listed(findings: Iterable[Finding], scan: _Scan) -> tuple[Finding, ...]:
    items = sorted(findings, key=lambda f: (f.offset, f.length, f.type))
    if len(items) > MAX_FINDINGS:
        omitted = len(items) - MAX_FINDINGS
        items = items[:MAX_FINDINGS] + [
            Finding("findings_truncated", "info", f"{omitted} more findings not listed",
                    0, 0, "limits", 1.0, "")
        ]
    return scan.info() + tuple(items)


def _redact(text: str, findings: Iterable[Finding]) -> str:
    spans = sorted(
        ((f.offset, f.offset + f.length, f.type) for f in findings if f.length > 0),
        key=lambda s: (s[0], -s[1]),
    )
    merged: list[list[Any]] = []
    for start, end, kind in spans:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end, kind])
    parts: list[str] = []
    pos = 0
    for start, end, kind in merged:
        parts.append(text[pos:start])
        parts.append(f"[REDACTED:{kind}]")
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _timeout_verdict(scan: _Scan, rule: OutputRule, label: str) -> OutputVerdict:
    ms = round(scan.policy.regex_timeout * 1000, 3)
    ms_text = f"{ms:g}"
    finding = Finding(
        type="regex_timeout",
        severity="high",
        detail=f"pattern {label!r} did not finish within {ms_text} ms",
        offset=0,
        length=0,
        scanner="limits",
        confidence=1.0,
        matched_pattern=label,
    )
    return OutputVerdict(
        decision="quarantine",
        reason=(
            f"output rule {rule.id!r}: pattern {label!r} timed out after {ms_text} ms; "
            "a scan that cannot finish quarantines the output"
        ),
        rule_id=rule.id,
        findings=scan.info() + (finding,),
    )


def _decide(scan: _Scan, rule: OutputRule) -> OutputVerdict:
    facts = scan.facts
    if rule.decision == "allow":
        reason = rule.reason or f"output allowed by output rule {rule.id!r}"
        return OutputVerdict("allow", reason, rule.id, scan.info())
    if rule.decision == "quarantine":
        reason = rule.reason or f"output quarantined by output rule {rule.id!r}"
        if facts.content is None or not rule.match.has_content_criteria:
            return OutputVerdict("quarantine", reason, rule.id, scan.info())
        findings = _content_findings(scan, rule, exhaustive=True)
        return OutputVerdict("quarantine", reason, rule.id, _listed(findings, scan))

    # redact
    reason = rule.reason or f"output redacted by output rule {rule.id!r}"
    if facts.content is None:  # metadata phase: the caller asks again with the content
        return OutputVerdict("redact", reason, rule.id)
    if rule.match.has_content_criteria:
        findings = _content_findings(scan, rule, exhaustive=True)
    else:
        findings = [f for d in rule.redact_detectors for f in scan.detector(d)]
    if scan.truncated:
        return OutputVerdict(
            "quarantine",
            f"output rule {rule.id!r} would redact, but the output is larger than max_scan_bytes "
            f"({scan.policy.max_scan_bytes}): what was not scanned cannot be redacted; quarantined instead",
            rule.id,
            _listed(findings, scan),
        )
    full = scan.full_text()
    if full is None:
        return OutputVerdict(
            "quarantine",
            f"output rule {rule.id!r} would redact, but the output is not valid UTF-8 "
            "and cannot be redacted safely; quarantined instead",
            rule.id,
            _listed(findings, scan),
        )
    redacted = _redact(full, findings).encode("utf-8")
    return OutputVerdict("redact", reason, rule.id, _listed(findings, scan), redacted)


def evaluate_output(policy: OutputPolicy, facts: OutputFacts) -> OutputVerdict:
    """First matching enabled rule decides; no match allows (spec §4.7)."""
    if not policy.has_rules:
        return OutputVerdict("allow", "no output rules")
    scan = _Scan(policy, facts)
    for rule in policy.rules:
        if not rule.enabled:
            continue
        deferred = facts.content is None and (
            rule.match.has_content_criteria or (rule.match.has_size_criteria and _size_unknown(facts)))
        if not _metadata_matches(rule.match, facts, ignore_size=deferred):
            continue
        if deferred:
            # The metadata phase cannot tell whether this rule matches, and a later rule must not
            # decide in its place (first match wins): the content phase decides.
            return OutputVerdict("allow", f"output rule {rule.id!r} needs the content: checked in the content phase",
                                 rule.id, deferred=True)
        try:
            if rule.match.has_content_criteria:
                if not _content_findings(scan, rule, exhaustive=False):
                    continue
            return _decide(scan, rule)
        except _Timeout as exc:
            return _timeout_verdict(scan, rule, exc.label)
    return OutputVerdict("allow", "no output rule matched", findings=scan.info())
