"""The embedded strategy's write-behind store: group commit, durability, bad rows."""

from __future__ import annotations

import asyncio
import time

import pytest
from pgkit import StoreBackend
from schedkit import LINUX_X86, make_job, make_operation, make_session

from buildfleet.errors import Unavailable
from buildfleet.scheduler.embedded.store import MemorySchedulerStore, Row
from buildfleet.scheduler.model import Stage


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
