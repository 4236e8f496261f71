"""What the replicated schedulers of one server share: the database and LISTEN.

Wake-ups cross replicas with LISTEN/NOTIFY, sent inside the transaction that
caused them and so delivered only once it commits: a new or requeued job wakes
one waiting bot that can run it on every replica (the first to claim it wins),
a job change wakes the operation's watchers (with the job's new stage, and its
response once done, when they fit: watchers then need not read it back), a
cancellation wakes the session.
While the listening connection is down notifications are lost; on reconnecting
every waiter looks again, and housekeeping wakes waiting bots for queued work
once per tick anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import psycopg

from buildfleet.postgres import Database, first_line, migrate
from buildfleet.scheduler.replicated.notes import (
    SEPARATOR,
    JobNews,
    job_payload,
    read_job_payload,
    work_payload,
)
from buildfleet.scheduler.replicated.sql import channel, properties_from

if TYPE_CHECKING:
    from buildfleet.scheduler.replicated.scheduler import ReplicatedScheduler

log = logging.getLogger(__name__)

KINDS = ("work", "job", "session", "drains")


class ReplicatedGrid:
    """The database and the notifications of a server's replicated schedulers.

    `store` of each scheduler is this object, so that code starting a scheduler's
    store (`UninstancedBotsService.start`) starts the grid.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.schedulers: dict[str, ReplicatedScheduler] = {}
        self.channels: dict[str, str] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            await self.database.open()
            async with self.database.connection() as conn:
                await migrate(conn)
                schema = (await (await conn.execute("SELECT current_schema()")).fetchone()
                          or ("public",))[0]
            self.channels = {kind: channel(schema, kind) for kind in KINDS}
            self._listener = asyncio.create_task(self._listen(), name="scheduler-listener")
            self._started = True
        # Notifications sent before LISTEN took effect would be lost: wait for it
        # (bounded: housekeeping's rescue covers the rest).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.database.config.connect_timeout):
                await self._listening.wait()

    async def flush(self) -> None:
        """Every change is committed before the call that made it returns."""

    async def close(self) -> None:
        async with self._lock:
            if self._listener is not None:
                self._listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._listener
                self._listener = None
            if self._started:
                await self.database.close()
                self._started = False

    def notes(self, instance: str, jobs: dict[str, JobNews | None], work: set[str],
              sessions: set[str]) -> tuple[list[str], list[str]]:
        """(channels, payloads) announcing changes of `instance`."""
        notes = [(self.channels["job"], job_payload(instance, job, news))
                 for job, news in sorted(jobs.items())]
        notes += [(self.channels["work"], work_payload(instance, reqs)) for reqs in sorted(work)]
        notes += [(self.channels["session"], instance + SEPARATOR + name)
                  for name in sorted(sessions)]
        return [c for c, _ in notes], [p for _, p in notes]

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self.database.listen_connection()
                for name in self.channels.values():
                    await conn.execute(f"LISTEN {name}")
                self._listening.set()
                delay = 0.2
                # Anything sent while we were not listening is lost: look again.
                for scheduler in self.schedulers.values():
                    scheduler.wake_everything()
                async for note in conn.notifies():
                    self._dispatch(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # reconnect after a pause
                self._listening.clear()
                log.warning("scheduler notifications interrupted (%s); reconnecting in %.1fs",
                            first_line(error), delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    def _dispatch(self, kind: str, payload: str) -> None:
        instance, _, rest = payload.partition(SEPARATOR)
        scheduler = self.schedulers.get(instance)
        if scheduler is None:
            return
        if kind == self.channels["work"]:
            scheduler.wake_for_work(properties_from(rest) if rest else None)
        elif kind == self.channels["job"]:
            if scheduler.watches(rest.partition(SEPARATOR)[0]):  # most are watched elsewhere
                scheduler.wake_watchers(*read_job_payload(rest))
        elif kind == self.channels["session"]:
            scheduler.wake_session(rest)
        elif kind == self.channels["drains"]:
            scheduler.drains_changed()
