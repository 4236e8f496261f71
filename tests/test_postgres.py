"""The PostgreSQL scheduler database: migrations, outages, and a server restarted on it.

Every test has a schema of its own (the `pg_url` fixture, tests/pgkit.py).  The
store tests shared with SQLite are in tests/test_scheduler_core.py and
tests/faults/test_fault_scheduler_store.py (the `backend` fixture).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import psycopg
import pytest
from botkit import (
    Client,
    StubBot,
    action_result,
    execute_response,
    poll_leases,
    stdout_is,
    wait_for,
)
from conftest import StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2
from pgkit import TcpProxy

from buildfleet.config import PostgresConfig, is_postgres_url
from buildfleet.errors import Unavailable
from buildfleet.postgres import Database, UnusableDatabase, migrate, redact, schema
from buildfleet.postgres import database as database_module
from buildfleet.scheduler.embedded import PostgresSchedulerStore

LATEST = len(schema.MIGRATIONS)


async def connect(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def versions(url: str) -> list[int]:
    async with await connect(url) as conn:
        cursor = await conn.execute("SELECT version FROM buildfleet_schema ORDER BY version")
        return [row[0] for row in await cursor.fetchall()]


async def tables(url: str) -> set[str]:
    async with await connect(url) as conn:
        cursor = await conn.execute("SELECT table_name FROM information_schema.tables "
                                    "WHERE table_schema = current_schema()")
        return {row[0] for row in await cursor.fetchall()}


def retry_delay(error: Unavailable) -> float:
    (info,) = [d for d in error.details if isinstance(d, error_details_pb2.RetryInfo)]
    return info.retry_delay.ToNanoseconds() / 1e9


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_database_urls_are_told_from_sqlite_files_and_passwords_kept_out() -> None:
    assert is_postgres_url("postgresql://db/x") and is_postgres_url("postgres://db/x")
    assert not is_postgres_url("scheduler.sqlite3")
    assert not is_postgres_url("/var/lib/postgresql/scheduler.sqlite3")
    assert redact("postgresql://bf:s3cret@db:5432/x?password=s3cret&sslmode=require") == (
        "postgresql://bf@db:5432/x?sslmode=require")


# ------------------------------------------------------------------ migrations

async def test_migrate_brings_a_fresh_schema_to_the_latest_version_once(pg_url: str) -> None:
    async with await connect(pg_url) as conn:
        assert await migrate(conn) == (0, LATEST)
        assert await migrate(conn) == (LATEST, LATEST)  # nothing left to do
    assert await versions(pg_url) == list(range(1, LATEST + 1))
    assert {"jobs", "operations", "sessions", "buildfleet_schema"} <= await tables(pg_url)


async def test_concurrent_migrations_apply_each_version_once(pg_url: str) -> None:
    conns = [await connect(pg_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(conn) for conn in conns),
                                       return_exceptions=True)
    finally:
        for conn in conns:
            await conn.close()
    assert all(isinstance(result, tuple) for result in results), results
    assert {after for _, after in results} == {LATEST}  # type: ignore[misc]
    assert min(before for before, _ in results) == 0  # type: ignore[misc]
    assert await versions(pg_url) == list(range(1, LATEST + 1))


async def test_an_appended_migration_is_applied_and_a_failing_one_leaves_no_trace(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with await connect(pg_url) as conn:
        await migrate(conn)
        monkeypatch.setattr(schema, "MIGRATIONS", [
            *schema.MIGRATIONS, "CREATE TABLE extra (x integer)",
            "CREATE TABLE half_done (x integer); SELECT no_such_function()"])
        with pytest.raises(psycopg.errors.UndefinedFunction):
            await migrate(conn)
    assert await versions(pg_url) == list(range(1, LATEST + 2))
    found = await tables(pg_url)
    assert "extra" in found and "half_done" not in found


async def test_a_newer_schema_is_refused(pg_url: str) -> None:
    async with await connect(pg_url) as conn:
        await migrate(conn)
        await conn.execute("INSERT INTO buildfleet_schema (version) VALUES (%s)", (LATEST + 5,))
        with pytest.raises(UnusableDatabase, match=f"schema version {LATEST + 5}"):
            await migrate(conn)


# ---------------------------------------------------------------- connections

async def test_pooled_connections_carry_the_statement_timeout(pg_url: str) -> None:
    database = Database(pg_url, PostgresConfig(statement_timeout=0.2))
    await database.open()
    try:
        async with database.connection() as conn:
            cursor = await conn.execute("SHOW statement_timeout")
            assert await cursor.fetchone() == ("200ms",)
        with pytest.raises(Unavailable, match="statement timeout") as raised:
            async with database.connection() as conn:
                await conn.execute("SELECT pg_sleep(30)")
        assert isinstance(raised.value.__cause__, psycopg.errors.QueryCanceled)
        assert retry_delay(raised.value) == 1.0
        async with database.connection() as conn:  # the pool is still fine
            cursor = await conn.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)
    finally:
        await database.close()


async def terminate_pool_connections(pg_url: str) -> int:
    """End, on the server's side, every other connection of this test's schema."""
    async with await connect(pg_url) as conn:
        cursor = await conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = current_setting('application_name') "
            "AND pid <> pg_backend_pid()")
        row = await cursor.fetchone()
        assert row is not None
        return int(row[0])


async def test_connections_ended_by_the_server_are_replaced(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    database = Database(pg_url, PostgresConfig(pool_min=2, pool_max=2))
    await database.open()

    async def select_one() -> None:
        async with database.connection() as conn:
            cursor = await conn.execute("SELECT 1")
            assert await cursor.fetchone() == (1,)

    try:
        await select_one()
        # A connection idle for a while is checked before use: no call sees the loss.
        monkeypatch.setattr(database_module, "CHECK_AFTER_IDLE", 0.0)
        assert await terminate_pool_connections(pg_url) >= 1
        for _ in range(4):
            await select_one()
        # One used a moment ago is trusted: a call may fail, UNAVAILABLE, and the
        # pool then replaces the connection.
        monkeypatch.setattr(database_module, "CHECK_AFTER_IDLE", 3600.0)
        await select_one()
        assert await terminate_pool_connections(pg_url) >= 1
        failures = 0
        for _ in range(4):
            try:
                await select_one()
            except Unavailable:
                failures += 1
        assert failures <= 2  # at most once per pooled connection
        await select_one()
    finally:
        await database.close()


async def test_a_transaction_commits_all_or_nothing(pg_url: str) -> None:
    database = Database(pg_url)
    await database.open()
    try:
        async with database.connection() as conn:
            await conn.execute("CREATE TABLE t (x integer)")
        async with database.transaction() as conn:
            await conn.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(ZeroDivisionError):
            async with database.transaction() as conn:
                await conn.execute("INSERT INTO t VALUES (2)")
                raise ZeroDivisionError
        async with database.connection() as conn:
            cursor = await conn.execute("SELECT x FROM t")
            assert await cursor.fetchall() == [(1,)]
    finally:
        await database.close()


async def test_listen_connection_receives_notifications(pg_url: str) -> None:
    database = Database(pg_url)
    await database.open()
    listener = await database.listen_connection()
    try:
        assert listener.autocommit
        await listener.execute("LISTEN buildfleet_test")
        async with database.connection() as conn:
            await conn.execute("SELECT pg_notify('buildfleet_test', 'hello')")
        notifications = listener.notifies(timeout=10, stop_after=1)
        assert [n.payload async for n in notifications] == ["hello"]
    finally:
        await listener.close()
        await database.close()


async def test_an_unreachable_database_is_unavailable_with_a_retry_hint(
        refused_port: int) -> None:
    url = f"postgresql://postgres:s3cret@127.0.0.1:{refused_port}/test"
    config = PostgresConfig(connect_timeout=0.5, retry_after=3)
    database = Database(url, config)
    with pytest.raises(Unavailable) as raised:
        await database.open()
    message = raised.value.message
    assert f"127.0.0.1:{refused_port}" in message and "s3cret" not in message, message
    assert "refused" in message and "\n" not in message, message
    assert retry_delay(raised.value) == 3.0
    with pytest.raises(Unavailable):
        await database.listen_connection()

    store = PostgresSchedulerStore(url, config)
    with pytest.raises(Unavailable):
        await store.start()
    await store.close()


async def test_an_outage_is_unavailable_and_the_store_recovers_keeping_its_changes(
        pg_url: str) -> None:
    from schedkit import make_job

    proxy = TcpProxy.to(pg_url)
    await proxy.start()
    store = PostgresSchedulerStore(proxy.url(pg_url),
                                   PostgresConfig(connect_timeout=1, retry_after=2))
    await store.start()
    try:
        store.save_job(make_job(0, name="before"))
        await store.flush()

        await proxy.stop()  # the database goes away, and with it every connection
        store.save_job(make_job(0, name="during"))
        with pytest.raises(Unavailable) as raised:
            await store.flush()
        assert retry_delay(raised.value) == 2.0
        with pytest.raises(Unavailable) as raised:
            async with store.database.connection() as conn:
                await conn.execute("SELECT 1")
        assert retry_delay(raised.value) == 2.0

        await proxy.start()  # back, on the same address: no restart needed

        async def flushed() -> bool:
            try:
                await store.flush()
            except Unavailable:
                return False
            return True

        await wait_for(flushed, timeout=30, what="a flush after the database returned")
        state = await store.load("")
        assert sorted(row["id"] for row in state.jobs) == ["before", "during"]
    finally:
        await store.close()
        await proxy.stop()


# ---------------------------------------------------------------------- server

@pytest.mark.parametrize("mode", ["single-server", "replicated"])
async def test_operations_survive_a_server_restart_on_postgres(
        pg_url: str, start_server: StartServer, mode: str) -> None:
    config = {"database": pg_url, "postgres": {"mode": mode}}
    first = await start_server(config)
    if mode == "single-server":
        assert isinstance(first.server.instances.scheduler_store, PostgresSchedulerStore)
    client = Client(first.channel)
    digest = await client.action("echo", "persisted")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    bot = StubBot(first.channel)
    await bot.register()
    (lease,) = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"persisted\n"))
    await bot.update(timeout=1.0)
    assert stdout_is((await client.result(call)).result, b"persisted\n")
    await first.channel.close()
    await first.server.stop(0)

    second = await start_server(config)
    operation = await operations_pb2_grpc.OperationsStub(second.channel).GetOperation(
        operations_pb2.GetOperationRequest(name=name))
    assert operation.done
    assert stdout_is(execute_response(operation).result, b"persisted\n")
