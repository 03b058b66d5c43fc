"""One WebSocket session: the handshake gate, the join, the receive loop, the goodbye."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
import time
from collections.abc import Coroutine
from functools import partial
from typing import Any, Final

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, QueryParams
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocketState

from . import joins, metrics
from .broker import BrokerUnavailable, Change
from .connection import Connection
from .deadlines import Deadline
from .presence import Member
from .protocol import (
    CLOSE_ABNORMAL,
    CLOSE_INTERNAL_ERROR,
    CLOSE_INVALID_PAYLOAD,
    CLOSE_NO_STATUS,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_UNSUPPORTED_DATA,
    DEFAULT_HISTORY,
    ERROR_FORBIDDEN,
    ERROR_INVALID,
    ERROR_NOT_FOUND,
    ERROR_RATE_LIMITED,
    ERROR_UNAVAILABLE,
    MAX_HISTORY,
    MAX_REACTIONS_PER_MESSAGE,
    REJECT_BAD_REQUEST,
    REJECT_BINARY,
    REJECT_DRAINING,
    REJECT_FLOOD,
    REJECT_FRAME_TOO_LARGE,
    REJECT_INVALID_UTF8,
    REJECT_MAX_CONNECTIONS,
    REJECT_MAX_CONNECTIONS_PER_USER,
    REJECT_REBALANCE,
    REJECT_TOO_MANY_HANDSHAKES,
    ROOM_RULE,
    TYPE_DELETE,
    TYPE_EDIT,
    TYPE_MESSAGE,
    TYPE_REACT,
    TYPE_READ,
    TYPE_TYPING,
    TYPING_INTERVAL_SECONDS,
    USERNAME_RULE,
    ClientDelete,
    ClientEdit,
    ClientFrame,
    ClientMessage,
    ClientReact,
    ClientRead,
    ClientTyping,
    ProtocolError,
    StreamId,
    ack_frame,
    change_tail,
    close_label,
    encode_published,
    error_frame,
    is_room,
    is_username,
    message_tail,
    parse_client_frame,
    parse_since,
    typing_frame,
    user_key,
    welcome_frame,
)
from .runtime import Runtime, runtime_in
from .security import Identity, Rejection, TokenBucket
from .sockets import RAW_SEND, close_now, lighten

log = logging.getLogger("chorus.session")

WS_PREFIX: Final = "/ws/"
PEER_CLOSE_WAIT_SECONDS: Final = 1.0
# A refused handshake is told to come back after 1 to 5 s, drawn per refusal: a wave shed at
# once returns spread over four seconds instead of as the same wave one second later.
RETRY_AFTER_SECONDS: Final = (1, 5)
# A draining replica, or one shedding for rebalance, sends a client on at once: another replica
# can take it now, and a longer wait only stretches a rolling restart's time until every
# socket is back (22.7-25.5 s against a 20 s target at 8,900 sockets with 1-5 s).
RETRY_AFTER_ELSEWHERE_SECONDS: Final = (1, 2)
_ELSEWHERE: Final = frozenset({REJECT_DRAINING, REJECT_REBALANCE})


def retry_after(reason: str = "") -> str:
    """A jittered `Retry-After` value (whole seconds, as RFC 9110 has it)."""
    bounds = RETRY_AFTER_ELSEWHERE_SECONDS if reason in _ELSEWHERE else RETRY_AFTER_SECONDS
    return str(random.randint(*bounds))


def is_chat_socket(scope: Scope) -> bool:
    """True for a WebSocket to `/ws/{room}`, which `serve_chat_socket` serves."""
    return scope["type"] == "websocket" and str(scope["path"]).startswith(WS_PREFIX)


def serve_chat_socket(scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
    """Serve `/ws/{room}` straight from the app's entry (`ChorusApp.__call__`), past its middleware.

    A WebSocket lives for hours, and every coroutine between the server and the receive loop
    stays alive with it: FastAPI's and Starlette's middleware (telemetry, body limit, errors,
    exceptions) and ours cost about 3 KiB per idle socket (tracemalloc, docs/perf/idle.md).
    None of them acts on a WebSocket that Chorus serves itself. Not `async` either: the
    caller awaits `serve_socket`'s coroutine itself, one frame less per socket.
    """
    scope[RAW_SEND] = send  # the server's own send: close_now and FrameWriter reach it
    runtime = runtime_in(scope.get("state") or {})
    if runtime is None:
        raise RuntimeError("no Chorus runtime in the lifespan state: is the lifespan on?")
    return serve_socket(WebSocket(scope, receive, send), scope["path"][len(WS_PREFIX) :], runtime)


async def serve_socket(websocket: WebSocket, room: str, runtime: Runtime) -> None:
    """Run one WebSocket from handshake to close."""
    try:
        identity, subprotocol, history = _admit(websocket, room, runtime)
    except Rejection as rejection:
        metrics.REJECTIONS.labels(rejection.reason).inc()
        # The handshake's contract since the first release: any token problem is 403 (a
        # WebSocket client has no credential challenge to answer); the HTTP reads say 401.
        status = 403 if rejection.status == 401 else rejection.status
        headers = {"Retry-After": retry_after(rejection.reason)} if status == 503 else None
        response = JSONResponse({"detail": rejection.detail}, status_code=status, headers=headers)
        await websocket.send_denial_response(response)
        return
    tag = runtime.next_tag()
    runtime.sockets += 1
    # From here to the welcome the socket does Redis work (lease, subscription, presence): it
    # counts against CHORUS_MAX_PENDING_HANDSHAKES until `_session` ends the handshake (or we do).
    handshake = _Handshake(runtime)
    try:
        # Counted per user_key: `Dave` and `dave` share the cap.
        if not await runtime.limiter.acquire(user_key(identity.user), tag.decode()):
            metrics.REJECTIONS.labels(REJECT_MAX_CONNECTIONS_PER_USER).inc()
            limit = runtime.settings.max_connections_per_user
            detail = f"{identity.user} already has {limit} connections open"
            await websocket.send_denial_response(JSONResponse({"detail": detail}, status_code=429))
            return
        try:
            await _session(websocket, room, runtime, identity, subprotocol, history, tag, handshake)
        finally:
            await runtime.limiter.release(user_key(identity.user), tag.decode())
    finally:
        handshake.end()
        runtime.sockets -= 1


class _Handshake:
    """Counts one socket in `Runtime.handshakes` until `end()` (idempotent)."""

    __slots__ = ("_runtime",)

    def __init__(self, runtime: Runtime) -> None:
        self._runtime: Runtime | None = runtime
        runtime.handshakes += 1

    def end(self) -> None:
        if self._runtime is not None:
            self._runtime.handshakes -= 1
            self._runtime = None


def _admit(websocket: WebSocket, room: str, runtime: Runtime) -> tuple[Identity, str | None, int]:
    """Every check that happens before accept(); raises Rejection. No Redis work here."""
    settings = runtime.settings
    # Locals, not Starlette's `websocket.headers`/`query_params`: those are cached on the
    # WebSocket and would be kept for the socket's lifetime (about 0.6 KiB, docs/perf/idle.md).
    params = QueryParams(websocket.scope["query_string"])
    headers = Headers(scope=websocket.scope)
    runtime.gatekeeper.check_host(headers)
    if not is_room(room):
        raise Rejection(400, REJECT_BAD_REQUEST, ROOM_RULE)
    runtime.gatekeeper.check_origin(headers)
    identity, subprotocol = runtime.gatekeeper.identify(headers, params, room)
    if not identity.user:
        identity = Identity(f"anon-{secrets.token_hex(2)}")
    if not is_username(identity.user):
        raise Rejection(400, REJECT_BAD_REQUEST, USERNAME_RULE)
    try:
        history = int(params.get("history", DEFAULT_HISTORY))
        if not 0 <= history <= MAX_HISTORY:
            raise ValueError
    except ValueError:
        raise Rejection(
            400, REJECT_BAD_REQUEST, f"history must be a whole number from 0 to {MAX_HISTORY}"
        ) from None
    if runtime.health.draining:
        raise Rejection(503, REJECT_DRAINING, "this replica is draining; reconnect")
    if runtime.rebalancer is not None and runtime.rebalancer.refusing:
        raise Rejection(503, REJECT_REBALANCE, "this replica holds more than its share; reconnect")
    if settings.max_connections and runtime.sockets >= settings.max_connections:
        raise Rejection(503, REJECT_MAX_CONNECTIONS, "this replica is full; reconnect")
    if runtime.handshakes >= settings.max_pending_handshakes:
        # Shed a reconnect wave here, before any Redis work; readiness is not touched, so the
        # wave does not also take the replica out of the Service.
        raise Rejection(503, REJECT_TOO_MANY_HANDSHAKES, "this replica is busy admitting others; retry later")
    return identity, subprotocol, history


async def _session(
    websocket: WebSocket,
    room: str,
    runtime: Runtime,
    identity: Identity,
    subprotocol: str | None,
    history: int,
    tag: bytes,
    handshake: _Handshake,
) -> None:
    settings = runtime.settings
    resume, since = _resume_point(websocket.scope)
    user = identity.user

    await websocket.accept(subprotocol=subprotocol)
    established = lighten(websocket.scope)
    runtime.keepalive.watch(established)
    metrics.CONNECTIONS.inc()
    metrics.CONNECTIONS_OPENED.inc()
    conn = Connection(
        room=room,
        user=user,
        tag=tag,
        limit=settings.send_queue_size,
        send=websocket.send_text,
        close=partial(_close, websocket),
    )
    expiry = _close_at_expiry(runtime, conn, identity)
    close_code: int | None = None  # the client's, once its close (or the drop) is read
    hub = runtime.hub
    member = Member(room, user, tag.decode())
    bucket = TokenBucket(settings.rate_limit, settings.rate_burst)
    state = _SocketState(identity)
    try:
        try:
            position = await hub.join(conn)
            # Presence, the backlog read and the room record: one round trip (chorus.joins).
            online, backlog = await joins.enter(
                runtime.broker,
                runtime.presence,
                member,
                last_id=hub.last_id(room),
                since=since,
                resume=resume,
                history=history,
                replay_limit=hub.replay_limit,
            )
            handshake.end()  # before the welcome is written: a client that waits for it never overlaps
            conn.offer(welcome_frame(room, user, settings.replica_name, online, position), force=True)
            await hub.replay(conn, since=since, resume=resume, history=history, backlog=backlog)
            if backlog is None:
                await _record_join(runtime, user, room)
        except BrokerUnavailable as exc:
            log.warning("cannot join %s: %s", room, exc)
            conn.close(CLOSE_INTERNAL_ERROR, "broker unavailable")
        finally:
            handshake.end()
        while not conn.closing:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                close_code = _peer_close_code(message)
                break
            text = message.get("text")
            if text is None:
                metrics.REJECTIONS.labels(REJECT_BINARY).inc()
                conn.close(CLOSE_UNSUPPORTED_DATA, "binary frames are not supported")
                break
            metrics.MESSAGES_RECEIVED.inc()
            if not bucket.take():
                _rate_limited(conn, bucket, settings.rate_flood_seconds, text)
                continue
            await _handle_text(runtime, conn, text, state)
    finally:
        runtime.deadlines.cancel(expiry)
        runtime.keepalive.forget(established)
        hub.leave(conn)
        await runtime.presence.leave(member)
        if conn.closing and conn.closed_with is not None:
            close_code = conn.closed_with
        elif close_code is None:
            # A write failed because the peer went away (say, right after the welcome): its
            # close code, or the drop, is waiting in the receive queue.
            close_code = await _pending_close_code(websocket)
        await conn.wait_closed()
        metrics.CONNECTIONS.dec()
        metrics.CONNECTIONS_CLOSED.labels(close_label(close_code)).inc()
        if close_code == CLOSE_INVALID_PAYLOAD:
            metrics.REJECTIONS.labels(REJECT_INVALID_UTF8).inc()
        elif close_code == CLOSE_TOO_BIG:
            metrics.REJECTIONS.labels(REJECT_FRAME_TOO_LARGE).inc()
        if websocket.application_state == WebSocketState.CONNECTED and not conn.closing:
            try:
                await websocket.close()
            except Exception:  # the peer is gone; nothing to tell it
                pass


def _resume_point(scope: Scope) -> tuple[bool, StreamId | None]:
    """Whether the client sent `since`, and its value (None when malformed).

    A helper, so the parsed query is not a local of `_session`, kept as long as the socket
    (about 0.5 KiB per idle socket, tracemalloc).
    """
    params = QueryParams(scope["query_string"])
    return "since" in params, parse_since(params.get("since"))


async def _record_join(runtime: Runtime, user: str, room: str) -> None:
    """Add the room to the user's rooms (GET /api/me/rooms); the chat works without it."""
    try:
        await runtime.broker.joined(user_key(user), room, runtime.hub.last_id(room))
    except BrokerUnavailable as exc:
        log.warning("could not record that %s joined %s: %s", user, room, exc)


def _peer_close_code(message: Message) -> int | None:
    """The code of a `websocket.disconnect`; None when the connection dropped without a close frame.

    uvicorn's websockets-sansio reports a lost connection after the handshake as 1005 with no
    `reason` key (`connection_lost`), where a real close frame always carries `reason`.
    """
    code = message.get("code", CLOSE_NO_STATUS)
    if code == CLOSE_ABNORMAL or (code == CLOSE_NO_STATUS and "reason" not in message):
        return None
    return int(code)


async def _pending_close_code(websocket: WebSocket) -> int | None:
    """Read the disconnect a peer that went away has left queued (bounded: it may not be there)."""
    if websocket.client_state != WebSocketState.CONNECTED:
        return None
    try:
        message = await asyncio.wait_for(websocket.receive(), PEER_CLOSE_WAIT_SECONDS)
    except Exception:  # TimeoutError, or the socket is already gone
        return None
    return _peer_close_code(message) if message["type"] == "websocket.disconnect" else None


def _close_at_expiry(runtime: Runtime, conn: Connection, identity: Identity) -> Deadline | None:
    """A socket may not outlive its token: close it with 1008 when the token expires."""
    if identity.expires_at is None:
        return None
    return runtime.deadlines.at(identity.expires_at, partial(conn.close, CLOSE_POLICY, "token expired"))


def _rate_limited(conn: Connection, bucket: TokenBucket, flood_seconds: float, text: str) -> None:
    metrics.MESSAGES_DROPPED.labels(metrics.DROP_RATE_LIMITED).inc()
    if bucket.flooding_for() >= flood_seconds:
        metrics.REJECTIONS.labels(REJECT_FLOOD).inc()
        log.info("closing %s in %s: over the rate limit for %.0fs", conn.user, conn.room, flood_seconds)
        conn.close(CLOSE_POLICY, "rate limit exceeded")
        return
    try:
        client_id = parse_client_frame(text, max_message_bytes=len(text) * 4 + 1).client_id
    except ProtocolError as exc:
        client_id = exc.client_id
    conn.offer(error_frame(ERROR_RATE_LIMITED, "slow down: the message was not sent", client_id))


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if not close_now(websocket.scope, code, reason):
        await websocket.close(code, reason)


async def _handle_text(runtime: Runtime, conn: Connection, text: str, state: _SocketState) -> None:
    settings = runtime.settings
    try:
        frame = parse_client_frame(text, max_message_bytes=settings.max_message_bytes)
    except ProtocolError as exc:
        metrics.MESSAGES_DROPPED.labels(exc.code).inc()
        conn.offer(error_frame(exc.code, exc.detail, exc.client_id))
        return
    metrics.FRAMES_RECEIVED.labels(_frame_type(frame)).inc()
    try:
        if isinstance(frame, ClientMessage):
            await _post(runtime, conn, frame)
        elif isinstance(frame, ClientTyping):
            await _typing(runtime, conn, state)
        elif isinstance(frame, ClientEdit | ClientDelete):
            await _change(runtime, conn, frame, state)
        elif isinstance(frame, ClientReact):
            await _react(runtime, conn, frame)
        else:
            await _read(runtime, conn, frame)
    except BrokerUnavailable as exc:
        metrics.MESSAGES_DROPPED.labels(metrics.DROP_BROKER_UNAVAILABLE).inc()
        log.warning("%s from %s in %s not done: %s", _frame_type(frame), conn.user, conn.room, exc)
        detail = "not done: the broker is unavailable"
        conn.offer(error_frame(ERROR_UNAVAILABLE, detail, frame.client_id))


class _SocketState:
    """What one socket's receive loop remembers between frames."""

    __slots__ = ("last_typing", "moderator")

    def __init__(self, identity: Identity) -> None:
        self.last_typing = -math.inf
        self.moderator = identity.is_moderator


def _frame_type(frame: ClientFrame) -> str:
    return _FRAME_TYPES[type(frame)]


_FRAME_TYPES: Final[dict[type, str]] = {
    ClientMessage: TYPE_MESSAGE,
    ClientTyping: TYPE_TYPING,
    ClientEdit: TYPE_EDIT,
    ClientDelete: TYPE_DELETE,
    ClientReact: TYPE_REACT,
    ClientRead: TYPE_READ,
}


async def _post(runtime: Runtime, conn: Connection, message: ClientMessage) -> None:
    tail = message_tail(
        room=conn.room,
        user=conn.user,
        text=message.text,
        ts=time.time(),
        replica=runtime.settings.replica_name,
    )
    msg_id = await runtime.broker.append(conn.room, tail, conn.tag)
    metrics.MESSAGES_PUBLISHED.inc()
    conn.offer(ack_frame(msg_id.decode(), message.client_id))


async def _typing(runtime: Runtime, conn: Connection, state: _SocketState) -> None:
    # Dropped silently when too soon: here first (no Redis work), then per user across replicas.
    now = time.monotonic()
    if now - state.last_typing < TYPING_INTERVAL_SECONDS:
        return
    state.last_typing = now
    payload = encode_published(conn.tag, typing_frame(conn.room, conn.user))
    await runtime.broker.typing(conn.room, user_key(conn.user), payload, interval=TYPING_INTERVAL_SECONDS)


async def _change(
    runtime: Runtime, conn: Connection, frame: ClientEdit | ClientDelete, state: _SocketState
) -> None:
    ts = time.time()
    if isinstance(frame, ClientEdit):
        kind = TYPE_EDIT
        tail = change_tail(ts=ts, target=frame.target, room=conn.room, user=conn.user, text=frame.text)
    else:
        kind = TYPE_DELETE
        tail = change_tail(ts=ts, target=frame.target, room=conn.room, user=conn.user)
    change = await runtime.broker.append_change(
        conn.room, kind, tail, conn.tag, target=frame.target, author=conn.user, moderator=state.moderator
    )
    _answer(conn, change, frame.client_id)


async def _react(runtime: Runtime, conn: Connection, frame: ClientReact) -> None:
    tail = change_tail(
        ts=time.time(), target=frame.target, room=conn.room, user=conn.user, emoji=frame.emoji, on=frame.on
    )
    change = await runtime.broker.react(
        conn.room,
        tail,
        conn.tag,
        target=frame.target,
        user=user_key(conn.user),
        emoji=frame.emoji,
        on=frame.on,
        limit=MAX_REACTIONS_PER_MESSAGE,
    )
    _answer(conn, change, frame.client_id, same_id=frame.target)


def _answer(conn: Connection, change: Change, client_id: str | None, same_id: str | None = None) -> None:
    if change.outcome == "ok":
        metrics.MESSAGES_PUBLISHED.inc()
        conn.offer(ack_frame(change.id.decode(), client_id))
    elif change.outcome == "same" and same_id is not None:
        conn.offer(ack_frame(same_id, client_id))  # idempotent: nothing appended
    elif change.outcome == ERROR_NOT_FOUND:
        conn.offer(error_frame(ERROR_NOT_FOUND, "no such message in this room's history", client_id))
    elif change.outcome == ERROR_FORBIDDEN:
        conn.offer(
            error_frame(ERROR_FORBIDDEN, "only its author or a moderator may change a message", client_id)
        )
    else:
        detail = f"a message takes at most {MAX_REACTIONS_PER_MESSAGE} different reactions"
        conn.offer(error_frame(ERROR_INVALID, detail, client_id))


async def _read(runtime: Runtime, conn: Connection, frame: ClientRead) -> None:
    if await runtime.broker.mark_read(user_key(conn.user), conn.room, frame.id):
        await runtime.hub.announce_read(conn, frame.id)
