"""Both scheduling strategies behind one door, for tests that must hold for either.

`open_scheduler("embedded" | "replicated", settings)` yields a started scheduler of
that strategy: the embedded one on a store of its own (a MemorySchedulerStore
unless one is given), the replicated one on a fresh PostgreSQL schema (or the
URL given, so that a test can open a second replica or a restarted one on it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from pgkit import postgres_schema

from buildfleet.config import PostgresConfig, SchedulerConfig
from buildfleet.postgres import Database
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.embedded import (
    EmbeddedScheduler,
    MemorySchedulerStore,
    SchedulerStore,
)
from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler
from buildfleet.storage.action_cache import ActionCache

KINDS = ["embedded", "replicated"]


@asynccontextmanager
async def open_scheduler(kind: str, settings: SchedulerConfig, *,
                         action_cache: ActionCache | None = None,
                         store: SchedulerStore | None = None,
                         url: str | None = None) -> AsyncIterator[SchedulerAPI]:
    """A started scheduler of strategy `kind` for instance ""; closed afterwards."""
    async with AsyncExitStack() as stack:
        scheduler: SchedulerAPI
        if kind == "embedded":
            own = store or MemorySchedulerStore()
            await own.start()
            if store is None:
                stack.push_async_callback(own.close)
            scheduler = EmbeddedScheduler("", own, action_cache=action_cache,
                                          settings=settings)
        else:
            if url is None:
                url = await stack.enter_async_context(postgres_schema())
            grid = ReplicatedGrid(Database(url, PostgresConfig(pool_max=20)))
            stack.push_async_callback(grid.close)
            scheduler = ReplicatedScheduler("", grid, action_cache=action_cache,
                                            settings=settings)
        await scheduler.start()
        stack.push_async_callback(scheduler.close)
        yield scheduler
