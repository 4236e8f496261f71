"""`postgres` storage: blobs in the grid's database, shared by every replica.

The behaviour every store shares is tested in test_storage.py (its `store`
fixture includes PostgresStore); these are what only this store does, and the
action cache that replicas on different machines share through it.
"""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest
from botkit import Client, StubBot, action_result, poll_leases, stdout_is
from conftest import StartServer
from google.rpc import code_pb2
from pgkit import TcpProxy
from test_postgres import retry_delay

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import ConfigError, PostgresConfig, parse_config
from buildfleet.digest import Digest
from buildfleet.errors import Unavailable
from buildfleet.storage import SizeLimitedStore
from buildfleet.storage.postgres import TOUCH_AFTER, PostgresStore


def blob(n: int, size: int = 100) -> tuple[Digest, bytes]:
    data = (f"pg-{n}-".encode() * size)[:size]
    return Digest.of(data), data


async def last_access(url: str, digest: Digest, namespace: str = "") -> float:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT last_access FROM blobs WHERE namespace = %s AND hash = %s AND size = %s",
            (namespace, digest.hash, digest.size_bytes))
        row = await cursor.fetchone()
        assert row is not None
        return float(row[0])


async def set_last_access(url: str, digest: Digest, when: float) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("UPDATE blobs SET last_access = %s WHERE hash = %s",
                           (when, digest.hash))


async def test_namespaces_keep_stores_apart(pg_url: str) -> None:
    first = PostgresStore(pg_url, namespace="one")
    second = PostgresStore(pg_url, namespace="two")
    await first.start()
    await second.start()
    try:
        digest, data = blob(1)
        await first.put(digest, data)
        assert await second.get(digest) is None
        assert await second.find_missing([digest]) == [digest]
        assert [b async for b in second.scan()] == []
        await second.put(digest, b"other")
        assert await second.delete(digest) is True
        assert await first.get(digest) == data  # the other namespace's delete left it
    finally:
        await first.close()
        await second.close()


async def test_a_read_refreshes_a_stale_last_use_only(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.start()
    try:
        stale, stale_data = blob(1)
        fresh, fresh_data = blob(2)
        await store.put_many([(stale, stale_data), (fresh, fresh_data)])
        long_ago = time.time() - 10 * TOUCH_AFTER
        await set_last_access(pg_url, stale, long_ago)
        recently = time.time() - TOUCH_AFTER / 2
        await set_last_access(pg_url, fresh, recently)

        before = time.time()
        assert await store.get_many([stale, fresh]) == {stale: stale_data, fresh: fresh_data}
        assert await last_access(pg_url, stale) >= before
        assert await last_access(pg_url, fresh) == recently  # no write for a fresh one
        scanned = {b.digest: b.last_access async for b in store.scan()}
        assert scanned[fresh] == recently and scanned[stale] >= before
    finally:
        await store.close()


async def test_size_limit_evicts_what_no_replica_used_lately(pg_url: str) -> None:
    # Blobs that another replica stored, with the last uses it recorded: a
    # size-limited store starting on the table evicts the least recently used.
    writer = PostgresStore(pg_url)
    await writer.start()
    blobs = [blob(n) for n in range(4)]
    await writer.put_many(blobs)
    now = time.time()
    for age, (digest, _) in zip((30, 10, 40, 20), blobs, strict=True):
        await set_last_access(pg_url, digest, now - age * 60)
    await writer.close()

    bounded = SizeLimitedStore(PostgresStore(pg_url), max_bytes=200)
    await bounded.start()
    try:
        # Oldest first: blob 2 (40 min), then blob 0 (30 min) go.
        assert await bounded.find_missing([d for d, _ in blobs]) == [blobs[0][0], blobs[2][0]]
        assert await bounded.inner.find_missing([d for d, _ in blobs]) == [
            blobs[0][0], blobs[2][0]]
    finally:
        await bounded.close()


async def test_an_outage_is_unavailable_and_the_store_recovers(pg_url: str) -> None:
    proxy = TcpProxy.to(pg_url)
    await proxy.start()
    store = PostgresStore(proxy.url(pg_url), PostgresConfig(connect_timeout=1,
                                           retry_after=2))
    await store.start()
    try:
        digest, data = blob(1)
        await store.put(digest, data)
        await proxy.stop()
        with pytest.raises(Unavailable) as raised:
            await store.get(digest)
        assert retry_delay(raised.value) == 2.0
        with pytest.raises(Unavailable):
            await store.put(*blob(2))
        await proxy.start()
        assert await store.get(digest) == data  # nothing stored was lost
    finally:
        await store.close()
        await proxy.stop()


def test_postgres_storage_needs_a_postgres_database(tmp_path: Path) -> None:
    document = {"data-dir": str(tmp_path),
                "instances": {"": {"action-cache": {"type": "postgres"}}}}
    with pytest.raises(ConfigError, match="postgresql://"):
        parse_config(document)
    config = parse_config({**document, "database": "postgresql://db.example/grid"})
    with pytest.raises(ValueError, match="postgresql://"):
        config.with_overrides(database="scheduler.sqlite3")


async def test_replicas_on_different_machines_share_cache_hits(
        pg_url: str, start_server: StartServer, tmp_path: Path) -> None:
    # No directory is shared: the CAS is a CAS-only server, the action cache is
    # in the database.  A result that a bot reported through replica A is a
    # cache hit for a client of replica B.
    cas = await start_server({"instances": {"": {"scheduler": {"enabled": False}}}},
                             data_dir=tmp_path / "cas")
    replica = {"database": pg_url, "instances": {"": {
        "cas": {"type": "remote", "address": cas.address, "timeout": 20},
        "action-cache": {"type": "postgres", "namespace": "grid"}}}}
    a = await start_server(replica, data_dir=tmp_path / "a")
    b = await start_server(replica, data_dir=tmp_path / "b")

    client_a, client_b = Client(a.channel), Client(b.channel)
    digest = await client_a.action("echo", "shared")
    call = client_a.execute(digest)
    await client_a.first_operation(call)
    bot = StubBot(a.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"ran once"))
    await bot.update(timeout=1.0)
    assert (await client_a.result(call)).status.code == code_pb2.OK

    cached = await b.action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=digest))
    assert cached.exit_code == 0
    response = await client_b.result(client_b.execute(digest))
    assert response.cached_result and response.status.code == code_pb2.OK
    assert stdout_is(response.result, b"ran once")  # stdout went to the shared CAS
