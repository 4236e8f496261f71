"""Persistence for the scheduler: every job, operation and bot-session change.

The scheduler keeps its state in memory and tells the store what changed
(`save_*` / `delete_*`, which return at once).  The store coalesces changes and
writes them in one transaction per batch (group commit) on a single background
thread; `flush()` waits until everything saved so far is durable.  Callers
await `flush()` before answering a client or bot whenever losing the change in
a crash would matter, so many concurrent calls share one commit.  A batch is
written when someone waits for it: changes saved meanwhile by other calls ride
along, and a flush with nothing new to write costs one comparison.

`SqliteSchedulerStore` (embedded/sqlite.py) is the default (WAL,
synchronous=FULL), `PostgresSchedulerStore` (embedded/postgres.py) the same rows
in PostgreSQL for one server; `MemorySchedulerStore` keeps nothing and serves
tests and throwaway grids.

Done operations need not stay in the scheduler's memory for their whole retention:
the scheduler keeps the most recent ones and reads older ones back from here
(`load_operation`, `load_done`); `expire_done` deletes the rows of operations, and
of jobs left without one, that ended before a cutoff (run by the writer, between
batches, so it never races a batch).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from buildfleet.errors import Unavailable
from buildfleet.scheduler.embedded.records import JobRecord, OperationRecord, SessionRecord
from buildfleet.scheduler.model import Stage
from buildfleet.scheduler.rules.drains import Drain

log = logging.getLogger(__name__)

Row = dict[str, Any]
COMPLETED = int(Stage.COMPLETED)

# Errors a row raises however often it is written (a value SQLite cannot hold, a
# type it does not take), unlike a full disk or a locked database, which pass.
UNSTORABLE = (OverflowError, TypeError, ValueError, sqlite3.InterfaceError,
              sqlite3.ProgrammingError, sqlite3.DataError)


@dataclass
class StoredState:
    """What a store holds for one instance, as rows."""

    jobs: list[Row] = field(default_factory=list)
    operations: list[Row] = field(default_factory=list)
    sessions: list[Row] = field(default_factory=list)
    drains: list[Row] = field(default_factory=list)


_PROPERTIES_JSON: dict[frozenset[tuple[str, str]], str] = {}
_PROPERTIES_JSON_LIMIT = 4096  # distinct property sets remembered


def properties_json(properties: frozenset[tuple[str, str]]) -> str:
    """A property set as stored: a sorted JSON list of pairs (remembered: sets recur)."""
    text = _PROPERTIES_JSON.get(properties)
    if text is None:
        text = json.dumps(sorted(properties))
        if len(_PROPERTIES_JSON) < _PROPERTIES_JSON_LIMIT:
            _PROPERTIES_JSON[properties] = text
    return text


def job_row(job: JobRecord) -> Row:
    lease = job.lease
    return {
        "id": job.id, "instance": job.instance,
        "action_hash": job.action_digest.hash, "action_size": job.action_digest.size_bytes,
        "action": job.action, "requirements": properties_json(job.requirements),
        "priority": job.priority, "cacheable": int(job.cacheable), "timeout": job.timeout,
        "queued_at": job.queued_at, "seq": job.seq, "stage": int(job.stage),
        "attempts": job.attempts, "response": job.response,
        "lease_id": lease.id if lease else None,
        "lease_session": lease.session.name if lease else None,
        "lease_state": int(lease.state) if lease else None,
        "failed_on": json.dumps(sorted(job.failed_on)) if job.failed_on else "[]",
        "last_failure": job.last_failure,
        "completed_at": job.completed_at, "worker": job.worker,
    }


def operation_row(operation: OperationRecord) -> Row:
    return {
        "name": operation.name, "instance": operation.instance, "job_id": operation.job.id,
        "created_at": operation.created_at, "cancelled": int(operation.cancelled),
        "own_response": operation.own_response, "owner": operation.owner,
        "request_metadata": operation.request_metadata,
    }


def session_row(session: SessionRecord) -> Row:
    return {
        "name": session.name, "instance": session.instance, "bot_id": session.bot_id,
        "status": int(session.status), "properties": properties_json(session.properties),
        "capacity": session.capacity, "created_at": session.created_at,
        "version": session.version, "worker": session.worker, "owner": session.owner,
    }


def drain_row(item: tuple[str, Drain]) -> Row:
    instance, drain = item
    return {"id": drain_key(instance, drain.pattern), "instance": instance,
            "pattern": drain.pattern, "created_at": drain.created_at}


def drain_key(instance: str, pattern: str) -> str:
    return f"{instance}\n{pattern}"  # neither may contain a newline


TABLES: dict[str, tuple[str, Callable[[Any], Row]]] = {
    "jobs": ("id", job_row),
    "operations": ("name", operation_row),
    "sessions": ("name", session_row),
    "drains": ("id", drain_row),
}


class SchedulerStore(abc.ABC):
    """Coalescing write-behind persistence; see the module docstring."""

    def __init__(self) -> None:
        # (table, key) -> the object to write, or None to delete the row.
        self._pending: dict[tuple[str, str], Any] = {}
        # flush() callers: the `queued` count each waits for, and its future.
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._writing = False
        self.commits = 0
        self.queued = 0  # changes handed to the store so far (a cheap change marker)
        self.durable = 0  # the value `queued` had when the last committed batch was taken
        self._expiries: dict[str, float] = {}  # instance -> cutoff (see expire_done)

    # -- what the scheduler calls -------------------------------------------
    def save_job(self, job: JobRecord) -> None:
        self._queue("jobs", job.id, job)

    def delete_job(self, job_id: str) -> None:
        self._queue("jobs", job_id, None)

    def save_operation(self, operation: OperationRecord) -> None:
        self._queue("operations", operation.name, operation)

    def delete_operation(self, name: str) -> None:
        self._queue("operations", name, None)

    def save_session(self, session: SessionRecord) -> None:
        self._queue("sessions", session.name, session)

    def delete_session(self, name: str) -> None:
        self._queue("sessions", name, None)

    def save_drain(self, instance: str, drain: Drain) -> None:
        self._queue("drains", drain_key(instance, drain.pattern), (instance, drain))

    def delete_drain(self, instance: str, pattern: str) -> None:
        self._queue("drains", drain_key(instance, pattern), None)

    async def flush(self) -> None:
        """Return once every change queued before this call is durable.

        Free when it already is (one comparison), so callers may flush whenever
        they are about to tell someone about a change.  A caller whose changes
        are in the batch being written waits for that commit only, not the next.
        """
        await self.flush_until(self.queued)

    async def flush_until(self, mark: int) -> None:
        """Return once the changes queued while `queued` reached `mark` are durable.

        For a caller that noted `queued` after its own change: it then waits for
        no commit of the changes others made since.
        """
        target = mark
        if self.durable >= target:
            return
        if self._wake is None:
            raise RuntimeError("store not started")
        # One future per caller: a cancelled caller cancels only its own, which the
        # writer then skips.
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((target, future))
        self._wake.set()
        await future

    # -- done operations that left the scheduler's memory ------------------
    async def load_operation(self, instance: str, name: str) -> tuple[Row, Row] | None:
        """The stored rows (operation, its job) of operation `name`, or None; a
        deletion still queued counts as done."""
        if self._pending.get(("operations", name), "") is None:
            return None
        return await self._load_operation(instance, name)

    async def load_done(self, instance: str) -> list[tuple[Row, Row]]:
        """The stored rows (operation, its job) of every done operation of `instance`
        whose deletion is not queued."""
        return [(operation, job) for operation, job in await self._load_done(instance)
                if self._pending.get(("operations", operation["name"]), "") is not None]

    def expire_done(self, instance: str, cutoff: float) -> None:
        """Have the writer delete, after its current batch, the rows of `instance`'s
        operations that ended before `cutoff` (a cancelled one when it was created, any
        other when its job completed) and of the done jobs then left without one."""
        self._expiries[instance] = cutoff
        if self._wake is not None:
            self._wake.set()

    async def start(self) -> None:
        """Open the backend and start the writer (once; later calls do nothing)."""
        if self._writer is not None:
            return
        self._wake = asyncio.Event()
        await self._open()
        self._writer = asyncio.create_task(self._write_loop(), name="scheduler-store-writer")

    async def close(self) -> None:
        if self._writer is not None:
            await self.flush()
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
            self._writer = None
        await self._close()

    @abc.abstractmethod
    async def load(self, instance: str) -> StoredState:
        """Everything stored for `instance`."""

    # -- what a backend implements ------------------------------------------
    async def _open(self) -> None:  # noqa: B027 - optional hook
        pass

    async def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    @abc.abstractmethod
    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        """Apply one batch atomically."""

    @abc.abstractmethod
    async def _load_operation(self, instance: str, name: str) -> tuple[Row, Row] | None:
        """The rows of one operation and its job."""

    @abc.abstractmethod
    async def _load_done(self, instance: str) -> list[tuple[Row, Row]]:
        """The rows of every done operation (cancelled, or of a completed job) with its
        job's."""

    @abc.abstractmethod
    async def _expire(self, instance: str, cutoff: float) -> None:
        """Delete what `expire_done` describes, atomically."""

    # -- group commit ---------------------------------------------------------
    def _queue(self, table: str, key: str, item: Any) -> None:
        # The writer is woken by flush(), not here: changes nobody waits for yet
        # join the batch of the next flush (the scheduler's housekeeping flushes
        # every tick), so a busy server commits fewer, larger batches.
        self.queued += 1
        self._pending[(table, key)] = item

    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._run_expiries()
            if not self._pending:
                self._release(self.durable)
                continue
            # Everything queued up to `mark` is in this batch (coalesced per row).
            batch, self._pending, mark = self._pending, {}, self.queued
            upserts: dict[str, list[Row]] = {}
            deletes: dict[str, list[str]] = {}
            for (table, key), item in batch.items():
                if item is None:
                    deletes.setdefault(table, []).append(key)
                else:
                    upserts.setdefault(table, []).append(TABLES[table][1](item))
            self._writing = True
            try:
                try:
                    await self._write(upserts, deletes)
                except UNSTORABLE as error:
                    await self._write_row_by_row(upserts, deletes, error)
                self.commits += 1
            except Exception as error:  # keep the changes for the next attempt
                log.error("scheduler store write failed: %s", error)
                for entry, item in batch.items():
                    self._pending.setdefault(entry, item)
                failure = Unavailable(f"the scheduler database is unavailable: {error}")
                self._release(mark, failure)
                await asyncio.sleep(0.5)
                self._wake.set()
                continue
            finally:
                self._writing = False
            self.durable = max(self.durable, mark)
            self._release(self.durable)
            if self._pending or self._waiters:
                self._wake.set()

    async def _run_expiries(self) -> None:
        expiries, self._expiries = self._expiries, {}
        for instance, cutoff in expiries.items():
            try:
                await self._expire(instance, cutoff)
            except Exception as error:  # the next housekeeping pass asks again
                log.warning("scheduler store: could not delete old operations of "
                            "instance %r: %s", instance, error)

    async def _write_row_by_row(self, upserts: dict[str, list[Row]],
                                deletes: dict[str, list[str]], error: Exception) -> None:
        """Write a batch one row at a time, logging and leaving out rows that can never
        be stored; retrying those would stall every later change."""
        log.error("scheduler store: a batch cannot be stored as a whole (%s); "
                  "writing it row by row", error)
        for table, rows in upserts.items():
            for row in rows:
                try:
                    await self._write({table: [row]}, {})
                except UNSTORABLE as row_error:
                    log.error("scheduler store: left out %s row %r, which cannot be "
                              "stored: %s", table, row[TABLES[table][0]], row_error)
        if deletes:
            await self._write({}, deletes)

    def _release(self, mark: int, failure: Exception | None = None) -> None:
        """Answer the flush() callers waiting for changes up to `mark`: done, or `failure`."""
        if not self._waiters:
            return
        keep: list[tuple[int, asyncio.Future[None]]] = []
        for target, future in self._waiters:
            if target > mark:
                keep.append((target, future))
            elif not future.done():
                if failure is None:
                    future.set_result(None)
                else:
                    future.set_exception(failure)
        self._waiters = keep


class MemorySchedulerStore(SchedulerStore):
    """Keeps rows in dicts: nothing survives the process."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, dict[str, Row]] = {name: {} for name in TABLES}

    async def load(self, instance: str) -> StoredState:
        state = StoredState()
        for name, target in (("jobs", state.jobs), ("operations", state.operations),
                             ("sessions", state.sessions), ("drains", state.drains)):
            target.extend(r for r in self.tables[name].values() if r["instance"] == instance)
        return state

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        for table, rows in upserts.items():
            key = TABLES[table][0]
            for row in rows:
                self.tables[table][row[key]] = row
        for table, keys in deletes.items():
            for key in keys:
                self.tables[table].pop(key, None)

    async def _load_operation(self, instance: str, name: str) -> tuple[Row, Row] | None:
        operation = self.tables["operations"].get(name)
        if operation is None or operation["instance"] != instance:
            return None
        job = self.tables["jobs"].get(operation["job_id"])
        return None if job is None else (operation, job)

    async def _load_done(self, instance: str) -> list[tuple[Row, Row]]:
        found = []
        for operation in self.tables["operations"].values():
            job = self.tables["jobs"].get(operation["job_id"])
            if (operation["instance"] == instance and job is not None
                    and (operation["own_response"] is not None or job["stage"] == COMPLETED)):
                found.append((operation, job))
        return found

    async def _expire(self, instance: str, cutoff: float) -> None:
        operations, jobs = self.tables["operations"], self.tables["jobs"]
        for name, operation in list(operations.items()):
            job = jobs.get(operation["job_id"])
            if operation["instance"] == instance and ended_before(operation, job, cutoff):
                del operations[name]
        referenced = {operation["job_id"] for operation in operations.values()}
        for job_id, job in list(jobs.items()):
            if (job["instance"] == instance and job["stage"] == COMPLETED
                    and (job["completed_at"] or 0) < cutoff and job_id not in referenced):
                del jobs[job_id]


# What expire_done deletes (placeholders %s; SQLite's are put in by replacing them).
EXPIRE_OPERATIONS = """
    DELETE FROM operations WHERE instance = %s AND (
        (own_response IS NOT NULL AND created_at < %s)
        OR (own_response IS NULL AND job_id IN (
            SELECT id FROM jobs WHERE instance = %s AND stage = %s AND completed_at < %s)))"""
EXPIRE_JOBS = """
    DELETE FROM jobs WHERE instance = %s AND stage = %s AND completed_at < %s
        AND NOT EXISTS (SELECT 1 FROM operations o WHERE o.job_id = jobs.id)"""


def ended_before(operation: Row, job: Row | None, cutoff: float) -> bool:
    """rules.timers.operation_ended on rows: whether the operation ended before `cutoff`."""
    if operation["own_response"] is not None:
        return bool(operation["created_at"] < cutoff)
    return job is not None and job["stage"] == COMPLETED and (job["completed_at"] or 0) < cutoff
