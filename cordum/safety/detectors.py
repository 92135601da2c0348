"""Built-in output detectors: what the ``secret``, ``pii`` and ``unsafe_instruction`` scanners look for.

Pure data plus a few checksum validators.  Every pattern is written for the third-party ``regex``
module and is meant to be run with ``timeout=``; the patterns avoid nested ambiguous quantifiers
(runs are possessive or bounded, starts are anchored by look-behinds) so they scan in roughly linear
time.  Candidate matches of ``credit_card``, ``iban`` and ``phone`` are confirmed by a validator
(Luhn, ISO 7064 mod-97, digit count) so plain numbers are not reported.

A detector never reports the text it matched: callers build findings from its name, severity and
description only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import regex

__all__ = [
    "BUILTIN_DETECTORS",
    "BUILTIN_SCANNERS",
    "SCANNER_ALIASES",
    "SCANNERS",
    "Detector",
    "iban_valid",
    "luhn_valid",
    "phone_valid",
]

#: scanner names a rule or a custom detector may use
SCANNERS = ("secret", "pii", "unsafe_instruction", "custom")
#: the scanners backed by built-in detectors (what a redact rule without content criteria redacts)
BUILTIN_SCANNERS = ("secret", "pii", "unsafe_instruction")
SCANNER_ALIASES: Mapping[str, str] = {
    "secret": "secret",
    "secrets": "secret",
    "pii": "pii",
    "unsafe_instruction": "unsafe_instruction",
    "unsafe_instructions": "unsafe_instruction",
    "injection": "unsafe_instruction",
    "prompt_injection": "unsafe_instruction",
    "custom": "custom",
}


@dataclass(frozen=True)
class Detector:
    """One named kind of finding, recognised by one or more patterns.

    The reported span is the group named ``secret`` if a pattern has one (e.g. only the value of
    ``password = "..."``), otherwise the whole match; ``validator`` (if any) must accept the span.
    """

    name: str
    scanner: str
    severity: str
    confidence: float
    patterns: tuple[str, ...]  # sources, for display and comparison; any of them may match
    description: str = ""
    compiled: tuple[Any, ...] = field(default=(), compare=False, repr=False)
    validator: Callable[[str], bool] | None = field(default=None, compare=False, repr=False)
    builtin: bool = False


# --- validators (run on candidate matches only) -------------------------------------------------
def luhn_valid(text: str) -> bool:
    """13-19 digits (separators ignored), issuer digit 2-6, valid Luhn checksum."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if not 13 <= len(digits) <= 19 or not 2 <= digits[0] <= 6:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """ISO 13616: 15-34 characters (spaces ignored) whose ISO 7064 mod-97 remainder is 1."""
    s = "".join(text.split()).upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    try:
        number = int("".join(str(int(c, 36)) for c in rearranged))
    except ValueError:
        return False
    return number % 97 == 1


def phone_valid(text: str) -> bool:
    """10-15 digits in all (E.164 allows at most 15)."""
    n = sum(1 for c in text if "0" <= c <= "9")
    return 10 <= n <= 15


# --- patterns ----------------------------------------------------------------------------------
# Each detector is a few simple patterns rather than one big alternation: a pattern that starts
# with a literal or a character class (not ``\b``) lets ``regex`` skip ahead with a fast search,
# which keeps a 1 MiB scan of ordinary text well inside the default 50 ms per-pattern timeout.
# Boundaries are therefore look-behinds placed so the fast search still applies.

# a shell word ends here: whitespace, end, or a shell operator / quote
_SHELL_END = r"""(?=\s|$|[;&|'"`)])"""
# an assignment between a credential name and its value: `k = v`, `k: v`, `"k": "v"`, `k := v`, `k => v`
_ASSIGN = r"""["']?[ \t]{0,5}(?::=|=>|[:=])[ \t]{0,5}["']?"""
# phone numbers must not be glued to other words / numbers
_NOT_AFTER = r"(?<![\w+\-.])"
_PHONE_END = r"(?!\w)(?![.\-][0-9])"
# card numbers: not inside a word, a dashed code or the fraction of a decimal number
_NOT_IN_NUMBER = r"(?<![\w\-]|[0-9]\.)"

_Spec = tuple[str, str, str, float, str, tuple[str, ...], "Callable[[str], bool] | None"]
_BUILTIN_SPECS: tuple[_Spec, ...] = (
    # name, scanner, severity, confidence, description, patterns, validator
    (
        "aws_access_key", "secret", "critical", 0.95, "AWS access key id",
        (r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",),
        None,
    ),
    (
        "aws_secret_key", "secret", "critical", 0.85, "AWS secret access key",
        tuple(
            prefix + _ASSIGN + r"(?P<secret>[A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])"
            for prefix in (
                r"(?i)aws[_.\- ]?secret(?:[_.\- ]?access)?[_.\- ]?key",
                r"(?i)\bsecret[_.\- ]?access[_.\- ]?key",
            )
        ),
        None,
    ),
    (
        "github_token", "secret", "critical", 0.95, "GitHub token",
        (r"\bgh[pousr]_[A-Za-z0-9]{36}\b", r"\bgithub_pat_[A-Za-z0-9_]{22,255}+\b"),
        None,
    ),
    (
        "slack_token", "secret", "high", 0.9, "Slack token",
        (r"\bxox[abprs]-[A-Za-z0-9]{1,48}+-[A-Za-z0-9\-]{8,}+",),
        None,
    ),
    (
        "private_key", "secret", "critical", 0.99, "private key block",
        (
            r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----"
            r"(?:[\s\S]{0,16384}?-----END [A-Z ]{0,40}PRIVATE KEY-----)?",
        ),
        None,
    ),
    (
        "jwt", "secret", "high", 0.8, "JSON web token",
        (r"\beyJ[A-Za-z0-9_\-]{7,}+\.[A-Za-z0-9_\-]{4,}+\.[A-Za-z0-9_\-]{4,}+",),
        None,
    ),
    (
        "openai_key", "secret", "critical", 0.85, "OpenAI-style API key",
        (r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20,}+",),
        lambda s: any("0" <= c <= "9" for c in s),  # "sk-learn-some-long-name" is prose
    ),
    (
        "stripe_key", "secret", "critical", 0.9, "Stripe secret key",
        (r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}+",),
        None,
    ),
    (
        "google_api_key", "secret", "high", 0.9, "Google API key",
        (r"\bAIza[0-9A-Za-z_\-]{35}(?![0-9A-Za-z_\-])",),
        None,
    ),
    (
        "generic_api_key", "secret", "high", 0.6, "credential assignment",
        tuple(
            name + r"[A-Za-z0-9_\-]{0,30}+" + _ASSIGN + r"(?P<secret>[A-Za-z0-9_\-./+=]{12,}+)"
            for name in (r"(?i)api[_\-]?key", r"(?i)secret", r"(?i)token", r"(?i)passw(?:or)?d")
        ),
        None,
    ),
    (
        "email", "pii", "medium", 0.9, "email address",
        (
            r"\b[A-Za-z0-9][A-Za-z0-9._%+\-]{0,63}+@"
            r"[A-Za-z0-9\-]{1,63}+(?:\.[A-Za-z0-9\-]{1,63}+)*\.[A-Za-z]{2,24}+(?![A-Za-z0-9\-])",
        ),
        None,
    ),
    (
        "phone", "pii", "medium", 0.7, "phone number",
        (
            # international: +CC, optional (area), then digits with single separators
            _NOT_AFTER + r"\+[1-9][0-9]{0,2}(?:[ .\-]?\([0-9]{1,4}\))?(?:[ .\-]?[0-9]){6,14}" + _PHONE_END,
            # NANP: (212) 555-1234
            _NOT_AFTER + r"\([2-9][0-9]{2}\)[ .\-]?[2-9][0-9]{2}[ .\-][0-9]{4}" + _PHONE_END,
            # NANP: 212-555-1234, 212.555.1234, 212 555 1234 (one separator throughout)
            _NOT_AFTER + r"[2-9][0-9]{2}([ .\-])[2-9][0-9]{2}\1[0-9]{4}" + _PHONE_END,
            # NANP with the trunk prefix: 1-212-555-1234
            _NOT_AFTER + r"1([ .\-])[2-9][0-9]{2}\1[2-9][0-9]{2}\1[0-9]{4}" + _PHONE_END,
        ),
        phone_valid,
    ),
    (
        "us_ssn", "pii", "high", 0.85, "US social security number",
        (r"(?<![\w\-])(?!000|666|9[0-9]{2})[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![\w\-])",),
        None,
    ),
    (
        "credit_card", "pii", "high", 0.9, "payment card number",
        (
            # 13-19 digits in one run
            _NOT_IN_NUMBER + r"[2-6][0-9]{12,18}+(?![\w\-])(?!\.[0-9])",
            # groups of four: 4111 1111 1111 1111 (13-19 digits), one separator throughout
            _NOT_IN_NUMBER + r"[2-6][0-9]{3}([ \-])[0-9]{4}\1[0-9]{4}\1[0-9]{1,4}+(?:\1[0-9]{1,3}+)?"
            r"(?![\w\-])(?![ \-.][0-9])",
            # American Express: 3782 822463 10005
            _NOT_IN_NUMBER + r"3[47][0-9]{2}([ \-])[0-9]{6}\1[0-9]{5}(?![\w\-])(?![ \-.][0-9])",
        ),
        luhn_valid,
    ),
    (
        "iban", "pii", "high", 0.85, "IBAN",
        (r"[A-Z]{2}[0-9]{2}(?<![A-Za-z0-9][A-Z]{2}[0-9]{2})(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b",),
        iban_valid,
    ),
    (
        "prompt_injection", "unsafe_instruction", "high", 0.8, "prompt injection phrase",
        tuple(
            r"(?i)\b" + verb + r"\s+(?:(?:all|any)\s+)?(?:(?:the|your|my|of\s+the)\s+)?"
            r"(?:previous|prior|above|earlier|preceding)\s+(?:instructions?|prompts?|directions|rules)\b"
            for verb in ("ignore", "disregard", "forget")
        )
        + (r"(?i)\bdisregard\s+(?:the|your)\s+system\s+prompt\b",)
        + tuple(
            r"(?i)\b" + verb + r"\s+(?:me\s+)?(?:the|your)\s+system\s+prompt\b"
            for verb in ("reveal", "print", "show", "repeat")
        )
        + (
            r"(?i)\byou\s+are\s+now\s+in\s+developer\s+mode\b",
            r"(?i)\benable\s+developer\s+mode\b",
        ),
        None,
    ),
    (
        "destructive_command", "unsafe_instruction", "critical", 0.85, "destructive shell command",
        (
            # rm -rf / (or ~, $HOME, /*), flags in any order, both r and f present
            r"\brm\s+-(?=[A-Za-z]{0,10}[rR])(?=[A-Za-z]{0,10}f)[A-Za-z]{2,12}+\s+"
            r"(?:--no-preserve-root\s+)?(?:/\*?|~/?\*?|\$HOME/?\*?)" + _SHELL_END,
            r"\bmkfs\.[a-z0-9]{2,10}\b",
            r"\bdd\s+(?:\S+\s+){0,6}?of=/dev/(?:sd|hd|vd|xvd|nvme|mmcblk|disk)",
            r":\(\)\s*\{\s*:\s*\|\s*:\s*&\s*\}\s*;\s*:",
            r"\bcurl\b[^\n|;]{0,300}+\|\s*(?:sudo\s+)?(?:ba|z|da)?sh\b",
            r"\bwget\b[^\n|;]{0,300}+\|\s*(?:sudo\s+)?(?:ba|z|da)?sh\b",
            r"\bchmod\s+(?:-R\s+0?777|0?777\s+-R)\s+/" + _SHELL_END,
        ),
        None,
    ),
    (
        "sql_drop", "unsafe_instruction", "high", 0.7, "SQL DROP statement",
        (r"""(?i)\bdrop\s+(?:table|database|schema)\s+(?:if\s+exists\s+)?[`"\[]?[A-Za-z_]""",),
        None,
    ),
)


def _build() -> dict[str, Detector]:
    out: dict[str, Detector] = {}
    for name, scanner, severity, confidence, description, patterns, validator in _BUILTIN_SPECS:
        out[name] = Detector(
            name=name,
            scanner=scanner,
            severity=severity,
            confidence=confidence,
            patterns=patterns,
            description=description,
            compiled=tuple(regex.compile(p) for p in patterns),
            validator=validator,
            builtin=True,
        )
    return out


#: name -> detector, in catalogue order
BUILTIN_DETECTORS: Mapping[str, Detector] = _build()
