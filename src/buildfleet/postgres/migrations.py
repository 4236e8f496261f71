"""Bring a database to the schema of `buildfleet.postgres.schema`.

`migrate` applies the pending migrations, one version per transaction, serialized
across processes by an advisory lock, so several replicas may start at once.  A
database newer than this buildfleet is refused rather than guessed at.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from buildfleet.config import PostgresConfig
from buildfleet.postgres import schema
from buildfleet.postgres.database import Database, UnusableDatabase

log = logging.getLogger(__name__)

# pg_advisory_xact_lock key that serializes migrations ("buildflt" in ASCII).
MIGRATION_LOCK = 0x6275696C64666C74


async def _version(conn: psycopg.AsyncConnection[Any]) -> int:
    cursor = await conn.execute("SELECT coalesce(max(version), 0) FROM buildfleet_schema")
    row = await cursor.fetchone()
    assert row is not None
    return int(row[0])


async def migrate(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
    """Apply the pending migrations of `MIGRATIONS`, each in its own transaction.

    Returns (version before, version after).  Safe to run from several processes at
    once; raises UnusableDatabase (a RuntimeError) for a database newer than this
    buildfleet.
    """
    known = len(schema.MIGRATIONS)
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
            await conn.execute(schema.MIGRATIONS[version])
            await conn.execute("INSERT INTO buildfleet_schema (version) VALUES (%s)",
                               (version + 1,))


async def upgrade(url: str, config: PostgresConfig | None = None) -> tuple[int, int]:
    """Connect, migrate, disconnect: `buildfleet db upgrade`."""
    database = Database(url, config)
    await database.open()
    try:
        async with database.connection() as conn:
            return await migrate(conn)
    finally:
        await database.close()
