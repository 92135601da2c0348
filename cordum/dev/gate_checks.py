"""The HA gate's verdicts, pure: each takes what a scenario observed and says PASS or why not.

They are strict on purpose (the Go gate's scenarios could not fail): every job must have
SUCCEEDED, every job must have been executed exactly once, 429s must actually be observed and the
admitted count must stay within the global limit, and worker lists must be non-empty and equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence


@dataclass(frozen=True)
class Verdict:
    ok: bool
    detail: str


def healthy(statuses: Mapping[str, Mapping[str, object]]) -> Verdict:
    """`statuses`: replica name → its health body (with `http_status`); gateways also need
    NATS connected and Redis ok in /api/v1/status."""
    if not statuses:
        return Verdict(False, "no replicas to check")
    bad = [name for name, body in statuses.items()
           if body.get("http_status") != 200
           or (name.startswith("api-gateway") and not (body.get("nats_connected") and body.get("redis_ok")))]
    return Verdict(not bad, f"unhealthy: {', '.join(sorted(bad))}" if bad else f"{len(statuses)} replicas healthy")


def exactly_once(job_ids: Sequence[str], states: Mapping[str, str], executions: Mapping[str, int]) -> Verdict:
    """Every job SUCCEEDED and was executed exactly once (counted by the workers themselves)."""
    if not job_ids:
        return Verdict(False, "no jobs were submitted")
    not_done = {j: states.get(j) for j in job_ids if states.get(j) != "SUCCEEDED"}
    counts = {j: executions.get(j, 0) for j in job_ids if executions.get(j, 0) != 1}
    problems = []
    if not_done:
        problems.append(f"{len(not_done)} not SUCCEEDED (e.g. {next(iter(not_done.items()))})")
    if counts:
        problems.append(f"{len(counts)} not executed exactly once (e.g. {next(iter(counts.items()))})")
    return Verdict(not problems, "; ".join(problems) or f"{len(job_ids)} jobs SUCCEEDED, each executed once")


def rate_limited(statuses: Iterable[int], *, burst: int, rps: float, seconds: float) -> Verdict:
    """A burst across the gateways saw 429s, and no more than the global limit got through."""
    codes = list(statuses)
    admitted = sum(1 for c in codes if c < 400)
    limited = sum(1 for c in codes if c == 429)
    ceiling = burst + int(rps * seconds + 0.999)
    if not limited:
        return Verdict(False, f"no 429 among {len(codes)} requests (admitted {admitted}, limit {ceiling})")
    if admitted > ceiling:
        return Verdict(False, f"admitted {admitted} > global limit {ceiling} (burst {burst} + {rps}/s × {seconds:.1f}s)")
    others = [c for c in codes if c >= 400 and c != 429]
    if others:
        return Verdict(False, f"unexpected statuses {sorted(set(others))}")
    return Verdict(True, f"admitted {admitted} ≤ {ceiling}, {limited} × 429")


def same_workers(lists: Mapping[str, Sequence[str]]) -> Verdict:
    """Every gateway returns the same non-empty sorted worker list."""
    if len(lists) < 2:
        return Verdict(False, "need at least two gateways")
    values = {name: list(ids) for name, ids in lists.items()}
    first = next(iter(values.values()))
    if not first:
        return Verdict(False, "worker list is empty")
    if any(v != first for v in values.values()):
        return Verdict(False, f"lists differ: {values}")
    if first != sorted(first):
        return Verdict(False, f"list not sorted: {first}")
    return Verdict(True, f"{len(first)} workers, identical on {len(values)} gateways")
