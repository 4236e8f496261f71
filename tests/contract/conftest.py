"""The contract suite: scheduler behaviour at the Python level, for both strategies.

Every test takes `harness` (or `scheduler`) and runs twice: on the embedded
strategy (state in memory, written behind to SQLite) and on the replicated one
(state in PostgreSQL).  `harness.open()` opens a scheduler on the same state --
a restarted server for the embedded strategy, another replica (or a restarted
one) for the replicated.  `Bot` drives `update_session` as a bot would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from pgkit import postgres_schema
from strategies import KINDS, open_scheduler

from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.embedded import SqliteSchedulerStore
from buildfleet.scheduler.model import BotSession, BotStatus, Lease, Properties, ReportedLease
from buildfleet.storage.action_cache import ActionCache

LINUX: Properties = frozenset({("OSFamily", "linux")})

# Fast timers for tests; a test overrides what it is about.
FAST: dict[str, Any] = {"keepalive": 5, "long_poll": 2, "busy_poll": 0.2,
                        "lease_timeout": 1.0, "retry_backoff": 0.3,
                        "housekeeping_interval": 0.05}


def settings(**overrides: Any) -> SchedulerConfig:
    return SchedulerConfig(**{**FAST, **overrides})


class Harness:
    """Schedulers of one strategy on one shared state."""

    def __init__(self, kind: str, tmp_path: Path, stack: AsyncExitStack) -> None:
        self.kind = kind
        self._path = tmp_path / "scheduler.sqlite3"
        self._stack = stack
        self._url: str | None = None
        self._scopes: dict[int, AsyncExitStack] = {}  # id(scheduler) -> what closes it

    async def open(self, config: SchedulerConfig | None = None, *,
                   action_cache: ActionCache | None = None) -> SchedulerAPI:
        """A started scheduler on this harness's state."""
        scope = AsyncExitStack()
        store = None
        if self.kind == "embedded":
            store = SqliteSchedulerStore(self._path)
            await store.start()
            scope.push_async_callback(store.close)
        elif self._url is None:
            self._url = await self._stack.enter_async_context(postgres_schema())
        scheduler = await scope.enter_async_context(open_scheduler(
            self.kind, config or settings(), action_cache=action_cache, store=store,
            url=self._url))
        self._scopes[id(scheduler)] = scope
        self._stack.push_async_callback(scope.aclose)
        return scheduler

    async def restart(self, scheduler: SchedulerAPI, config: SchedulerConfig | None = None,
                      *, action_cache: ActionCache | None = None) -> SchedulerAPI:
        """Stop `scheduler` (as a server would at shutdown) and open its successor."""
        await self._scopes.pop(id(scheduler)).aclose()
        return await self.open(config, action_cache=action_cache)


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with AsyncExitStack() as stack:
        yield Harness(request.param, tmp_path, stack)


@pytest.fixture
async def scheduler(harness: Harness) -> SchedulerAPI:
    return await harness.open()


class Bot:
    """A bot as the scheduler sees it: a session and its UpdateBotSession calls."""

    def __init__(self, scheduler: SchedulerAPI, bot_id: str, *,
                 properties: Properties = LINUX, capacity: int = 1) -> None:
        self.scheduler = scheduler
        self.bot_id = bot_id
        self.properties = properties
        self.capacity = capacity
        self.session: BotSession | None = None
        self.leases: list[Lease] = []

    @property
    def name(self) -> str:
        assert self.session is not None
        return self.session.name

    async def register(self, status: BotStatus = BotStatus.OK) -> BotSession:
        self.session = await self.scheduler.create_session(
            self.bot_id, status=status, properties=self.properties, capacity=self.capacity)
        return self.session

    async def update(self, *reports: ReportedLease, status: BotStatus = BotStatus.OK,
                     wait: float = 0.0, capacity: int | None = None,
                     scheduler: SchedulerAPI | None = None) -> list[Lease]:
        """One UpdateBotSession reporting `reports`; the leases answered."""
        self.session, self.leases = await (scheduler or self.scheduler).update_session(
            self.name, bot_id=self.bot_id, status=status, leases=list(reports),
            capacity=capacity, wait=wait)
        return self.leases
