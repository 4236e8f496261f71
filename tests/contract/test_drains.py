"""Contract: drains -- a drained bot finishes what it runs and takes nothing new, by
id or by property, also for bots that register later; stored across restarts and
(replicated) across replicas."""

from __future__ import annotations

import pytest
from botkit import wait_for
from schedkit import action, active, completed

from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import Stage

from .conftest import LINUX, Bot, Harness, settings


async def test_a_drained_bot_finishes_its_lease_and_takes_no_new_work(harness: Harness) -> None:
    scheduler = await harness.open()
    draining, other = Bot(scheduler, "spot-1"), Bot(scheduler, "steady-1")
    await draining.register()
    first = await scheduler.submit(*action(1), LINUX)
    (lease,) = await draining.update()
    drain = await scheduler.add_drain("spot-*")
    assert drain.pattern == "spot-*"
    assert [d.pattern for d in scheduler.drains()] == ["spot-*"]
    assert draining.session is not None and scheduler.is_drained(draining.session)
    second = await scheduler.submit(*action(2), LINUX)
    # it keeps and finishes its lease, and is offered nothing new
    assert [held.id for held in await draining.update(active(lease.id))] == [lease.id]
    assert await draining.update(completed(lease.id)) == []
    assert (await scheduler.get_operation(first.name)).done
    # another bot takes the queue
    await other.register()
    (taken,) = await other.update()
    assert taken.action_digest == action(2)[0]
    await other.update(completed(taken.id))
    assert (await scheduler.get_operation(second.name)).done
    # undrained, it takes work again
    assert await scheduler.remove_drain("spot-*") is True
    assert await scheduler.remove_drain("spot-*") is False
    await scheduler.submit(*action(3), LINUX)
    (again,) = await draining.update()
    assert again.action_digest == action(3)[0]


async def test_a_property_drain_holds_for_bots_that_register_later(harness: Harness) -> None:
    scheduler = await harness.open()
    await scheduler.add_drain("pool=spot*")
    spot = Bot(scheduler, "a", properties=LINUX | {("pool", "spot-eu")})
    steady = Bot(scheduler, "b", properties=LINUX | {("pool", "steady")})
    await spot.register()
    await scheduler.submit(*action(4), LINUX)
    assert await spot.update() == []
    await steady.register()
    (lease,) = await steady.update()
    assert lease.action_digest == action(4)[0]
    assert spot.session is not None and steady.session is not None
    assert scheduler.is_drained(spot.session) and not scheduler.is_drained(steady.session)


async def test_drains_survive_a_restart(harness: Harness) -> None:
    scheduler = await harness.open()
    await scheduler.add_drain("linux-*")
    await scheduler.add_drain("zone=eu-1")
    again = await harness.restart(scheduler)
    await again.housekeep()  # the replicated strategy reads them on its tick
    assert [d.pattern for d in again.drains()] == ["linux-*", "zone=eu-1"]
    bot = Bot(again, "linux-9")
    await bot.register()
    queued = await again.submit(*action(5), LINUX)
    assert await bot.update() == []
    assert (await again.get_operation(queued.name)).stage == Stage.QUEUED


@pytest.mark.parametrize("pattern", ["", "   ", "a b", "=value", "tab\there", "x" * 300])
async def test_a_malformed_pattern_is_refused(harness: Harness, pattern: str) -> None:
    scheduler = await harness.open()
    with pytest.raises(InvalidArgument, match="drain pattern"):
        await scheduler.add_drain(pattern)
    assert scheduler.drains() == []


async def test_a_drain_holds_on_the_other_replica_at_once(harness: Harness) -> None:
    """Announced to every replica (NOTIFY): no waiting for a housekeeping tick."""
    if harness.kind != "replicated":
        pytest.skip("one embedded scheduler owns its state: there is no other replica")
    slow = settings(housekeeping_interval=60)
    here, there = await harness.open(slow), await harness.open(slow)
    bot = Bot(there, "far-away")
    await bot.register()
    await here.add_drain("far-*")
    await wait_for(lambda: [d.pattern for d in there.drains()] == ["far-*"], 10,
                   "the drain to reach the other replica")
    await here.submit(*action(6), LINUX)
    assert await bot.update() == []
    await here.remove_drain("far-*")
    await wait_for(lambda: not there.drains(), 10, "the undrain to reach the other replica")
    (lease,) = await bot.update()
    assert lease.action_digest == action(6)[0]
