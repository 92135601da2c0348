"""Pure input-policy evaluation (spec §4.2 steps 3-8, 10) plus proto conversion.

``evaluate(policy, request)`` is deterministic and does no I/O; the gRPC service wraps it with
snapshot handling and the decision cache.  Content scanning (input rules, step 9), velocity rules
and MCP filters are later stages and are rejected by the policy parser instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from cordum.agent.v1 import safety_pb2
from cordum.safety.policy import Constraints, Glob, Policy, Remediation, Rule, compile_glob

__all__ = [
    "CheckInput",
    "Decision",
    "DecisionKind",
    "Explanation",
    "RuleTrace",
    "check_input_from_proto",
    "decision_to_proto",
    "evaluate",
    "explain",
]

DEFAULT_TENANT = "default"
_TRUE = frozenset({"true", "1", "yes"})
_ACTOR_TYPES = {0: "", 1: "human", 2: "service"}


class DecisionKind(enum.IntEnum):
    """Values equal the proto ``DecisionType`` numbers."""

    ALLOW = safety_pb2.DECISION_TYPE_ALLOW
    DENY = safety_pb2.DECISION_TYPE_DENY
    REQUIRE_HUMAN = safety_pb2.DECISION_TYPE_REQUIRE_HUMAN
    THROTTLE = safety_pb2.DECISION_TYPE_THROTTLE
    ALLOW_WITH_CONSTRAINTS = safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@dataclass(frozen=True)
class CheckInput:
    """What a policy check looks at. Mappings passed in are frozen into sorted pairs."""

    topic: str
    job_id: str = ""
    tenant: str = ""  # request tenant, falls back to meta_tenant, policy default, "default"
    meta_tenant: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    capability: str = ""
    risk_tags: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    principal_id: str = ""
    actor_id: str = ""
    actor_type: str = ""  # "human" | "service" | ""
    pack_id: str = ""
    priority: int = 0
    estimated_cost: float = 0.0
    memory_id: str = ""
    #: effective-config restrictions (``safety.denied_topics`` / ``safety.allowed_topics``)
    denied_topics: tuple[str, ...] = ()
    allowed_topics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", _pairs(self.labels))
        object.__setattr__(self, "risk_tags", tuple(self.risk_tags))
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "denied_topics", tuple(self.denied_topics))
        object.__setattr__(self, "allowed_topics", tuple(self.allowed_topics))

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def canonical_key(self) -> str:
        """Deterministic text of everything but ``job_id`` (decision-cache key, §4.6)."""
        data = {k: v for k, v in self.__dict__.items() if k != "job_id"}
        return json.dumps(data, sort_keys=True, separators=(",", ":"), default=list)


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str
    rule_id: str = ""
    constraints: Constraints | None = None
    remediations: tuple[Remediation, ...] = ()
    approval_required: bool = False
    retry_after: float | None = None  # seconds; THROTTLE only (not carried by the proto)


@dataclass(frozen=True)
class RuleTrace:
    rule_id: str
    matched: bool
    selected: bool  # the first matching rule, i.e. the one that decided
    reasons: tuple[str, ...]  # why it did not match (empty when matched)
    line: int = 0


@dataclass(frozen=True)
class Explanation:
    decision: Decision
    tenant: str
    rules: tuple[RuleTrace, ...] = field(default=())


# --- matching ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Ctx:
    tenant: str
    topic: str
    labels: dict[str, str]
    folded_labels: dict[str, str]
    capability: str
    risk_tags: frozenset[str]
    requires: frozenset[str]
    pack_id: str
    actor_id: str
    actor_type: str
    secrets_present: bool


def _context(policy: Policy | None, req: CheckInput) -> _Ctx:
    tenant = req.tenant or req.meta_tenant or (policy.default_tenant if policy else "") or DEFAULT_TENANT
    labels = req.label_map
    risk = frozenset(t.casefold() for t in req.risk_tags)
    flag = labels.get("secrets_present")
    secrets = flag.strip().lower() in _TRUE if flag else "secrets" in risk
    return _Ctx(
        tenant=tenant.casefold(),
        topic=req.topic,
        labels=labels,
        folded_labels={k: v.casefold() for k, v in labels.items()},
        capability=req.capability.casefold(),
        risk_tags=risk,
        requires=frozenset(r.casefold() for r in req.requires),
        pack_id=req.pack_id.casefold(),
        actor_id=(req.actor_id or req.principal_id).casefold(),
        actor_type=req.actor_type.casefold(),
        secrets_present=secrets,
    )


def _mismatches(rule: Rule, c: _Ctx, *, first_only: bool) -> list[str]:
    """Reasons the rule does not match (empty list = match)."""
    m = rule.match
    out: list[str] = []

    def fail(reason: str) -> bool:
        out.append(reason)
        return first_only

    if m.topics and not any(g.matches(c.topic) for g in m.topics):
        if fail(f"topic {c.topic!r} not in {[g.pattern for g in m.topics]}"):
            return out
    if m.tenants and c.tenant not in m.tenants:
        if fail(f"tenant {c.tenant!r} not in {list(m.tenants)}"):
            return out
    if m.capabilities and c.capability not in m.capabilities:
        if fail(f"capability {c.capability!r} not in {list(m.capabilities)}"):
            return out
    if m.risk_tags and not c.risk_tags.intersection(m.risk_tags):
        if fail(f"none of risk tags {list(m.risk_tags)} present"):
            return out
    if m.requires:
        missing = [r for r in m.requires if r not in c.requires]
        if missing and fail(f"requires {missing} not present"):
            return out
    if m.pack_ids and c.pack_id not in m.pack_ids:
        if fail(f"pack {c.pack_id!r} not in {list(m.pack_ids)}"):
            return out
    if m.actor_ids and c.actor_id not in m.actor_ids:
        if fail(f"actor {c.actor_id!r} not in {list(m.actor_ids)}"):
            return out
    if m.actor_types and c.actor_type not in m.actor_types:
        if fail(f"actor type {c.actor_type!r} not in {list(m.actor_types)}"):
            return out
    for key, glob in m.labels:
        value = c.labels.get(key)
        if value is None or not glob.matches(value):
            if fail(f"label {key}={value!r} does not match {glob.pattern!r}"):
                return out
    if m.label_allowlist:
        fired = any(
            key in c.folded_labels and c.folded_labels[key] not in allowed
            for key, allowed in m.label_allowlist
        )
        if not fired and fail("every allowlisted label is absent or allowed"):
            return out
    if m.label_threshold:
        fired = any(_exceeds(c.labels.get(key), limit) for key, limit in m.label_threshold)
        if not fired and fail("no label exceeds its threshold"):
            return out
    if m.secrets_present is not None and m.secrets_present != c.secrets_present:
        if fail(f"secrets_present is {str(c.secrets_present).lower()}"):
            return out
    return out


def _exceeds(value: str | None, limit: float) -> bool:
    if value is None:
        return False
    try:
        return float(value) > limit
    except ValueError:
        return False


# --- evaluation --------------------------------------------------------------------------------
def _deny(reason: str, rule_id: str = "") -> Decision:
    return Decision(DecisionKind.DENY, reason, rule_id)


def _from_rule(rule: Rule) -> Decision:
    reason = rule.reason or f"matched rule {rule.id}"
    if rule.decision == "deny":
        return Decision(DecisionKind.DENY, reason, rule.id, remediations=rule.remediations)
    if rule.decision == "require_approval":
        return Decision(
            DecisionKind.REQUIRE_HUMAN,
            reason,
            rule.id,
            constraints=rule.constraints,
            remediations=rule.remediations,
            approval_required=True,
        )
    if rule.decision == "throttle":
        return Decision(
            DecisionKind.THROTTLE, reason, rule.id, remediations=rule.remediations, retry_after=rule.retry_after
        )
    kind = (
        DecisionKind.ALLOW_WITH_CONSTRAINTS
        if rule.decision == "allow_with_constraints" or rule.constraints is not None
        else DecisionKind.ALLOW
    )
    return Decision(kind, reason, rule.id, constraints=rule.constraints, remediations=rule.remediations)


def _precheck(policy: Policy | None, req: CheckInput) -> Decision | None:
    if policy is None:
        return _deny("no policy loaded — fail-closed")
    if not req.topic:
        return _deny("missing topic")
    if not req.topic.startswith("job."):
        return _deny("unsupported topic")
    return None


def _effective_config(decision: Decision, req: CheckInput) -> Decision:
    """§4.2 step 8: effective-config restrictions can only turn the result into DENY."""
    if decision.kind == DecisionKind.DENY:
        return decision
    globs = _globs(req.denied_topics)
    if any(g.matches(req.topic) for g in globs):
        return _deny("topic denied by effective config", decision.rule_id)
    if req.allowed_topics:
        allowed = _globs(req.allowed_topics)
        if not any(g.matches(req.topic) for g in allowed):
            return _deny("topic not allowed by effective config", decision.rule_id)
    return decision


def _globs(patterns: tuple[str, ...]) -> list[Glob]:
    out = []
    for p in patterns:
        try:
            out.append(compile_glob(p))
        except ValueError:
            continue  # Go path.Match: a bad pattern never matches
    return out


NO_MATCH = "no matching rule"  # how a default decision's reason begins (counted by the kernel)


def _default(policy: Policy) -> Decision:
    if policy.default_decision == "allow":
        return Decision(DecisionKind.ALLOW, f"{NO_MATCH} (default allow)")
    return _deny(f"{NO_MATCH} (default deny)")


def evaluate(policy: Policy | None, request: CheckInput) -> Decision:
    """First matching rule wins; no match → the policy default (deny unless stated)."""
    pre = _precheck(policy, request)
    if pre is not None:
        return pre
    assert policy is not None
    ctx = _context(policy, request)
    for rule in policy.rules:
        if not _mismatches(rule, ctx, first_only=True):
            return _tenant_limits(_effective_config(_from_rule(rule), request), policy, ctx.tenant)
    return _tenant_limits(_effective_config(_default(policy), request), policy, ctx.tenant)


def _tenant_limits(decision: Decision, policy: Policy, tenant: str) -> Decision:
    """`tenants.<t>.max_concurrent_jobs` rides along as the budget constraint of every decision
    that lets a job of that tenant in (unless the rule set one itself): the gateway refuses a
    submit (429) while the tenant has that many unfinished jobs."""
    if decision.kind in (DecisionKind.DENY, DecisionKind.THROTTLE):
        return decision
    limit = next((t.max_concurrent_jobs for t in policy.tenants if t.name == tenant), 0)
    current = decision.constraints or Constraints()
    if limit <= 0 or current.budgets.max_concurrent_jobs > 0:
        return decision
    budgets = dataclasses.replace(current.budgets, max_concurrent_jobs=limit)
    return dataclasses.replace(decision, constraints=dataclasses.replace(current, budgets=budgets))


def explain(policy: Policy | None, request: CheckInput) -> Explanation:
    """The decision plus, for every rule, whether and why it matched (Explain RPC)."""
    pre = _precheck(policy, request)
    if pre is not None:
        tenant = request.tenant or request.meta_tenant or DEFAULT_TENANT
        return Explanation(pre, tenant.casefold())
    assert policy is not None
    ctx = _context(policy, request)
    traces: list[RuleTrace] = []
    chosen: Rule | None = None
    for rule in policy.rules:
        reasons = _mismatches(rule, ctx, first_only=False)
        selected = not reasons and chosen is None
        if selected:
            chosen = rule
        traces.append(RuleTrace(rule.id, not reasons, selected, tuple(reasons), rule.line))
    decision = _from_rule(chosen) if chosen is not None else _default(policy)
    return Explanation(_tenant_limits(_effective_config(decision, request), policy, ctx.tenant), ctx.tenant,
                       tuple(traces))


# --- proto conversion --------------------------------------------------------------------------
def _effective_safety(raw: bytes) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Pull ``safety.denied_topics`` / ``safety.allowed_topics`` out of the config JSON.

    Malformed config is ignored (it was merged and validated upstream by the config service).
    """
    if not raw:
        return (), ()
    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return (), ()
    safety = doc.get("safety") if isinstance(doc, dict) else None
    if not isinstance(safety, dict):
        return (), ()

    def strs(key: str) -> tuple[str, ...]:
        v = safety.get(key)
        return tuple(x for x in v if isinstance(x, str)) if isinstance(v, list) else ()

    return strs("denied_topics"), strs("allowed_topics")


def check_input_from_proto(req: safety_pb2.PolicyCheckRequest) -> CheckInput:
    """Build a :class:`CheckInput`; request labels override ``meta.labels`` on conflict."""
    meta = req.meta
    labels = dict(meta.labels)
    labels.update(req.labels)
    denied, allowed = _effective_safety(req.effective_config)
    return CheckInput(
        topic=req.topic,
        job_id=req.job_id,
        tenant=req.tenant,
        meta_tenant=meta.tenant_id,
        labels=labels,
        capability=meta.capability,
        risk_tags=tuple(meta.risk_tags),
        requires=tuple(meta.requires),
        principal_id=req.principal_id,
        actor_id=meta.actor_id,
        actor_type=_ACTOR_TYPES.get(meta.actor_type, ""),
        pack_id=meta.pack_id,
        priority=int(req.priority),
        estimated_cost=req.estimated_cost,
        memory_id=req.memory_id,
        denied_topics=denied,
        allowed_topics=allowed,
    )


def _constraints_to_proto(c: Constraints) -> safety_pb2.PolicyConstraints:
    msg = safety_pb2.PolicyConstraints(redaction_level=c.redaction_level)
    b = c.budgets
    msg.budgets.max_runtime_ms = b.max_runtime_ms
    msg.budgets.max_retries = b.max_retries
    msg.budgets.max_artifact_bytes = b.max_artifact_bytes
    msg.budgets.max_concurrent_jobs = b.max_concurrent_jobs
    s = c.sandbox
    msg.sandbox.isolated = s.isolated
    msg.sandbox.network_allowlist.extend(s.network_allowlist)
    msg.sandbox.fs_read_only.extend(s.fs_read_only)
    msg.sandbox.fs_read_write.extend(s.fs_read_write)
    msg.toolchain.allowed_tools.extend(c.toolchain.allowed_tools)
    msg.toolchain.allowed_commands.extend(c.toolchain.allowed_commands)
    msg.diff.max_files = c.diff.max_files
    msg.diff.max_lines = c.diff.max_lines
    msg.diff.deny_path_globs.extend(c.diff.deny_path_globs)
    return msg


def decision_to_proto(
    decision: Decision, policy: Policy | None, *, job_id: str = "", snapshot: str | None = None
) -> safety_pb2.PolicyCheckResponse:
    """``policy_snapshot`` defaults to ``policy.snapshot``; ``approval_ref`` = job_id if approval."""
    resp = safety_pb2.PolicyCheckResponse(
        decision=int(decision.kind),
        reason=decision.reason,
        rule_id=decision.rule_id,
        policy_snapshot=snapshot if snapshot is not None else (policy.snapshot if policy else ""),
        approval_required=decision.approval_required or decision.kind == DecisionKind.REQUIRE_HUMAN,
    )
    if resp.approval_required:
        resp.approval_ref = job_id
    if decision.constraints is not None:
        resp.constraints.CopyFrom(_constraints_to_proto(decision.constraints))
    for r in decision.remediations:
        resp.remediations.add(
            id=r.id,
            title=r.title,
            summary=r.summary,
            replacement_topic=r.replacement_topic,
            replacement_capability=r.replacement_capability,
            add_labels=dict(r.add_labels),
            remove_labels=list(r.remove_labels),
        )
    return resp
