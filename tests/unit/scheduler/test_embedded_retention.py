"""Done operations leave the embedded strategy's memory (all but the newest
`completed-in-memory`) and are read back from the store for the whole retention:
GetOperation, WaitExecution, ListOperations, cancel and delete answer as before,
for their owner only; a restart keeps memory as bounded; the store forgets them
when the retention ends.  On SQLite and on PostgreSQL (single-server)."""

from __future__ import annotations

import asyncio

import pytest
from botkit import wait_for
from pgkit import StoreBackend
from schedkit import completed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.errors import NotFound
from buildfleet.scheduler.embedded import EmbeddedScheduler, MemorySchedulerStore
from buildfleet.scheduler.embedded.store import Row
from buildfleet.scheduler.model import BotStatus, Operation, Stage
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.scheduler.rules.timers import JUST_FINISHED

LINUX = frozenset({("OSFamily", "linux")})
KEEP = 3


class Clocks:
    def __init__(self) -> None:
        self.monotonic = 1000.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.monotonic += seconds
        self.wall += seconds


async def new_scheduler(backend: StoreBackend, clocks: Clocks) -> EmbeddedScheduler:
    settings = SchedulerConfig(completed_in_memory=KEEP, completed_retention=600)
    store = backend.new_store()
    await store.start()
    scheduler = EmbeddedScheduler("", store, settings=settings,
                                  clock=lambda: clocks.monotonic, wall=lambda: clocks.wall)
    await scheduler.start()
    return scheduler


def exit_code(operation: Operation) -> int:
    response = re_pb2.ExecuteResponse()
    assert operation.response is not None
    response.ParseFromString(operation.response)
    return response.result.exit_code


async def run_actions(scheduler: EmbeddedScheduler, count: int, owner: str
                      ) -> list[str]:
    """`count` actions of `owner`, each run to exit code = its number; their names."""
    bot = await scheduler.create_session("bot", status=BotStatus.OK, properties=LINUX,
                                         capacity=1)
    names = []
    for number in range(count):
        action = re_pb2.Action(salt=f"{owner}-{number}".encode())
        operation = await scheduler.submit(Digest.of(action.SerializeToString()), action,
                                           LINUX, owner=owner)
        names.append(operation.name)
        _, (lease,) = await scheduler.update_session(bot.name, bot_id="bot",
                                                     status=BotStatus.OK, leases=[])
        await scheduler.update_session(bot.name, bot_id="bot", status=BotStatus.OK,
                                       leases=[completed(lease.id, exit_code=number)])
    return names


def done_in_memory(scheduler: EmbeddedScheduler) -> int:
    return sum(1 for record in scheduler.state.operations.values() if record.done)


async def test_done_operations_leave_memory_and_answer_from_the_store(
        backend: StoreBackend) -> None:
    clocks = Clocks()
    scheduler = await new_scheduler(backend, clocks)
    try:
        names = await run_actions(scheduler, 10, owner="alice")
        clocks.advance(JUST_FINISHED + 1)  # no longer answering identical submissions
        await scheduler.housekeep()
        assert done_in_memory(scheduler) == KEEP
        assert len(scheduler.state.jobs) <= KEEP
        alice = Caller("alice")
        for number, name in enumerate(names):
            operation = await scheduler.get_operation(name, alice)
            assert operation.stage == Stage.COMPLETED and exit_code(operation) == number
            snapshots = [s async for s in scheduler.watch(operation)]
            assert len(snapshots) == 1 and snapshots[0].done and snapshots[0].name == name
        listed = await scheduler.list_operations(alice)
        assert sorted(o.name for o in listed) == sorted(names)
        # another principal sees none of them, in memory or not
        bob = Caller("bob")
        assert await scheduler.list_operations(bob) == []
        for name in (names[0], names[-1]):
            with pytest.raises(NotFound):
                await scheduler.get_operation(name, bob)
            with pytest.raises(NotFound):
                await scheduler.cancel_operation(name, bob)
            with pytest.raises(NotFound):
                await scheduler.delete_operation(name, bob)
        # cancelling a done one changes nothing; deleting one that left memory works
        await scheduler.cancel_operation(names[0], alice)
        assert exit_code(await scheduler.get_operation(names[0], alice)) == 0
        await scheduler.delete_operation(names[0], alice)
        with pytest.raises(NotFound):
            await scheduler.get_operation(names[0], alice)
        assert names[0] not in {o.name for o in await scheduler.list_operations(alice)}
    finally:
        await scheduler.close()
        await scheduler.store.close()

    # a restart keeps memory as bounded, and every retained operation answers
    again = await new_scheduler(backend, clocks)
    try:
        assert done_in_memory(again) == KEEP
        for number, name in enumerate(names[1:], start=1):
            assert exit_code(await again.get_operation(name)) == number
        # the retention ends: the store forgets them too
        clocks.advance(601)
        await again.housekeep()

        async def forgotten() -> bool:
            return await again.store.load_operation("", names[1]) is None

        await wait_for(forgotten, 10, "the expired rows deleted")
        for name in names[1:]:
            with pytest.raises(NotFound):
                await again.get_operation(name)
        assert await again.list_operations() == []
    finally:
        await again.close()
        await again.store.close()


async def test_memory_stays_bounded_however_many_operations_are_retained(
        backend: StoreBackend) -> None:
    clocks = Clocks()
    scheduler = await new_scheduler(backend, clocks)
    try:
        for round_ in range(4):
            await run_actions(scheduler, 300, owner=f"round{round_}")
            clocks.advance(JUST_FINISHED + 1)
            await scheduler.housekeep()
            assert done_in_memory(scheduler) == KEEP
            assert len(scheduler.state.jobs) <= KEEP
            assert len(scheduler.state.finished) == KEEP
            # the retention heap keeps no entry for long of what left memory
            assert len(scheduler.state.expiry) <= 1100
        assert len(await scheduler.list_operations()) == 1200
    finally:
        await scheduler.close()
        await scheduler.store.close()


class GatedStore(MemorySchedulerStore):
    """A store whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        await self.gate.wait()
        await super()._write(upserts, deletes)


async def test_an_operation_leaves_memory_only_once_it_is_stored() -> None:
    store = GatedStore()
    await store.start()
    scheduler = EmbeddedScheduler("", store, settings=SchedulerConfig(completed_in_memory=0))
    await scheduler.start()
    try:
        store.gate.clear()
        action = re_pb2.Action(salt=b"cached")
        answering = asyncio.create_task(scheduler.record_cache_hit(
            Digest.of(action.SerializeToString()), re_pb2.ActionResult(exit_code=5)))
        await wait_for(lambda: scheduler.state.finished, 5, "the cache hit done in memory")
        (name,) = scheduler.state.finished
        assert scheduler.state.retire(0) == 0  # not stored yet: it stays
        assert name in scheduler.state.operations
        store.gate.set()
        operation = await answering
        assert scheduler.state.retire(0) == 1
        assert name not in scheduler.state.operations
        assert exit_code(await scheduler.get_operation(operation.name)) == 5
    finally:
        store.gate.set()
        await scheduler.close()
        await store.close()
