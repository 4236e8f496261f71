"""Contract: what a scheduler observes for its metrics -- how jobs end, why leases go
back, submissions that join a job in flight, refused reports -- the same on both
strategies."""

from __future__ import annotations

import asyncio

import pytest
from google.rpc import code_pb2
from schedkit import action, completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import InvalidArgument
from buildfleet.scheduler.model import LeaseState, ReportedLease

from .conftest import LINUX, Bot, Harness, settings


async def test_endings_requeues_and_joins_are_counted(harness: Harness) -> None:
    scheduler = await harness.open(settings(max_attempts=2, unmatched_timeout=0.3,
                                            retry_backoff=0))
    bot = Bot(scheduler, "bot")
    await bot.register()
    seen = scheduler.observations

    first, first_message = action(1)
    await scheduler.submit(first, first_message, LINUX)
    await scheduler.submit(first, first_message, LINUX)  # joins the first
    (lease,) = await bot.update()
    await bot.update(completed(lease.id, exit_code=0))

    second, second_message = action(2)
    await scheduler.submit(second, second_message, LINUX)
    (lease,) = await bot.update()
    await bot.update(completed(lease.id, exit_code=3))

    third, third_message = action(3, cacheable=False)
    await scheduler.submit(third, third_message, LINUX)
    for _ in range(2):  # the bot fails it twice: out of attempts
        (lease,) = await bot.update()
        await bot.update(completed(lease.id, code=code_pb2.INTERNAL, message="broken"))

    cancelled, cancelled_message = action(4, cacheable=False)
    operation = await scheduler.submit(cancelled, cancelled_message, frozenset({("x", "y")}))
    await scheduler.cancel_operation(operation.name)

    unmatched, unmatched_message = action(5, cacheable=False)
    await scheduler.submit(unmatched, unmatched_message, frozenset({("OSFamily", "plan9")}))

    async def ended_unmatched() -> None:
        while seen.outcomes["unmatched"] < 1:
            await scheduler.housekeep()
            await asyncio.sleep(0.05)

    try:
        await asyncio.wait_for(ended_unmatched(), 10)
    except TimeoutError:
        raise AssertionError(dict(seen.outcomes)) from None
    await scheduler.record_cache_hit(*action(6)[:1], re_pb2.ActionResult(exit_code=0))

    assert dict(seen.outcomes) == {"success": 1, "failed": 2, "cancelled": 1,
                                   "unmatched": 1, "cache_hit": 1}
    assert seen.requeues["bot_failure"] == 2
    assert seen.deduplicated == 1
    # the two that ran reported their timings (the bot's results carry no timestamps
    # here, so only those with metadata count)
    assert seen.total_seconds.count == seen.queued_seconds.count


async def test_a_timeout_is_counted_as_one(harness: Harness) -> None:
    scheduler = await harness.open(settings(timeout_grace=0.0, lease_timeout=30))
    bot = Bot(scheduler, "bot")
    await bot.register()
    digest, message = action(7, timeout=1)
    await scheduler.submit(digest, message, LINUX)
    (lease,) = await bot.update()
    await bot.update(ReportedLease(id=lease.id, state=LeaseState.ACTIVE))

    async def timed_out() -> None:
        while scheduler.observations.outcomes["timeout"] < 1:
            await scheduler.housekeep()
            await asyncio.sleep(0.05)

    await asyncio.wait_for(timed_out(), 10)
    assert dict(scheduler.observations.outcomes) == {"timeout": 1}


async def test_a_result_with_timestamps_fills_the_histograms(harness: Harness) -> None:
    scheduler = await harness.open()
    bot = Bot(scheduler, "bot")
    await bot.register()
    digest, message = action(8)
    await scheduler.submit(digest, message, LINUX)
    (lease,) = await bot.update()
    result = re_pb2.ActionResult(exit_code=0)
    metadata = result.execution_metadata
    metadata.queued_timestamp.FromSeconds(1000)
    metadata.worker_start_timestamp.FromSeconds(1002)
    metadata.execution_start_timestamp.FromSeconds(1003)
    metadata.execution_completed_timestamp.FromSeconds(1013)
    metadata.worker_completed_timestamp.FromSeconds(1014)
    report = completed(lease.id)
    report.result.value = result.SerializeToString()  # type: ignore[union-attr]
    await bot.update(report)
    seen = scheduler.observations
    assert (seen.queued_seconds.count, seen.queued_seconds.total) == (1, 2.0)
    assert (seen.execution_seconds.count, seen.execution_seconds.total) == (1, 10.0)
    assert (seen.total_seconds.count, seen.total_seconds.total) == (1, 14.0)
    assert dict(seen.queued_seconds.cumulative())[2.5] == 1
    assert dict(seen.queued_seconds.cumulative())[1.0] == 0


async def test_malformed_reports_are_not_counted_by_the_scheduler(harness: Harness) -> None:
    """The Bots service counts refused reports (tests/test_metrics.py); the scheduler
    itself only refuses them."""
    scheduler = await harness.open()
    bot = Bot(scheduler, "bot")
    await bot.register()
    with pytest.raises(InvalidArgument):
        await bot.update(ReportedLease(id="x", state=LeaseState.COMPLETED),
                         ReportedLease(id="x", state=LeaseState.COMPLETED))
    assert scheduler.observations.reports_refused == 0
