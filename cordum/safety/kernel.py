"""The safety kernel's state: the policy in force, its version counter, the local snapshot history
and the per-replica decision cache (spec cordum-jobpath §4.2, §4.4, §4.6).

Synchronous and free of I/O except `read_policy_file` (called from a worker thread by the
service): the gRPC servicer and the reload watcher in `service.py` are thin layers on top.

- `Kernel.install(policy)` swaps the policy when its snapshot differs from the one in force:
  version += 1, the decision cache is cleared (its entries are also keyed by version), the
  snapshot goes to the front of the local history (newest first, at most 10).
- `Kernel.check(request)` is Check/Evaluate/Simulate: cache lookup, evaluation, cache fill.
- `Kernel.explain(request)` evaluates without the cache and appends the per-rule trace to the
  response's `reason` (one line per rule), keeping the proto response valid.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cordum.agent.v1 import safety_pb2
from cordum.safety.cache import DEFAULT_MAX_SIZE, DecisionCache, proto_request_key
from cordum.safety.evaluate import check_input_from_proto, decision_to_proto, evaluate, explain
from cordum.safety.policy import Policy, PolicyError, parse_policy

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_POLICY_PATH",
    "HISTORY_SIZE",
    "Kernel",
    "Loaded",
    "PolicyReadError",
    "decision_name",
    "parse_policy_bytes",
    "read_policy_file",
]

#: the packaged policy used when SAFETY_POLICY_PATH is not set
DEFAULT_POLICY_PATH = Path(__file__).with_name("default_policy.yaml")
#: snapshots kept locally and in Redis (spec §4.4)
HISTORY_SIZE = 10
#: SAFETY_POLICY_MAX_BYTES default (spec §4.4: 2 MiB)
DEFAULT_MAX_BYTES = 2 << 20

_DECISION_NAMES = {
    value: name.removeprefix("DECISION_TYPE_").lower() for name, value in safety_pb2.DecisionType.items()
}


def decision_name(decision: int) -> str:
    """`DECISION_TYPE_REQUIRE_HUMAN` → `require_human` (metric label values)."""
    return _DECISION_NAMES.get(decision, str(decision))


class PolicyReadError(Exception):
    """The policy file could not be read (missing, not a file, unreadable, too large)."""


def read_policy_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes; raises PolicyReadError with a message saying what is wrong (blocking)."""
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise PolicyReadError(f"policy file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise PolicyReadError(f"policy file {str(path)!r} is a directory") from None
    except PermissionError:
        raise PolicyReadError(f"policy file {str(path)!r} is not readable (permission denied)") from None
    except OSError as exc:
        raise PolicyReadError(f"policy file {str(path)!r} cannot be read: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise PolicyReadError(
            f"policy file {str(path)!r} is larger than SAFETY_POLICY_MAX_BYTES={max_bytes} bytes"
        )
    return data


def parse_policy_bytes(data: bytes, source: str) -> Policy:
    """Decode (UTF-8) and parse; raises PolicyError naming `source:line`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(source, line, f"not UTF-8 text (byte {exc.start})") from None
    return parse_policy(text, source)


def content_hash(data: bytes) -> str:
    """Same digest as `Policy.content_hash` of a policy parsed from `data`."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Loaded:
    policy: Policy
    version: int
    loaded_at: float  # wall clock (epoch seconds), shared meaning across replicas

    @property
    def snapshot(self) -> str:
        return self.policy.snapshot


class Kernel:
    def __init__(
        self,
        *,
        cache_ttl: float = 0.0,
        cache_max_size: int = DEFAULT_MAX_SIZE,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._current: Loaded | None = None
        self._version = 0
        self._wall_clock = wall_clock
        self.history: deque[str] = deque(maxlen=HISTORY_SIZE)  # newest first
        self.cache: DecisionCache[safety_pb2.PolicyCheckResponse] = DecisionCache(
            cache_ttl, cache_max_size, clock
        )

    # ---- the policy in force ----------------------------------------------------------------

    @property
    def current(self) -> Loaded | None:
        return self._current

    @property
    def policy(self) -> Policy | None:
        return self._current.policy if self._current else None

    @property
    def version(self) -> int:
        return self._version

    @property
    def snapshot(self) -> str:
        return self._current.snapshot if self._current else ""

    def install(self, policy: Policy) -> Loaded | None:
        """Put `policy` in force unless it is the one already in force; returns the new state."""
        if self._current is not None and self._current.snapshot == policy.snapshot:
            return None
        self._version += 1
        loaded = Loaded(policy, self._version, self._wall_clock())
        self._current = loaded
        self.cache.clear()
        if policy.snapshot in self.history:
            self.history.remove(policy.snapshot)
        self.history.appendleft(policy.snapshot)
        return loaded

    # ---- decisions --------------------------------------------------------------------------

    def check(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        """Check / Evaluate / Simulate: one evaluation path, with the decision cache."""
        current = self._current
        if current is None:
            return decision_to_proto(evaluate(None, check_input_from_proto(request)), None, job_id=request.job_id)
        cache_key = ""
        if self.cache.enabled:
            cache_key = proto_request_key(request)
            cached = self.cache.get(self._cache_snapshot(current), cache_key)
            if cached is not None:
                response = safety_pb2.PolicyCheckResponse()
                response.CopyFrom(cached)
                if response.approval_required:
                    response.approval_ref = request.job_id
                return response
        decision = evaluate(current.policy, check_input_from_proto(request))
        response = decision_to_proto(decision, current.policy, job_id=request.job_id, snapshot=current.snapshot)
        if self.cache.enabled:
            stored = safety_pb2.PolicyCheckResponse()
            stored.CopyFrom(response)
            stored.approval_ref = ""
            self.cache.put(self._cache_snapshot(current), cache_key, stored)
        return response

    def explain(self, request: safety_pb2.PolicyCheckRequest) -> safety_pb2.PolicyCheckResponse:
        """The same decision as `check`, with the per-rule trace appended to `reason`."""
        current = self._current
        policy = current.policy if current else None
        result = explain(policy, check_input_from_proto(request))
        response = decision_to_proto(
            result.decision, policy, job_id=request.job_id, snapshot=current.snapshot if current else ""
        )
        if policy is None:
            return response
        assert current is not None
        lines = [response.reason, f"explain: tenant {result.tenant!r}, policy {current.snapshot} (version {current.version})"]
        for trace in result.rules:
            where = f"rule {trace.rule_id}" + (f" (line {trace.line})" if trace.line else "")
            if trace.selected:
                lines.append(f"  {where}: matched, decided")
            elif trace.matched:
                lines.append(f"  {where}: matched, but an earlier rule decided")
            else:
                lines.append(f"  {where}: no match: " + "; ".join(trace.reasons))
        if not result.rules and policy.rules:
            lines.append("  rules not evaluated: the request failed the checks before them")
        elif not any(t.selected for t in result.rules):
            lines.append(f"  no rule matched: default_decision {policy.default_decision}")
        response.reason = "\n".join(lines)
        return response

    def _cache_snapshot(self, current: Loaded) -> str:
        # Versioned: an entry from an earlier load of the same file never answers (spec §4.6).
        return f"{current.version}|{current.snapshot}"
