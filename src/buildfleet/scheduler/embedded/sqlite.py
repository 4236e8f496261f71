"""The write-behind store's rows in one SQLite file: the embedded default."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from buildfleet.scheduler.embedded.store import (
    COMPLETED,
    EXPIRE_JOBS,
    EXPIRE_OPERATIONS,
    TABLES,
    Row,
    SchedulerStore,
    StoredState,
)

_SCHEMA = [
    # version 1
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY, instance TEXT NOT NULL,
        action_hash TEXT NOT NULL, action_size INTEGER NOT NULL, action BLOB NOT NULL,
        requirements TEXT NOT NULL, priority INTEGER NOT NULL, cacheable INTEGER NOT NULL,
        timeout REAL NOT NULL, queued_at REAL NOT NULL, seq INTEGER NOT NULL,
        stage INTEGER NOT NULL, attempts INTEGER NOT NULL, response BLOB,
        lease_id TEXT, lease_session TEXT, lease_state INTEGER,
        failed_on TEXT NOT NULL, last_failure TEXT NOT NULL, completed_at REAL,
        worker TEXT NOT NULL
    );
    CREATE INDEX jobs_instance ON jobs (instance);
    CREATE TABLE operations (
        name TEXT PRIMARY KEY, instance TEXT NOT NULL, job_id TEXT NOT NULL,
        created_at REAL NOT NULL, cancelled INTEGER NOT NULL, own_response BLOB
    );
    CREATE INDEX operations_instance ON operations (instance);
    CREATE TABLE sessions (
        name TEXT PRIMARY KEY, instance TEXT NOT NULL, bot_id TEXT NOT NULL,
        status INTEGER NOT NULL, properties TEXT NOT NULL, capacity INTEGER NOT NULL,
        created_at REAL NOT NULL, version INTEGER NOT NULL, worker BLOB NOT NULL
    );
    CREATE INDEX sessions_instance ON sessions (instance);
    """,
    # version 2: the principal an operation or a bot session belongs to
    """
    ALTER TABLE operations ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    ALTER TABLE sessions ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    """,
    # version 3: drains (bots matching a pattern take no new work)
    """
    CREATE TABLE drains (
        id TEXT PRIMARY KEY, instance TEXT NOT NULL, pattern TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    # version 4: done operations are read back and expired here (store.expire_done)
    """
    CREATE INDEX jobs_done ON jobs (instance, completed_at) WHERE stage = 4;
    CREATE INDEX operations_job ON operations (job_id);
    """,
    # version 5: the client's RequestMetadata of an operation (rules.invocations)
    """
    ALTER TABLE operations ADD COLUMN request_metadata BLOB NOT NULL DEFAULT x'';
    """,
]


class SqliteSchedulerStore(SchedulerStore):
    """Rows in one SQLite file (WAL), written by one background thread."""

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        super().__init__()
        self.path = Path(path)
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-store")
        self._db: sqlite3.Connection | None = None

    async def _run(self, function: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _open(self) -> None:
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.execute("PRAGMA busy_timeout=10000")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_SCHEMA):
            raise RuntimeError(f"{self.path} has schema version {version}, newer than this "
                               f"buildfleet ({len(_SCHEMA)}); upgrade buildfleet")
        for number, script in enumerate(_SCHEMA[version:], start=version + 1):
            db.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")
        db.row_factory = sqlite3.Row
        self._db = db

    async def _close(self) -> None:
        if self._db is not None:
            await self._run(self._db.close)
            self._db = None
        self._executor.shutdown(wait=True)

    async def load(self, instance: str) -> StoredState:
        return await self._run(self._load_sync, instance)

    def _load_sync(self, instance: str) -> StoredState:
        assert self._db is not None
        state = StoredState()
        for table, target in (("jobs", state.jobs), ("operations", state.operations),
                              ("sessions", state.sessions), ("drains", state.drains)):
            rows = self._db.execute(f"SELECT * FROM {table} WHERE instance = ?", (instance,))
            target.extend(dict(row) for row in rows)
        return state

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        await self._run(self._write_sync, upserts, deletes)

    async def _load_operation(self, instance: str, name: str) -> tuple[Row, Row] | None:
        return await self._run(self._load_operation_sync, instance, name)  # type: ignore[no-any-return]

    def _load_operation_sync(self, instance: str, name: str) -> tuple[Row, Row] | None:
        assert self._db is not None
        operation = self._db.execute("SELECT * FROM operations WHERE name = ? AND instance = ?",
                                     (name, instance)).fetchone()
        if operation is None:
            return None
        job = self._db.execute("SELECT * FROM jobs WHERE id = ?",
                               (operation["job_id"],)).fetchone()
        return None if job is None else (dict(operation), dict(job))

    async def _load_done(self, instance: str) -> list[tuple[Row, Row]]:
        return await self._run(self._load_done_sync, instance)  # type: ignore[no-any-return]

    def _load_done_sync(self, instance: str) -> list[tuple[Row, Row]]:
        assert self._db is not None
        jobs = {row["id"]: dict(row) for row in self._db.execute(
            "SELECT * FROM jobs WHERE instance = ? AND stage = ?", (instance, COMPLETED))}
        found = []
        for row in self._db.execute("SELECT * FROM operations WHERE instance = ?", (instance,)):
            job = jobs.get(row["job_id"])
            if job is not None or row["own_response"] is not None:
                job = job or self._db.execute("SELECT * FROM jobs WHERE id = ?",
                                              (row["job_id"],)).fetchone()
                if job is not None:
                    found.append((dict(row), dict(job)))
        return found

    async def _expire(self, instance: str, cutoff: float) -> None:
        await self._run(self._expire_sync, instance, cutoff)

    def _expire_sync(self, instance: str, cutoff: float) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            db.execute(EXPIRE_OPERATIONS.replace("%s", "?"),
                       (instance, cutoff, instance, COMPLETED, cutoff))
            db.execute(EXPIRE_JOBS.replace("%s", "?"), (instance, COMPLETED, cutoff))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _write_sync(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            for table, rows in upserts.items():
                columns = list(rows[0])
                sql = (f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
                       f"VALUES ({', '.join('?' * len(columns))})")
                db.executemany(sql, [tuple(row[c] for c in columns) for row in rows])
            for table, keys in deletes.items():
                key = TABLES[table][0]
                db.executemany(f"DELETE FROM {table} WHERE {key} = ?", [(k,) for k in keys])
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
