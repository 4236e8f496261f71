"""Contract: what goes wrong -- failed leases, silent and dead bots, overdue and
unrunnable actions."""

from __future__ import annotations

import asyncio

import pytest
from botkit import wait_for
from google.rpc import code_pb2
from schedkit import action, active, completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import BotStatus, LeaseState, Stage

from .conftest import LINUX, Bot, Harness, settings


def status_of(response: bytes | None) -> tuple[int, str]:
    assert response is not None
    status = re_pb2.ExecuteResponse.FromString(response).status
    return status.code, status.message


async def test_an_infrastructure_failure_goes_to_another_bot(scheduler: SchedulerAPI) -> None:
    operation = await scheduler.submit(*action(1), LINUX)
    broken, healthy = Bot(scheduler, "broken"), Bot(scheduler, "healthy")
    await broken.register()
    (lease,) = await broken.update()
    await healthy.register()
    poll = asyncio.create_task(healthy.update(wait=10))
    await wait_for(lambda: scheduler.is_polling(healthy.name), 10, "the healthy bot's poll")
    assert await broken.update(completed(lease.id, code=code_pb2.INTERNAL,
                                         message="no space left")) == []
    (retry,) = await asyncio.wait_for(poll, 10)
    assert retry.action_digest == action(1)[0] and retry.id != lease.id
    # The broken bot is not handed it again while the healthy one lives.
    assert await broken.update() == []
    await healthy.update(completed(retry.id))
    done = await scheduler.get_operation(operation.name)
    assert done.done and done.worker == "healthy" and done.attempts == 1


async def test_the_only_bot_gets_its_failed_action_back_after_a_back_off(
        harness: Harness) -> None:
    scheduler = await harness.open(settings(retry_backoff=0.6, max_attempts=3))
    operation = await scheduler.submit(*action(2), LINUX)
    bot = Bot(scheduler, "lonely")
    await bot.register()
    (lease,) = await bot.update()
    loop = asyncio.get_running_loop()
    failed_at = loop.time()
    assert await bot.update(completed(lease.id, code=code_pb2.UNAVAILABLE)) == []
    # Not at once (that would burn every attempt within milliseconds) ...
    assert await bot.update() == []
    # ... but a waiting bot is handed it once the back-off is over.
    (retry,) = await asyncio.wait_for(bot.update(wait=10), 10)
    assert loop.time() - failed_at >= 0.55
    assert retry.id != lease.id
    # A repeat of the old failure report cannot touch the retry.
    assert [item.id for item in await bot.update(completed(lease.id, code=code_pb2.INTERNAL),
                                                 active(retry.id))] == [retry.id]
    again = await scheduler.get_operation(operation.name)
    assert again.attempts == 1 and again.stage == Stage.EXECUTING


async def test_attempts_are_bounded(harness: Harness) -> None:
    scheduler = await harness.open(settings(max_attempts=2, retry_backoff=0))
    operation = await scheduler.submit(*action(3), LINUX)
    bot = Bot(scheduler, "flaky")
    await bot.register()
    for attempt in range(2):
        (lease,) = await asyncio.wait_for(bot.update(wait=5), 10)
        await bot.update(completed(lease.id, code=code_pb2.INTERNAL,
                                   message=f"runner crashed #{attempt}"))
    done = await scheduler.get_operation(operation.name)
    assert done.done and done.attempts == 2
    assert status_of(done.response) == (
        code_pb2.INTERNAL, "the action failed on 2 attempts; last failure: runner crashed #1")


async def test_another_status_is_the_actions_final_one(scheduler: SchedulerAPI) -> None:
    operation = await scheduler.submit(*action(4), LINUX)
    bot = Bot(scheduler, "bot")
    await bot.register()
    (lease,) = await bot.update()
    await bot.update(completed(lease.id, code=code_pb2.FAILED_PRECONDITION,
                               message="input blob gone"))
    done = await scheduler.get_operation(operation.name)
    assert status_of(done.response) == (code_pb2.FAILED_PRECONDITION, "input blob gone")
    assert done.attempts == 0


async def test_a_bot_silent_while_holding_a_lease_loses_it_its_session_lives_on(
        harness: Harness) -> None:
    scheduler = await harness.open(settings(lease_timeout=0.6, keepalive=30))
    operation = await scheduler.submit(*action(5), LINUX)
    dead, alive = Bot(scheduler, "dead"), Bot(scheduler, "alive")
    await dead.register()
    (lease,) = await dead.update()
    await alive.register()
    loop = asyncio.get_running_loop()
    silent_since = loop.time()
    (moved,) = await asyncio.wait_for(alive.update(wait=10), 10)  # held until it moves
    assert loop.time() - silent_since >= 0.55
    assert moved.action_digest == action(5)[0]
    requeued = await scheduler.get_operation(operation.name)
    assert requeued.attempts == 1 and requeued.worker == "alive"
    assert scheduler.stats["abandoned_leases"] == 1
    # The silent bot's session lives on; its late report is dropped.
    assert await dead.update(completed(lease.id)) == []
    assert (await scheduler.get_operation(operation.name)).stage == Stage.EXECUTING
    await alive.update(completed(moved.id))
    assert (await scheduler.get_operation(operation.name)).worker == "alive"


async def test_a_silent_session_expires_and_its_work_moves_on(harness: Harness) -> None:
    scheduler = await harness.open(settings(keepalive=0.5, lease_timeout=30))
    operation = await scheduler.submit(*action(6), LINUX)
    gone = Bot(scheduler, "gone")
    await gone.register()
    await gone.update()

    async def requeued() -> bool:
        return (await scheduler.get_operation(operation.name)).stage == Stage.QUEUED

    await wait_for(requeued, 10, "the silent bot's job going back to the queue")
    assert (await scheduler.get_operation(operation.name)).attempts == 1
    with pytest.raises(InvalidArgument, match="keepalive"):
        await gone.update()
    assert scheduler.stats["expired_sessions"] == 1


async def test_an_action_running_past_its_timeout_ends_and_its_bot_is_told(
        harness: Harness) -> None:
    scheduler = await harness.open(settings(timeout_grace=0, lease_timeout=30))
    operation = await scheduler.submit(*action(7, timeout=1), LINUX)
    bot = Bot(scheduler, "slow")
    await bot.register()
    (lease,) = await bot.update()

    async def ended() -> bool:
        return (await scheduler.get_operation(operation.name)).done

    await wait_for(ended, 10, "the overdue action to end")
    done = await scheduler.get_operation(operation.name)
    assert status_of(done.response) == (code_pb2.DEADLINE_EXCEEDED,
                                        "the action ran longer than its timeout of 1s")
    leases = await bot.update(active(lease.id))
    assert [(item.id, item.state) for item in leases] == [(lease.id, LeaseState.CANCELLED)]


async def test_an_action_no_bot_can_run_fails_naming_what_is_missing(
        harness: Harness) -> None:
    scheduler = await harness.open(settings(unmatched_timeout=0.5))
    windows = frozenset({("OSFamily", "windows")})
    linux_bot = Bot(scheduler, "linux-bot")
    await linux_bot.register()
    # A bot that could run it but is terminating does not count.
    leaving = Bot(scheduler, "leaving", properties=windows, capacity=1)
    await leaving.register(status=BotStatus.BOT_TERMINATING)
    operation = await scheduler.submit(*action(8), windows)
    runnable = await scheduler.submit(*action(9), LINUX)

    async def failed() -> bool:
        return (await scheduler.get_operation(operation.name)).done

    await wait_for(failed, 10, "the unrunnable action to fail")
    code, message = status_of((await scheduler.get_operation(operation.name)).response)
    assert code == code_pb2.FAILED_PRECONDITION
    assert message == ("no bot can run this action: for 0.5s no connected bot had the "
                       "platform properties OSFamily=windows")
    assert not (await scheduler.get_operation(runnable.name)).done


@pytest.mark.parametrize("other", ["silent", "terminating"])
async def test_a_failed_action_returns_to_its_bot_when_no_other_live_bot_could_run_it(
        harness: Harness, other: str) -> None:
    """Only live bots that may yet work count as others: one silent beyond the
    keepalive (its session not yet closed) or terminating does not."""
    scheduler = await harness.open(settings(keepalive=0.5, lease_timeout=30, retry_backoff=0,
                                            housekeeping_interval=60))
    operation = await scheduler.submit(*action(10), LINUX)
    failing, peer = Bot(scheduler, "failing"), Bot(scheduler, "peer")
    await failing.register()
    await peer.register(status=BotStatus.BOT_TERMINATING if other == "terminating"
                        else BotStatus.OK)
    (lease,) = await failing.update()
    if other == "silent":
        await asyncio.sleep(0.6)  # the peer's keepalive passes; nothing closes it (no tick)
        await failing.update(active(lease.id))  # the failing bot itself stays live
    await failing.update(completed(lease.id, code=code_pb2.INTERNAL))
    (retry,) = await failing.update()
    assert retry.action_digest == action(10)[0]
    assert (await scheduler.get_operation(operation.name)).attempts == 1
