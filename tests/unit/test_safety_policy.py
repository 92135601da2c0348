"""Pure safety-kernel core: policy parsing, evaluation, explain, proto mapping, decision cache."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest

from cordum.agent.v1 import job_pb2, safety_pb2
from cordum.safety.cache import DecisionCache, proto_request_key
from cordum.safety.evaluate import (
    CheckInput,
    DecisionKind,
    check_input_from_proto,
    decision_to_proto,
    evaluate,
    explain,
)
from cordum.safety.policy import PolicyError, compile_glob, parse_policy


def P(text: str, source: str = "<policy>"):
    return parse_policy(textwrap.dedent(text), source)


def one_rule(match: str, decision: str = "allow", extra: str = ""):
    return P(
        f"""\
        version: t
        rules:
          - id: r
            match: {match}
            decision: {decision}
        {extra}"""
    )


# --- policy parsing ----------------------------------------------------------------------------
POLICY = """\
version: "2024-06-01"
default_tenant: acme
rules:
  - id: deny-prod-delete
    match:
      topics: ["job.*.delete"]
      labels: {env: prod}
    decision: deny
    reason: no deletes in prod
    remediations:
      - id: use-staging
        title: Use staging
        add_labels: {env: staging}
        remove_labels: [force]
  - id: allow-read
    match: {topics: ["job.read.*"]}
    decision: allow_with_constraints
    reason: reads are fine
    constraints:
      budgets: {max_runtime_ms: 60000, max_retries: 2, max_artifact_bytes: 1024, max_concurrent_jobs: 3}
      sandbox: {isolated: true, network_allowlist: [api.example.com], fs_read_only: [/data], fs_read_write: [/tmp]}
      toolchain: {allowed_tools: [git], allowed_commands: [ls]}
      diff: {max_files: 5, max_lines: 100, deny_path_globs: ["*.key"]}
      redaction_level: strict
  - id: review-writes
    match: {topics: ["job.write.*"], risk_tags: [pii, finance]}
    decision: require_approval
  - id: throttle-bulk
    match: {capabilities: [bulk.export]}
    decision: throttle
    retry_after: 30
  - id: allow-all-jobs
    match: {topics: ["job.*"]}
    decision: allow
"""


def test_parse_full_policy():
    pol = parse_policy(POLICY, "safety.yaml")
    assert pol.version == "2024-06-01"
    assert pol.default_decision == "deny"
    assert pol.default_tenant == "acme"
    assert [r.id for r in pol.rules] == [
        "deny-prod-delete",
        "allow-read",
        "review-writes",
        "throttle-bulk",
        "allow-all-jobs",
    ]
    assert [r.line for r in pol.rules] == [4, 15, 25, 28, 32]
    assert pol.rules[1].constraints.budgets.max_runtime_ms == 60000
    assert pol.rules[2].decision == "require_approval"
    assert pol.rules[3].retry_after == 30.0
    assert pol.content_hash == hashlib.sha256(POLICY.encode()).hexdigest()
    assert pol.snapshot == f"2024-06-01:{pol.content_hash}"


def test_snapshot_without_version_is_hash():
    pol = P("rules: []\n")
    assert pol.snapshot == pol.content_hash


def test_hash_changes_with_text():
    a = parse_policy(POLICY)
    b = parse_policy(POLICY + "# comment\n")
    assert a.content_hash != b.content_hash
    assert a.snapshot != b.snapshot
    assert a.rules == b.rules


def test_empty_document_is_default_deny():
    pol = parse_policy("")
    assert pol.rules == ()
    assert evaluate(pol, CheckInput(topic="job.x")).kind == DecisionKind.DENY


@pytest.mark.parametrize("alias,canonical", [
    ("allow", "allow"), ("permit", "allow"), ("deny", "deny"), ("block", "deny"),
    ("require_approval", "require_approval"), ("require-approval", "require_approval"),
    ("require_human", "require_approval"), ("throttle", "throttle"),
    ("allow_with_constraints", "allow_with_constraints"), ("ALLOW", "allow"),
])
def test_decision_aliases(alias, canonical):
    assert one_rule("{}", alias).rules[0].decision == canonical


def test_flat_budget_shorthand():
    pol = P("""\
        rules:
          - id: r
            decision: allow
            constraints: {max_runtime_ms: 5, redaction_level: low}
        """)
    assert pol.rules[0].constraints.budgets.max_runtime_ms == 5
    assert pol.rules[0].constraints.redaction_level == "low"


@pytest.mark.parametrize("text,line,fragment", [
    ("rules:\n  - id: a\n    decision: alow\n", 3, "unknown decision 'alow'"),
    ("rules:\n  - match: {}\n    decision: allow\n", 2, "has no 'id'"),
    ("rules:\n  - id: a\n    decision: allow\n  - id: a\n    decision: deny\n", 4,
     "duplicate rule id 'a' (first defined on line 2)"),
    ("rules:\n  - id: a\n    decision: allow\n    match:\n      topic: [job.x]\n", 5,
     "unknown key 'topic'"),
    ("rules:\n  - id: a\n    decision: allow\n    match:\n      topics: job.x\n", 5,
     "must be a list"),
    ("rules:\n  - id: a\n    decision: allow\n    constraints:\n      budgets: {max_retries: many}\n", 5,
     "must be an integer"),
    ("version: 1\nrulez: []\n", 2, "unknown key 'rulez'"),
    ("rules: {a: 1}\n", 1, "rules must be a list"),
    ("rules:\n  - id: a\n", 2, "has no 'decision'"),
    ("default_decision: maybe\n", 1, "unknown default_decision"),
    ("rules:\n  - id: a\n    decision: allow\n    retry_after: 3\n", 4, "only applies to decision throttle"),
    ("rules:\n  - id: a\n    decision: allow\n    velocity: {max_requests: 3}\n", 4, "not supported"),
    ("rules:\n  - id: a\n    decision: allow\n    match: {mcp: {}}\n", 4, "not supported"),
    ("rules:\n  - id: a\n    decision: allow\n    match: {topics: ['job.[x']}\n", 4, "unterminated"),
    ("rules:\n  - id: a\n    decision: allow\n    match: {secrets_present: maybe}\n", 4, "true or false"),
    ("rules:\n  - id: a\n    id: b\n    decision: allow\n", 3, "duplicate key 'id'"),
    ("rules:\n  - id: a\n    decision: [allow\n", 4, "invalid YAML"),
    ("tier: global\n", 1, "not supported"),
])
def test_policy_errors_name_the_line(text, line, fragment):
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "safety.yaml")
    err = info.value
    assert err.line == line, str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"safety.yaml:{line}: ")


def test_verbatim_sections_are_kept():
    pol = P("""\
        input_rules:
          - id: x
            decision: deny
        rules: []
        """)
    assert dict(pol.extras)["input_rules"] == [{"id": "x", "decision": "deny"}]


# --- globs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern,value,ok", [
    ("job.*", "job.a", True),
    ("job.*", "job.a.b", True),  # '*' spans dots, only '/' stops it
    ("job.*", "job/a", False),
    ("job.?", "job.a", True),
    ("job.?", "job.ab", False),
    ("job.[ab]", "job.b", True),
    ("job.[^ab]", "job.b", False),
    ("job.[a-c]x", "job.bx", True),
    ("JOB.Read", "job.read", True),
    ("job.\\*", "job.*", True),
    ("job.\\*", "job.a", False),
    ("job.x", "job.xy", False),
])
def test_go_path_match(pattern, value, ok):
    assert compile_glob(pattern).matches(value) is ok


# --- evaluation --------------------------------------------------------------------------------
def test_first_match_wins():
    pol = parse_policy(POLICY)
    d = evaluate(pol, CheckInput(topic="job.read.delete", labels={"env": "prod"}))
    assert (d.kind, d.rule_id, d.reason) == (DecisionKind.DENY, "deny-prod-delete", "no deletes in prod")
    d = evaluate(pol, CheckInput(topic="job.read.delete", labels={"env": "dev"}))
    assert (d.kind, d.rule_id) == (DecisionKind.ALLOW_WITH_CONSTRAINTS, "allow-read")


def test_default_deny_and_allow():
    pol = one_rule("{topics: [job.a]}")
    d = evaluate(pol, CheckInput(topic="job.b"))
    assert (d.kind, d.reason, d.rule_id) == (DecisionKind.DENY, "no matching rule (default deny)", "")
    pol = P("default_decision: permit\nrules: [{id: r, match: {topics: [job.a]}, decision: deny}]\n")
    d = evaluate(pol, CheckInput(topic="job.b"))
    assert (d.kind, d.reason) == (DecisionKind.ALLOW, "no matching rule (default allow)")


@pytest.mark.parametrize("topic,reason", [("", "missing topic"), ("sys.job.submit", "unsupported topic")])
def test_topic_prechecks(topic, reason):
    pol = one_rule("{}")
    d = evaluate(pol, CheckInput(topic=topic))
    assert (d.kind, d.reason) == (DecisionKind.DENY, reason)


def test_no_policy_fails_closed():
    d = evaluate(None, CheckInput(topic="job.a"))
    assert d.kind == DecisionKind.DENY and "fail-closed" in d.reason


def test_match_topic_glob():
    pol = one_rule("{topics: ['job.code.*']}")
    assert evaluate(pol, CheckInput(topic="job.code.fix")).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.docs.fix")).kind == DecisionKind.DENY


def test_match_tenant_with_fallbacks():
    pol = one_rule("{tenants: [Acme]}")
    assert evaluate(pol, CheckInput(topic="job.a", tenant="ACME")).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", meta_tenant="acme")).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", tenant="other")).kind == DecisionKind.DENY
    # request tenant wins over meta tenant
    assert evaluate(pol, CheckInput(topic="job.a", tenant="other", meta_tenant="acme")).kind == DecisionKind.DENY
    with_default = P("default_tenant: acme\nrules: [{id: r, match: {tenants: [acme]}, decision: allow}]\n")
    assert evaluate(with_default, CheckInput(topic="job.a")).kind == DecisionKind.ALLOW
    dflt = one_rule("{tenants: [default]}")
    assert evaluate(dflt, CheckInput(topic="job.a")).kind == DecisionKind.ALLOW


def test_match_labels_exact_and_glob():
    pol = one_rule("{labels: {env: prod, region: 'eu-*'}}")
    ok = CheckInput(topic="job.a", labels={"env": "PROD", "region": "eu-west"})
    assert evaluate(pol, ok).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", labels={"env": "prod"})).kind == DecisionKind.DENY
    assert evaluate(pol, CheckInput(topic="job.a", labels={"env": "prod", "region": "us-1"})).kind == DecisionKind.DENY


def test_match_capability():
    pol = one_rule("{capabilities: [repo.write, repo.read]}")
    assert evaluate(pol, CheckInput(topic="job.a", capability="Repo.Read")).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", capability="repo.admin")).kind == DecisionKind.DENY
    assert evaluate(pol, CheckInput(topic="job.a")).kind == DecisionKind.DENY


def test_match_risk_tags_any_of():
    pol = one_rule("{risk_tags: [pii, finance]}")
    assert evaluate(pol, CheckInput(topic="job.a", risk_tags=("network", "PII"))).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", risk_tags=("network",))).kind == DecisionKind.DENY


def test_match_requires_all_of():
    pol = one_rule("{requires: [git, docker]}")
    assert evaluate(pol, CheckInput(topic="job.a", requires=("git", "docker", "x"))).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", requires=("git",))).kind == DecisionKind.DENY


def test_match_pack_actor():
    pol = one_rule("{pack_ids: [p1], actor_ids: [alice], actor_types: [human]}")
    ok = CheckInput(topic="job.a", pack_id="p1", actor_id="alice", actor_type="human")
    assert evaluate(pol, ok).kind == DecisionKind.ALLOW
    # principal stands in for a missing actor id
    assert evaluate(pol, CheckInput(topic="job.a", pack_id="p1", principal_id="Alice", actor_type="human")).kind == DecisionKind.ALLOW
    assert evaluate(pol, CheckInput(topic="job.a", pack_id="p1", actor_id="alice", actor_type="service")).kind == DecisionKind.DENY


def test_match_label_allowlist_and_threshold():
    pol = one_rule("{label_allowlist: {repo_host: [github.com]}}", "deny")
    assert evaluate(pol, CheckInput(topic="job.a", labels={"repo_host": "evil.com"})).rule_id == "r"
    assert evaluate(pol, CheckInput(topic="job.a", labels={"repo_host": "GitHub.com"})).rule_id == ""
    assert evaluate(pol, CheckInput(topic="job.a")).rule_id == ""
    pol = one_rule("{label_threshold: {amount: 100}}", "require_approval")
    assert evaluate(pol, CheckInput(topic="job.a", labels={"amount": "150.5"})).kind == DecisionKind.REQUIRE_HUMAN
    assert evaluate(pol, CheckInput(topic="job.a", labels={"amount": "100"})).rule_id == ""
    assert evaluate(pol, CheckInput(topic="job.a", labels={"amount": "lots"})).rule_id == ""


def test_match_secrets_present():
    pol = one_rule("{secrets_present: true}", "deny")
    assert evaluate(pol, CheckInput(topic="job.a", risk_tags=("secrets",))).rule_id == "r"
    assert evaluate(pol, CheckInput(topic="job.a", labels={"secrets_present": "yes"})).rule_id == "r"
    # an explicit label wins over the risk tag
    assert evaluate(pol, CheckInput(topic="job.a", risk_tags=("secrets",), labels={"secrets_present": "false"})).rule_id == ""


def test_empty_match_is_wildcard():
    pol = one_rule("{topics: [], tenants: []}")
    assert evaluate(pol, CheckInput(topic="job.anything")).kind == DecisionKind.ALLOW


@pytest.mark.parametrize("decision,kind,approval", [
    ("allow", DecisionKind.ALLOW, False),
    ("deny", DecisionKind.DENY, False),
    ("require_approval", DecisionKind.REQUIRE_HUMAN, True),
    ("throttle", DecisionKind.THROTTLE, False),
    ("allow_with_constraints", DecisionKind.ALLOW_WITH_CONSTRAINTS, False),
])
def test_each_decision_type(decision, kind, approval):
    d = evaluate(one_rule("{}", decision), CheckInput(topic="job.a"))
    assert d.kind == kind
    assert d.approval_required is approval
    assert d.reason == "matched rule r"


def test_allow_with_constraints_is_implied_by_constraints():
    pol = P("rules: [{id: r, decision: allow, constraints: {max_retries: 1}}]\n")
    d = evaluate(pol, CheckInput(topic="job.a"))
    assert d.kind == DecisionKind.ALLOW_WITH_CONSTRAINTS
    assert d.constraints.budgets.max_retries == 1


def test_throttle_retry_after():
    d = evaluate(parse_policy(POLICY), CheckInput(topic="job.x", capability="bulk.export"))
    assert (d.kind, d.rule_id, d.retry_after) == (DecisionKind.THROTTLE, "throttle-bulk", 30.0)


def test_effective_config_only_denies():
    pol = one_rule("{}")
    d = evaluate(pol, CheckInput(topic="job.a.b", denied_topics=("job.a.*",)))
    assert (d.kind, d.reason) == (DecisionKind.DENY, "topic denied by effective config")
    d = evaluate(pol, CheckInput(topic="job.a.b", allowed_topics=("job.c.*",)))
    assert (d.kind, d.reason) == (DecisionKind.DENY, "topic not allowed by effective config")
    assert evaluate(pol, CheckInput(topic="job.c.b", allowed_topics=("job.c.*",))).kind == DecisionKind.ALLOW
    deny = one_rule("{}", "deny")
    assert evaluate(deny, CheckInput(topic="job.c", allowed_topics=("job.c",))).kind == DecisionKind.DENY


def test_legacy_tenant_rules():
    pol = P("""\
        tenants:
          acme:
            allow_topics: ["job.*"]
            deny_topics: ["job.admin.*"]
        """)
    assert evaluate(pol, CheckInput(topic="job.admin.x", tenant="acme")).kind == DecisionKind.DENY
    assert evaluate(pol, CheckInput(topic="job.code", tenant="acme")).kind == DecisionKind.ALLOW
    d = evaluate(pol, CheckInput(topic="job.code", tenant="other"))
    assert d.reason == "no matching rule (default deny)"


def test_evaluate_is_deterministic():
    pol = parse_policy(POLICY)
    req = CheckInput(topic="job.write.x", risk_tags=("finance",))
    assert evaluate(pol, req) == evaluate(pol, req)


# --- explain -----------------------------------------------------------------------------------
def test_explain_traces_every_rule():
    pol = parse_policy(POLICY)
    ex = explain(pol, CheckInput(topic="job.read.delete", labels={"env": "dev"}))
    assert ex.decision == evaluate(pol, CheckInput(topic="job.read.delete", labels={"env": "dev"}))
    by_id = {t.rule_id: t for t in ex.rules}
    assert len(ex.rules) == 5
    first = by_id["deny-prod-delete"]
    assert not first.matched and "label env='dev'" in first.reasons[0]
    assert by_id["allow-read"].matched and by_id["allow-read"].selected
    assert by_id["allow-all-jobs"].matched and not by_id["allow-all-jobs"].selected
    assert len(by_id["review-writes"].reasons) == 2  # topic and risk tags both reported
    assert by_id["allow-read"].line == 15


def test_explain_precheck_and_default():
    assert explain(one_rule("{}"), CheckInput(topic="")).rules == ()
    ex = explain(one_rule("{topics: [job.a]}"), CheckInput(topic="job.b", tenant="T"))
    assert ex.decision.reason == "no matching rule (default deny)"
    assert ex.tenant == "t"
    assert ex.rules[0].reasons == ("topic 'job.b' not in ['job.a']",)


# --- proto conversion --------------------------------------------------------------------------
def _request(**over) -> safety_pb2.PolicyCheckRequest:
    req = safety_pb2.PolicyCheckRequest(
        job_id="j-1",
        topic="job.write.ledger",
        tenant="acme",
        priority=job_pb2.JobPriority.Value(job_pb2.JobPriority.keys()[1]),
        estimated_cost=1.5,
        principal_id="svc-1",
        labels={"env": "prod", "shared": "req"},
        memory_id="mem-1",
        effective_config=json.dumps({"safety": {"denied_topics": ["job.x.*"], "allowed_topics": []}}).encode(),
        meta=job_pb2.JobMetadata(
            tenant_id="acme-meta",
            actor_id="alice",
            actor_type=job_pb2.ACTOR_TYPE_HUMAN,
            capability="ledger.write",
            risk_tags=["finance"],
            requires=["git"],
            pack_id="pack-1",
            labels={"shared": "meta", "meta_only": "1"},
        ),
        input_content=b"hello",
    )
    for k, v in over.items():
        setattr(req, k, v)
    return req


def test_check_input_from_proto():
    ci = check_input_from_proto(_request())
    assert ci.job_id == "j-1"
    assert ci.topic == "job.write.ledger"
    assert (ci.tenant, ci.meta_tenant) == ("acme", "acme-meta")
    assert ci.label_map == {"env": "prod", "shared": "req", "meta_only": "1"}
    assert (ci.capability, ci.risk_tags, ci.requires) == ("ledger.write", ("finance",), ("git",))
    assert (ci.principal_id, ci.actor_id, ci.actor_type, ci.pack_id) == ("svc-1", "alice", "human", "pack-1")
    assert ci.estimated_cost == 1.5 and ci.memory_id == "mem-1"
    assert ci.denied_topics == ("job.x.*",) and ci.allowed_topics == ()
    # survives a wire round trip unchanged
    wire = safety_pb2.PolicyCheckRequest.FromString(_request().SerializeToString())
    assert check_input_from_proto(wire) == ci
    d = evaluate(parse_policy(POLICY), ci)
    assert (d.kind, d.rule_id) == (DecisionKind.REQUIRE_HUMAN, "review-writes")


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1]", b'{"safety": 3}', b'{"safety": {"denied_topics": "x"}}'])
def test_malformed_effective_config_is_ignored(raw):
    ci = check_input_from_proto(_request(effective_config=raw))
    assert ci.denied_topics == () and ci.allowed_topics == ()


def test_decision_to_proto_constraints():
    pol = parse_policy(POLICY)
    d = evaluate(pol, CheckInput(topic="job.read.x"))
    resp = decision_to_proto(d, pol, job_id="j-9")
    assert resp.decision == safety_pb2.DECISION_TYPE_ALLOW_WITH_CONSTRAINTS
    assert (resp.reason, resp.rule_id) == ("reads are fine", "allow-read")
    assert resp.policy_snapshot == pol.snapshot
    assert not resp.approval_required and resp.approval_ref == ""
    c = resp.constraints
    assert (c.budgets.max_runtime_ms, c.budgets.max_retries) == (60000, 2)
    assert (c.budgets.max_artifact_bytes, c.budgets.max_concurrent_jobs) == (1024, 3)
    assert c.sandbox.isolated and list(c.sandbox.network_allowlist) == ["api.example.com"]
    assert list(c.sandbox.fs_read_only) == ["/data"] and list(c.sandbox.fs_read_write) == ["/tmp"]
    assert list(c.toolchain.allowed_tools) == ["git"] and list(c.toolchain.allowed_commands) == ["ls"]
    assert (c.diff.max_files, c.diff.max_lines, list(c.diff.deny_path_globs)) == (5, 100, ["*.key"])
    assert c.redaction_level == "strict"


def test_decision_to_proto_approval_and_remediations():
    pol = parse_policy(POLICY)
    d = evaluate(pol, CheckInput(topic="job.write.x", risk_tags=("pii",)))
    resp = decision_to_proto(d, pol, job_id="j-2")
    assert resp.decision == safety_pb2.DECISION_TYPE_REQUIRE_HUMAN
    assert resp.approval_required and resp.approval_ref == "j-2"
    assert not resp.HasField("constraints")
    d = evaluate(pol, CheckInput(topic="job.db.delete", labels={"env": "prod"}))
    resp = decision_to_proto(d, pol)
    assert resp.decision == safety_pb2.DECISION_TYPE_DENY
    (rem,) = resp.remediations
    assert (rem.id, rem.title, dict(rem.add_labels), list(rem.remove_labels)) == (
        "use-staging", "Use staging", {"env": "staging"}, ["force"])


def test_decision_to_proto_default_and_no_policy():
    resp = decision_to_proto(evaluate(None, CheckInput(topic="job.a")), None)
    assert resp.decision == safety_pb2.DECISION_TYPE_DENY and resp.policy_snapshot == ""
    resp = decision_to_proto(evaluate(parse_policy(""), CheckInput(topic="job.a")), None, snapshot="s|cfg:x")
    assert resp.policy_snapshot == "s|cfg:x" and resp.rule_id == ""


# --- decision cache ----------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_cache_disabled_when_ttl_zero():
    cache = DecisionCache(0, clock=FakeClock())
    assert not cache.enabled
    cache.put("s", "k", "v")
    assert cache.get("s", "k") is None and len(cache) == 0


def test_cache_ttl_expiry():
    clock = FakeClock()
    cache = DecisionCache(5, clock=clock)
    cache.put("s", "k", "v")
    clock.now += 4.9
    assert cache.get("s", "k") == "v"
    clock.now += 0.1
    assert cache.get("s", "k") is None
    assert len(cache) == 0  # expired entry deleted on lookup
    assert (cache.hits, cache.misses) == (1, 1)


def test_cache_lru_eviction():
    clock = FakeClock()
    cache = DecisionCache(60, max_size=2, clock=clock)
    cache.put("s", "a", 1)
    cache.put("s", "b", 2)
    assert cache.get("s", "a") == 1  # a is now most recent
    cache.put("s", "c", 3)
    assert cache.get("s", "b") is None
    assert (cache.get("s", "a"), cache.get("s", "c")) == (1, 3)
    assert len(cache) == 2


def test_cache_eviction_drops_expired_first():
    clock = FakeClock()
    cache = DecisionCache(10, max_size=2, clock=clock)
    cache.put("s", "old", 1)
    clock.now += 5
    cache.put("s", "b", 2)
    cache.get("s", "old")  # old is most recently used ...
    clock.now += 6  # ... but expired now
    cache.put("s", "c", 3)
    assert cache.get("s", "b") == 2 and cache.get("s", "c") == 3


def test_cache_non_positive_max_size_ignored():
    assert DecisionCache(1, max_size=0).max_size == 10_000


def test_cache_versioned_invalidation():
    cache = DecisionCache(60, clock=FakeClock())
    cache.put("v1:aaa", "k", "old")
    assert cache.get("v2:bbb", "k") is None  # another policy version never sees it
    cache.put("v2:bbb", "k2", "new")
    cache.on_policy_swap("v2:bbb")
    assert cache.get("v1:aaa", "k") is None
    assert cache.get("v2:bbb", "k2") == "new"
    assert len(cache) == 1
    cache.clear()
    assert len(cache) == 0


def test_cache_keys_ignore_job_id():
    a, b = _request(), _request(job_id="j-other")
    assert proto_request_key(a) == proto_request_key(b)
    assert proto_request_key(a) != proto_request_key(_request(topic="job.other"))
    assert a.job_id == "j-1"  # the caller's message is untouched
    ca, cb = check_input_from_proto(a), check_input_from_proto(b)
    assert ca.canonical_key() == cb.canonical_key()
    assert ca.canonical_key() != check_input_from_proto(_request(tenant="t2")).canonical_key()


def test_cache_with_real_decisions():
    pol = parse_policy(POLICY)
    cache: DecisionCache = DecisionCache(30, clock=FakeClock())
    req = _request()
    key = proto_request_key(req)
    assert cache.get(pol.snapshot, key) is None
    decision = evaluate(pol, check_input_from_proto(req))
    cache.put(pol.snapshot, key, decision)
    hit = cache.get(pol.snapshot, proto_request_key(_request(job_id="j-2")))
    assert hit == decision
    assert decision_to_proto(hit, pol, job_id="j-2").approval_ref == "j-2"
