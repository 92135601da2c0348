"""Redis and NATS with credentials (requirepass / an ACL user; a NATS user or token), given as
REDIS_PASSWORD, NATS_USER/NATS_PASSWORD, NATS_TOKEN rather than inside the URLs: real servers."""

from __future__ import annotations

import pytest

from cordum.dev.servers import start_nats, start_redis
from cordum.infra.bus import open_bus
from cordum.infra.config import ConfigError, load_settings
from cordum.infra.redis import open_redis

SECRET = "s3cr3t-0123456789abcdef"


@pytest.fixture
def guarded(tmp_path):
    redis = start_redis(tmp_path / "redis", extra=["--requirepass", SECRET,
                                                   "--user", "cordum", "on", f">{SECRET}-acl", "~*", "&*", "+@all"])
    nats = start_nats(tmp_path / "nats", extra=["--user", "cordum", "--pass", SECRET])
    yield redis, nats
    nats.stop()
    redis.stop()


async def test_services_reach_guarded_servers_with_credentials_from_the_environment(guarded, tmp_path) -> None:
    redis, nats = guarded
    settings = load_settings({"REDIS_URL": redis.url, "NATS_URL": nats.url, "REDIS_PASSWORD": SECRET,
                              "NATS_USER": "cordum", "NATS_PASSWORD": SECRET, "REDIS_MIN_IDLE_CONNS": "0"})
    assert SECRET not in repr(settings)
    async with open_redis(settings) as client:
        await client.execute("SET", "k", "v")
        assert await client.execute("GET", "k") == "v"
    async with open_bus(settings, name="creds-test") as bus:
        assert bus.connected
    acl = load_settings({"REDIS_URL": redis.url, "REDIS_USERNAME": "cordum", "REDIS_PASSWORD": f"{SECRET}-acl",
                         "REDIS_MIN_IDLE_CONNS": "0"})
    async with open_redis(acl) as client:
        assert await client.execute("ACL", "WHOAMI") == "cordum"


async def test_without_credentials_the_guarded_servers_refuse(guarded) -> None:
    redis, _ = guarded
    settings = load_settings({"REDIS_URL": redis.url, "REDIS_MIN_IDLE_CONNS": "0"})
    with pytest.raises(BaseException) as refused:  # on connecting, or on the first command
        async with open_redis(settings) as client:
            await client.execute("GET", "k")
    causes = [refused.value, *getattr(refused.value, "exceptions", ())]
    assert any("AuthenticationError" in repr(e) or "NOAUTH" in repr(e) for e in causes), causes


@pytest.mark.parametrize("env,message", [
    ({"NATS_USER": "cordum"}, "NATS_USER and NATS_PASSWORD go together"),
    ({"NATS_TOKEN": "t", "NATS_USER": "u", "NATS_PASSWORD": "p"}, "NATS_TOKEN is invalid together"),
    ({"REDIS_USERNAME": "cordum"}, "REDIS_USERNAME is invalid without REDIS_PASSWORD"),
])
def test_credential_settings_name_what_is_wrong(env, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
