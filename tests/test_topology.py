"""CHORUS_REDIS_URL forms: standalone, Sentinel and Cluster, and the one sentence for a bad one."""

from __future__ import annotations

import pytest

from chorus.config import SettingsError, load_settings, redact_url
from chorus.topology import parse_redis_url


def test_standalone_urls_are_unchanged() -> None:
    top = parse_redis_url("redis://:s3cret@redis.example:6380/2")
    assert (top.mode, top.hosts, top.password, top.db, top.tls) == (
        "standalone", (("redis.example", 6380),), "s3cret", 2, False,
    )  # fmt: skip
    assert parse_redis_url("rediss://redis.example").tls


def test_sentinel_url_with_hosts_master_db_and_tls() -> None:
    top = parse_redis_url("redis+sentinel://:pw@s0:26379,s1,[::1]:26380/mymaster/3?sentinel_password=sp")
    assert top.mode == "sentinel"
    assert top.hosts == (("s0", 26379), ("s1", 26379), ("::1", 26380))
    assert (top.master_name, top.db, top.password, top.sentinel_password) == ("mymaster", 3, "pw", "sp")
    assert not top.tls
    for scheme in ("rediss+sentinel", "redis+sentinel+tls"):
        assert parse_redis_url(f"{scheme}://s0:26379/mymaster").tls


def test_cluster_url_with_seed_nodes() -> None:
    top = parse_redis_url("redis+cluster://user:pw@n0:7000,n1:7001")
    assert (top.mode, top.hosts, top.username, top.password) == (
        "cluster", (("n0", 7000), ("n1", 7001)), "user", "pw",
    )  # fmt: skip
    assert parse_redis_url("rediss+cluster://n0:7000").tls
    assert parse_redis_url("redis+cluster+tls://n0:7000/").tls


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel://s0:26379,s1:26379", "needs the master name"),
        ("redis+sentinel://s0:26379/m/1/2", "/MASTER_NAME or /MASTER_NAME/DB"),
        ("redis+sentinel://s0:26379/m/zero", "database must be a number"),
        ("redis+cluster://n0:7000/1", "Redis Cluster has only database 0"),
        ("redis+cluster://", "at least one host:port"),
        ("redis+cluster://n0:99999", "port between 1 and 65535"),
        ("redis+shard://n0:7000", "scheme 'redis+shard' is not supported"),
        ("redis://a:1,b:2", "names one host"),
        ("n0:7000", "is not supported"),
    ],
)
def test_a_url_that_cannot_work_fails_at_start_with_one_sentence(url: str, why: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(redis_url=url)
    message = str(info.value)
    assert message.startswith("CHORUS_REDIS_URL: ") and why in message
    assert "\n" not in message


def test_settings_expose_the_topology_and_logs_never_show_passwords() -> None:
    settings = load_settings(redis_url="redis+sentinel://:pw@s0:26379,s1:26379/mymaster")
    assert settings.redis_topology.mode == "sentinel"
    assert settings.redis_url_redacted == "redis+sentinel://:***@s0:26379,s1:26379/mymaster"
    assert "sp" not in redact_url("redis+sentinel://s0/m?sentinel_password=sp").split("?")[1]
    assert "pw" not in repr(settings.redis_topology)
