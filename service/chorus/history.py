"""Messages in their latest form: a room's stream entries with later changes folded in.

The stream keeps every change as its own entry (so live clients and `since=` resumes apply
them in order); the history API and the replay on join show each message as it stands now:
an edit replaces `text` and adds `edited_ts`, a delete leaves `"deleted":true` and no text,
reactions add `"reactions":{emoji:[users...]}` (only when there are some).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .protocol import TYPE_DELETE, TYPE_EDIT, TYPE_MESSAGE, TYPE_REACTION, message_frame

if TYPE_CHECKING:
    from .broker import Entry


@dataclass(slots=True)
class _Changes:
    text: str | None = None
    edited_ts: float | None = None
    deleted: bool = False
    reactions: dict[str, dict[str, None]] = field(default_factory=dict)  # emoji -> users, in order


def fold(entries: Sequence[Entry]) -> list[bytes]:
    """The message frames among `entries` (oldest first), each in its latest form."""
    changes: dict[str, _Changes] = {}
    for entry in entries:
        if entry.kind == TYPE_MESSAGE:
            continue
        body = orjson.loads(entry.tail)
        target = changes.setdefault(str(body.get("target")), _Changes())
        if entry.kind == TYPE_EDIT:
            target.text, target.edited_ts = body.get("text"), body.get("ts")
        elif entry.kind == TYPE_DELETE:
            target.deleted = True
        elif entry.kind == TYPE_REACTION:
            users = target.reactions.setdefault(str(body.get("emoji")), {})
            if body.get("on"):
                users[str(body.get("user"))] = None
            else:
                users.pop(str(body.get("user")), None)
    frames: list[bytes] = []
    for entry in entries:
        if entry.kind != TYPE_MESSAGE:
            continue
        change = changes.get(entry.raw_id.decode())
        if change is None:
            frames.append(entry.frame)  # the common case: the stored bytes, never parsed
            continue
        frames.append(message_frame(entry.raw_id, orjson.dumps(_apply(orjson.loads(entry.tail), change))))
    return frames


def _apply(body: dict[str, Any], change: _Changes) -> dict[str, Any]:
    if change.deleted:
        body.pop("text", None)
        body["deleted"] = True
        return body
    if change.text is not None:
        body["text"] = change.text
        body["edited_ts"] = change.edited_ts
    reactions = {emoji: list(users) for emoji, users in change.reactions.items() if users}
    if reactions:
        body["reactions"] = reactions
    return body
