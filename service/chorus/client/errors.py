"""What `chorus.client` raises: one base class, each error carrying what the wire said."""

from __future__ import annotations

from ..protocol import ERROR_RATE_LIMITED, ERROR_UNAVAILABLE


class ChorusError(Exception):
    """Base class of every error `chorus.client` raises."""


class Disconnected(ChorusError):
    """The room is closed for good: no more events, no more sends.

    `code` is the last close code (None when no socket was ever open or the caller closed the
    room); `reason` says why the client stopped (a close code reconnecting cannot fix, the
    reconnect budget spent, or the caller's own `close()`).
    """

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class HandshakeRefused(Disconnected):
    """The server answered the WebSocket handshake with an HTTP status instead of 101.

    400 and 403 are never retried (a bad room or name, a missing or expired token); 429 and 503
    are, after at least `retry_after` seconds when the server sent `Retry-After`.
    """

    def __init__(self, status: int, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"handshake refused with HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class SendRejected(ChorusError):
    """The server answered a send with an `error` frame: the message was **not** stored.

    `code` is the protocol's error code: `invalid`, `too_large`, `rate_limited` or `unavailable`
    (later servers may add more).
    """

    def __init__(self, code: str, detail: str, client_id: str | None) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.client_id = client_id

    @property
    def retryable(self) -> bool:
        """True when sending the same text again later may succeed (`rate_limited`, `unavailable`)."""
        return self.code in (ERROR_RATE_LIMITED, ERROR_UNAVAILABLE)


class SendUnconfirmed(ChorusError):
    """The socket closed (or the ack did not come in time) after the message was written.

    The message may or may not have been stored: a resumed room replays it as a `Message` from
    you if it was. Sending it again with the same `client_id` is allowed, but the server does
    not deduplicate by `client_id`, so a resend can store it twice.
    """

    def __init__(self, client_id: str, why: str) -> None:
        super().__init__(f"message {client_id!r} not confirmed: {why}")
        self.client_id = client_id
        self.why = why


class NotConnected(ChorusError):
    """The room was reconnecting and did not come back within the send's timeout: not sent."""
