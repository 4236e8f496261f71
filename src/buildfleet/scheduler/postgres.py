"""Scheduler state in PostgreSQL: a connection pool, schema migrations and a store.

`Database` wraps a psycopg connection pool (autocommit connections, each with the
configured ``statement_timeout``) and turns every sign of an unreachable database --
a refused or broken connection, no free connection in time, a cancelled statement,
a server shutting down -- into `Unavailable` with a retry hint, so callers answer
UNAVAILABLE instead of INTERNAL.  Pooled connections idle for a while are checked
before use and broken ones replaced, so once the database is back the next calls
work again without a restart.

`migrate` brings a database to the schema of `buildfleet.scheduler.pg_schema`,
one version per transaction, serialized across processes by an advisory lock, so
several replicas may start at once.  `PostgresSchedulerStore` is the
write-behind store of `buildfleet.scheduler.store` on PostgreSQL.

Nothing here schema-qualifies a name: every object lives in the connection's
``search_path`` schema.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from buildfleet.errors import Unavailable
from buildfleet.scheduler import pg_schema
from buildfleet.scheduler.store import Row, SchedulerStore, StoredState

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key that serializes migrations ("buildflt" in ASCII).
MIGRATION_LOCK = 0x6275696C64666C74
# How long the pool keeps retrying a lost connection (with growing delays) before
# giving up on that attempt; the next request then starts a fresh attempt.  Short,
# so that a database back after a long outage is noticed within seconds.
RECONNECT_TIMEOUT = 10.0
# A pooled connection idle longer than this is checked (one round trip) before it
# is handed out; one used more recently is trusted, since a connection broken
# while in use is discarded by the pool, and an outage lasts longer than this.
CHECK_AFTER_IDLE = 1.0
# The primary key of each table the store writes.
_KEYS = {"jobs": "id", "operations": "name", "sessions": "name"}


class UnusableDatabase(RuntimeError):
    """The database cannot be used as it is: a newer schema, a malformed URL."""


def redact(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hosts = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hosts}"
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                       if k != "password"])
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(frozen=True)
class PostgresSettings:
    url: str
    pool_min: int = 1
    pool_max: int = 10
    statement_timeout: float = 10.0  # seconds, for every statement on a pooled connection
    connect_timeout: float = 5.0  # seconds, to connect and to wait for a pooled connection
    retry_after: float = 1.0  # seconds, the retry hint sent while the database is down


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def retry_info(retry_after: float) -> error_details_pb2.RetryInfo:
    delay = Duration()
    delay.FromNanoseconds(int(retry_after * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def unavailable(error: BaseException, settings: PostgresSettings | None = None) -> Unavailable:
    """The `Unavailable` answered while the database cannot be reached.

    Its details carry a RetryInfo of ``settings.retry_after`` (1 s without settings).
    """
    retry_after = settings.retry_after if settings is not None else 1.0
    return Unavailable(f"the scheduler database is unreachable: {_first_line(error)}",
                       details=[retry_info(retry_after)])


class Database:
    """A psycopg_pool.AsyncConnectionPool (autocommit connections) plus error mapping.

    Errors of the connection rather than of the statement (`psycopg.OperationalError`,
    which includes pool timeouts, statement timeouts, server shutdown, and also
    serialization failures and deadlocks) leave `connection()` and `transaction()`
    as `unavailable(...)`, chained to the original (``__cause__``).
    """

    def __init__(self, settings: PostgresSettings) -> None:
        if settings.pool_min < 1 or settings.pool_max < settings.pool_min:
            raise ValueError(f"pool sizes must satisfy 1 <= pool-min <= pool-max, got "
                             f"{settings.pool_min} and {settings.pool_max}")
        self.settings = settings
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # When each pooled connection last finished a block without an error.
        self._used: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary())

    # -- connecting -------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq takes whole seconds and treats anything below 2 as 2.
        return {"autocommit": True,
                "connect_timeout": max(2, math.ceil(self.settings.connect_timeout))}

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        milliseconds = max(1, round(self.settings.statement_timeout * 1000))
        await conn.execute("SELECT set_config('statement_timeout', %s, false)",
                           (f"{milliseconds}ms",))

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async with asyncio.timeout(self.settings.connect_timeout):
            conn = await psycopg.AsyncConnection.connect(self.settings.url,
                                                         **self._connect_kwargs())
        try:
            await self._configure(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def open(self) -> None:
        """Connect (retrying for up to `connect_timeout`), then open the pool.

        Raises `Unavailable` naming the URL (without its password) and the last
        error when no connection works in time.
        """
        if self._pool is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.connect_timeout
        while True:
            try:
                probe = await self._connect()
            except (psycopg.OperationalError, TimeoutError) as error:
                if loop.time() + 0.25 >= deadline:
                    reason = ("no answer within "
                              f"{self.settings.connect_timeout:g} s"
                              if isinstance(error, TimeoutError) else _first_line(error))
                    raise Unavailable(
                        f"cannot connect to the scheduler database "
                        f"{redact(self.settings.url)}: {reason}",
                        details=[retry_info(self.settings.retry_after)]) from error
                await asyncio.sleep(0.25)
            except psycopg.Error as error:  # a malformed URL, an unknown option...
                raise UnusableDatabase(f"cannot use the scheduler database "
                                       f"{redact(self.settings.url)}: {_first_line(error)}"
                                       ) from error
            else:
                await probe.close()
                break
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.settings.url, open=False, kwargs=self._connect_kwargs(),
            min_size=self.settings.pool_min, max_size=self.settings.pool_max,
            configure=self._configure, check=self._check,
            timeout=self.settings.connect_timeout, reconnect_timeout=RECONNECT_TIMEOUT,
            name="buildfleet-scheduler")
        await pool.open(wait=False)
        self._pool = pool

    async def _check(self, conn: psycopg.AsyncConnection[Any]) -> None:
        last = self._used.get(conn)
        if last is None or time.monotonic() - last > CHECK_AFTER_IDLE:
            await AsyncConnectionPool.check_connection(conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()

    # -- using ------------------------------------------------------------------
    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled autocommit connection; database outages become `Unavailable`."""
        if self._pool is None:
            raise RuntimeError("the scheduler database is not open")
        try:
            async with self._pool.connection() as conn:
                self._used.pop(conn, None)  # checked again next time unless all goes well
                yield conn
                self._used[conn] = time.monotonic()
        except psycopg.OperationalError as error:
            raise unavailable(error, self.settings) from error

    @asynccontextmanager
    async def transaction(self, *, pipeline: bool = False
                          ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """`connection()` inside one transaction, committed when the block ends.

        With `pipeline`, statements are sent without waiting for their results
        until one is fetched (psycopg's pipeline mode): BEGIN, the statements
        between two fetches and COMMIT then cost one round trip together.  An
        error may then surface at a later statement than the one that caused it.
        """
        async with self.connection() as conn:
            if pipeline:
                async with conn.pipeline(), conn.transaction():
                    yield conn
            else:
                async with conn.transaction():
                    yield conn

    async def listen_connection(self) -> psycopg.AsyncConnection[Any]:
        """A new autocommit connection outside the pool (for LISTEN); the caller closes it."""
        try:
            return await self._connect()
        except TimeoutError as error:
            raise unavailable(TimeoutError(f"no connection within "
                                           f"{self.settings.connect_timeout:g} s"),
                              self.settings) from error
        except psycopg.OperationalError as error:
            raise unavailable(error, self.settings) from error


# ------------------------------------------------------------------ migrations

async def _version(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM buildfleet_schema")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def migrate(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    """Apply the pending migrations of `pg_schema.MIGRATIONS`, each in its own transaction.

    Returns (version before, version after).  Safe to run from several processes at
    once; raises UnusableDatabase (a RuntimeError) for a database newer than this
    buildfleet.
    """
    known = len(pg_schema.MIGRATIONS)
    before: int | None = None
    while True:
        async with conn.transaction():
            # A migration may take long; waiting for another process's is fine too.
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS buildfleet_schema (version integer NOT NULL)")
            version = await _version(conn)
            if before is None:
                before = version
            if version > known:
                raise UnusableDatabase(
                    f"the scheduler database has schema version {version}, newer than this "
                    f"buildfleet knows ({known}); upgrade buildfleet")
            if version == known:
                return before, version
            log.info("scheduler database: migrating schema to version %d", version + 1)
            await conn.execute(pg_schema.MIGRATIONS[version])
            await conn.execute("INSERT INTO buildfleet_schema (version) VALUES (%s)",
                               (version + 1,))


async def upgrade(settings: PostgresSettings) -> tuple[int, int]:
    """Connect, migrate, disconnect: `buildfleet db upgrade`."""
    database = Database(settings)
    await database.open()
    try:
        async with database.connection() as conn:
            return await migrate(conn)
    finally:
        await database.close()


# ----------------------------------------------------------------------- store

def _upsert_sql(table: str, columns: list[str]) -> str:
    key = _KEYS[table]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


class PostgresSchedulerStore(SchedulerStore):
    """The write-behind store's rows in PostgreSQL; one transaction per batch."""

    def __init__(self, settings: PostgresSettings) -> None:
        super().__init__()
        self.settings = settings
        self.database = Database(settings)

    async def _open(self) -> None:
        await self.database.open()
        try:
            async with self.database.connection() as conn:
                await migrate(conn)
        except BaseException:
            await self.database.close()
            raise

    async def _close(self) -> None:
        await self.database.close()

    async def flush(self) -> None:
        try:
            await super().flush()
        except Unavailable as error:
            if any(isinstance(d, error_details_pb2.RetryInfo) for d in error.details):
                raise
            raise Unavailable(error.message,
                              details=[*error.details, retry_info(self.settings.retry_after)]
                              ) from error

    async def load(self, instance: str) -> StoredState:
        state = StoredState()
        async with self.database.connection() as conn:
            for table, target in (("jobs", state.jobs), ("operations", state.operations),
                                  ("sessions", state.sessions)):
                cursor = conn.cursor(row_factory=dict_row)
                await cursor.execute(f"SELECT * FROM {table} WHERE instance = %s", (instance,))
                target.extend(await cursor.fetchall())
        return state

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        try:
            async with self.database.transaction() as conn, conn.cursor() as cursor:
                for table, rows in upserts.items():
                    columns = list(rows[0])
                    await cursor.executemany(_upsert_sql(table, columns),
                                             [tuple(row[c] for c in columns) for row in rows])
                for table, keys in deletes.items():
                    await cursor.execute(
                        f"DELETE FROM {table} WHERE {_KEYS[table]} = ANY(%s)", (keys,))
        # A value PostgreSQL cannot hold (out of range, a NUL in text, a NULL where
        # none may be) or psycopg cannot send fails however often it is retried: the
        # base class then writes the batch row by row and leaves such rows out.
        except (psycopg.DataError, psycopg.IntegrityError) as error:
            raise ValueError(_first_line(error)) from error
        except psycopg.ProgrammingError as error:
            if error.sqlstate is not None:  # the statement, not a value: keep the batch
                raise
            raise TypeError(_first_line(error)) from error
