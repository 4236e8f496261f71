"""The embedded strategy's fast paths keep their promises: what a client or bot is
told is stored first, commits are shared and happen only when someone waits, and
old operations are forgotten without scanning every one."""

from __future__ import annotations

import asyncio
import time

from botkit import wait_for
from google.longrunning import operations_pb2
from google.protobuf.any_pb2 import Any as AnyProto

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.scheduler.embedded import EmbeddedScheduler, MemorySchedulerStore
from buildfleet.scheduler.embedded.housekeeping import forget_old
from buildfleet.scheduler.embedded.records import SessionRecord
from buildfleet.scheduler.embedded.store import Row
from buildfleet.scheduler.model import BotStatus, LeaseState, Operation, ReportedLease
from buildfleet.scheduler.rules.observations import Outcome

LINUX = frozenset({("OSFamily", "linux")})


class GatedStore(MemorySchedulerStore):
    """A store whose writes wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.writing = asyncio.Event()

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        self.writing.set()
        await self.gate.wait()
        await super()._write(upserts, deletes)


def result_any(result: re_pb2.ActionResult) -> AnyProto:
    packed = AnyProto()
    packed.Pack(result)
    return packed


def session(name: str) -> SessionRecord:
    return SessionRecord(name=name, instance="", bot_id=f"bot-{name}", status=BotStatus.OK,
                         properties=LINUX, capacity=1, created_at=time.time(),
                         last_seen=time.monotonic())


async def submitted(scheduler: EmbeddedScheduler, salt: str) -> tuple[Operation, Digest]:
    action = re_pb2.Action(salt=salt.encode())
    digest = Digest.of(action.SerializeToString())
    operation = await scheduler.submit(digest, action, LINUX)
    return operation, digest


async def test_a_completed_operation_is_told_only_once_its_result_is_stored() -> None:
    store = GatedStore()
    await store.start()
    scheduler = EmbeddedScheduler("", store)
    await scheduler.start()
    try:
        bot = await scheduler.create_session("bot", status=BotStatus.OK,
                                             properties=LINUX, capacity=1)
        operation, _ = await submitted(scheduler, "durable")
        _, (lease,) = await scheduler.update_session(bot.name, bot_id="bot",
                                                     status=BotStatus.OK, leases=[])
        watch = scheduler.watch(operation)
        assert not (await anext(watch)).done

        store.gate.clear()  # the next commit hangs until the gate opens
        store.writing.clear()
        report = ReportedLease(id=lease.id, state=LeaseState.COMPLETED,
                               result=result_any(re_pb2.ActionResult()))
        bot_call = asyncio.create_task(scheduler.update_session(
            bot.name, bot_id="bot", status=BotStatus.OK, leases=[report]))
        async def next_snapshot() -> operations_pb2.Operation:
            return await anext(watch)

        snapshot = asyncio.create_task(next_snapshot())
        await asyncio.wait_for(store.writing.wait(), 5)
        await asyncio.sleep(0.05)
        # The job is done in memory, but neither the bot nor the client has heard.
        assert scheduler.state.operations[operation.name].done
        assert not bot_call.done() and not snapshot.done()
        rows = {row["id"]: row for row in store.tables["jobs"].values()}
        assert rows[operation.job_id]["response"] is None

        store.gate.set()
        assert (await asyncio.wait_for(snapshot, 5)).done
        await asyncio.wait_for(bot_call, 5)
        rows = {row["id"]: row for row in store.tables["jobs"].values()}
        assert rows[operation.job_id]["response"] is not None
    finally:
        store.gate.set()
        await scheduler.close()
        await store.close()


async def test_a_flush_waits_for_its_own_batch_not_for_changes_queued_after_it() -> None:
    store = GatedStore()
    await store.start()
    try:
        store.save_session(session("first"))
        store.gate.clear()
        first = asyncio.create_task(store.flush())
        await asyncio.wait_for(store.writing.wait(), 5)  # "first" is being written
        mark = store.queued
        store.save_session(session("second"))  # queued while that batch is written
        second = asyncio.create_task(store.flush())
        mine = asyncio.create_task(store.flush_until(mark))
        store.gate.set()
        await asyncio.wait_for(asyncio.gather(first, mine), 5)
        await asyncio.wait_for(second, 5)
        assert set(store.tables["sessions"]) == {"first", "second"}
        assert store.commits == 2
    finally:
        store.gate.set()
        await store.close()


async def test_changes_are_committed_when_someone_waits_for_them() -> None:
    store = MemorySchedulerStore()
    await store.start()
    try:
        for index in range(50):
            store.save_session(session(f"s{index}"))
        await asyncio.sleep(0.05)
        assert store.commits == 0 and not store.tables["sessions"]  # nobody waited yet
        await store.flush()
        assert store.commits == 1 and len(store.tables["sessions"]) == 50
        await store.flush()  # nothing new: no commit
        assert store.commits == 1
    finally:
        await store.close()


async def test_housekeeping_commits_changes_nobody_flushed() -> None:
    store = MemorySchedulerStore()
    await store.start()
    scheduler = EmbeddedScheduler("", store,
                                  settings=SchedulerConfig(housekeeping_interval=0.05))
    await scheduler.start()
    try:
        store.save_session(session("left-behind"))
        await wait_for(lambda: "left-behind" in store.tables["sessions"],
                       what="housekeeping's flush")
    finally:
        await scheduler.close()
        await store.close()


async def test_old_operations_and_their_jobs_are_forgotten_recent_ones_kept() -> None:
    store = MemorySchedulerStore()
    await store.start()
    settings = SchedulerConfig(completed_retention=100.0, housekeeping_interval=60)
    scheduler = EmbeddedScheduler("", store, settings=settings)
    await scheduler.start()
    state = scheduler.state
    try:
        done, _ = await submitted(scheduler, "done")
        cancelled_only, _ = await submitted(scheduler, "cancelled")
        running, _ = await submitted(scheduler, "running")
        joined, digest = await submitted(scheduler, "shared")
        other = await scheduler.submit(digest, re_pb2.Action(salt=b"shared"), LINUX)
        assert other.job_id == joined.job_id
        hit = await scheduler.record_cache_hit(Digest.of(b"cached"), re_pb2.ActionResult())
        await scheduler.cancel_operation(cancelled_only.name)
        await scheduler.cancel_operation(done.name)
        await scheduler.delete_operation(other.name)
        for job_id in {done.job_id, joined.job_id}:
            state.complete(state.jobs[job_id], b"", outcome=Outcome.FAILED)

        wall = time.time()
        await scheduler.housekeep()  # nothing is old yet
        assert len(state.operations) == 5
        forget_old(state, wall + 50)
        assert len(state.operations) == 5

        forget_old(state, wall + 200)
        # Every done operation went, with the jobs nobody refers to any more; the
        # operation still running stays, and so does its job.
        assert set(state.operations) == {running.name}
        assert set(state.jobs) == {running.job_id}
        assert hit.name not in state.operations
        await store.flush()
        assert set(store.tables["operations"]) == {running.name}
        assert set(store.tables["jobs"]) == {running.job_id}

        # Done later: forgotten once its own retention has passed, not before.
        state.complete(state.jobs[running.job_id], b"", outcome=Outcome.FAILED)
        forget_old(state, time.time() + 50)
        assert set(state.operations) == {running.name}
        forget_old(state, time.time() + 200)
        assert not state.operations and not state.jobs
    finally:
        await scheduler.close()
        await store.close()


async def test_restored_done_operations_expire_too() -> None:
    store = MemorySchedulerStore()
    await store.start()
    settings = SchedulerConfig(completed_retention=100.0, housekeeping_interval=60)
    try:
        first = EmbeddedScheduler("", store, settings=settings)
        await first.start()
        done, _ = await submitted(first, "before-restart")
        queued, _ = await submitted(first, "still-queued")
        first.state.complete(first.state.jobs[done.job_id], b"", outcome=Outcome.FAILED)
        await store.flush()
        await first.close()

        second = EmbeddedScheduler("", store, settings=settings)
        await second.start()
        forget_old(second.state, time.time() + 200)
        assert set(second.state.operations) == {queued.name}
        await second.close()
    finally:
        await store.close()
