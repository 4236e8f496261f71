"""The replicated scheduler without gRPC: two replicas (two grids) on one database.

Each test gets its own PostgreSQL schema (tests/pgkit.py); the two `Replica`s
below are what two `buildfleet serve` processes would hold.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import psycopg
import pytest
from botkit import wait_for
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import code_pb2
from psycopg.rows import dict_row

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import PostgresConfig, SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.errors import InvalidArgument, NotFound
from buildfleet.postgres import Database
from buildfleet.scheduler.model import BotStatus, LeaseState, ReportedLease, Stage
from buildfleet.scheduler.protos import ACTION_RESULT_URL
from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler, jobs
from buildfleet.scheduler.replicated import scheduler as replicated_module
from buildfleet.scheduler.replicated.transactions import Effects, Tx
from buildfleet.scheduler.rules.observations import Outcome

LINUX = frozenset({("OSFamily", "linux")})


@dataclass
class Replica:
    grid: ReplicatedGrid
    scheduler: ReplicatedScheduler


async def open_replica(url: str, settings: SchedulerConfig) -> Replica:
    grid = ReplicatedGrid(Database(url, PostgresConfig(pool_max=20)))
    scheduler = ReplicatedScheduler("", grid, settings=settings)
    await scheduler.start()
    return Replica(grid, scheduler)


@pytest.fixture
def settings() -> SchedulerConfig:
    return SchedulerConfig(housekeeping_interval=0.1, keepalive=30, busy_poll=1.0)


@pytest.fixture
async def replicas(pg_url: str, settings: SchedulerConfig) -> AsyncIterator[list[Replica]]:
    opened = [await open_replica(pg_url, settings) for _ in range(2)]
    yield opened
    for replica in opened:
        await replica.scheduler.close()
        await replica.grid.close()


def action(number: int, *, timeout: float | None = None) -> tuple[Digest, re_pb2.Action]:
    message = re_pb2.Action(
        command_digest=re_pb2.Digest(hash=f"{number:064x}", size_bytes=number),
        input_root_digest=re_pb2.Digest(hash="0" * 64, size_bytes=0))
    if timeout is not None:
        message.timeout.FromSeconds(int(timeout))
    return Digest.of(message.SerializeToString()), message


def completed(lease_id: str, exit_code: int = 0) -> ReportedLease:
    result = re_pb2.ActionResult(exit_code=exit_code)
    return ReportedLease(id=lease_id, state=LeaseState.COMPLETED,
                         result=AnyProto(type_url=ACTION_RESULT_URL,
                                         value=result.SerializeToString()))


async def test_work_submitted_on_one_replica_reaches_a_bot_waiting_on_the_other(
        replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    session = await a.create_session("bot-1", status=BotStatus.OK, properties=LINUX,
                                     capacity=1)
    poll = asyncio.create_task(a.update_session(session.name, bot_id="bot-1",
                                                status=BotStatus.OK, leases=[], wait=20))
    await asyncio.sleep(0.2)  # let the bot park (the result does not depend on it)
    digest, message = action(1)
    operation = await b.submit(digest, message, LINUX)
    _, leases = await asyncio.wait_for(poll, 10)
    assert [lease.action_digest for lease in leases] == [digest]
    assert leases[0].state == LeaseState.ACTIVE

    # The bot's next update lands on the other replica, and the client watching
    # on the first replica sees the result.
    watcher = a.watch(await a.get_operation(operation.name))
    first = await anext(watcher)
    assert not first.done
    _, after = await b.update_session(session.name, bot_id="bot-1", status=BotStatus.OK,
                                      leases=[completed(leases[0].id)], wait=0)
    assert after == []
    last = first
    async with asyncio.timeout(10):
        async for snapshot in watcher:
            last = snapshot
    assert last.done
    response = re_pb2.ExecuteResponse()
    assert last.response.Unpack(response)
    assert response.status.code == code_pb2.OK
    assert response.result.execution_metadata.worker == "bot-1"


async def test_identical_actions_on_two_replicas_share_one_job(replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    digest, message = action(7)
    first, second = await asyncio.gather(a.submit(digest, message, LINUX),
                                         b.submit(digest, message, LINUX))
    assert first.name != second.name
    assert first.job_id == second.job_id


async def test_no_job_is_leased_twice_across_replicas(replicas: list[Replica]) -> None:
    total = 200
    submitted = []
    for number in range(total):
        digest, message = action(1000 + number)
        replica = replicas[number % 2].scheduler
        submitted.append(await replica.submit(digest, message, LINUX))
    runs: Counter[str] = Counter()

    async def bot(index: int) -> None:
        scheduler = replicas[index % 2].scheduler
        session = await scheduler.create_session(f"bot-{index}", status=BotStatus.OK,
                                                 properties=LINUX, capacity=2)
        reports: list[ReportedLease] = []
        idle = 0
        while idle < 3:
            # Alternate replicas, as a load balancer would.
            scheduler = replicas[(index + idle + len(runs)) % 2].scheduler
            _, leases = await scheduler.update_session(
                session.name, bot_id=f"bot-{index}", status=BotStatus.OK, leases=reports,
                wait=0.2)
            reports = []
            for lease in leases:
                runs[lease.action_digest.hash] += 1
                reports.append(completed(lease.id))
            idle = 0 if leases else idle + 1

    await asyncio.wait_for(asyncio.gather(*(bot(i) for i in range(8))), 120)
    assert len(runs) == total
    assert set(runs.values()) == {1}
    for operation in submitted:
        done = await replicas[0].scheduler.get_operation(operation.name)
        assert done.done and done.stage == Stage.COMPLETED


async def test_cancelling_on_one_replica_tells_the_bot_polling_on_the_other(
        replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    digest, message = action(3)
    operation = await b.submit(digest, message, LINUX)
    session = await a.create_session("bot-c", status=BotStatus.OK, properties=LINUX,
                                     capacity=1)
    _, leases = await a.update_session(session.name, bot_id="bot-c", status=BotStatus.OK,
                                       leases=[], wait=0)
    lease_id = leases[0].id
    running = [ReportedLease(id=lease_id, state=LeaseState.ACTIVE)]
    poll = asyncio.create_task(a.update_session(session.name, bot_id="bot-c",
                                                status=BotStatus.OK, leases=running, wait=20))
    await asyncio.sleep(0.2)
    await b.cancel_operation(operation.name)
    _, answer = await asyncio.wait_for(poll, 10)
    assert [(lease.id, lease.state) for lease in answer] == [(lease_id, LeaseState.CANCELLED)]
    done = await a.get_operation(operation.name)
    assert done.done
    # Told once: the next answer no longer carries it.
    _, later = await b.update_session(session.name, bot_id="bot-c", status=BotStatus.OK,
                                      leases=[ReportedLease(id=lease_id,
                                                            state=LeaseState.CANCELLED)],
                                      wait=0)
    assert later == []


async def test_a_silent_session_is_expired_once_and_its_job_requeued_once(
        pg_url: str) -> None:
    settings = SchedulerConfig(housekeeping_interval=0.05, keepalive=0.5, max_attempts=5)
    opened = [await open_replica(pg_url, settings) for _ in range(2)]
    try:
        a, b = opened[0].scheduler, opened[1].scheduler
        digest, message = action(11)
        operation = await a.submit(digest, message, LINUX)
        session = await a.create_session("bot-gone", status=BotStatus.OK, properties=LINUX,
                                         capacity=1)
        _, leases = await b.update_session(session.name, bot_id="bot-gone",
                                           status=BotStatus.OK, leases=[], wait=0)
        assert len(leases) == 1
        # Both replicas run housekeeping; the session goes silent.

        async def requeued() -> bool:
            current = await b.get_operation(operation.name)
            return current.stage == Stage.QUEUED

        await wait_for(requeued, 15, "the silent bot's job going back to the queue")
        current = await b.get_operation(operation.name)
        assert current.attempts == 1
        with pytest.raises(InvalidArgument, match="keepalive"):
            await a.update_session(session.name, bot_id="bot-gone", status=BotStatus.OK,
                                   leases=[], wait=0)
    finally:
        for replica in opened:
            await replica.scheduler.close()
            await replica.grid.close()


async def test_deleted_operation_is_not_found_on_either_replica(replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    digest, message = action(5)
    operation = await a.submit(digest, message, LINUX)
    await b.delete_operation(operation.name)
    for scheduler in (a, b):
        with pytest.raises(NotFound):
            await scheduler.get_operation(operation.name)


async def test_connected_bots_count_the_whole_grid(replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    await a.create_session("bot-x", status=BotStatus.OK, properties=LINUX, capacity=1)
    await b.create_session("bot-y", status=BotStatus.OK, properties=LINUX, capacity=2)
    await wait_for(lambda: a.connected_bots() == 2 and b.connected_bots() == 2, 10,
                   "both replicas counting both bots")
    free = sorted(s.free_slots for s in a.live_sessions())
    assert free == [1, 2]


async def test_a_submission_just_after_success_joins_the_finished_job(
        replicas: list[Replica]) -> None:
    """Execute looks in the action cache before submitting; a retry racing the first
    job's completion (its replica died) must not run the action again."""
    a, b = replicas[0].scheduler, replicas[1].scheduler
    session = await a.create_session("bot-r", status=BotStatus.OK, properties=LINUX,
                                     capacity=1)
    for exit_code, joined in ((0, True), (1, False)):
        digest, message = action(40 + exit_code)
        first = await a.submit(digest, message, LINUX)
        _, [lease] = await a.update_session(session.name, bot_id="bot-r",
                                            status=BotStatus.OK, leases=[], wait=0)
        await a.update_session(session.name, bot_id="bot-r", status=BotStatus.OK,
                               leases=[completed(lease.id, exit_code)], wait=0)
        again = await b.submit(digest, message, LINUX)
        assert (again.job_id == first.job_id) is joined
        assert again.done is joined


async def test_a_submission_racing_the_completion_joins_the_finished_job(
        replicas: list[Replica], pg_url: str) -> None:
    """A submission whose statement began before the first job's completion committed
    (it cannot see the success yet) must still join that job, not queue another."""
    a, b = replicas[0].scheduler, replicas[1].scheduler
    digest, message = action(50)
    first = await a.submit(digest, message, LINUX)
    application = dict(parse_qsl(urlsplit(pg_url).query))["application_name"]
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        async with conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute("SELECT * FROM grid_jobs WHERE id = %s FOR UPDATE",
                                 (first.job_id,))
            row = await cursor.fetchone()
            assert row is not None
            response = re_pb2.ExecuteResponse(result=re_pb2.ActionResult(exit_code=0))
            await jobs.complete(Tx(conn, Effects(), "", a.settings), row,
                                response.SerializeToString(), worker="bot-x", succeeded=True,
                                outcome=Outcome.SUCCESS)
            # The completion is written, not committed: the submission waits for it.
            racing = asyncio.create_task(b.submit(digest, message, LINUX))

            async def submission_waits() -> bool:
                async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
                    cursor = await c.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                        "AND wait_event_type = 'Lock'", (application,))
                    found = await cursor.fetchone()
                    return bool(found and found[0])

            await wait_for(submission_waits, 10, "the submission waiting for the completion")
        again = await asyncio.wait_for(racing, 10)
        assert again.job_id == first.job_id and again.done
        cursor = await conn.execute(
            "SELECT count(*) FROM grid_jobs WHERE action_hash = %s", (digest.hash,))
        assert await cursor.fetchone() == (1,)


async def test_skipping_the_cache_right_after_success_runs_the_action_again(
        replicas: list[Replica]) -> None:
    a, b = replicas[0].scheduler, replicas[1].scheduler
    session = await a.create_session("bot-s", status=BotStatus.OK, properties=LINUX,
                                     capacity=1)
    digest, message = action(60)
    first = await a.submit(digest, message, LINUX)
    _, [lease] = await a.update_session(session.name, bot_id="bot-s", status=BotStatus.OK,
                                        leases=[], wait=0)
    await a.update_session(session.name, bot_id="bot-s", status=BotStatus.OK,
                           leases=[completed(lease.id)], wait=0)
    again = await b.submit(digest, message, LINUX, skip_cache_lookup=True)
    assert again.job_id != first.job_id and not again.done
    joined = await a.submit(digest, message, LINUX, skip_cache_lookup=True)
    assert joined.job_id == again.job_id  # the new run is in flight: joined
    _, [lease] = await b.update_session(session.name, bot_id="bot-s", status=BotStatus.OK,
                                        leases=[], wait=0)
    assert lease.action_digest == digest


async def test_a_queued_operation_nobody_watches_is_not_listened_for_forever(
        replicas: list[Replica], monkeypatch: pytest.MonkeyPatch) -> None:
    a = replicas[0].scheduler
    digest, message = action(70)
    watched = await a.submit(digest, message, LINUX)
    unwatched = await a.submit(*action(71), LINUX)
    watcher = a.watch(watched)
    assert not (await anext(watcher)).done
    monkeypatch.setattr(replicated_module, "RESYNC", 0.0)
    a._forget_unwatched()
    assert unwatched.job_id not in a._watchers  # the client never came to watch
    assert watched.job_id in a._watchers
    await watcher.aclose()
    assert watched.job_id not in a._watchers


async def test_a_retried_transaction_counts_and_logs_once(
        replicas: list[Replica], monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that PostgreSQL aborts after doing its work runs again from the start;
    what it decided beyond the database (counters, the fairness count) happens once."""
    from buildfleet.scheduler.replicated import bots
    from buildfleet.scheduler.replicated.transactions import Retry

    a = replicas[0].scheduler
    session = await a.create_session("bot-t", status=BotStatus.OK, properties=LINUX,
                                     capacity=1)
    await a.submit(*action(80), LINUX)
    await a.submit(*action(81), LINUX)
    _, [lease] = await a.update_session(session.name, bot_id="bot-t", status=BotStatus.OK,
                                        leases=[], wait=0)
    real_step, aborted = bots.step, []

    async def abort_once(*args: object, **kwargs: object) -> bots.Outcome:
        outcome = await real_step(*args, **kwargs)  # type: ignore[arg-type]
        if not aborted:
            aborted.append(True)
            raise Retry("aborted after the work was done")
        return outcome

    monkeypatch.setattr(bots, "step", abort_once)
    before = dict(a.stats)
    picks = a.fairness.picks
    _, [second] = await a.update_session(session.name, bot_id="bot-t", status=BotStatus.OK,
                                         leases=[completed(lease.id)], wait=0)
    assert aborted and second.id != lease.id
    assert a.stats["completed"] - before.get("completed", 0) == 1
    assert a.stats["assigned"] - before.get("assigned", 0) == 1
    assert a.fairness.picks - picks == 1
