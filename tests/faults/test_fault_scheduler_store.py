"""One change the scheduler database can never store must not wedge it for good.

(On SQLite and on PostgreSQL: the `backend` fixture runs the test on each.)

Found by the fuzzing suite: a bot that announced a capacity of 10^20 reached
SQLite as an integer it cannot hold ("Python int too large to convert to SQLite
INTEGER").  The store keeps a failed batch to retry it, so that batch failed
again every half second and every later `flush()` -- every Execute, every bot
update -- answered UNAVAILABLE until the server was restarted.  The Bots service
now refuses such a capacity (tests/fuzz/test_bad_input.py); the store itself
must also write what it can and leave such a row out rather than retry it forever.
"""

from __future__ import annotations

import pytest
from pgkit import StoreBackend

from buildfleet.errors import BuildfleetError
from buildfleet.scheduler.embedded import EmbeddedScheduler
from buildfleet.scheduler.model import BotStatus

pytestmark = pytest.mark.faults


async def test_an_unstorable_row_does_not_wedge_the_scheduler_database(
        backend: StoreBackend) -> None:
    store = backend.new_store()
    await store.start()
    scheduler = EmbeddedScheduler("", store)
    await scheduler.start()
    try:
        try:  # refused or accepted without being stored: either is fine
            await scheduler.create_session("huge", status=BotStatus.OK,
                                           properties=frozenset(), capacity=10**20)
        except BuildfleetError:
            pass
        session = await scheduler.create_session("ordinary", status=BotStatus.OK,
                                                 properties=frozenset(), capacity=1)
    finally:
        await scheduler.close()
        await store.close()
    reopened = backend.new_store()
    await reopened.start()
    try:
        state = await reopened.load("")
    finally:
        await reopened.close()
    assert session.name in {row["name"] for row in state.sessions}
