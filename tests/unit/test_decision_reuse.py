"""Which stored submit-time decisions the scheduler may dispatch under (cordum/scheduler/reuse.py)."""

from __future__ import annotations

import json

from cordum.agent.v1 import safety_pb2
from cordum.safety.client import Verdict
from cordum.scheduler.reuse import stored_decision

NOW = "v2:abc|cfg:123"


def _meta(**fields) -> dict:
    return {"safety_decision": "ALLOW", "safety_snapshot": NOW, "safety_rule_id": "allow-default",
            "safety_reason": "fine", **fields}


def test_an_allow_made_under_the_newest_policy_is_reused_as_stored() -> None:
    decision = stored_decision(_meta(), NOW)
    assert decision is not None
    assert (decision.verdict, decision.reason, decision.rule_id, decision.snapshot) == (
        Verdict.ALLOW, "fine", "allow-default", NOW)
    assert decision.response.decision == safety_pb2.DECISION_TYPE_ALLOW


def test_a_decision_of_another_policy_or_of_none_is_checked_again() -> None:
    assert stored_decision(_meta(), "v3:def|cfg:123") is None  # the policy changed since submit
    assert stored_decision(_meta(), None) is None  # no snapshot known
    assert stored_decision(_meta(safety_snapshot=""), "") is None  # a fail-open admission stores none
    assert stored_decision({}, NOW) is None  # published straight to the bus: nothing stored


def test_only_allows_are_reused() -> None:
    for verdict in ("DENY", "REQUIRE_APPROVAL", "THROTTLE", "UNAVAILABLE", "", "allow"):
        assert stored_decision(_meta(safety_decision=verdict), NOW) is None, verdict
    assert stored_decision(_meta(safety_approval_required="true"), NOW) is None


def test_stored_constraints_come_back_with_the_decision_and_bad_ones_are_checked_again() -> None:
    constraints = json.dumps({"budgets": {"maxRetries": 2}})
    decision = stored_decision(_meta(safety_decision="ALLOW_WITH_CONSTRAINTS", safety_constraints=constraints), NOW)
    assert decision is not None and decision.verdict is Verdict.ALLOW_WITH_CONSTRAINTS
    assert decision.response.constraints.budgets.max_retries == 2
    as_dict = stored_decision(_meta(safety_constraints={"budgets": {"maxRetries": 3}}), NOW)
    assert as_dict is not None and as_dict.response.constraints.budgets.max_retries == 3
    assert stored_decision(_meta(safety_constraints="{not json"), NOW) is None
    assert stored_decision(_meta(safety_constraints=json.dumps({"no_such_field": 1})), NOW) is None
