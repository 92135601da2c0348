"""The pure half of the chaos run (`scripts/chaos`, `cordum.dev.chaos`): the fault plan drawn from a
seeded RNG, the job mix, and the verdict from what a run observed. No I/O: unit-tested without
servers (tests/unit/test_chaos_core.py), as `gate_checks` is for the HA gate.

The verdict, per job whose submit was answered with its id:

    lost          unknown to the store, or not terminal
    duplicated    executed more than once (the workers' ECHO_EXECUTIONS_KEY hash)
    wrong_state   terminal in another state than expected (SUCCEEDED; FAILED for `fail: true`;
                  DENIED for a submit the gateway denied because the policy check was unavailable),
                  or SUCCEEDED without an execution
    dlq_mismatch  its DLQ entry missing (it ended FAILED, TIMEOUT or DENIED) or there though it
                  SUCCEEDED; and every DLQ entry that is no job of the run
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

FAULT_KINDS = ("kill", "term", "pause", "redis", "nats")
PROCESS_FAULTS = ("kill", "term", "pause")
TARGETS = ("scheduler", "api-gateway", "worker", "safety-kernel")
ALIASES = {"gateway": "api-gateway", "kernel": "safety-kernel", "sigkill": "kill", "sigterm": "term",
           "sigstop": "pause", "stop": "pause"}
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT", "DENIED"})
DLQ_STATES = frozenset({"FAILED", "TIMEOUT", "DENIED"})  # a job ending so has a DLQ entry

# Job kinds of the load, with their weights and the state each must end in.
JOB_WEIGHTS = (("plain", 50), ("slow", 25), ("retry", 17), ("fail", 8))
EXPECTED = {"plain": "SUCCEEDED", "slow": "SUCCEEDED", "retry": "SUCCEEDED", "probe": "SUCCEEDED",
            "fail": "FAILED", "denied": "DENIED"}


@dataclass(frozen=True)
class Fault:
    round: int  # 1-based
    kind: str  # one of FAULT_KINDS
    target: str  # a replica kind of TARGETS, or "redis" / "nats"
    index: int = 0  # 1-based replica (worker slot) of that kind; 0 for redis / nats

    @property
    def replica(self) -> str:
        return self.target if self.index == 0 else f"{self.target}-{self.index}"

    @property
    def label(self) -> str:
        return f"restart {self.target}" if self.kind in ("redis", "nats") else f"{self.kind} {self.replica}"


def parse_list(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """`a,b,c` → the named items (aliases resolved, duplicates dropped); ValueError names a bad one."""
    items: list[str] = []
    for raw in text.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in allowed:
            raise ValueError(f"unknown {what} {raw.strip()!r} (choose from {', '.join(allowed)})")
        if name not in items:
            items.append(name)
    if not items:
        raise ValueError(f"no {what} given")
    return tuple(items)


def plan_faults(seed: int, rounds: int, kinds: Sequence[str] = FAULT_KINDS, targets: Sequence[str] = TARGETS,
                *, replicas: int = 2, workers: int = 2) -> list[Fault]:
    """The faults of `rounds` rounds, from an RNG seeded with `seed`: a kind drawn uniformly from
    `kinds`; for a process fault, a target kind from `targets` and one of its replicas."""
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    unknown = [k for k in kinds if k not in FAULT_KINDS] + [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown fault kinds or targets: {unknown}")
    counts = {t: (workers if t == "worker" else replicas) for t in targets}
    usable = [t for t in targets if counts[t] > 0]
    if any(k in PROCESS_FAULTS for k in kinds) and not usable:
        raise ValueError("process faults need at least one target with replicas")
    rng = random.Random(f"faults:{seed}")
    plan: list[Fault] = []
    for n in range(1, rounds + 1):
        kind = rng.choice(list(kinds))
        if kind in PROCESS_FAULTS:
            target = rng.choice(usable)
            plan.append(Fault(n, kind, target, rng.randint(1, counts[target])))
        else:
            plan.append(Fault(n, kind, kind))
    return plan


@dataclass(frozen=True)
class JobSpec:
    kind: str  # plain | slow | retry | fail | probe
    context: Mapping[str, Any]

    @property
    def expected(self) -> str:
        return EXPECTED[self.kind]


PROBE = JobSpec("probe", {})


def job_spec(rng: random.Random) -> JobSpec:
    """One job of the load's mix."""
    kind = rng.choices([k for k, _ in JOB_WEIGHTS], weights=[w for _, w in JOB_WEIGHTS])[0]
    if kind == "slow":
        return JobSpec(kind, {"sleep_ms": rng.randint(500, 3000)})
    if kind == "retry":
        return JobSpec(kind, {"fail_attempts": 1})
    if kind == "fail":
        return JobSpec(kind, {"fail": True, "error": "chaos: permanent failure"})
    return JobSpec(kind, {})


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in (0, 100]); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Facts:
    """What a run observed; `judge` turns it into the verdict."""

    jobs: dict[str, str] = field(default_factory=dict)  # job id -> kind (EXPECTED's keys)
    states: dict[str, str | None] = field(default_factory=dict)  # last state read; None: unknown to the store
    executions: dict[str, int] = field(default_factory=dict)  # ECHO_EXECUTIONS_KEY: job id -> runs
    dlq: set[str] = field(default_factory=set)  # job ids with a DLQ entry
    faults: list[Fault] = field(default_factory=list)  # faults injected (in order)
    recoveries: list[float | None] = field(default_factory=list)  # per round; None: not recovered
    unconfirmed: int = 0  # submits never answered with a job id (not counted as jobs)
    errors: list[str] = field(default_factory=list)  # what the run could not do as planned
    starts: int = 0  # handler starts in all (informational)
    seed: int | None = None
    state_dir: str = ""


@dataclass(frozen=True)
class Summary:
    rounds: int
    faults: dict[str, int]
    jobs: int
    by_kind: dict[str, int]
    lost: int
    duplicated: int
    wrong_state: int
    dlq_mismatch: int
    p99_recovery_s: float | None
    unrecovered: int
    unconfirmed: int
    errors: list[str]
    examples: dict[str, list[str]]
    recoveries_s: list[float | None]
    starts: int = 0
    seed: int | None = None
    state_dir: str = ""

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong_state or self.dlq_mismatch)

    @property
    def exit_code(self) -> int:
        return 1 if not self.ok else 2 if self.errors else 0

    def line(self) -> str:
        faults = ",".join(f"{k}:{v}" for k, v in sorted(self.faults.items())) or "none"
        p99 = "n/a" if self.p99_recovery_s is None else f"{self.p99_recovery_s:.1f}"
        verdict = "PASS" if self.ok else "FAIL"
        if self.ok and self.errors:
            verdict = "INCOMPLETE"
        return (f"chaos: {verdict} rounds={self.rounds} faults={faults} jobs={self.jobs} lost={self.lost} "
                f"duplicated={self.duplicated} wrong_state={self.wrong_state} dlq_mismatch={self.dlq_mismatch} "
                f"p99_recovery_s={p99} unrecovered={self.unrecovered} unconfirmed={self.unconfirmed} "
                f"errors={len(self.errors)} seed={self.seed}")

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "rounds": self.rounds, "faults": self.faults, "jobs": self.jobs,
                "by_kind": self.by_kind, "lost": self.lost, "duplicated": self.duplicated,
                "wrong_state": self.wrong_state, "dlq_mismatch": self.dlq_mismatch,
                "p99_recovery_s": self.p99_recovery_s, "recoveries_s": self.recoveries_s,
                "unrecovered": self.unrecovered, "unconfirmed": self.unconfirmed, "errors": self.errors,
                "examples": self.examples, "handler_starts": self.starts, "seed": self.seed,
                "state_dir": self.state_dir}


def judge(facts: Facts, *, max_examples: int = 5) -> Summary:
    """The verdict: lost, duplicated, wrong_state and dlq_mismatch counted per job (see the module doc)."""
    found: dict[str, list[str]] = {"lost": [], "duplicated": [], "wrong_state": [], "dlq_mismatch": []}
    for job_id, kind in facts.jobs.items():
        state = facts.states.get(job_id)
        runs = facts.executions.get(job_id, 0)
        expected = EXPECTED[kind]
        if runs > 1:
            found["duplicated"].append(f"{job_id} ({kind}) executed {runs} times")
        if state not in TERMINAL:
            found["lost"].append(f"{job_id} ({kind}) {'unknown to the store' if state is None else state}")
            continue  # no final state to compare, nor a DLQ entry to expect
        if state != expected:
            found["wrong_state"].append(f"{job_id} ({kind}) {state}, expected {expected}")
        elif state == "SUCCEEDED" and runs == 0:
            found["wrong_state"].append(f"{job_id} ({kind}) SUCCEEDED without an execution")
        wanted = state in DLQ_STATES
        if wanted != (job_id in facts.dlq):
            found["dlq_mismatch"].append(f"{job_id} ({kind}) {state} {'without' if wanted else 'with'} a DLQ entry")
    for job_id in sorted(facts.dlq - set(facts.jobs)):
        found["dlq_mismatch"].append(f"{job_id} in the DLQ, not a job of this run")
    recovered = [r for r in facts.recoveries if r is not None]
    return Summary(
        rounds=len(facts.faults), faults=dict(Counter(f.kind for f in facts.faults)), jobs=len(facts.jobs),
        by_kind=dict(Counter(facts.jobs.values())),
        lost=len(found["lost"]), duplicated=len(found["duplicated"]), wrong_state=len(found["wrong_state"]),
        dlq_mismatch=len(found["dlq_mismatch"]),
        p99_recovery_s=None if not recovered else round(percentile(recovered, 99) or 0.0, 3),
        unrecovered=sum(1 for r in facts.recoveries if r is None), unconfirmed=facts.unconfirmed,
        errors=list(facts.errors), examples={k: v[:max_examples] for k, v in found.items() if v},
        recoveries_s=[None if r is None else round(r, 3) for r in facts.recoveries],
        starts=facts.starts, seed=facts.seed, state_dir=facts.state_dir,
    )
