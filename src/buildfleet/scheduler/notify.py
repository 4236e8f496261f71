"""The scheduler's runtime machinery, kept apart from the domain values: waking
waiting coroutines (how both strategies tell a long-poll or a watcher that what it
waits on changed -- a waiting bot or Execute stream costs an event, never a
thread), and the ticking of housekeeping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from buildfleet.errors import Unavailable

log = logging.getLogger(__name__)


class Notifier:
    """Wakes every coroutine waiting for the next change of one thing."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    def waiter(self) -> asyncio.Event:
        """An event set at the next `notify()`; take it before looking at the state."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event


class Wakers:
    """Notifiers by key (a job id, a session name), kept while anyone listens."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Notifier, int]] = {}

    def subscribe(self, key: str) -> Notifier:
        """The key's notifier; call `release(key)` once done listening."""
        notifier, users = self._entries.get(key) or (Notifier(), 0)
        self._entries[key] = (notifier, users + 1)
        return notifier

    def release(self, key: str) -> None:
        notifier, users = self._entries[key]
        if users <= 1:
            del self._entries[key]
        else:
            self._entries[key] = (notifier, users - 1)

    def notify(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry[0].notify()

    def notify_all(self) -> None:
        for notifier, _ in self._entries.values():
            notifier.notify()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class Ticker:
    """Runs a coroutine function every `interval` seconds in a task of its own, until
    stopped: a strategy's housekeeping.  A failed pass is logged and the next one
    runs on time; while the database is unreachable that is a warning, not a bug."""

    def __init__(self, name: str, interval: float,
                 tick: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval = interval
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Unavailable as error:
                log.warning("%s skipped: %s", self.name, error.message)
            except Exception:
                log.exception("%s failed", self.name)
