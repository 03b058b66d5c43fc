"""Pub/sub events from the reader straight into each subscription's queue.

broadcaster 0.3.1 moves every event through a listener task of its own: the backend's queue,
then the listener wakes and copies the event into each subscriber's queue, then the room task
wakes. That is one task wake-up more per pub/sub read than the work needs, and in small rooms
a read carries about one message (100 rooms of 4 at 1,000 msg/s, py-spy on one replica: the
listener 1.5 % of the samples, its task switch more in the loop's own share). `relay` hands
the reader a function that does the listener's copy at once, in the reader's own turn, so
the room task is the only hop.

The coupling is to broadcaster's private `Broadcast._subscribers` (channel -> set of queues,
which `Broadcast.subscribe` maintains), fenced here and checked by tests/test_broker.py
against the pinned version. Order is kept: events reach each queue in the order the reader
hands them on, gap marks included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from broadcaster import Broadcast, Event

from .backend import ChannelBackend

# What a subscription's queue holds in broadcaster 0.3.1 (None marks the end of a subscription).
Queues = dict[str, set["asyncio.Queue[Event | None]"]]


def subscriber_queues(broadcast: Broadcast) -> Queues:
    """broadcaster's own table of subscription queues per channel (the fenced internal)."""
    queues = getattr(broadcast, "_subscribers", None)
    if not isinstance(queues, dict):
        raise RuntimeError("broadcaster no longer keeps Broadcast._subscribers: chorus.relay needs updating")
    return queues


def relay(broadcast: Broadcast) -> Callable[[Event], None]:
    """A function that puts an event on every queue subscribed to its channel, now."""
    queues = subscriber_queues(broadcast)

    def put(event: Event) -> None:
        # put_nowait runs no code that could change the set (it only wakes a waiter).
        for queue in queues.get(event.channel, ()):
            queue.put_nowait(event)

    return put


def relayed(backend: ChannelBackend) -> Broadcast:
    """A `Broadcast` over `backend` whose reader fills the subscriptions' queues itself."""
    broadcast = Broadcast(backend=backend)
    backend.deliver_to(relay(broadcast))
    return broadcast
