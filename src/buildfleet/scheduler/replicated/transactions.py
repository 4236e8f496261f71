"""Transactions of the replicated strategy, and what happens once they commit.

A transaction body only reads and writes the database.  Everything else it
decides -- wake-ups for other replicas, counters, log lines, this replica's
view of the live sessions, the fairness count -- goes into `Effects`: the
notifications are sent inside the transaction (PostgreSQL delivers NOTIFY at
commit, or never), the rest is applied after the commit, once.  A body that
PostgreSQL aborts for a transient reason (deadlock, serialization failure, a
lost race marked with `Retry`) is run again from the start with fresh effects,
so nothing it did outside the database happens twice.  Blob I/O (results,
the action cache) happens before a transaction, never while it holds row locks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row

from buildfleet.config import SchedulerConfig
from buildfleet.scheduler.replicated.notes import JobNews, job_note
from buildfleet.scheduler.replicated.sql import Row
from buildfleet.scheduler.rules.observations import Observations

log = logging.getLogger(__name__)

T = TypeVar("T")
ATTEMPTS = 5  # tries of a transaction that PostgreSQL aborted for a transient reason


class Retry(Exception):
    """A transaction lost a race it can simply run again."""


def is_transient(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, psycopg.errors.TransactionRollback | Retry):
            return True
        cause = cause.__cause__
    return False


async def retrying(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`, tried again (up to ATTEMPTS times) while it fails transiently."""
    for number in range(1, ATTEMPTS + 1):
        try:
            return await attempt()
        except Exception as error:
            if number < ATTEMPTS and is_transient(error):
                await asyncio.sleep(0.005 * number)
                continue
            raise
    raise AssertionError("unreachable")


@dataclass
class Effects:
    """What one run of a transaction body decided beyond the database."""

    # Changed jobs, to wake their watchers: what they can learn from the notification
    # alone (None: they read the job).
    jobs: dict[str, JobNews | None] = field(default_factory=dict)
    # What the statements that changed a job announced already (see Tx.announcing).
    announced: dict[str, JobNews | None] = field(default_factory=dict)
    work: set[str] = field(default_factory=set)  # requirements (json) of newly queued work
    sessions: set[str] = field(default_factory=set)  # sessions to wake (cancellations)
    queued: int = 0  # jobs added to (or taken from, when negative) the queue
    picks: int = 0  # assignments made, for the fairness share
    closed: set[str] = field(default_factory=set)  # sessions closed
    stats: Counter[str] = field(default_factory=Counter)
    observations: Observations = field(default_factory=Observations)
    logs: list[tuple[int, str, tuple[Any, ...]]] = field(default_factory=list)

    def log(self, level: int, message: str, *args: Any) -> None:
        self.logs.append((level, message, args))

    def job(self, job_id: str, news: JobNews | None = None) -> None:
        """Note a changed job.  Several changes of one job in one transaction tell
        their watchers to read it unless each came with news (the last one wins)."""
        if job_id in self.jobs and self.jobs[job_id] is None:
            return
        self.jobs[job_id] = news if job_id not in self.jobs or news is not None else None

    def unannounced(self) -> dict[str, JobNews | None]:
        """The job changes still to announce when the transaction ends."""
        return {job: news for job, news in self.jobs.items()
                if job not in self.announced or self.announced[job] is not news}


@dataclass
class Tx:
    """One run of a transaction body: its connection, what it decided, and the
    instance's settings."""

    conn: psycopg.AsyncConnection[Any]
    effects: Effects
    instance: str
    settings: SchedulerConfig
    job_channel: str = ""  # where job changes are announced ("": at the end)
    drains: tuple[str, ...] = ()  # the instance's drain patterns, as this replica knows them

    def announcing(self, job_id: str, news: JobNews) -> tuple[str, str] | None:
        """Note a job change; (channel, payload) for the statement making it to announce
        it (`RETURNING pg_notify(...)`: no statement of its own), or None when it is
        announced at the end with the job's other changes."""
        if job_id in self.effects.jobs or not self.job_channel:
            self.effects.job(job_id, news)
            return None
        payload, sent = job_note(self.instance, job_id, news)
        self.announced(job_id, sent)
        return self.job_channel, payload

    def announced(self, job_id: str, news: JobNews | None) -> None:
        """Note a job change that its statement announced (with `news`, or for reading)."""
        self.effects.job(job_id, news)
        self.effects.announced[job_id] = news

    async def execute(self, statement: str, params: Any = None) -> None:
        """A statement whose result is not needed (in a pipeline: no round trip)."""
        await self.conn.execute(statement, params)

    async def rows(self, statement: str, params: Any = None) -> list[Row]:
        cursor = self.conn.cursor(row_factory=dict_row)
        await cursor.execute(statement, params)
        return await cursor.fetchall()

    async def row(self, statement: str, params: Any = None) -> Row | None:
        cursor = self.conn.cursor(row_factory=dict_row)
        await cursor.execute(statement, params)
        return await cursor.fetchone()

    async def value(self, statement: str, params: Any = None) -> Any:
        cursor = await self.conn.execute(statement, params)
        found = await cursor.fetchone()
        return None if found is None else found[0]
