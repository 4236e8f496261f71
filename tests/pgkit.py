"""PostgreSQL for tests: a fresh schema per test, and the store backends side by side.

`postgres_schema()` creates a schema ``bf_<random hex>`` in the test database
(``postgresql://postgres@127.0.0.1:5432/test``, or env BUILDFLEET_TEST_POSTGRES_URL),
yields a URL whose ``search_path`` is that schema, and drops it afterwards,
first ending any connection a test left open on it.  When PostgreSQL cannot be
reached the test is skipped, or fails when env BUILDFLEET_REQUIRE_POSTGRES=1 (CI).

`StoreBackend` lets one store test run against SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import sql

from buildfleet.postgres import redact
from buildfleet.scheduler.embedded import (
    PostgresSchedulerStore,
    SchedulerStore,
    SqliteSchedulerStore,
)

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def base_url() -> str:
    return os.environ.get("BUILDFLEET_TEST_POSTGRES_URL") or DEFAULT_URL


def with_query(url: str, **params: str) -> str:
    """`url` with these query parameters set (others kept)."""
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_address(url: str, host: str, port: int) -> str:
    """`url` pointing at another host and port (user and password kept)."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{host}:{port}" if userinfo
                                     else f"{host}:{port}"))


async def _connect(url: str, *, required: bool = False) -> psycopg.AsyncConnection:
    try:
        return await asyncio.wait_for(
            psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=3), 10)
    except (psycopg.OperationalError, TimeoutError) as error:
        reason = f"PostgreSQL unreachable at {redact(url)}: {str(error).strip() or 'timeout'}"
        if required or os.environ.get("BUILDFLEET_REQUIRE_POSTGRES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


async def require_postgres() -> None:
    """Skip the test (fail it where PostgreSQL is required) when there is none."""
    await (await _connect(base_url())).close()


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A URL to a new, empty schema of its own; the schema is dropped afterwards."""
    base = base_url()
    schema = f"bf_{secrets.token_hex(6)}"
    async with await _connect(base) as admin:
        await admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    # application_name marks the test's connections, to end any left open.
    try:
        yield with_query(base, options=f"-csearch_path={schema}", application_name=schema)
    finally:  # reachable a moment ago: failing to clean up is a failure, not a skip
        async with await _connect(base, required=True) as admin:
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                                (schema,))
            await admin.execute("SET lock_timeout = '30s'")
            await admin.execute(
                sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@dataclass
class StoreBackend:
    """Where a scheduler store keeps its rows: a SQLite file or a PostgreSQL schema."""

    name: str  # "sqlite" or "postgres"
    location: str  # the SQLite file's path, or the PostgreSQL URL

    def new_store(self) -> SchedulerStore:
        """A new store on the same rows (as a restarted server would open)."""
        if self.name == "sqlite":
            return SqliteSchedulerStore(Path(self.location))
        return PostgresSchedulerStore(self.location)

    async def set_schema_version(self, version: int) -> None:
        """Mark the database as having schema `version` (as a newer buildfleet would)."""
        if self.name == "sqlite":
            with sqlite3.connect(self.location) as db:
                db.execute(f"PRAGMA user_version={int(version)}")
            return
        async with await psycopg.AsyncConnection.connect(self.location,
                                                         autocommit=True) as conn:
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS buildfleet_schema (version integer NOT NULL)")
            await conn.execute("INSERT INTO buildfleet_schema (version) VALUES (%s)",
                               (version,))


@asynccontextmanager
async def store_backend(name: str, tmp_path: Path) -> AsyncIterator[StoreBackend]:
    if name == "sqlite":
        yield StoreBackend("sqlite", str(tmp_path / "scheduler.sqlite3"))
    else:
        async with postgres_schema() as url:
            yield StoreBackend("postgres", url)


class TcpProxy:
    """Forwards a loopback port to PostgreSQL; `stop()` cuts every connection and
    refuses new ones (the database "goes away") until `start()` again, on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def to(cls, url: str) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5432)

    def url(self, url: str) -> str:
        """`url` going through this proxy."""
        return with_address(url, "127.0.0.1", self.port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if server is not None:
            await server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer, upstream_writer}
        self._writers |= pair

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except OSError:
                pass
            finally:
                for end in pair:
                    end.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers -= pair
