"""chorus.client speaks typing, edits, deletes, reactions and read markers, across two replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from chorus.client import Delete, Edit, Message, Reaction, Read, SendRejected, Typing, connect
from chorus.client.events import Event
from chorus.devcluster import LocalCluster

pytestmark = pytest.mark.anyio


async def next_of(room: object, kind: type[Event], timeout: float = 10) -> Event:
    async def find() -> Event:
        async for event in room:  # type: ignore[attr-defined]
            if isinstance(event, kind):
                return event
        raise AssertionError("the room ended")

    return await asyncio.wait_for(find(), timeout)


async def test_client_sends_and_receives_every_new_frame(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster(2)
    async with (
        connect(cluster.replica_ws_url(0), "cf", username="alice", history=0) as alice,
        connect(cluster.replica_ws_url(1), "cf", username="bob", history=0) as bob,
        connect(cluster.replica_ws_url(1), "cf", username="alice", history=0) as alice_too,
    ):
        ack = await alice.send("helo")
        assert isinstance(await next_of(bob, Message), Message)
        await alice.typing()
        typing = await next_of(bob, Typing)
        assert isinstance(typing, Typing) and typing.user == "alice"
        edit_ack = await alice.edit(ack.id, "hello")
        edit = await next_of(bob, Edit)
        assert isinstance(edit, Edit) and (edit.id, edit.target, edit.text) == (edit_ack.id, ack.id, "hello")
        await bob.react(ack.id, "👍")
        reaction = await next_of(alice, Reaction)
        assert isinstance(reaction, Reaction) and (reaction.user, reaction.emoji, reaction.on) == (
            "bob",
            "👍",
            True,
        )
        with pytest.raises(SendRejected) as refused:
            await bob.edit(ack.id, "mine now")
        assert refused.value.code == "forbidden"
        await alice.read(ack.id)
        read = await next_of(alice_too, Read)
        assert isinstance(read, Read) and read.id == ack.id and read.room == "cf"
        await alice.delete(ack.id)
        delete = await next_of(bob, Delete)
        assert isinstance(delete, Delete) and delete.target == ack.id
    async with connect(cluster.url.replace("http", "ws"), "cf", username="carol", history=5) as carol:
        message = await next_of(carol, Message)
        assert isinstance(message, Message) and message.deleted and message.text == ""
