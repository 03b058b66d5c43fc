"""The server API for backends and bots: `/api/v1/`, authenticated by API key.

Keys come from CHORUS_API_KEYS / CHORUS_API_KEYS_FILE and are compared in constant time
(every key, every request); they are never logged. Each key has its own token bucket.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Final

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from . import metrics
from .broker import BrokerUnavailable
from .config import Settings
from .protocol import (
    API_USER,
    ERROR_NOT_FOUND,
    ROOM_RULE,
    TYPE_DELETE,
    USERNAME_RULE,
    ProtocolError,
    StreamId,
    change_tail,
    check_text,
    is_room,
    is_username,
    message_frame,
    message_tail,
)
from .runtime import runtime_of
from .security import TokenBucket

API_SENDER: Final = b"api"  # the sender tag of what the API publishes: no socket has it


class Detail(BaseModel):
    detail: str


class NewMessage(BaseModel):
    user: str
    text: str


class RoomOccupancy(BaseModel):
    room: str
    online: int


class Rooms(BaseModel):
    rooms: list[RoomOccupancy]


_ERRORS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": Detail, "description": "No API key, or a wrong one."},
    429: {
        "model": Detail,
        "description": "This key is over its rate limit; retry after Retry-After seconds.",
    },
    503: {"model": Detail, "description": "Redis is unavailable."},
}


class ApiKeys:
    """The configured keys and a token bucket per key."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [key.encode() for key in settings.api_key_list]
        self._rate = settings.api_rate_limit
        self._burst = settings.api_rate_burst
        self._buckets = [TokenBucket(self._rate, self._burst) for _ in self._keys]

    def check(self, authorization: str) -> None:
        """Raise HTTPException 401 (no or wrong key) or 429 (over the key's rate)."""
        scheme, _, credentials = authorization.partition(" ")
        offered = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        found = -1
        for index, key in enumerate(self._keys):  # no early exit: the time says nothing
            if hmac.compare_digest(offered, key) and offered:
                found = index
        if found < 0:
            raise HTTPException(
                401,
                "a valid API key is required (Authorization: Bearer <key>)",
                {"WWW-Authenticate": "Bearer"},
            )
        if not self._buckets[found].take():
            raise HTTPException(
                429, "this API key is over its rate limit", {"Retry-After": str(max(1, int(1 / self._rate)))}
            )


def create_api_router(settings: Settings) -> APIRouter:
    keys = ApiKeys(settings)

    def api_key(request: Request) -> None:
        keys.check(request.headers.get("authorization", ""))

    router = APIRouter(
        prefix="/api/v1", dependencies=[Depends(api_key)], responses=_ERRORS, tags=["server API"]
    )

    @router.post(
        "/rooms/{room}/messages",
        status_code=201,
        responses={201: {"description": "The message frame, as members get it."}, 400: {"model": Detail}},
    )
    async def post_message(request: Request, room: str, body: NewMessage) -> Response:
        """Post a message into a room as `user`; members on every replica get it."""
        runtime = runtime_of(request)
        _check_room(room)
        if not is_username(body.user):
            raise HTTPException(400, USERNAME_RULE)
        try:
            text = check_text(body.text, runtime.settings.max_message_bytes)
        except ProtocolError as exc:
            raise HTTPException(400, exc.detail) from None
        tail = message_tail(
            room=room, user=body.user, text=text, ts=time.time(), replica=runtime.settings.replica_name
        )
        try:
            msg_id = await runtime.broker.append(room, tail, API_SENDER)
        except BrokerUnavailable:
            raise HTTPException(503, "the broker is unavailable") from None
        metrics.MESSAGES_PUBLISHED.inc()
        return Response(message_frame(msg_id, tail), status_code=201, media_type="application/json")

    @router.delete(
        "/rooms/{room}/messages/{message_id}",
        status_code=204,
        responses={404: {"model": Detail, "description": "No such message in the room's history."}},
    )
    async def delete_message(request: Request, room: str, message_id: str) -> Response:
        """Delete a message (as a moderator would); members get a `delete` frame."""
        runtime = runtime_of(request)
        _check_room(room)
        try:
            target = str(StreamId.parse(message_id))
        except ValueError:
            raise HTTPException(404, "no such message in this room's history") from None
        tail = change_tail(ts=time.time(), target=target, room=room, user=API_USER)
        try:
            change = await runtime.broker.append_change(
                room, TYPE_DELETE, tail, API_SENDER, target=target, author=API_USER, moderator=True
            )
        except BrokerUnavailable:
            raise HTTPException(503, "the broker is unavailable") from None
        if change.outcome == ERROR_NOT_FOUND:
            raise HTTPException(404, "no such message in this room's history")
        return Response(status_code=204)

    @router.post("/users/{user}/disconnect", status_code=202, responses={400: {"model": Detail}})
    async def disconnect(request: Request, user: str) -> JSONResponse:
        """Close every socket of `user` on every replica with 4001 ("disconnected by the server")."""
        if not is_username(user):
            raise HTTPException(400, USERNAME_RULE)
        try:
            await runtime_of(request).hub.disconnect_user(user)
        except BrokerUnavailable:
            raise HTTPException(503, "the broker is unavailable") from None
        return JSONResponse({"detail": f"every socket of {user} is being closed"}, status_code=202)

    @router.get("/rooms")
    async def rooms(request: Request) -> Rooms:
        """Rooms with members now, and how many users each."""
        try:
            occupancy = await runtime_of(request).presence.occupancy()
        except BrokerUnavailable:
            raise HTTPException(503, "the broker is unavailable") from None
        return Rooms(rooms=[RoomOccupancy(room=room, online=n) for room, n in sorted(occupancy.items())])

    return router


def _check_room(room: str) -> None:
    if not is_room(room):
        raise HTTPException(400, ROOM_RULE)
