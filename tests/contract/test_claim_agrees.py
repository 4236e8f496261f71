"""The replicated strategy's claim is `rules.matching` in SQL: it must take, for each
bot, exactly the job the core's reference rule picks.

Random queues (priorities, requirements, jobs that some bots failed, back-offs over
or not) and random sessions (properties, terminating, silent beyond the
keepalive) are built in PostgreSQL; each claim is compared with `matching.pick`
over the same jobs, eligibility decided by `matching.may_take` with the core's
definition of another bot that could run the job.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from schedkit import action

from buildfleet.config import PostgresConfig, SchedulerConfig
from buildfleet.postgres import Database
from buildfleet.scheduler.model import BotStatus, Properties
from buildfleet.scheduler.replicated import ReplicatedGrid, ReplicatedScheduler, bots
from buildfleet.scheduler.replicated.sql import properties_from
from buildfleet.scheduler.replicated.transactions import Effects, Tx
from buildfleet.scheduler.rules.matching import (
    may_take,
    may_yet_work,
    pick,
    pick_fairly,
    satisfies,
)

KEYS = [("OSFamily", "linux"), ("OSFamily", "windows"), ("ISA", "x86-64"), ("ISA", "arm64"),
        ("pool", "big")]


@dataclass
class QueuedJob:
    id: str
    priority: int
    seq: int
    requirements: Properties
    failed_on: list[str] = field(default_factory=list)
    retry_at: float | None = None


@dataclass
class Session:
    name: str
    bot_id: str
    properties: Properties
    status: BotStatus
    live: bool


async def test_the_claim_statement_picks_what_the_core_picks(pg_url: str) -> None:
    chooser = random.Random(1414)
    settings = SchedulerConfig(keepalive=60, housekeeping_interval=60)
    grid = ReplicatedGrid(Database(pg_url, PostgresConfig()))
    scheduler = ReplicatedScheduler("", grid, settings=settings)
    await scheduler.start()
    try:
        sessions: list[Session] = []
        for index in range(6):
            properties = frozenset(chooser.sample(KEYS, chooser.randint(1, 4)))
            status = BotStatus.BOT_TERMINATING if index == 4 else BotStatus.OK
            created = await scheduler.create_session(f"bot-{index}", status=status,
                                                     properties=properties, capacity=100)
            sessions.append(Session(created.name, f"bot-{index}", properties, status,
                                    live=index != 5))
        jobs: list[QueuedJob] = []
        for number in range(80):
            requirements = frozenset(chooser.sample(KEYS, chooser.randint(0, 2)))
            operation = await scheduler.submit(*action(number, cacheable=False), requirements,
                                               priority=chooser.randint(-2, 2))
            jobs.append(QueuedJob(operation.job_id, 0, 0, requirements))
        async with grid.database.connection() as conn:
            # Session 5 went silent long ago: it no longer counts as a bot that could.
            await conn.execute("UPDATE grid_sessions SET last_seen = last_seen - 1000 "
                               "WHERE name = %s", (sessions[5].name,))
            now = (await (await conn.execute(
                "SELECT extract(epoch from clock_timestamp())::float8")).fetchone())[0]
            for job in jobs:
                if chooser.random() < 0.4:
                    job.failed_on = [s.bot_id for s in chooser.sample(sessions,
                                                                      chooser.randint(1, 3))]
                    job.retry_at = now + chooser.choice([-1000.0, 1000.0])
                    await conn.execute(
                        "UPDATE grid_jobs SET failed_on = %s::jsonb, retry_at = %s "
                        "WHERE id = %s", (json.dumps(job.failed_on), job.retry_at, job.id))
            cursor = await conn.execute("SELECT id, priority, seq, requirements FROM grid_jobs")
            stored = {row[0]: row for row in await cursor.fetchall()}
        for job in jobs:
            _, job.priority, job.seq, requirements = stored[job.id]
            assert properties_from(requirements) == job.requirements

        claims = 0
        for _ in range(120):
            claimer = chooser.choice([s for s in sessions if s.status == BotStatus.OK])
            oldest_first = chooser.random() < 0.3

            def others_could(job: QueuedJob, claimer: Session = claimer) -> bool:
                return any(other.name != claimer.name and other.live
                           and may_yet_work(other.status)
                           and satisfies(other.properties, job.requirements)
                           and other.bot_id not in job.failed_on for other in sessions)

            def eligible(job: QueuedJob, claimer: Session = claimer) -> bool:
                return may_take(bot_id=claimer.bot_id, failed_on=job.failed_on,
                                retry_at=job.retry_at, now=now,
                                others_could=lambda: others_could(job))

            expected = pick(jobs, claimer.properties, oldest_first=oldest_first,
                            eligible=eligible)
            async with grid.database.transaction() as conn:
                tx = Tx(conn, Effects(), "", settings)
                row = await tx.row("SELECT * FROM grid_sessions WHERE name = %s",
                                   (claimer.name,))
                assert row is not None
                claimed = await bots.claim_batch(tx, row, claimer.properties, 1, oldest_first,
                                                 offer_pending=False)
            assert [r["id"] for r in claimed] == ([expected.id] if expected else [])
            if expected is not None:
                jobs.remove(expected)
                claims += 1
        assert claims > 30  # the scenario exercised the rule, not only empty claims
    finally:
        await scheduler.close()
        await grid.close()


@dataclass
class BuildJob:
    id: str
    priority: int
    seq: int
    requirements: Properties
    builds: set[str]


async def test_the_fair_claim_picks_what_the_core_picks(pg_url: str) -> None:
    """Jobs of several builds (some waited for by two), claims that change the builds'
    running counts, a limit per build: each claim is `matching.pick_fairly`."""
    from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2
    from buildfleet.scheduler.rules.invocations import build_key

    chooser = random.Random(2718)
    for limit in (None, 3):  # (the claims end early with the limit: each build runs 3)
        settings = SchedulerConfig(keepalive=60, housekeeping_interval=60,
                                   max_running_per_build=limit)
        grid = ReplicatedGrid(Database(pg_url, PostgresConfig()))
        scheduler = ReplicatedScheduler(f"fair-{limit}", grid, settings=settings)
        await scheduler.start()
        try:
            properties = frozenset(KEYS[:3])
            session = await scheduler.create_session("claimer", status=BotStatus.OK,
                                                     properties=properties, capacity=1000)
            jobs: dict[str, BuildJob] = {}
            for number in range(90):
                build = chooser.choice(["ci", "laptop", "nightly", "release"])
                metadata = remote_execution_pb2.RequestMetadata(
                    tool_invocation_id=build).SerializeToString()
                # every fifth submission repeats an earlier action: it joins that job
                again = number % 5 == 4
                which = chooser.randrange(number) if again else number
                operation = await scheduler.submit(
                    *action(1000 + which), frozenset(chooser.sample(KEYS, chooser.randint(0, 1))),
                    priority=chooser.choice([-100, 0, 0, 50]), request_metadata=metadata)
                job = jobs.setdefault(operation.job_id, BuildJob(operation.job_id, 0, 0,
                                                                 frozenset(), set()))
                job.builds.add(build_key(metadata, ""))
            async with grid.database.connection() as conn:
                cursor = await conn.execute(
                    "SELECT id, priority, seq, requirements, builds FROM grid_jobs "
                    "WHERE instance = %s", (scheduler.instance,))
                for row in await cursor.fetchall():
                    job = jobs[row[0]]
                    job.priority, job.seq = row[1], row[2]
                    job.requirements = properties_from(row[3])
                    assert set(row[4]) == job.builds
            queued = list(jobs.values())
            running: dict[str, int] = {}
            picks = 0
            for _ in range(70):
                oldest_first = chooser.random() < 0.2
                expected = pick_fairly(queued, properties, oldest_first=oldest_first,
                                       running=lambda b, counts=running: counts.get(b, 0),
                                       limit=limit)
                async with grid.database.transaction() as conn:
                    tx = Tx(conn, Effects(), scheduler.instance, settings)
                    row = await tx.row("SELECT * FROM grid_sessions WHERE name = %s",
                                       (session.name,))
                    assert row is not None
                    claimed = await bots.claim_batch(tx, row, properties, 1, oldest_first,
                                                     offer_pending=False)
                assert [r["id"] for r in claimed] == ([expected.id] if expected else [])
                if expected is None:
                    break
                queued.remove(expected)
                picks += 1
                for build in expected.builds:
                    running[build] = running.get(build, 0) + 1
            # (with the limit, the claims end when every build runs its 3)
            assert picks > (30 if limit is None else 5), picks
        finally:
            await scheduler.close()
            await grid.close()
