"""Settings: one pydantic-settings class, read from `CHORUS_*` environment variables."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Annotated, Final, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .topology import Topology, parse_redis_url

ENV_PREFIX = "CHORUS_"
REDIS_SCHEMES = ("redis", "rediss")
# An ALLOWED_HOSTS entry: a DNS name or IPv4 address, `.name` (it and its subdomains), `*.name`
# (one label under it, as Ingress and HTTPRoute hosts mean it; the chart copies those), [IPv6].
_LABEL = r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?"
_HOST_ENTRY = re.compile(rf"(\.|\*\.)?{_LABEL}(\.{_LABEL})*|\[[0-9a-f:.]+\]")


API_KEY_MIN_CHARS: Final = 16


class SettingsError(ValueError):
    """A setting has a value Chorus cannot run with; the message names the variable."""


class Settings(BaseSettings):
    """Everything an operator can set, with the defaults a laptop run needs."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    # -- Redis URL: redis[s]://, redis+sentinel://, redis+cluster:// (see chorus.topology).
    # Empty: the in-process memory broker, one replica only.
    redis_url: str = ""
    # -- Name shown to clients in frames; the chart sets it from the pod name.
    replica_name: str = Field(default_factory=socket.gethostname, min_length=1, max_length=128)
    history_size: int = Field(1000, ge=1, le=1_000_000)
    send_queue_size: int = Field(256, ge=1, le=100_000)
    # -- A member's fan-out frames of one event-loop turn always share one write. Above 0, a
    # room's fan-outs closer together than this also share one, for up to this much latency.
    coalesce_seconds: float = Field(0.0, ge=0, le=0.1)
    max_message_bytes: int = Field(4096, ge=1, le=1_048_576)
    # -- Hard cap on one WebSocket frame; a bigger frame closes the socket with 1009.
    max_frame_bytes: int = Field(65536, ge=1024, le=16_777_216)
    # -- gunicorn workers for `chorus serve` (1: uvicorn in process). No `port`/`host` fields:
    # Kubernetes injects CHORUS_PORT=tcp://... for a Service named chorus.
    workers: int = Field(1, ge=1, le=64)
    drain_seconds: float = Field(10.0, ge=0, le=3600)
    probe_interval_seconds: float = Field(1.0, gt=0, le=60)
    probe_timeout_seconds: float = Field(1.5, gt=0, le=60)
    broker_timeout_seconds: float = Field(1.5, gt=0, le=60)
    # -- Redis commands in flight at once per process (one connection each); more wait their turn.
    redis_max_connections: int = Field(32, ge=1, le=10_000)
    # -- Presence heartbeat; a replica that dies is gone from presence after 3 missed beats.
    presence_heartbeat_seconds: float = Field(3.0, gt=0, le=60)
    # -- A room's joins and leaves reach its members as at most one diff frame per interval
    # (0: one frame per change). Without it a wave of N joins costs N*N/2 frames.
    presence_interval_seconds: float = Field(0.5, ge=0, le=60)
    # -- Above this many users a room's presence frames carry only the count; the list is at
    # GET /api/rooms/{room}/presence.
    presence_max_members: int = Field(100, ge=0, le=1_000_000)
    # -- Rebalancing (chorus.rebalance): a process holding more than (1 + tolerance) x the fleet's
    # mean sockets closes the excess with 1012 `rebalance`, at most `rate` per second (0: off),
    # only once every process has been ready for `settle` seconds, and `settle` after one left or a
    # reconnect wave landed.
    rebalance_tolerance: float = Field(0.1, ge=0, le=10)
    rebalance_rate: float = Field(20.0, ge=0, le=100_000)
    rebalance_settle_seconds: float = Field(30.0, ge=0, le=3600)
    # -- While the fleet is out of balance, processes above the mean refuse handshakes (503
    # `rebalance`) so reconnects land below it: 1.00x the minimum moves at 10,000 sockets
    # against 2.7x, but with an L4 round robin a moved client retries until it lands there
    # (live-room p99 9.6 s during a 2 -> 3 scale-out). Off: moves land anywhere, as before.
    rebalance_refuse: bool = True
    # -- Handshakes doing Redis work at once (upgrade to welcome); beyond it: 503 + Retry-After.
    # Measured (bench-storm hold): ~150 in flight per replica made joins time out on the 32
    # Redis slots (1011 broker unavailable); ~75 lost 2 of 20,000.
    max_pending_handshakes: int = Field(64, ge=1, le=100_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "text"

    # -- Security (docs/security.md). HS256 secret; when set (or the public key), a JWT is required.
    auth_jwt_secret: SecretStr | None = None
    # -- Path to a PEM public key (RS256/ES256); alternative to the secret.
    auth_jwt_public_key: Path | None = None
    # -- Origins allowed to open WebSockets; empty: the Host's own origin only. No Origin header: allowed.
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # -- Host header values served (WebSockets and /api/*), like Django's ALLOWED_HOSTS:
    # `chat.example.com`, `.example.com` (it and its subdomains), `*.example.com` (one label,
    # as in an Ingress), `*`; port ignored. Empty: any.
    allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # -- Server API keys (`Authorization: Bearer <key>` on /api/v1/), comma-separated; empty:
    # the server API answers 401 to everything. Each at least 16 characters.
    api_keys: SecretStr | None = None
    # -- A file with server API keys, one a line or comma-separated (a mounted Secret); adds to API_KEYS.
    api_keys_file: Path | None = None
    # -- Server API requests per second per key, and the burst above it (token bucket; 429 beyond).
    api_rate_limit: float = Field(50.0, gt=0, le=100_000)
    api_rate_burst: int = Field(100, ge=1, le=1_000_000)
    rate_limit: float = Field(10.0, gt=0, le=10_000)
    rate_burst: int = Field(20, ge=1, le=100_000)
    # -- Seconds a client may stay over the rate limit before it is closed with 1008.
    rate_flood_seconds: float = Field(5.0, gt=0, le=3600)
    # -- WebSockets per replica (HTTP 503 beyond); 0: no limit.
    max_connections: int = Field(10_000, ge=0, le=1_000_000)
    # -- WebSockets per user name across the cluster (HTTP 429 beyond); 0: no limit.
    max_connections_per_user: int = Field(20, ge=0, le=100_000)
    # -- How long a dead replica's connections still count against their users' limit.
    connection_lease_seconds: float = Field(30.0, ge=1, le=3600)
    ping_interval_seconds: float = Field(20.0, gt=0, le=3600)
    ping_timeout_seconds: float = Field(20.0, gt=0, le=3600)
    # -- Deadline for each HTTP request head, from the connection's start or the end of the
    # previous response on a keep-alive connection; bytes that do not complete it buy no time.
    handshake_timeout_seconds: float = Field(10.0, gt=0, le=600)
    # -- An idle keep-alive connection (no request begun) is closed after this long; the head
    # deadline runs while it idles too, so the shorter of the two applies.
    keep_alive_timeout_seconds: float = Field(5.0, gt=0, le=600)
    # -- Connections per process waiting for a request head; a new one beyond closes the oldest.
    max_pending_connections: int = Field(256, ge=1, le=100_000)
    # -- Longest request target (path and query) in bytes; 414 beyond. httptools' URL parser
    # stores offsets in 16 bits, so targets of 64 KiB or more could never be read right.
    max_url_bytes: int = Field(8192, ge=1024, le=65_535)
    # -- Most bytes of request head besides the target (method, version, header lines); 431 beyond.
    max_header_bytes: int = Field(16384, ge=4096, le=1_048_576)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for origin in value:
                parts = urlsplit(str(origin))
                if origin != "*" and (
                    parts.scheme not in ("http", "https") or not parts.netloc or parts.path
                ):
                    raise ValueError(f"{origin!r} is not an origin like https://chat.example.com")
            return [str(origin).rstrip("/").lower() for origin in value]
        return value

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            hosts = [str(host).lower().removesuffix(".") for host in value]
            for host in hosts:
                if host != "*" and not _HOST_ENTRY.fullmatch(host):
                    raise ValueError(f"{host!r} is not a host name like chat.example.com or .example.com")
            return hosts
        return value

    @field_validator("auth_jwt_secret")
    @classmethod
    def _check_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (HS256 keys shorter than the hash are guessable)")
        return value

    @field_validator("auth_jwt_public_key")
    @classmethod
    def _check_public_key(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{value} is not a readable file")
        return value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    # The parsed `redis_url`, made once by `_parse_redis_url`: every part of the process reads
    # this one Topology (a second parse is how two parts start to disagree).
    _topology: Topology | None = PrivateAttr(default=None)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        value = value.strip()
        return "" if value == "memory://" else value

    @model_validator(mode="after")
    def _parse_redis_url(self) -> Settings:
        if self.redis_url:
            try:
                self._topology = parse_redis_url(self.redis_url)
            except ValueError as exc:  # one sentence saying why, named for the variable
                raise ValueError(f"{ENV_PREFIX}REDIS_URL: {exc}") from None
        return self

    @model_validator(mode="after")
    def _check_auth_choice(self) -> Settings:
        if self.auth_jwt_secret is not None and self.auth_jwt_public_key is not None:
            raise ValueError(f"set {ENV_PREFIX}AUTH_JWT_SECRET or {ENV_PREFIX}AUTH_JWT_PUBLIC_KEY, not both")
        return self

    @model_validator(mode="after")
    def _check_api_keys(self) -> Settings:
        for key in self.api_key_list:
            if len(key) < API_KEY_MIN_CHARS:
                raise ValueError(
                    f"{ENV_PREFIX}API_KEYS / {ENV_PREFIX}API_KEYS_FILE: every key must be at least "
                    f"{API_KEY_MIN_CHARS} characters (a short key is guessable)"
                )
        return self

    @property
    def api_key_list(self) -> list[str]:
        """The server API keys from API_KEYS and API_KEYS_FILE (read at each call: build once)."""
        raw = self.api_keys.get_secret_value() if self.api_keys is not None else ""
        if self.api_keys_file is not None:
            try:
                raw += "," + self.api_keys_file.read_text()
            except OSError as exc:
                raise ValueError(f"{ENV_PREFIX}API_KEYS_FILE cannot be read: {exc.strerror}") from None
        return [key.strip() for key in raw.replace("\n", ",").split(",") if key.strip()]

    @property
    def auth_enabled(self) -> bool:
        return self.auth_jwt_secret is not None or self.auth_jwt_public_key is not None

    @model_validator(mode="after")
    def _check_frame_cap(self) -> Settings:
        if self.max_frame_bytes < self.max_message_bytes + 1024:
            raise ValueError(
                f"{ENV_PREFIX}MAX_FRAME_BYTES ({self.max_frame_bytes}) must exceed "
                f"{ENV_PREFIX}MAX_MESSAGE_BYTES ({self.max_message_bytes}) by at least 1024 bytes"
            )
        return self

    @property
    def uses_redis(self) -> bool:
        return bool(self.redis_url)

    @property
    def redis_topology(self) -> Topology:
        """Standalone, Sentinel or Cluster, parsed from `redis_url` (which must be set) at validation."""
        if self._topology is None:
            raise SettingsError(f"{ENV_PREFIX}REDIS_URL is not set: there is no Redis topology")
        return self._topology

    @property
    def redis_url_redacted(self) -> str:
        """The Redis URL with any password replaced, safe for logs."""
        return redact_url(self.redis_url) if self.redis_url else "memory://"


def redact_url(url: str) -> str:
    if "sentinel_password=" in url:
        url = re.sub(r"(sentinel_password=)[^&#]*", r"\1***", url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    # The host part as written: Sentinel and Cluster URLs list several host:port pairs.
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; raise SettingsError with one line naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if first["loc"]:
            message = f"{ENV_PREFIX}{str(first['loc'][0]).upper()}: {message}"
        raise SettingsError(message) from None
