"""Contract: what clients see -- submissions, joining, cancellation, retention, restarts."""

from __future__ import annotations

import asyncio

import pytest
from botkit import wait_for
from google.rpc import code_pb2, status_pb2
from schedkit import action, active, completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import NotFound, ResourceExhausted
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import LeaseState, Stage

from .conftest import LINUX, Bot, Harness, settings


def response_of(data: bytes | None) -> re_pb2.ExecuteResponse:
    assert data is not None
    return re_pb2.ExecuteResponse.FromString(data)


async def run_one(bot: Bot, exit_code: int = 0) -> str:
    """Let the bot take one lease and complete it; the lease id."""
    (lease,) = await bot.update()
    await bot.update(completed(lease.id, exit_code))
    return lease.id


async def test_an_action_runs_and_its_operation_says_so(scheduler: SchedulerAPI) -> None:
    digest, message = action(1)
    operation = await scheduler.submit(digest, message, LINUX)
    assert operation.stage == Stage.QUEUED and not operation.done
    assert operation.action_digest == digest and operation.name.startswith("operations/")
    watcher = scheduler.watch(operation)
    assert not (await anext(watcher)).done
    bot = Bot(scheduler, "bot-1")
    await bot.register()
    (lease,) = await bot.update()
    assert lease.state == LeaseState.ACTIVE and lease.action_digest == digest
    assert lease.action == message.SerializeToString(deterministic=True)
    running = await scheduler.get_operation(operation.name)
    assert running.stage == Stage.EXECUTING and running.worker == "bot-1"
    assert await bot.update(completed(lease.id)) == []
    async with asyncio.timeout(10):
        states = [snapshot.done async for snapshot in watcher]
    assert states[-1] is True
    done = await scheduler.get_operation(operation.name)
    assert done.done and done.worker == "bot-1"
    answer = response_of(done.response)
    assert answer.status.code == code_pb2.OK and answer.message == "ran on bot-1"
    assert answer.result.execution_metadata.worker == "bot-1"
    assert scheduler.stats["completed"] == 1 and scheduler.stats["assigned"] == 1


async def test_identical_actions_share_one_job_and_its_most_urgent_priority(
        scheduler: SchedulerAPI) -> None:
    digest, message = action(2)
    other_digest, other = action(3)
    urgent_other = await scheduler.submit(other_digest, other, LINUX, priority=0)
    first = await scheduler.submit(digest, message, LINUX, priority=5)
    second = await scheduler.submit(digest, message, LINUX, priority=-5)
    assert first.name != second.name and first.job_id == second.job_id
    assert await scheduler.queue_length() == 2
    bot = Bot(scheduler, "bot")
    await bot.register()
    (lease,) = await bot.update()  # the joined job is now the most urgent
    assert lease.action_digest == digest
    await bot.update(completed(lease.id))
    for name in (first.name, second.name):
        assert (await scheduler.get_operation(name)).done
    assert not (await scheduler.get_operation(urgent_other.name)).done


async def test_actions_that_must_not_be_cached_never_share(scheduler: SchedulerAPI) -> None:
    digest, message = action(4, cacheable=False)
    first = await scheduler.submit(digest, message, LINUX)
    second = await scheduler.submit(digest, message, LINUX)
    assert first.job_id != second.job_id


async def test_a_success_answers_an_identical_submission_a_moment_later(
        scheduler: SchedulerAPI) -> None:
    """Execute looks in the action cache before submitting; a client retrying an
    Execute that raced the first job's completion must not run the action again."""
    bot = Bot(scheduler, "bot")
    await bot.register()
    for exit_code, joins in ((0, True), (1, False)):
        digest, message = action(40 + exit_code)
        first = await scheduler.submit(digest, message, LINUX)
        await run_one(bot, exit_code)
        again = await scheduler.submit(digest, message, LINUX)
        assert (again.job_id == first.job_id) is joins
        assert again.done is joins
        if not joins:
            (lease,) = await bot.update()
            await bot.update(completed(lease.id))


async def test_skipping_the_cache_lookup_runs_a_just_finished_action_again(
        scheduler: SchedulerAPI) -> None:
    bot = Bot(scheduler, "bot")
    await bot.register()
    digest, message = action(60)
    first = await scheduler.submit(digest, message, LINUX)
    await run_one(bot)
    fresh = await scheduler.submit(digest, message, LINUX, skip_cache_lookup=True)
    assert fresh.job_id != first.job_id and not fresh.done
    joined = await scheduler.submit(digest, message, LINUX, skip_cache_lookup=True)
    assert joined.job_id == fresh.job_id  # the new run is in flight: joined
    (lease,) = await bot.update()
    assert lease.action_digest == digest


async def test_a_cache_hit_is_done_from_the_start(scheduler: SchedulerAPI) -> None:
    digest, _ = action(5)
    operation = await scheduler.record_cache_hit(digest, re_pb2.ActionResult(exit_code=7))
    assert operation.done
    stored = await scheduler.get_operation(operation.name)
    answer = response_of(stored.response)
    assert stored.done and answer.cached_result and answer.result.exit_code == 7
    assert [snapshot.done async for snapshot in scheduler.watch(stored)] == [True]


async def test_cancelling_every_operation_stops_the_job_and_tells_the_bot_once(
        scheduler: SchedulerAPI) -> None:
    digest, message = action(6)
    first = await scheduler.submit(digest, message, LINUX)
    second = await scheduler.submit(digest, message, LINUX)
    bot = Bot(scheduler, "bot")
    await bot.register()
    (lease,) = await bot.update()
    await scheduler.cancel_operation(first.name)
    cancelled = await scheduler.get_operation(first.name)
    assert cancelled.done and cancelled.cancelled
    assert response_of(cancelled.response).status.code == code_pb2.CANCELLED
    assert not (await scheduler.get_operation(second.name)).done  # someone still waits
    running = [active(lease.id)]
    assert [(item.id, item.state) for item in await bot.update(*running)] == [
        (lease.id, LeaseState.ACTIVE)]
    await scheduler.cancel_operation(second.name)
    assert [(item.id, item.state) for item in await bot.update(*running)] == [
        (lease.id, LeaseState.CANCELLED)]
    assert await bot.update(*running) == []  # told once
    answer = response_of((await scheduler.get_operation(second.name)).response)
    assert answer.status == status_pb2.Status(code=code_pb2.CANCELLED,
                                              message="the operation was cancelled")
    # Its late result is dropped; cancelling a done operation is harmless.
    assert await bot.update(completed(lease.id)) == []
    await scheduler.cancel_operation(second.name)
    with pytest.raises(NotFound):
        await scheduler.cancel_operation("operations/nope")


async def test_a_deleted_operation_is_gone_and_its_job_runs_on(scheduler: SchedulerAPI) -> None:
    digest, message = action(7)
    kept = await scheduler.submit(digest, message, LINUX)
    deleted = await scheduler.submit(digest, message, LINUX)
    await scheduler.delete_operation(deleted.name)
    with pytest.raises(NotFound):
        await scheduler.get_operation(deleted.name)
    with pytest.raises(NotFound):
        await scheduler.delete_operation(deleted.name)
    assert [op.name for op in await scheduler.list_operations()] == [kept.name]
    bot = Bot(scheduler, "bot")
    await bot.register()
    await run_one(bot)
    assert (await scheduler.get_operation(kept.name)).done


async def test_a_full_queue_refuses_new_work_but_not_joiners(harness: Harness) -> None:
    scheduler = await harness.open(settings(max_queued=2))
    digests = [action(10 + n) for n in range(3)]
    for digest, message in digests[:2]:
        await scheduler.submit(digest, message, LINUX)
    with pytest.raises(ResourceExhausted, match="2 queued actions"):
        await scheduler.submit(*digests[2], LINUX)
    joined = await scheduler.submit(*digests[0], LINUX)
    assert not joined.done
    assert await scheduler.queue_length() == 2


async def test_old_operations_are_forgotten_running_ones_kept(harness: Harness) -> None:
    scheduler = await harness.open(settings(completed_retention=0.3))
    bot = Bot(scheduler, "bot")
    await bot.register()
    done = await scheduler.submit(*action(20), LINUX)
    await run_one(bot)
    cancelled = await scheduler.submit(*action(21), LINUX)
    await scheduler.cancel_operation(cancelled.name)
    hit = await scheduler.record_cache_hit(action(22)[0], re_pb2.ActionResult())
    running = await scheduler.submit(*action(23), LINUX)
    await bot.update()

    async def forgotten() -> bool:
        names = {op.name for op in await scheduler.list_operations()}
        return names == {running.name}

    await wait_for(forgotten, 10, "the done operations to be forgotten")
    for name in (done.name, cancelled.name, hit.name):
        with pytest.raises(NotFound):
            await scheduler.get_operation(name)
    assert (await scheduler.get_operation(running.name)).stage == Stage.EXECUTING


async def test_state_survives_a_restart(harness: Harness) -> None:
    first = await harness.open()
    bot = Bot(first, "bot")
    await bot.register()
    running = await first.submit(*action(30), LINUX, priority=2)
    (lease,) = await bot.update()
    queued = await first.submit(*action(31), LINUX, priority=3)
    second = await harness.restart(first)
    bot.scheduler = second
    # The queued job is still queued, deduplication survives, the running one is
    # still the bot's and its result is accepted.
    assert (await second.get_operation(queued.name)).stage == Stage.QUEUED
    assert (await second.submit(*action(31), LINUX)).job_id == queued.job_id
    assert (await second.get_operation(running.name)).stage == Stage.EXECUTING
    leases = await bot.update(completed(lease.id))
    assert [item.action_digest for item in leases] == [action(31)[0]]
    assert (await second.get_operation(running.name)).done
    assert second.connected_bots() == 1


async def test_listing_only_the_operations_still_running(scheduler: SchedulerAPI) -> None:
    """What the fleet's views ask for (a bot's running operations, the queued ones):
    the done ones are left out without being read."""
    finished_digest, finished_message = action(41)
    finished = await scheduler.submit(finished_digest, finished_message, LINUX)
    bot = Bot(scheduler, "bot")
    await bot.register()
    await run_one(bot)
    queued_digest, queued_message = action(42)
    queued = await scheduler.submit(queued_digest, queued_message, LINUX)
    everything = {op.name for op in await scheduler.list_operations()}
    assert everything == {finished.name, queued.name}
    running = await scheduler.list_operations(running_only=True)
    assert [op.name for op in running] == [queued.name] and not running[0].done
