"""The embedded strategy with the clock in the test's hands: the timers of the core
applied without waiting for anything."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from google.rpc import code_pb2
from schedkit import LINUX, action, completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.embedded import EmbeddedScheduler, MemorySchedulerStore
from buildfleet.scheduler.model import BotStatus, Stage


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def timed() -> AsyncIterator[tuple[EmbeddedScheduler, Clock]]:
    store = MemorySchedulerStore()
    await store.start()
    clock = Clock(1000.0)
    settings = SchedulerConfig(lease_timeout=10, keepalive=60, retry_backoff=2,
                               housekeeping_interval=60, unmatched_timeout=300)
    scheduler = EmbeddedScheduler("", store, settings=settings, clock=clock,
                                  wall=lambda: 1.7e9 + clock.now)
    await scheduler.start()
    try:
        yield scheduler, clock
    finally:
        await scheduler.close()
        await store.close()


async def test_a_silent_bot_loses_its_lease_after_the_lease_timeout(
        timed: tuple[EmbeddedScheduler, Clock]) -> None:
    scheduler, clock = timed
    operation = await scheduler.submit(*action(1), LINUX)
    bot = await scheduler.create_session("bot", status=BotStatus.OK, properties=LINUX,
                                         capacity=1)
    _, (lease,) = await scheduler.update_session(bot.name, bot_id="bot", status=BotStatus.OK,
                                                 leases=[])
    clock.now += 9.9
    await scheduler.housekeep()
    assert (await scheduler.get_operation(operation.name)).stage == Stage.EXECUTING
    clock.now += 0.2
    await scheduler.housekeep()
    requeued = await scheduler.get_operation(operation.name)
    assert requeued.stage == Stage.QUEUED and requeued.attempts == 1
    assert scheduler.connected_bots() == 1  # the session lives on

    # Back again, it waits out the back-off (no other bot could run the job) ...
    _, leases = await scheduler.update_session(bot.name, bot_id="bot", status=BotStatus.OK,
                                               leases=[completed(lease.id)])
    assert leases == []  # its late report was dropped, and no retry yet
    clock.now += 2.1
    _, (retry,) = await scheduler.update_session(bot.name, bot_id="bot",
                                                 status=BotStatus.OK, leases=[])
    assert retry.id != lease.id
    # ... and the session itself expires only at the keepalive.
    clock.now += 61
    await scheduler.housekeep()
    assert scheduler.connected_bots() == 0
    assert scheduler.stats["abandoned_leases"] == 1
    assert scheduler.stats["expired_sessions"] == 1


async def test_an_unrunnable_action_fails_at_the_unmatched_timeout(
        timed: tuple[EmbeddedScheduler, Clock]) -> None:
    scheduler, clock = timed
    operation = await scheduler.submit(*action(2), frozenset({("OSFamily", "windows")}))
    await scheduler.housekeep()  # noted as unmatched now
    clock.now += 299
    await scheduler.housekeep()
    assert not (await scheduler.get_operation(operation.name)).done
    clock.now += 2
    await scheduler.housekeep()
    done = await scheduler.get_operation(operation.name)
    assert done.done
    status = re_pb2.ExecuteResponse.FromString(done.response or b"").status
    assert status.code == code_pb2.FAILED_PRECONDITION and "OSFamily=windows" in status.message
