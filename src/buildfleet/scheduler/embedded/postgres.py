"""The write-behind store's rows in PostgreSQL, for one server (`postgres: {mode:
single-server}`): the embedded strategy's state in memory, written behind as with
SQLite, one transaction per batch.  Several servers sharing a database use the
replicated strategy instead."""

from __future__ import annotations

import psycopg
from google.rpc import error_details_pb2
from psycopg.rows import dict_row

from buildfleet.config import PostgresConfig
from buildfleet.errors import Unavailable
from buildfleet.postgres import Database, first_line, migrate, retry_info
from buildfleet.scheduler.embedded.store import (
    COMPLETED,
    EXPIRE_JOBS,
    EXPIRE_OPERATIONS,
    TABLES,
    Row,
    SchedulerStore,
    StoredState,
)


def _upsert_sql(table: str, columns: list[str]) -> str:
    key = TABLES[table][0]
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != key)
    return (f"INSERT INTO {table} ({', '.join(columns)}) "
            f"VALUES ({', '.join(['%s'] * len(columns))}) "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}")


class PostgresSchedulerStore(SchedulerStore):
    """The write-behind store's rows in PostgreSQL; one transaction per batch."""

    def __init__(self, url: str, config: PostgresConfig | None = None) -> None:
        super().__init__()
        self.database = Database(url, config)

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
                              details=[*error.details, retry_info(self.database.config.retry_after)]
                              ) from error

    async def load(self, instance: str) -> StoredState:
        state = StoredState()
        async with self.database.connection() as conn:
            for table, target in (("jobs", state.jobs), ("operations", state.operations),
                                  ("sessions", state.sessions), ("drains", state.drains)):
                cursor = conn.cursor(row_factory=dict_row)
                await cursor.execute(f"SELECT * FROM {table} WHERE instance = %s", (instance,))
                target.extend(await cursor.fetchall())
        return state

    async def _load_operation(self, instance: str, name: str) -> tuple[Row, Row] | None:
        async with self.database.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute("SELECT * FROM operations WHERE name = %s AND instance = %s",
                                 (name, instance))
            operation = await cursor.fetchone()
            if operation is None:
                return None
            await cursor.execute("SELECT * FROM jobs WHERE id = %s", (operation["job_id"],))
            job = await cursor.fetchone()
        return None if job is None else (operation, job)

    async def _load_done(self, instance: str) -> list[tuple[Row, Row]]:
        async with self.database.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                """SELECT o.* FROM operations o JOIN jobs j ON j.id = o.job_id
                   WHERE o.instance = %s AND (o.own_response IS NOT NULL OR j.stage = %s)""",
                (instance, COMPLETED))
            operations = await cursor.fetchall()
            await cursor.execute("SELECT * FROM jobs WHERE id = ANY(%s)",
                                 (list({o["job_id"] for o in operations}),))
            jobs = {job["id"]: job for job in await cursor.fetchall()}
        return [(operation, jobs[operation["job_id"]]) for operation in operations
                if operation["job_id"] in jobs]

    async def _expire(self, instance: str, cutoff: float) -> None:
        async with self.database.transaction() as conn:
            await conn.execute(EXPIRE_OPERATIONS, (instance, cutoff, instance, COMPLETED, cutoff))
            await conn.execute(EXPIRE_JOBS, (instance, COMPLETED, cutoff))

    async def _write(self, upserts: dict[str, list[Row]], deletes: dict[str, list[str]]) -> None:
        try:
            async with self.database.transaction() as conn, conn.cursor() as cursor:
                for table, rows in upserts.items():
                    columns = list(rows[0])
                    await cursor.executemany(_upsert_sql(table, columns),
                                             [tuple(row[c] for c in columns) for row in rows])
                for table, keys in deletes.items():
                    await cursor.execute(
                        f"DELETE FROM {table} WHERE {TABLES[table][0]} = ANY(%s)", (keys,))
        # A value PostgreSQL cannot hold (out of range, a NUL in text, a NULL where
        # none may be) or psycopg cannot send fails however often it is retried: the
        # base class then writes the batch row by row and leaves such rows out.
        except (psycopg.DataError, psycopg.IntegrityError) as error:
            raise ValueError(first_line(error)) from error
        except psycopg.ProgrammingError as error:
            if error.sqlstate is not None:  # the statement, not a value: keep the batch
                raise
            raise TypeError(first_line(error)) from error
