"""Contract: a bot's result on its way to the client -- stored in the CAS, written to
the action cache before anyone sees the operation done, never a forged one."""

from __future__ import annotations

import asyncio

from google.protobuf.any_pb2 import Any as AnyProto
from schedkit import action, active, completed, packed

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.scheduler.model import LeaseState, ReportedLease
from buildfleet.storage import Cas, MemoryStore
from buildfleet.storage.action_cache import ActionCache

from .conftest import LINUX, Bot, Harness


class GatedStore(MemoryStore):
    """Blobs whose puts wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.putting = asyncio.Event()

    async def put(self, digest: Digest, data: bytes) -> None:
        self.putting.set()
        await self.gate.wait()
        await super().put(digest, data)


def caches() -> tuple[Cas, GatedStore, ActionCache]:
    cas = Cas(MemoryStore())
    entries = GatedStore()
    return cas, entries, ActionCache(entries, cas)


async def test_no_one_sees_a_result_before_it_is_in_the_action_cache(harness: Harness) -> None:
    _, entries, cache = caches()
    scheduler = await harness.open(action_cache=cache)
    digest, message = action(1)
    operation = await scheduler.submit(digest, message, LINUX)
    bot = Bot(scheduler, "bot")
    await bot.register()
    (lease,) = await bot.update()
    watcher = scheduler.watch(operation)
    assert not (await anext(watcher)).done

    async def done_snapshot() -> bool:
        async for snapshot in watcher:
            if snapshot.done:
                return True
        return False

    entries.gate.clear()
    report = asyncio.create_task(bot.update(completed(lease.id)))
    seen = asyncio.create_task(done_snapshot())
    await asyncio.wait_for(entries.putting.wait(), 10)
    await asyncio.sleep(0.1)  # time enough for a wrong answer to arrive
    assert not report.done() and not seen.done()
    assert not (await scheduler.get_operation(operation.name)).done
    entries.gate.set()
    assert await asyncio.wait_for(report, 10) == []
    assert await asyncio.wait_for(seen, 10)
    cached = await cache.get(digest)
    assert cached is not None and cached.execution_metadata.worker == "bot"
    # Once cached, an identical submission that skips the cache runs anew.
    again = await scheduler.submit(digest, message, LINUX, skip_cache_lookup=True)
    assert again.job_id != operation.job_id


async def test_inline_outputs_are_stored_and_referenced_by_digest(harness: Harness) -> None:
    cas, _, cache = caches()
    scheduler = await harness.open(action_cache=cache)
    digest, message = action(2)
    operation = await scheduler.submit(digest, message, LINUX)
    bot = Bot(scheduler, "reccworker")
    await bot.register()
    (lease,) = await bot.update()
    result = re_pb2.ActionResult(exit_code=0, stdout_raw=b"hello from a bot\n")
    await bot.update(ReportedLease(id=lease.id, state=LeaseState.COMPLETED,
                                   result=packed(result)))
    done = await scheduler.get_operation(operation.name)
    answer = re_pb2.ExecuteResponse.FromString(done.response or b"").result
    stdout = Digest.of(b"hello from a bot\n")
    assert (answer.stdout_digest.hash, answer.stdout_digest.size_bytes) == (
        stdout.hash, stdout.size_bytes)
    assert await cas.get(Digest.of(b"hello from a bot\n")) == b"hello from a bot\n"


async def test_a_failed_result_or_a_forged_one_is_not_cached(harness: Harness) -> None:
    _, _, cache = caches()
    scheduler = await harness.open(action_cache=cache)
    failing, forged = action(3), action(4)
    await scheduler.submit(*failing, LINUX)
    await scheduler.submit(*forged, LINUX)
    holder, intruder = Bot(scheduler, "holder", capacity=2), Bot(scheduler, "intruder")
    await holder.register()
    await intruder.register()
    leases = {lease.action_digest: lease for lease in await holder.update()}
    forgery = ReportedLease(id=leases[forged[0]].id, state=LeaseState.COMPLETED,
                            result=packed(re_pb2.ActionResult(exit_code=0)))
    await intruder.update(forgery)
    await holder.update(completed(leases[failing[0]].id, exit_code=1))
    assert await cache.get(failing[0]) is None
    assert await cache.get(forged[0]) is None


async def test_a_result_that_is_not_an_action_result_is_retried(harness: Harness) -> None:
    scheduler = await harness.open()
    operation = await scheduler.submit(*action(5), LINUX)
    bot = Bot(scheduler, "confused")
    await bot.register()
    (lease,) = await bot.update()
    bogus = AnyProto(type_url="type.googleapis.com/google.protobuf.Empty", value=b"")
    await bot.update(ReportedLease(id=lease.id, state=LeaseState.COMPLETED, result=bogus))
    retried = await scheduler.get_operation(operation.name)
    assert not retried.done and retried.attempts == 1


async def test_a_result_reported_after_its_lease_ended_is_not_cached(harness: Harness) -> None:
    _, _, cache = caches()
    scheduler = await harness.open(action_cache=cache)
    digest, message = action(6)
    operation = await scheduler.submit(digest, message, LINUX)
    bot = Bot(scheduler, "late")
    await bot.register()
    (lease,) = await bot.update()
    await scheduler.cancel_operation(operation.name)
    await bot.update(active(lease.id))  # told CANCELLED
    assert await bot.update(completed(lease.id)) == []
    assert await cache.get(digest) is None
