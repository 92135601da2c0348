"""Cluster settings: REDIS_CLUSTER_ADDRESSES, redis+cluster:// URLs, several NATS servers."""

from __future__ import annotations

import pytest

from cordum.infra.config import ConfigError, load_settings
from cordum.infra.redis import cluster_credentials


def _load(**env: str):
    return load_settings({"CORDUM_INSTANCE_ID": "t", **env})


def test_standalone_by_default():
    settings = _load()
    assert not settings.redis_cluster and settings.redis_cluster_nodes == ()
    assert settings.nats_servers == ("nats://localhost:4222",)


def test_cluster_addresses_select_the_cluster_client():
    settings = _load(REDIS_CLUSTER_ADDRESSES=" 10.0.0.1:7000, redis-1:7001 ,[::1]:7002")
    assert settings.redis_cluster
    assert settings.redis_cluster_nodes == (("10.0.0.1", 7000), ("redis-1", 7001), ("::1", 7002))
    assert _load(REDIS_CLUSTER_ADDRESSES="redis-0:6379").redis_cluster_nodes == (("redis-0", 6379),)
    assert not _load(REDIS_CLUSTER_ADDRESSES="  ").redis_cluster


def test_cluster_url_selects_the_cluster_client():
    settings = _load(REDIS_URL="redis+cluster://:s3cret@a:7000,b:7001/0")
    assert settings.redis_cluster_nodes == (("a", 7000), ("b", 7001))
    assert cluster_credentials(settings.redis_url) == {"ssl": False, "password": "s3cret"}
    tls = _load(REDIS_URL="rediss+cluster://user:p%40ss@a:7000")
    assert cluster_credentials(tls.redis_url) == {"ssl": True, "username": "user", "password": "p@ss"}
    # with REDIS_CLUSTER_ADDRESSES, credentials and TLS come from a plain REDIS_URL
    plain = _load(REDIS_URL="rediss://:pw@ignored:6379/0", REDIS_CLUSTER_ADDRESSES="a:1")
    assert cluster_credentials(plain.redis_url) == {"ssl": True, "password": "pw"}


@pytest.mark.parametrize(
    "env, message",
    [
        ({"REDIS_CLUSTER_ADDRESSES": "a:7000,b"}, "REDIS_CLUSTER_ADDRESSES='a:7000,b' is invalid: 'b' is not host:port"),
        ({"REDIS_CLUSTER_ADDRESSES": "a:7000,,b:7001"}, "REDIS_CLUSTER_ADDRESSES='a:7000,,b:7001' is invalid: expected comma"),
        ({"REDIS_CLUSTER_ADDRESSES": "a:70000"}, "REDIS_CLUSTER_ADDRESSES='a:70000' is invalid"),
        ({"REDIS_CLUSTER_ADDRESSES": ":7000"}, "REDIS_CLUSTER_ADDRESSES=':7000' is invalid"),
        ({"REDIS_URL": "redis+cluster://"}, "REDIS_URL='redis+cluster://' is invalid"),
        ({"REDIS_URL": "redis+cluster://a:7000/2"}, "REDIS_URL='redis+cluster://a:7000/2' is invalid: a Redis Cluster has only database 0"),
        ({"REDIS_URL": "redis+cluster://a"}, "REDIS_URL='redis+cluster://a' is invalid: 'a' is not host:port"),
        ({"REDIS_URL": "redis+cluster://a:1", "REDIS_CLUSTER_ADDRESSES": "b:2"}, "REDIS_CLUSTER_ADDRESSES='b:2' is invalid: REDIS_URL is already"),
        ({"REDIS_URL": "unix:///tmp/r.sock", "REDIS_CLUSTER_ADDRESSES": "b:2"}, "REDIS_CLUSTER_ADDRESSES='b:2' is invalid"),
        ({"NATS_URL": "nats://a:4222,http://b:4222"}, "NATS_URL='nats://a:4222,http://b:4222' is invalid: 'http://b:4222'"),
        ({"NATS_URL": "nats://a:4222,"}, "NATS_URL='nats://a:4222,' is invalid: expected comma-separated"),
        ({"NATS_URL": "nats://a:x"}, "NATS_URL='nats://a:x' is invalid: 'nats://a:x': the port must be a number"),
    ],
)
def test_bad_cluster_values_name_the_variable(env, message):
    with pytest.raises(ConfigError) as error:
        _load(**env)
    assert message in str(error.value)


def test_nats_url_may_list_every_cluster_member():
    settings = _load(NATS_URL="nats://n0:4222, nats://user:pw@n1:4222 ,tls://n2:4222", NATS_JS_REPLICAS="3")
    assert settings.nats_servers == ("nats://n0:4222", "nats://user:pw@n1:4222", "tls://n2:4222")
    assert settings.nats_js_replicas == 3
    with pytest.raises(ConfigError, match="NATS_JS_REPLICAS='6' is invalid"):
        _load(NATS_JS_REPLICAS="6")
