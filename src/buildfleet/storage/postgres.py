"""Blobs in a PostgreSQL table: storage that every replica of a grid shares.

Replicas on different machines reach one database already (the scheduler's);
keeping the action cache there too means a result cached through one replica is a
cache hit on every other.  Action cache entries are small (an ActionResult whose
large outputs live in the CAS), which suits rows; the CAS belongs on disk or a
`remote` store, although nothing here stops small CAS blobs from living here.

Rows are keyed by (namespace, hash, size): storages configured with different
namespaces never see each other's blobs.  Each row records its last use as wall
clock time, refreshed at most once a minute per blob so that reads stay reads;
`scan` reports it, so a SizeLimitedStore wrapper (`max-size`) evicts the least
recently used blobs across every replica.  While the database is unreachable,
calls raise `Unavailable` with a retry hint, like the scheduler's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from typing import Any

from buildfleet.config import PostgresConfig
from buildfleet.digest import Digest
from buildfleet.postgres import Database, migrate
from buildfleet.storage.base import StoredBlob, WholeBlobStore

# A blob's recorded last use is refreshed when a read finds it older than this.
TOUCH_AFTER = 60.0
# Digests per statement in find_missing / get_many.
_BATCH = 1000


class PostgresStore(WholeBlobStore):
    """Blobs of one namespace in the `blobs` table of a PostgreSQL database."""

    def __init__(self, url: str, config: PostgresConfig | None = None, *,
                 namespace: str = "") -> None:
        self.database = Database(url, config)
        self.namespace = namespace

    async def start(self) -> None:
        await self.database.open()
        async with self.database.connection() as conn:
            await migrate(conn)

    async def close(self) -> None:
        await self.database.close()

    async def _rows(self, digests: list[Digest], columns: str) -> list[tuple[Any, ...]]:
        """Rows (hash, size, *columns) of the given digests that are stored."""
        rows: list[tuple[Any, ...]] = []
        async with self.database.connection() as conn:
            for start in range(0, len(digests), _BATCH):
                batch = digests[start:start + _BATCH]
                cursor = await conn.execute(
                    f"SELECT b.hash, b.size{columns} FROM blobs b "
                    "JOIN unnest(%s::text[], %s::bigint[]) AS d(hash, size) "
                    "ON b.hash = d.hash AND b.size = d.size WHERE b.namespace = %s",
                    ([d.hash for d in batch], [d.size_bytes for d in batch], self.namespace))
                rows.extend(await cursor.fetchall())
        return rows

    async def _touch(self, stale: list[Digest]) -> None:
        if not stale:
            return
        async with self.database.connection() as conn:
            await conn.execute(
                "UPDATE blobs b SET last_access = %s "
                "FROM unnest(%s::text[], %s::bigint[]) AS d(hash, size) "
                "WHERE b.namespace = %s AND b.hash = d.hash AND b.size = d.size",
                (time.time(), [d.hash for d in stale], [d.size_bytes for d in stale],
                 self.namespace))

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(digests)
        if not wanted:
            return []
        present = {Digest(h, s) for h, s in await self._rows(list(dict.fromkeys(wanted)), "")}
        return [d for d in wanted if d not in present]

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return {}
        found: dict[Digest, bytes] = {}
        stale: list[Digest] = []
        cutoff = time.time() - TOUCH_AFTER
        for hash_, size, data, last_access in await self._rows(
                wanted, ", b.data, b.last_access"):
            digest = Digest(hash_, size)
            found[digest] = bytes(data)
            if last_access < cutoff:
                stale.append(digest)
        await self._touch(stale)
        return found

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        rows = [(self.namespace, d.hash, d.size_bytes, bytes(data), time.time())
                for d, data in blobs]
        if not rows:
            return
        async with self.database.connection() as conn, conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO blobs (namespace, hash, size, data, last_access) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (namespace, hash, size) "
                "DO UPDATE SET data = EXCLUDED.data, last_access = EXCLUDED.last_access",
                rows)

    async def delete(self, digest: Digest) -> bool:
        async with self.database.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM blobs WHERE namespace = %s AND hash = %s AND size = %s",
                (self.namespace, digest.hash, digest.size_bytes))
            return cursor.rowcount > 0

    async def scan(self) -> AsyncIterator[StoredBlob]:
        async with self.database.connection() as conn:
            cursor = await conn.execute(
                "SELECT hash, size, octet_length(data), last_access FROM blobs "
                "WHERE namespace = %s", (self.namespace,))
            rows = await cursor.fetchall()
        for hash_, size, stored, last_access in rows:
            yield StoredBlob(Digest(hash_, size), stored, last_access)

