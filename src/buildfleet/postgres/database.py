"""PostgreSQL connections for every part of buildfleet that keeps state there.

`Database` wraps a psycopg connection pool (autocommit connections, each with the
configured ``statement_timeout``) and turns every sign of an unreachable database --
a refused or broken connection, no free connection in time, a cancelled statement,
a server shutting down -- into `Unavailable` with a retry hint, so callers answer
UNAVAILABLE instead of INTERNAL.  Pooled connections idle for a while are checked
before use and broken ones replaced, so once the database is back the next calls
work again without a restart.

The scheduler (both strategies) and the `postgres` blob store use it; the schema
they share is `buildfleet.postgres.schema`, applied by `buildfleet.postgres.migrations`.
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
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2
from psycopg_pool import AsyncConnectionPool

from buildfleet.config import PostgresConfig
from buildfleet.errors import Unavailable

log = logging.getLogger(__name__)

# How long the pool keeps retrying a lost connection (with growing delays) before
# giving up on that attempt; the next request then starts a fresh attempt.  Short,
# so that a database back after a long outage is noticed within seconds.
RECONNECT_TIMEOUT = 10.0
# A pooled connection idle longer than this is checked (one round trip) before it
# is handed out; one used more recently is trusted, since a connection broken
# while in use is discarded by the pool, and an outage lasts longer than this.
CHECK_AFTER_IDLE = 1.0


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


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def retry_info(retry_after: float) -> error_details_pb2.RetryInfo:
    delay = Duration()
    delay.FromNanoseconds(int(retry_after * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def unavailable(error: BaseException, retry_after: float = 1.0) -> Unavailable:
    """The `Unavailable` answered while the database cannot be reached, with a
    RetryInfo hint of `retry_after` seconds."""
    return Unavailable(f"the scheduler database is unreachable: {first_line(error)}",
                       details=[retry_info(retry_after)])


class Database:
    """A psycopg_pool.AsyncConnectionPool (autocommit connections) plus error mapping.

    Errors of the connection rather than of the statement (`psycopg.OperationalError`,
    which includes pool timeouts, statement timeouts, server shutdown, and also
    serialization failures and deadlocks) leave `connection()` and `transaction()`
    as `unavailable(...)`, chained to the original (``__cause__``).
    """

    def __init__(self, url: str, config: PostgresConfig | None = None) -> None:
        self.url = url
        self.config = config if config is not None else PostgresConfig()
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        # When each pooled connection last finished a block without an error.
        self._used: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
            weakref.WeakKeyDictionary())

    # -- connecting -------------------------------------------------------------
    def _connect_kwargs(self) -> dict[str, Any]:
        # libpq takes whole seconds and treats anything below 2 as 2.
        return {"autocommit": True,
                "connect_timeout": max(2, math.ceil(self.config.connect_timeout))}

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        milliseconds = max(1, round(self.config.statement_timeout * 1000))
        await conn.execute("SELECT set_config('statement_timeout', %s, false)",
                           (f"{milliseconds}ms",))

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        async with asyncio.timeout(self.config.connect_timeout):
            conn = await psycopg.AsyncConnection.connect(self.url,
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
        deadline = loop.time() + self.config.connect_timeout
        while True:
            try:
                probe = await self._connect()
            except (psycopg.OperationalError, TimeoutError) as error:
                if loop.time() + 0.25 >= deadline:
                    reason = ("no answer within "
                              f"{self.config.connect_timeout:g} s"
                              if isinstance(error, TimeoutError) else first_line(error))
                    raise Unavailable(
                        f"cannot connect to the scheduler database "
                        f"{redact(self.url)}: {reason}",
                        details=[retry_info(self.config.retry_after)]) from error
                await asyncio.sleep(0.25)
            except psycopg.Error as error:  # a malformed URL, an unknown option...
                raise UnusableDatabase(f"cannot use the scheduler database "
                                       f"{redact(self.url)}: {first_line(error)}"
                                       ) from error
            else:
                await probe.close()
                break
        pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            self.url, open=False, kwargs=self._connect_kwargs(),
            min_size=self.config.pool_min, max_size=self.config.pool_max,
            configure=self._configure, check=self._check,
            timeout=self.config.connect_timeout, reconnect_timeout=RECONNECT_TIMEOUT,
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
            raise unavailable(error, self.config.retry_after) from error

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
                                           f"{self.config.connect_timeout:g} s"),
                              self.config.retry_after) from error
        except psycopg.OperationalError as error:
            raise unavailable(error, self.config.retry_after) from error


