"""The scheduler's building blocks without gRPC: JobQueue and the scheduler stores."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from pgkit import StoreBackend

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import Unavailable
from buildfleet.scheduler.model import BotSession, BotStatus, Job, Operation, Properties, Stage
from buildfleet.scheduler.queue import JobQueue
from buildfleet.scheduler.scheduler import Scheduler
from buildfleet.scheduler.store import (
    MemorySchedulerStore,
    Row,
    SchedulerStore,
)

LINUX: Properties = frozenset({("OSFamily", "linux")})
LINUX_X86: Properties = frozenset({("OSFamily", "linux"), ("ISA", "x86-64")})
_seq = itertools.count()


def make_job(priority: int = 0, requirements: Properties = frozenset(), *,
             instance: str = "", name: str = "") -> Job:
    seq = next(_seq)
    return Job(id=name or f"job-{seq}", instance=instance,
               action_digest=Digest.of(f"action {seq}".encode()), action=b"action",
               requirements=requirements, priority=priority, cacheable=True, timeout=0,
               queued_at=time.time(), seq=seq)


def drain(queue: JobQueue, properties: Properties = LINUX_X86) -> list[Job]:
    taken: list[Job] = []
    while (job := queue.pop_for(properties)) is not None:
        taken.append(job)
    return taken


# ------------------------------------------------------------------- JobQueue

def test_priority_then_submission_order() -> None:
    queue = JobQueue(fairness_share=0)
    jobs = [make_job(p) for p in (5, -1, 3, 0, -1, 5)]
    for job in jobs:
        queue.push(job)
    assert len(queue) == 6
    taken = drain(queue)
    assert taken == [jobs[1], jobs[4], jobs[3], jobs[2], jobs[0], jobs[5]]
    assert len(queue) == 0


def test_groups_are_matched_by_subset_and_merged_in_order() -> None:
    queue = JobQueue(fairness_share=0)
    anywhere = make_job(2)
    linux = make_job(1, LINUX)
    x86 = make_job(0, LINUX_X86)
    windows = make_job(-5, frozenset({("OSFamily", "windows")}))
    for job in (anywhere, linux, x86, windows):
        queue.push(job)
    assert queue.pop_for(frozenset({("OSFamily", "mac")})) is anywhere
    assert queue.pop_for(LINUX) is linux  # the x86 job needs ISA too
    assert queue.pop_for(LINUX) is None
    assert queue.pop_for(LINUX_X86) is x86
    assert len(queue) == 1 and windows in queue


def test_multi_valued_requirements() -> None:
    queue = JobQueue(fairness_share=0)
    both = frozenset({("ISA", "x86-64"), ("ISA", "x86-64-v3")})
    job = make_job(0, both)
    queue.push(job)
    assert queue.pop_for(frozenset({("ISA", "x86-64")})) is None
    assert queue.pop_for(frozenset({("ISA", "x86-64-v3"), ("ISA", "x86-64"),
                                    ("OSFamily", "linux")})) is job


def test_fairness_share_half_alternates_oldest_and_most_urgent() -> None:
    queue = JobQueue(fairness_share=0.5)
    jobs = [make_job(p) for p in (5, -1, 3, 0)]  # jobs[0] is the oldest
    for job in jobs:
        queue.push(job)
    assert drain(queue) == [jobs[1], jobs[0], jobs[3], jobs[2]]


def test_fairness_share_tenth_takes_every_tenth_pick_by_age() -> None:
    queue = JobQueue(fairness_share=0.1)
    old = make_job(100)
    urgent = [make_job(0) for _ in range(20)]
    for job in (old, *urgent):
        queue.push(job)
    taken = drain(queue)
    assert taken.index(old) == 9
    assert [job for job in taken if job is not old] == urgent


def test_fairness_share_zero_never_ignores_priority() -> None:
    queue = JobQueue(fairness_share=0)
    old = make_job(1)
    urgent = [make_job(0) for _ in range(30)]
    for job in (old, *urgent):
        queue.push(job)
    assert drain(queue)[-1] is old


def test_fairness_counts_assignments_not_empty_polls() -> None:
    queue = JobQueue(fairness_share=0.5)
    jobs = [make_job(p, LINUX) for p in (5, -1, 3, 0)]
    for job in jobs:
        queue.push(job)
    taken = []
    for _ in range(4):
        assert queue.pop_for(frozenset({("OSFamily", "windows")})) is None
        taken.append(queue.pop_for(LINUX))
    assert taken == [jobs[1], jobs[0], jobs[3], jobs[2]]


def test_reprioritize_moves_a_queued_job_forward_once() -> None:
    queue = JobQueue(fairness_share=0)
    first, second = make_job(0), make_job(5)
    queue.push(first)
    queue.push(second)
    second.priority = -5
    queue.reprioritize(second)
    assert drain(queue) == [second, first]  # and the stale entry yields nothing more


def test_remove_and_accept() -> None:
    queue = JobQueue(fairness_share=0)
    jobs = [make_job(p) for p in (0, 1, 2)]
    for job in jobs:
        queue.push(job)
    assert queue.remove(jobs[0]) and not queue.remove(jobs[0])
    assert jobs[0] not in queue and len(queue) == 2
    # A job the caller refuses stays queued; the next acceptable one is taken.
    assert queue.pop_for(LINUX, lambda job: job is not jobs[1]) is jobs[2]
    assert jobs[1] in queue
    assert queue.pop_for(LINUX, lambda job: False) is None
    assert drain(queue) == [jobs[1]]


def test_requeued_job_is_taken_once() -> None:
    queue = JobQueue(fairness_share=0.5)
    job, other = make_job(0), make_job(1)
    queue.push(job)
    queue.push(other)
    assert queue.pop_for(LINUX) is job
    queue.push(job)  # back in the queue (its bot went away)
    queue.push(job)  # pushing twice is harmless
    assert len(queue) == 2
    assert sorted(drain(queue), key=lambda j: j.seq) == [job, other]
    assert len(queue) == 0


# ---------------------------------------------------------------------- stores

def make_operation(job: Job, name: str) -> Operation:
    return Operation(name=name, instance=job.instance, job=job, created_at=time.time())


def make_session(name: str, instance: str = "") -> BotSession:
    return BotSession(name=name, instance=instance, bot_id=f"bot-{name}", status=BotStatus.OK,
                      properties=LINUX, capacity=2, created_at=time.time(),
                      last_seen=time.monotonic(), worker_proto=b"worker")


async def test_group_commit_coalesces_saves(backend: StoreBackend) -> None:
    store = backend.new_store()
    await store.start()
    try:
        jobs = [make_job(i) for i in range(500)]
        for job in jobs:
            store.save_job(job)
        for job in jobs:  # saved again before being written: one row each
            job.attempts = 1
            store.save_job(job)
        await store.flush()
        assert 1 <= store.commits <= 2

        # Many concurrent callers each saving and flushing share commits.
        before = store.commits

        async def save_and_flush(index: int) -> None:
            store.save_operation(make_operation(jobs[index], f"operations/{index}"))
            await store.flush()

        await asyncio.gather(*(save_and_flush(i) for i in range(200)))
        assert store.commits - before <= 3
        state = await store.load("")
        assert len(state.jobs) == 500 and {row["attempts"] for row in state.jobs} == {1}
        assert len(state.operations) == 200
        # A flush with nothing pending returns at once and commits nothing.
        commits = store.commits
        await store.flush()
        assert store.commits == commits
    finally:
        await store.close()


async def test_flushed_state_survives_in_a_new_store(backend: StoreBackend) -> None:
    store = backend.new_store()
    await store.start()
    queued = make_job(3, LINUX_X86, name="queued")
    done = make_job(0, name="done")
    done.stage = Stage.COMPLETED
    done.response = b"response bytes"
    done.completed_at = time.time()
    done.failed_on = {"bot-b", "bot-a"}
    other_instance = make_job(0, instance="ci", name="ci-job")
    for job in (queued, done, other_instance):
        store.save_job(job)
    store.save_operation(make_operation(queued, "operations/q"))
    store.save_operation(make_operation(done, "operations/d"))
    store.save_session(make_session("s1"))
    store.save_session(make_session("s2"))
    await store.flush()
    store.delete_session("s2")
    store.delete_operation("operations/d")
    await store.flush()

    # A second store on the same database (the process after a crash) sees exactly that.
    reader = backend.new_store()
    await reader.start()
    try:
        state = await reader.load("")
        jobs = {row["id"]: row for row in state.jobs}
        assert set(jobs) == {"queued", "done"}
        assert jobs["queued"]["priority"] == 3 and jobs["queued"]["stage"] == Stage.QUEUED
        assert jobs["queued"]["action_hash"] == queued.action_digest.hash
        assert jobs["done"]["response"] == b"response bytes"
        assert jobs["done"]["failed_on"] == '["bot-a", "bot-b"]'
        assert [row["name"] for row in state.operations] == ["operations/q"]
        assert [row["name"] for row in state.sessions] == ["s1"]
        assert state.sessions[0]["worker"] == b"worker"
        assert [row["id"] for row in (await reader.load("ci")).jobs] == ["ci-job"]
    finally:
        await reader.close()
        await store.close()


async def test_store_refuses_a_newer_schema(backend: StoreBackend) -> None:
    await backend.set_schema_version(99)
    store = backend.new_store()
    with pytest.raises(RuntimeError, match="schema version 99"):
        await store.start()
    await store.close()


async def test_memory_store_keeps_rows_per_instance() -> None:
    store = MemorySchedulerStore()
    await store.start()
    try:
        job = make_job(1, name="a")
        ci_job = make_job(2, instance="ci", name="b")
        store.save_job(job)
        store.save_job(ci_job)
        store.save_operation(make_operation(job, "operations/a"))
        store.save_session(make_session("ci/s", instance="ci"))
        await store.flush()
        assert store.commits == 1
        state = await store.load("")
        assert [row["id"] for row in state.jobs] == ["a"]
        assert [row["name"] for row in state.operations] == ["operations/a"]
        assert state.sessions == []
        ci = await store.load("ci")
        assert [row["id"] for row in ci.jobs] == ["b"]
        assert [row["name"] for row in ci.sessions] == ["ci/s"]
        store.delete_job("a")
        store.delete_operation("operations/a")
        await store.flush()
        state = await store.load("")
        assert state.jobs == [] and state.operations == []
    finally:
        await store.close()


class FlakyStore(MemorySchedulerStore):
    """Fails its first `failures` writes."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("disk on fire")
        await super()._write(upserts, deletes)


async def test_failed_write_is_unavailable_and_kept_for_the_next_attempt() -> None:
    store = FlakyStore(failures=1)
    await store.start()
    try:
        store.save_job(make_job(0, name="kept"))
        with pytest.raises(Unavailable):
            await store.flush()
        await asyncio.wait_for(store.flush(), 5)
        assert [row["id"] for row in (await store.load("")).jobs] == ["kept"]
    finally:
        await store.close()


async def test_scheduler_restores_queued_jobs_and_operations() -> None:
    store: SchedulerStore = MemorySchedulerStore()
    await store.start()
    try:
        first = Scheduler("", store)
        await first.start()
        action = re_pb2.Action(do_not_cache=False)
        digest = Digest.of(action.SerializeToString())
        operation = await first.submit(digest, action, LINUX, priority=2)
        await first.close()

        second = Scheduler("", store)
        await second.start()
        restored = second.operation(operation.name)
        assert restored.job.action_digest == digest and restored.job.priority == 2
        assert restored.job.stage == Stage.QUEUED and len(second.queue) == 1
        # Deduplication survives too: the same action joins the restored job.
        again = await second.submit(digest, action, LINUX)
        assert again.job is restored.job
        await second.close()
    finally:
        await store.close()



async def test_watch_yields_the_done_state_that_arrives_during_a_yield() -> None:
    store = MemorySchedulerStore()
    await store.start()
    scheduler = Scheduler("", store)
    await scheduler.start()
    try:
        action = re_pb2.Action()
        operation = await scheduler.submit(Digest.of(action.SerializeToString()), action,
                                           LINUX)
        watch = scheduler.watch(operation)
        first = await anext(watch)
        assert not first.done
        # While the consumer is busy with that snapshot (sending it to a client), the
        # operation finishes.
        await scheduler.cancel_operation(operation.name)
        states = [snapshot.done async for snapshot in watch]
        assert states == [True]
    finally:
        await scheduler.close()
        await store.close()
