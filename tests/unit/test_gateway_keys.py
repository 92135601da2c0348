"""The gateway's key ring: expiry, the keys file read again on change (a broken file keeps the
keys in force), the check a long-lived stream makes, and keys offered as a WebSocket subprotocol."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest

from cordum.gateway.auth import KEY_SUBPROTOCOL, key_from_headers, key_from_subprotocols, load_keyring
from cordum.infra.config import ConfigError

ADMIN = "static-admin-key-0123456789"
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef00"


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ring(tmp_path: Path, text: str):
    path = tmp_path / "keys.yaml"
    _write(path, text)
    return path, load_keyring({"CORDUM_API_KEY": ADMIN, "CORDUM_API_KEYS_PATH": str(path)})


def test_an_expired_key_authenticates_nothing(tmp_path):
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    _, ring = _ring(tmp_path, f"- {{key: {ALICE}, role: operator, expires_at: '{past}'}}\n"
                              f"- {{key: {BOB}, role: operator, expires_at: '2999-01-01T00:00:00+02:00'}}\n")
    assert ring.authenticate(ALICE) is None
    assert ring.authenticate(BOB).role == "operator"


def test_a_bad_expiry_names_the_entry(tmp_path):
    with pytest.raises(ConfigError, match="entry 1 is invalid: expires_at"):
        _ring(tmp_path, f"- {{key: {ALICE}, expires_at: next tuesday}}\n")


def test_the_keys_file_is_read_again_when_it_changes(tmp_path):
    path, ring = _ring(tmp_path, f"- {{key: {ALICE}, role: operator, principal_id: alice}}\n")
    alice = ring.authenticate(ALICE)
    assert not ring.reload_if_changed()  # unchanged: not read again
    _write(path, f"- {{key: {BOB}, role: viewer}}\n")
    assert ring.reload_if_changed()
    assert ring.authenticate(ALICE) is None and ring.authenticate(BOB).role == "viewer"
    assert not ring.still_valid(alice)  # a stream opened with it ends
    assert ring.authenticate(ADMIN).static_admin  # the environment's key stays


def test_a_broken_keys_file_keeps_the_keys_in_force(tmp_path):
    path, ring = _ring(tmp_path, f"- {{key: {ALICE}, role: operator}}\n")
    _write(path, "- {key: [unclosed\n")
    assert not ring.reload_if_changed()
    assert "not YAML/JSON" in ring.reload_error and ALICE not in ring.reload_error
    assert ring.authenticate(ALICE) is not None
    _write(path, f"- {{key: {ALICE}, role: operator}}\n- {{key: weak}}\n")
    assert not ring.reload_if_changed() and "too weak" in ring.reload_error
    _write(path, f"- {{key: {ALICE}, role: admin}}\n")
    assert ring.reload_if_changed() and ring.reload_error == ""


def test_a_key_moved_to_another_role_or_tenant_is_no_longer_valid_as_it_was(tmp_path):
    path, ring = _ring(tmp_path, f"- {{key: {ALICE}, role: admin, tenant: acme}}\n")
    alice = ring.authenticate(ALICE)
    assert ring.still_valid(alice)
    _write(path, f"- {{key: {ALICE}, role: viewer, tenant: acme}}\n")
    ring.reload_if_changed()
    assert not ring.still_valid(alice) and ring.still_valid(ring.authenticate(ALICE))


def _b64(key: str, *, pad: bool = False) -> str:
    text = base64.urlsafe_b64encode(key.encode()).decode()
    return text if pad else text.rstrip("=")


def test_keys_offered_as_a_subprotocol():
    assert key_from_subprotocols(f"{KEY_SUBPROTOCOL}.{_b64(ALICE)}") == ALICE
    assert key_from_subprotocols(f"{KEY_SUBPROTOCOL}, {_b64(ALICE, pad=True)}") == ALICE
    assert key_from_subprotocols(f"chat, {KEY_SUBPROTOCOL}.{_b64(ALICE)}") == ALICE
    assert key_from_subprotocols("chat") is None
    assert key_from_subprotocols(f"{KEY_SUBPROTOCOL}.%%%") is None  # not base64: no key, a 401
    assert key_from_subprotocols(KEY_SUBPROTOCOL) is None
    headers = {"Sec-WebSocket-Protocol": f"{KEY_SUBPROTOCOL}.{_b64(ALICE)}"}
    assert key_from_headers(headers, {}) == ALICE
    assert key_from_headers(headers) is None  # plain HTTP requests: X-API-Key only


@pytest.mark.parametrize("key", ["aaaaaaaaaaaaaaaaaaaaaaaa", "1212121212121212121212", "abcabcabcabcabcabcabc"])
def test_long_keys_of_few_characters_are_weak(key):
    with pytest.raises(ConfigError, match="CORDUM_API_KEY is too weak") as refused:
        load_keyring({"CORDUM_API_KEY": key})
    assert key not in str(refused.value)


def test_an_address_that_fails_too_often_waits():
    from cordum.gateway.auth import AuthFailures

    failures = AuthFailures(limit=3, window=60.0, max_addresses=2)
    for t in (0.0, 1.0, 2.0):
        assert failures.blocked_for("10.0.0.1", t) == 0.0
        failures.record("10.0.0.1", t)
    assert failures.blocked_for("10.0.0.1", 3.0) == pytest.approx(57.0)  # the oldest of the 3 ages out at 60
    assert failures.blocked_for("10.0.0.2", 3.0) == 0.0  # others are not affected
    assert failures.blocked_for("10.0.0.1", 60.5) == 0.0
    failures.record("10.0.0.2", 70.0)
    failures.record("10.0.0.3", 71.0)  # bounded: the least recently failing address is forgotten
    assert "10.0.0.1" not in failures._failures  # noqa: SLF001


def test_the_client_address_comes_from_trusted_proxies_only():
    import ipaddress

    from cordum.gateway.context import client_address

    trusted = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
    assert client_address("203.0.113.9", "1.2.3.4", trusted) == "203.0.113.9"  # not a proxy: its header is ignored
    assert client_address("127.0.0.1", None, trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", "198.51.100.7", trusted) == "198.51.100.7"  # cordum-mcp's client
    # a client's own (spoofed) entry stays to the left of what the trusted proxies appended
    assert client_address("10.1.1.1", "6.6.6.6, 198.51.100.7, 10.2.2.2", trusted) == "198.51.100.7"
    assert client_address("127.0.0.1", "10.0.0.5, 127.0.0.2", trusted) == "10.0.0.5"  # all trusted: the first
