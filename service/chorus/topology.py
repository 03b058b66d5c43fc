"""Where Redis lives: one server, a Sentinel-watched master, or a Cluster, read from one URL.

`CHORUS_REDIS_URL` forms:

- `redis://[[user]:password@]host:port[/db]` and `rediss://...` (TLS): one server;
- `redis+sentinel://[:password@]host:port[,host:port...]/MASTER_NAME[/db]`: ask the sentinels
  for the current master before every (re)connect; `?sentinel_password=...` when the
  sentinels themselves require a password (the URL's password is the master's);
- `redis+cluster://[:password@]host:port[,host:port...]`: seed nodes of a Redis Cluster;
  sharded pub/sub (`SSUBSCRIBE`/`SPUBLISH`) keeps each room's traffic on its own shard.

`rediss+sentinel://`, `rediss+cluster://` and the `+tls` spellings (`redis+sentinel+tls://`)
use TLS for every connection, the sentinels' included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

Mode = Literal["standalone", "sentinel", "cluster"]

_SCHEMES: Final[dict[str, tuple[Mode, bool]]] = {
    "redis": ("standalone", False),
    "rediss": ("standalone", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+sentinel+tls": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
    "redis+cluster+tls": ("cluster", True),
}
DEFAULT_PORT: Final = 6379
DEFAULT_SENTINEL_PORT: Final = 26379


@dataclass(frozen=True, slots=True)
class Topology:
    """A parsed `CHORUS_REDIS_URL`."""

    mode: Mode
    url: str = field(repr=False)
    hosts: tuple[tuple[str, int], ...]
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    master_name: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)

    @property
    def cluster(self) -> bool:
        return self.mode == "cluster"


def parse_redis_url(url: str) -> Topology:
    """Parse a Redis URL; raise ValueError with one sentence saying why it cannot work."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            f"scheme {scheme if sep else '(none)'!r} is not supported; use redis://, rediss://, "
            "redis+sentinel://, redis+cluster:// (rediss+... for TLS), or leave it empty for the "
            "in-process broker"
        )
    mode, tls = _SCHEMES[scheme]
    if mode == "standalone":
        # One host: the standard form, kept exactly as redis-py reads it.
        parts = urlsplit(url)
        if "," in parts.netloc:
            raise ValueError(
                "a redis:// URL names one host; use redis+sentinel:// or redis+cluster:// for several"
            )
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("the port is not a number between 0 and 65535") from None
        db = _db(parts.path.strip("/"), url)
        return Topology(
            mode, url, ((parts.hostname or "127.0.0.1", port),), tls,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password is not None else None, db,
        )  # fmt: skip
    netloc, _, path_query = rest.partition("/")
    path, _, query = path_query.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    default_port = DEFAULT_SENTINEL_PORT if mode == "sentinel" else DEFAULT_PORT
    hosts = tuple(_host(item, default_port) for item in hostlist.split(",") if item.strip())
    if not hosts:
        raise ValueError(f"a {scheme}:// URL needs at least one host:port")
    segments = [unquote(s) for s in path.split("/") if s]
    params = parse_qs(query)
    if mode == "cluster":
        if segments:
            raise ValueError(
                "Redis Cluster has only database 0; remove the path from the redis+cluster:// URL"
            )
        return Topology(mode, url, hosts, tls, username, password)
    if not segments:
        raise ValueError(
            "a redis+sentinel:// URL needs the master name after the hosts, e.g. "
            "redis+sentinel://sentinel-0:26379,sentinel-1:26379/mymaster"
        )
    if len(segments) > 2:
        raise ValueError("a redis+sentinel:// URL's path is /MASTER_NAME or /MASTER_NAME/DB")
    db = _db(segments[1] if len(segments) == 2 else "", url)
    sentinel_password = params.get("sentinel_password", [None])[-1]
    return Topology(mode, url, hosts, tls, username, password, db, segments[0], sentinel_password)


def _host(item: str, default_port: int) -> tuple[str, int]:
    item = item.strip()
    if item.startswith("["):  # [::1]:26379
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"{item!r} is not a host:port")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r} does not have a port between 1 and 65535")
    return host, int(port)


def _db(text: str, url: str) -> int:
    if not text:
        return 0
    if not text.isdigit():
        raise ValueError(f"the database must be a number, not {text!r}")
    return int(text)


def command_client(
    topology: Topology,
    *,
    timeout: float,
    max_connections: int,
    health_check_interval: float = 0,
    sentinel: Sentinel | None = None,
) -> aioredis.Redis | aioredis.RedisCluster:
    """A redis-py client for commands and scripts, for any topology (RESP2, `timeout` everywhere,
    at most `max_connections` per Redis node); `sentinel` is required for a Sentinel topology."""
    common: dict[str, Any] = {
        "protocol": 2,
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": health_check_interval,
        "max_connections": max_connections,
    }
    if topology.mode == "standalone":
        return aioredis.Redis.from_url(topology.url, **common)
    auth: dict[str, Any] = {"username": topology.username, "password": topology.password}
    if topology.mode == "cluster":
        nodes = [ClusterNode(host, port) for host, port in topology.hosts]
        return aioredis.RedisCluster(startup_nodes=nodes, ssl=topology.tls, **auth, **common)
    assert sentinel is not None and topology.master_name is not None
    client: aioredis.Redis = sentinel.master_for(
        topology.master_name, db=topology.db, ssl=topology.tls, **auth, **common
    )
    return client


def sentinels(topology: Topology, *, timeout: float) -> Sentinel:
    """A redis-py Sentinel for the URL's sentinels (they may have a password of their own)."""
    sentinel_kwargs: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "protocol": 2,
        "ssl": topology.tls,
    }
    if topology.sentinel_password is not None:
        sentinel_kwargs["password"] = topology.sentinel_password
    return Sentinel(list(topology.hosts), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]


class SentinelResolver:
    """Asks the sentinels for the current master's address (the pub/sub backend's resolver)."""

    def __init__(self, topology: Topology, sentinel: Sentinel) -> None:
        assert topology.master_name is not None
        self._name = topology.master_name
        self._sentinel = sentinel  # the process's one Sentinel, shared with the command client

    async def __call__(self) -> tuple[str, int]:
        try:
            host, port = await self._sentinel.discover_master(self._name)
        except RedisError as exc:
            # The backend's reconnect loop handles the built-in ConnectionError.
            raise ConnectionError(f"no master for {self._name!r} from the sentinels: {exc}") from exc
        return str(host), int(port)

    async def aclose(self) -> None:
        for client in self._sentinel.sentinels:
            await client.aclose()
