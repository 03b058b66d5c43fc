"""When a shedding replica refuses handshakes (chorus.rebalance): only when a client has somewhere to go."""

from __future__ import annotations

from typing import Any, cast

import pytest

from chorus.broker import Load
from chorus.rebalance import (
    REFUSE_AFTER_MOVES_SECONDS,
    Rebalancer,
    excess,
    missing_allowed,
    refuses,
    sheds_somewhere,
)


def load(process: str, sockets: int, *, ready: bool = True, ready_for: float = 60.0) -> Load:
    return Load(process, sockets, ready, ready_for if ready else 0.0, 0.0)


def test_a_full_replica_refuses_while_a_ready_one_is_below_the_mean() -> None:
    fleet = [load("a", 300), load("b", 300), load("c", 0)]
    assert refuses(fleet[0], fleet, 0.1, 30)
    assert not refuses(fleet[2], fleet, 0.1, 30), "the under-full replica takes everyone"


def test_no_refusal_in_a_fleet_of_one_or_a_balanced_fleet() -> None:
    alone = [load("a", 5000)]
    assert not refuses(alone[0], alone, 0.1, 30)
    balanced = [load("a", 205), load("b", 200), load("c", 195)]
    assert not any(refuses(mine, balanced, 0.1, 30) for mine in balanced)


def test_no_refusal_while_the_fleet_is_changing() -> None:
    just_ready = [load("a", 300), load("b", 300), load("c", 0, ready_for=1.0)]
    assert not refuses(just_ready[0], just_ready, 0.1, 30), "the new replica has not settled"
    not_ready = [load("a", 300), load("b", 300), load("c", 0, ready=False)]
    assert not refuses(not_ready[0], not_ready, 0.1, 30), "nowhere ready to go"
    assert not refuses(load("a", 300, ready=False), [load("a", 300, ready=False), load("c", 0)], 0.1, 0)


def test_missing_sockets_bound_the_refusal() -> None:
    assert missing_allowed(10_000, 3, 20.0) == 1000  # a tenth of a large fleet
    assert missing_allowed(600, 3, 20.0) == 600  # what 3 processes shed in 10 s, in a small one


def test_sockets_on_their_way_count_in_the_mean() -> None:
    # 600 sockets, 80 shed a moment ago and not back yet: the mean is still 200, not 173.
    fleet = [load("a", 230), load("b", 230), load("c", 60)]
    assert excess(230, fleet, 0.1) == 56
    assert excess(230, fleet, 0.1, missing=80) == 30


def test_a_replica_at_the_mean_keeps_refusing_until_the_fleet_is_balanced() -> None:
    fleet = [load("a", 200), load("b", 260), load("c", 140)]
    assert excess(200, fleet, 0.1) == 0
    assert refuses(fleet[0], fleet, 0.1, 30), "or b's shed sockets land on a"
    assert not refuses(fleet[2], fleet, 0.1, 30)


class _Broker:
    """Hands the rebalancer the fleet a test sets; its own report replaces its entry."""

    def __init__(self) -> None:
        self.others: list[Load] = []

    async def report_load(self, process: str, load: Load, *, ttl: float) -> list[Load]:
        return [load, *self.others]


class _Conn:
    closing = False

    def close_after_flush(self, code: int, reason: str) -> None:
        self.closing = True


class _Hub:
    def __init__(self, sockets: int) -> None:
        self.connections = {_Conn() for _ in range(sockets)}


class _Health:
    ready = True
    draining = False


def _rebalancer(hub: _Hub, *, rate: float, settle: float) -> tuple[Rebalancer, _Broker, _Hub]:
    """Process "a" holding `hub`'s sockets, beating every second, tolerance 0.1."""
    broker = _Broker()
    rebalancer = Rebalancer(
        cast(Any, broker), cast(Any, hub), cast(Any, _Health()),
        process="a", interval=1.0, tolerance=0.1, rate=rate, settle=settle,
    )  # fmt: skip
    return rebalancer, broker, hub


@pytest.mark.anyio
async def test_refusals_stop_when_shed_sockets_never_come_back() -> None:
    # The new replica reports ready but the balancer sends it no one: refusing would empty
    # the fleet, so the refusals stop until the fleet is balanced again. (A beat sheds one socket
    # within its 1 s interval; a refusal lasts two intervals: the asserts see it in force.)
    rebalancer, broker, hub = _rebalancer(_Hub(300), rate=1.0, settle=0.0)
    broker.others = [load("b", 300), load("c", 0)]
    await rebalancer.beat()
    assert rebalancer.refusing
    hub.connections = set(list(hub.connections)[:250])
    broker.others = [load("b", 250), load("c", 0)]  # 100 gone, none arrived
    await rebalancer.beat()
    assert not rebalancer.refusing
    hub.connections = set(list(hub.connections)[:240])
    broker.others = [load("b", 260), load("c", 20)]
    await rebalancer.beat()
    assert not rebalancer.refusing, "not again until the fleet is balanced"


@pytest.mark.anyio
async def test_no_moves_for_the_settle_time_after_a_process_left_the_fleet() -> None:
    # A rollout between two steps: every process left is ready and has been for long, but one
    # just left (drained and exited); the next step would drain the sockets moved now.
    rebalancer, broker, hub = _rebalancer(_Hub(300), rate=1000.0, settle=30.0)
    rebalancer._ready_since = -60.0  # "a" itself has been ready for long
    broker.others = [load("b", 300), load("old", 0, ready=False)]  # drained, about to exit
    await rebalancer.beat()
    broker.others = [load("b", 300), load("new", 0)]  # "old" exited; "new" ready for 60 s
    await rebalancer.beat()
    assert not rebalancer.refusing and not any(conn.closing for conn in hub.connections)
    rebalancer._left_at -= 30.0  # the settle time has passed since
    await rebalancer.beat()
    assert rebalancer.refusing and any(conn.closing for conn in hub.connections)


@pytest.mark.anyio
async def test_refusals_lapse_once_no_process_has_anything_to_shed() -> None:
    # c stays under 0.9x the mean, but no process is MIN_EXCESS over it: no more moves come, and a
    # client that can reach "a" only (a bot given the pod's address) must get in again.
    rebalancer, broker, _ = _rebalancer(_Hub(52), rate=20.0, settle=0.0)
    broker.others = [load("b", 70), load("c", 23)]  # b sheds down to the mean of 48
    await rebalancer.beat()
    assert rebalancer.refusing, "b's shed sockets go to c, not to a"
    broker.others = [load("b", 53), load("c", 40)]  # b is done; c is still out of tolerance
    await rebalancer.beat()
    assert rebalancer.refusing, "the sockets b shed moments ago are still on their way"
    rebalancer._moving_at -= REFUSE_AFTER_MOVES_SECONDS
    await rebalancer.beat()
    assert not rebalancer.refusing


def test_no_refusal_in_a_fleet_where_no_process_would_shed() -> None:
    fleet = [load("a", 52), load("b", 53), load("c", 40)]
    assert refuses(fleet[0], fleet, 0.1, 30), "a is above the mean and c is out of tolerance"
    assert not sheds_somewhere(fleet, 0.1), "but nobody is MIN_EXCESS over the mean"


@pytest.mark.anyio
async def test_no_moves_for_the_settle_time_after_a_reconnect_wave_landed() -> None:
    # A drained replica's sockets are still coming back (on a busy machine, for longer than the
    # settle time after it left): moving and refusing now would only slow them down.
    rebalancer, broker, hub = _rebalancer(_Hub(150), rate=20.0, settle=30.0)
    rebalancer._ready_since = -60.0
    broker.others = [load("b", 150), load("c", 150)]
    await rebalancer.beat()
    hub.connections |= {_Conn() for _ in range(150)}
    broker.others = [load("b", 300), load("c", 50)]  # 200 more in one beat: a wave, not moves
    await rebalancer.beat()
    assert not rebalancer.refusing and not any(conn.closing for conn in hub.connections)
    rebalancer._wave_at -= 30.0  # the settle time has passed since the wave landed
    await rebalancer.beat()
    assert rebalancer.refusing and any(conn.closing for conn in hub.connections)


@pytest.mark.anyio
async def test_refusals_go_on_while_shed_sockets_are_still_coming_back() -> None:
    # On a starved machine moved clients took over 20 s to come back: nobody had anything left
    # to shed, but cutting the refusals then sent hundreds of them back to the full replicas.
    rebalancer, broker, _ = _rebalancer(_Hub(100), rate=20.0, settle=0.0)
    broker.others = [load("b", 170), load("c", 30)]  # 300: b sheds down to the mean of 100
    await rebalancer.beat()
    broker.others = [load("b", 100), load("c", 40)]  # b is done; 60 on their way
    await rebalancer.beat()
    rebalancer._moving_at -= REFUSE_AFTER_MOVES_SECONDS
    broker.others = [load("b", 100), load("c", 60)]  # 20 of them arrived in this beat
    await rebalancer.beat()
    assert rebalancer.refusing, "sockets still arrive: keep steering them to c"
    rebalancer._moving_at -= REFUSE_AFTER_MOVES_SECONDS
    await rebalancer.beat()  # and none for the whole window since
    assert not rebalancer.refusing
