"""Contract: bot sessions and their leases -- registration, reports, offers, capacity,
statuses, long-polls, events and the live-session queries."""

from __future__ import annotations

import asyncio
import time

import pytest
from botkit import wait_for
from schedkit import action, active, completed, packed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import InvalidArgument, NotFound
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease, Stage

from .conftest import LINUX, Bot, Harness, settings


async def test_a_session_is_named_under_its_instance_and_starts_ok(
        scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "bot-1")
    session = await bot.register(status=BotStatus.UNSPECIFIED)
    assert session.status == BotStatus.OK and session.bot_id == "bot-1"
    assert session.name and "/" not in session.name  # the unnamed instance
    fetched = await scheduler.get_session(session.name)
    assert (fetched.capacity, fetched.held, fetched.properties) == (1, 0, LINUX)
    with pytest.raises(NotFound):
        await scheduler.get_session("no-such-session")


async def test_updates_of_unknown_closed_or_foreign_sessions_are_refused(
        scheduler: SchedulerAPI) -> None:
    with pytest.raises(InvalidArgument, match="does not exist; create a new session"):
        await scheduler.update_session("nope", bot_id="x", status=BotStatus.OK, leases=[])
    bot = Bot(scheduler, "owner")
    await bot.register()
    with pytest.raises(InvalidArgument, match="belongs to bot 'owner', not 'thief'"):
        await scheduler.update_session(bot.name, bot_id="thief", status=BotStatus.OK,
                                       leases=[])
    await bot.update(status=BotStatus.BOT_TERMINATING)  # holds nothing: closes at once
    with pytest.raises(InvalidArgument, match="was closed \\(the bot terminated\\)"):
        await bot.update()
    assert scheduler.connected_bots() == 0


async def test_a_second_registration_closes_the_first_and_requeues_its_work(
        scheduler: SchedulerAPI) -> None:
    operation = await scheduler.submit(*action(1), LINUX)
    old = Bot(scheduler, "twin")
    await old.register()
    await old.update()
    new = Bot(scheduler, "twin")
    await new.register()
    requeued = await scheduler.get_operation(operation.name)
    assert requeued.stage == Stage.QUEUED and requeued.attempts == 1
    with pytest.raises(InvalidArgument, match="opened a new session"):
        await old.update()
    (lease,) = await new.update()
    assert lease.action_digest == action(1)[0]


async def test_a_bad_report_applies_nothing(scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "bot", capacity=2)
    await bot.register()
    first = await scheduler.submit(*action(2), LINUX)
    await scheduler.submit(*action(3), LINUX)
    one, two = await bot.update()
    for bad in (ReportedLease(id=two.id, state=LeaseState.UNSPECIFIED),
                ReportedLease(id=one.id, state=LeaseState.ACTIVE)):
        with pytest.raises(InvalidArgument):
            await bot.update(completed(one.id), bad)  # a completion next to a bad report
    assert (await scheduler.get_operation(first.name)).stage == Stage.EXECUTING


async def test_a_bot_cannot_complete_a_lease_it_does_not_hold(harness: Harness) -> None:
    scheduler = await harness.open()
    operation = await scheduler.submit(*action(4), LINUX)
    holder, intruder = Bot(scheduler, "holder"), Bot(scheduler, "intruder")
    await holder.register()
    await intruder.register()
    (lease,) = await holder.update()
    forged = ReportedLease(id=lease.id, state=LeaseState.COMPLETED,
                           result=packed(re_pb2.ActionResult(exit_code=0)))
    assert await intruder.update(forged, completed("never-offered"), active("nor-this")) == []
    still = await scheduler.get_operation(operation.name)
    assert still.stage == Stage.EXECUTING and still.worker == "holder"
    await holder.update(completed(lease.id))
    assert (await scheduler.get_operation(operation.name)).worker == "holder"


async def test_a_resent_completion_is_acknowledged_not_applied_again(
        scheduler: SchedulerAPI) -> None:
    await scheduler.submit(*action(5), LINUX)
    bot = Bot(scheduler, "bot")
    await bot.register()
    (lease,) = await bot.update()
    assert await bot.update(completed(lease.id)) == []
    assert await bot.update(completed(lease.id, exit_code=3)) == []
    assert scheduler.stats["completed"] == 1


@pytest.mark.parametrize("straight_to_completed", [False, True])
async def test_pending_offers(harness: Harness, straight_to_completed: bool) -> None:
    scheduler = await harness.open(settings(lease_offer="pending"))
    operation = await scheduler.submit(*action(6), LINUX)
    bot = Bot(scheduler, "old-bot")
    await bot.register()
    (lease,) = await bot.update()
    assert lease.state == LeaseState.PENDING
    if not straight_to_completed:
        (accepted,) = await bot.update(active(lease.id))
        assert accepted.state == LeaseState.ACTIVE
        with pytest.raises(InvalidArgument, match="from ACTIVE to PENDING"):
            await bot.update(ReportedLease(id=lease.id, state=LeaseState.PENDING))
    assert await bot.update(completed(lease.id)) == []
    assert (await scheduler.get_operation(operation.name)).done


async def test_a_bot_gets_as_many_leases_as_its_capacity(scheduler: SchedulerAPI) -> None:
    for number in range(4):
        await scheduler.submit(*action(10 + number), LINUX)
    bot = Bot(scheduler, "big", capacity=3)
    await bot.register()
    assert len(await bot.update()) == 3
    assert await scheduler.queue_length() == 1
    assert len(await bot.update(*[active(lease.id) for lease in bot.leases],
                                capacity=4)) == 4


@pytest.mark.parametrize("status", [BotStatus.UNHEALTHY, BotStatus.HOST_REBOOTING,
                                    BotStatus.INITIALIZING])
async def test_an_unwell_bot_keeps_its_leases_but_gets_no_new_work(
        scheduler: SchedulerAPI, status: BotStatus) -> None:
    bot = Bot(scheduler, "bot", capacity=2)
    await bot.register()
    await scheduler.submit(*action(20), LINUX)
    (lease,) = await bot.update()
    waiting = await scheduler.submit(*action(21), LINUX)
    assert [item.id for item in await bot.update(active(lease.id), status=status)] == [lease.id]
    assert (await scheduler.get_operation(waiting.name)).stage == Stage.QUEUED
    leases = await bot.update(completed(lease.id), status=BotStatus.OK)
    assert [item.action_digest for item in leases] == [action(21)[0]]


async def test_a_terminating_bot_finishes_its_leases_then_closes(
        scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "stopping", capacity=2)
    await bot.register()
    first = await scheduler.submit(*action(30), LINUX)
    (lease,) = await bot.update()
    later = await scheduler.submit(*action(31), LINUX)
    leases = await bot.update(active(lease.id), status=BotStatus.BOT_TERMINATING)
    assert [item.id for item in leases] == [lease.id]  # no new work
    assert await bot.update(completed(lease.id), status=BotStatus.BOT_TERMINATING) == []
    assert (await scheduler.get_operation(first.name)).done
    assert (await scheduler.get_operation(later.name)).stage == Stage.QUEUED
    with pytest.raises(InvalidArgument, match="closed"):
        await bot.update()


@pytest.mark.parametrize("status_then", [BotStatus.BOT_TERMINATING, BotStatus.UNSPECIFIED])
async def test_an_action_killed_by_its_bots_stop_runs_elsewhere_uncounted(
        scheduler: SchedulerAPI, status_then: BotStatus) -> None:
    """buildbox-worker on SIGTERM reports the killed action with exit code 143; the
    status it reports with it may be BOT_TERMINATING again or left unset."""
    operation = await scheduler.submit(*action(32), LINUX)
    bot = Bot(scheduler, "stopping")
    await bot.register()
    (lease,) = await bot.update()
    await bot.update(active(lease.id), status=BotStatus.BOT_TERMINATING)
    await bot.update(completed(lease.id, exit_code=143), status=status_then)
    requeued = await scheduler.get_operation(operation.name)
    assert requeued.stage == Stage.QUEUED and requeued.attempts == 0


async def test_a_long_poll_wakes_at_once_for_new_work_and_for_a_cancellation(
        scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "poller")
    await bot.register()
    poll = asyncio.create_task(bot.update(wait=20))
    await wait_for(lambda: scheduler.is_polling(bot.name), 10, "the bot's long-poll")
    started = time.monotonic()
    operation = await scheduler.submit(*action(40), LINUX)
    (lease,) = await asyncio.wait_for(poll, 10)
    assert time.monotonic() - started < 2
    # Running it, the bot is held only for the busy-poll; a cancellation answers at once.
    await scheduler.cancel_operation(operation.name)
    leases = await asyncio.wait_for(bot.update(active(lease.id), wait=20), 10)
    assert [(item.id, item.state) for item in leases] == [(lease.id, LeaseState.CANCELLED)]
    assert not scheduler.is_polling(bot.name)


async def test_a_long_poll_without_news_returns_when_its_time_is_up(
        scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "idle")
    await bot.register()
    started = time.monotonic()
    assert await bot.update(wait=0.5) == []
    assert 0.4 <= time.monotonic() - started < 3


async def test_bot_events_are_kept_per_session(scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "chatty")
    await bot.register()
    for number in range(105):
        await scheduler.post_event(bot.name, "INFO", f"event {number}")
    events = await scheduler.bot_events("chatty")
    assert [event.message for event in events] == [f"event {n}" for n in range(5, 105)]
    assert await scheduler.bot_events("stranger") == []
    await bot.update(status=BotStatus.BOT_TERMINATING)
    with pytest.raises(InvalidArgument, match="closed"):
        await scheduler.post_event(bot.name, "INFO", "late")


async def test_live_sessions_count_bots_and_free_slots(scheduler: SchedulerAPI) -> None:
    busy = Bot(scheduler, "busy", capacity=3)
    await busy.register()
    await scheduler.submit(*action(50), LINUX)
    await busy.update()
    unwell = Bot(scheduler, "unwell")
    await unwell.register(status=BotStatus.UNHEALTHY)
    sessions = {session.bot_id: session for session in scheduler.live_sessions()}
    assert scheduler.connected_bots() == 2
    assert (sessions["busy"].held, sessions["busy"].free_slots) == (1, 2)
    assert sessions["unwell"].status == BotStatus.UNHEALTHY


async def test_huge_properties_and_bot_ids_still_schedule(scheduler: SchedulerAPI) -> None:
    """Wake-ups that carry requirements or a bot id too long to announce as they are
    (PostgreSQL's NOTIFY takes under 8000 bytes) still reach the bot and the client."""
    huge = frozenset({("label", "x" * 9000), ("OSFamily", "linux")})
    bot = Bot(scheduler, "b" * 9000, properties=huge)
    await bot.register()
    poll = asyncio.create_task(bot.update(wait=20))
    await wait_for(lambda: scheduler.is_polling(bot.name), 10, "the bot's long-poll")
    operation = await scheduler.submit(*action(60), huge)
    (lease,) = await asyncio.wait_for(poll, 10)
    watcher = scheduler.watch(operation)
    assert not (await anext(watcher)).done
    await bot.update(completed(lease.id))
    async with asyncio.timeout(10):
        assert [snapshot.done async for snapshot in watcher][-1]
    assert (await scheduler.get_operation(operation.name)).worker == bot.bot_id
