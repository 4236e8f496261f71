"""The replicated strategy: one instance's scheduler for several server replicas
sharing one PostgreSQL database.

It keeps no authoritative state in the process: every job, operation, lease and
bot session is a row, and every decision one transaction (`transactions`), so
any replica serves any call -- a bot may send each UpdateBotSession to another
replica, a client may watch an operation from a replica other than the one it
submitted to, and a replica may die at any moment without losing anything.
The decisions are the core's (`buildfleet.scheduler.rules`): claims are the
matching rule in SQL (`bots`), the rest reads candidate rows and asks the core.
When the database is unreachable, calls fail with UNAVAILABLE and a retry hint
(`buildfleet.postgres`); nothing needs restarting when it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from google.longrunning import operations_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.errors import NotFound, Unavailable
from buildfleet.scheduler.model import (
    BotEvent,
    BotSession,
    BotStatus,
    BuildKindCount,
    Lease,
    Operation,
    Properties,
    QueueGroup,
    ReportedLease,
    Stage,
    random_id,
)
from buildfleet.scheduler.notify import Ticker, Wakers
from buildfleet.scheduler.protos import operation_proto
from buildfleet.scheduler.replicated import bots, housekeeping, jobs, operations
from buildfleet.scheduler.replicated.grid import ReplicatedGrid
from buildfleet.scheduler.replicated.notes import JobNews, work_payload
from buildfleet.scheduler.replicated.settling import Settler
from buildfleet.scheduler.replicated.sql import (
    COMPLETED,
    EXECUTING,
    LIVE_LEASE,
    NOW,
    OPERATION_QUERY,
    QUEUED,
    operation_view,
    properties_from,
    properties_json,
    session_view,
)
from buildfleet.scheduler.replicated.transactions import Effects, Retry, Tx, retrying
from buildfleet.scheduler.rules import (
    invocations,
    outcomes,
    ownership,
    reports,
    submissions,
    timers,
)
from buildfleet.scheduler.rules.drains import Drain, check_pattern, drained
from buildfleet.scheduler.rules.invocations import build_key
from buildfleet.scheduler.rules.matching import Fairness, qualified
from buildfleet.scheduler.rules.observations import Observations, Outcome
from buildfleet.scheduler.rules.outcomes import Completion, Requeue
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.scheduler.rules.throughput import Throughput
from buildfleet.scheduler.rules.timers import MAX_EVENTS
from buildfleet.storage.action_cache import ActionCache

log = logging.getLogger(__name__)

T = TypeVar("T")
RESYNC = 10.0  # seconds a watcher waits for a notification before reading again anyway
MIN_WAIT = 0.01  # below this much of a long-poll left, answer rather than wait again


@dataclass
class _Waiting:
    """A bot session long-polling on this replica."""

    event: asyncio.Event
    properties: Properties | None  # None: not known yet (any work wakes it)
    bot_id: str = ""


class ReplicatedScheduler:
    """Schedules one instance's actions with the state in PostgreSQL."""

    def __init__(self, instance: str, grid: ReplicatedGrid, *,
                 action_cache: ActionCache | None = None,
                 settings: SchedulerConfig | None = None,
                 new_id: Callable[[], str] = random_id) -> None:
        self.instance = instance
        self.grid = grid
        self.store = grid
        self.db = grid.database
        self.action_cache = action_cache
        self.settings = settings or SchedulerConfig()
        self.new_id = new_id
        grid.schedulers[instance] = self
        self._waiting: dict[str, _Waiting] = {}  # session name -> its long-poll here
        self._open_calls: Counter[str] = Counter()  # session name -> calls open here
        self._watchers = Wakers()  # job id -> watchers here
        # Job id -> (how often watchers had to read it, the latest news of it): a change
        # announced without news makes every watcher read the job, however many
        # notifications arrive before it wakes.
        self._news: dict[str, tuple[int, JobNews | None]] = {}
        # Operations of jobs this replica just queued, registered for notifications
        # before the job existed, so that `watch` need not read them back:
        # operation name -> (job id, waiter, monotonic time).
        self._fresh: dict[str, tuple[str, asyncio.Event, float]] = {}
        # Grid-wide live sessions by name, read each tick (and on calls served here).
        self._live: dict[str, BotSession] = {}
        self._queued = 0  # grid-wide queued jobs, refreshed each tick
        self._groups: list[QueueGroup] = []  # the same per platform
        self._build_kinds: list[BuildKindCount] = []  # and per kind of build
        self._drains: dict[str, Drain] = {}  # the grid's drains (NOTIFY, and each tick)
        self._drains_reload: asyncio.Task[None] | None = None
        self._executing = 0
        self._settler = Settler(self.db, instance, self.settings, action_cache)
        self.fairness = Fairness(self.settings.fairness_share)  # counted on this replica
        self.stats: Counter[str] = Counter()
        self.observations = Observations()
        self.throughput = Throughput()
        self._housekeeper = Ticker(f"replicated scheduler[{instance!r}] housekeeping",
                                   self.settings.tick, self.housekeep)

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        if self._housekeeper.running:
            return
        await self.grid.start()
        with contextlib.suppress(Unavailable):
            await self._refresh()
        self._housekeeper.start()

    async def close(self) -> None:
        await self._housekeeper.stop()
        if self._drains_reload is not None:
            self._drains_reload.cancel()
        self.wake_everything()

    # ------------------------------------------------------------- wake-ups
    def wake_everything(self) -> None:
        for waiting in self._waiting.values():
            waiting.event.set()
        self._watchers.notify_all()

    def wake_for_work(self, requirements: Properties | None) -> None:
        """Wake one bot waiting here that can run a job with `requirements` (None: not
        known, any)."""
        for name, waiting in self._waiting.items():
            if not waiting.event.is_set() and (waiting.properties is None or requirements is None
                                               or requirements <= waiting.properties) and not (
                    self._drains and waiting.properties is not None
                    and drained(waiting.bot_id, waiting.properties, self._drains)):
                waiting.event.set()
                # The next job goes to another waiting bot.
                self._waiting[name] = self._waiting.pop(name)
                return

    def watches(self, job_id: str) -> bool:
        """Whether anyone here watches the job."""
        return job_id in self._watchers

    def wake_watchers(self, job_id: str, news: JobNews | None = None) -> None:
        if job_id not in self._watchers:
            return
        reads, _ = self._news.get(job_id, (0, None))
        self._news[job_id] = (reads + (news is None), news)
        self._watchers.notify(job_id)

    def _unwatch(self, job_id: str) -> None:
        self._watchers.release(job_id)
        if job_id not in self._watchers:
            self._news.pop(job_id, None)

    def wake_session(self, name: str) -> None:
        """The session's leases changed elsewhere (or it closed): wake its long-poll."""
        self._settler.forget(name)
        waiting = self._waiting.get(name)
        if waiting is not None:
            waiting.event.set()

    # ------------------------------------------------------------ transactions
    async def _transaction(self, body: Callable[[Tx], Awaitable[T]], *,
                           pipeline: bool = False) -> T:
        """Run `body` in a transaction (again, from the start, after a transient
        failure); announce its effects at commit and apply the rest after it.

        With `pipeline` (see Database.transaction), statements whose results `body`
        does not fetch ride along with the next round trip."""
        async def attempt() -> tuple[T, Effects]:
            effects = Effects()
            async with self.db.transaction(pipeline=pipeline) as conn:
                result = await body(Tx(conn, effects, self.instance, self.settings,
                                       self.grid.channels["job"], tuple(self._drains)))
                await self._announce(conn, effects)
            return result, effects

        result, effects = await retrying(attempt)
        self._committed(effects)
        return result

    async def _announce(self, conn: psycopg.AsyncConnection[Any], effects: Effects) -> None:
        """NOTIFY inside the transaction: PostgreSQL delivers it at commit, or never."""
        channels, payloads = self.grid.notes(self.instance, effects.unannounced(),
                                             effects.work, effects.sessions)
        if channels:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
                (channels, payloads))

    def _committed(self, effects: Effects) -> None:
        """What a committed transaction decided beyond the database, applied once."""
        self._queued = max(0, self._queued + effects.queued)
        self.fairness.picked(effects.picks)
        self.stats.update(effects.stats)
        self.observations.merge(effects.observations)
        for name in effects.closed:
            self._live.pop(name, None)
        for level, message, args in effects.logs:
            log.log(level, message, *args)

    # ---------------------------------------------------------------- clients
    def check_timeout(self, action: re_pb2.Action) -> float:
        return submissions.action_timeout(action, self.settings.max_timeout)

    async def submit(self, action_digest: Digest, action: re_pb2.Action,
                     requirements: Properties, *, priority: int = 0,
                     skip_cache_lookup: bool = False, owner: str = "",
                     request_metadata: bytes = b"") -> Operation:
        """Queue an action (or join an identical one); a new operation for it.

        The operation returned is what this call knows (a new job is QUEUED);
        `watch` reads its current state."""
        timeout = self.check_timeout(action)
        requirements_json = properties_json(requirements)
        name = qualified(self.instance, f"operations/{self.new_id()}")
        job: dict[str, Any] = {
            "id": self.new_id(), "instance": self.instance, "hash": action_digest.hash,
            "size": action_digest.size_bytes,
            "action": action.SerializeToString(deterministic=True),
            "requirements": requirements_json, "priority": priority,
            "cacheable": not action.do_not_cache, "timeout": timeout,
            "run_limit": timers.run_limit(timeout, self.settings), "owner": owner,
            "request_metadata": request_metadata,
            "build": build_key(request_metadata, owner, self.settings.fair_share_by)}
        now = time.time()
        queued = Operation(name=name, instance=self.instance, job_id=job["id"],
                           action_digest=action_digest, stage=Stage.QUEUED, response=None,
                           queued_at=now, created_at=now, owner=owner, priority=priority,
                           request_metadata=request_metadata)
        if self._queued < self.settings.max_queued:
            # Listening for the job's changes before it exists: none can be missed.
            waiter = self._watchers.subscribe(job["id"]).waiter()
            try:
                inserted = await self._submit_at_once(job, name, requirements_json)
            except BaseException:
                self._unwatch(job["id"])
                raise
            if inserted:
                self._fresh[name] = (job["id"], waiter, time.monotonic())
                return queued
            self._unwatch(job["id"])
        joined = await self._transaction(lambda tx: operations.submit(
            tx, job, name=name, skip_cache_lookup=skip_cache_lookup, queued=self._queued))
        if joined is None:
            return queued
        return operations.joined_view(name, joined, created_at=now, owner=owner,
                                      request_metadata=request_metadata)

    async def _submit_at_once(self, job: dict[str, Any], name: str,
                              requirements_json: str) -> bool:
        """A new job in one statement (see operations.SUBMIT_AT_ONCE); False when the
        action is in flight already (nothing was written: join it in a transaction)."""
        statement = {**job, "operation": name, "channel": self.grid.channels["work"],
                     "payload": work_payload(self.instance, requirements_json)}

        async def attempt() -> tuple[Any, ...]:
            async with self.db.connection() as conn:
                cursor = await conn.execute(operations.SUBMIT_AT_ONCE[job["cacheable"]],
                                            statement)
                return await cursor.fetchone() or (None, 0)

        inserted, _ = await retrying(attempt)
        if inserted is None:
            return False
        self._queued += 1
        return True

    async def record_cache_hit(self, action_digest: Digest, result: re_pb2.ActionResult,
                               owner: str = "", request_metadata: bytes = b"") -> Operation:
        response = outcomes.cache_hit(result)
        name = qualified(self.instance, f"operations/{self.new_id()}")
        job_id = self.new_id()
        async with self.db.connection() as conn:
            await conn.execute(operations.CACHE_HIT, {
                "id": job_id, "instance": self.instance, "hash": action_digest.hash,
                "size": action_digest.size_bytes, "response": response, "operation": name,
                "owner": owner, "request_metadata": request_metadata})
        self.observations.ended(Outcome.CACHE_HIT)
        now = time.time()
        return Operation(name=name, instance=self.instance, job_id=job_id,
                         action_digest=action_digest, stage=Stage.COMPLETED, response=response,
                         queued_at=now, created_at=now, owner=owner,
                         request_metadata=request_metadata)

    async def get_operation(self, name: str, caller: Caller | None = None) -> Operation:
        operation = await self._load_operation(name)
        if operation is None:
            raise ownership.no_such_operation(name)
        ownership.check_operation(name, operation.owner, caller)
        return operation

    async def _load_operation(self, name: str) -> Operation | None:
        async with self.db.connection() as conn:
            row = await Tx(conn, Effects(), self.instance, self.settings).row(
                f"{OPERATION_QUERY} WHERE o.name = %s AND o.instance = %s",
                (name, self.instance))
        return None if row is None else operation_view(row)

    async def list_operations(self, caller: Caller | None = None, *,
                              running_only: bool = False) -> list[Operation]:
        """Every operation of the instance, grid-wide, that `caller` may see (with
        `running_only`, those not done yet)."""
        everyone = caller is None or caller.admin
        running = (f" AND o.own_response IS NULL AND j.stage <> {COMPLETED}"
                   if running_only else "")
        async with self.db.connection() as conn:
            rows = await Tx(conn, Effects(), self.instance, self.settings).rows(
                f"{OPERATION_QUERY} WHERE o.instance = %s AND (%s OR o.owner = %s){running}",
                (self.instance, everyone, "" if caller is None else caller.name))
        return [operation_view(row) for row in rows]

    async def watch(self, operation: Operation) -> AsyncIterator[operations_pb2.Operation]:
        """Snapshots of the operation: now, then after each change, until it is done.

        A change announced with news (the job's stage, its response once done) is
        yielded as such; any other makes the watcher read the operation."""
        job_id = operation.job_id
        fresh = self._fresh.pop(operation.name, None)
        notifier = self._watchers.subscribe(job_id)
        if fresh is not None:
            self._unwatch(job_id)  # the registration made at submission
        reads, used = self._news.get(job_id, (0, None))
        try:
            last: tuple[bool, Stage] | None = None
            # Read again now that notifications reach this watcher: a change made
            # since `operation` was read would otherwise go unnoticed until RESYNC.
            # (Not for an operation this replica just queued: its watcher was
            # registered before the job existed.)
            current: Operation | None = operation if operation.done or fresh else None
            known = operation
            while True:
                waiter = fresh[1] if fresh else notifier.waiter()
                fresh = None
                if current is None:
                    current = await self._load_operation(operation.name)
                    if current is None:
                        raise NotFound(f"operation {operation.name!r} was deleted")
                known = current
                state = (current.done, current.stage)
                if state != last:
                    last = state
                    yield operation_proto(current)
                if current.done:
                    return
                current = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESYNC):
                        await waiter.wait()
                # Fresh news since the last look, and no change that needs a read: use
                # them.  Anything else (a timeout, a reconnection) reads the operation.
                count, news = self._news.get(job_id, (reads, None))
                if count == reads and news is not None and news is not used:
                    current = dataclasses.replace(
                        known, stage=news.stage, worker=news.worker,
                        response=news.response if news.stage == Stage.COMPLETED else None)
                reads, used = count, news
        finally:
            self._unwatch(job_id)

    async def cancel_operation(self, name: str, caller: Caller | None = None) -> None:
        await self._transaction(lambda tx: operations.cancel(tx, name, caller))

    async def delete_operation(self, name: str, caller: Caller | None = None) -> None:
        await self._transaction(lambda tx: operations.delete(tx, name, caller))

    async def queue_length(self) -> int:
        async with self.db.connection() as conn:
            cursor = await conn.execute(
                f"SELECT count(*) FROM grid_jobs WHERE instance = %s AND stage = {QUEUED}",
                (self.instance,))
            found = await cursor.fetchone()
        return int(found[0]) if found else 0

    # ------------------------------------------------------------------- bots
    async def create_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                             capacity: int, worker: bytes = b"", owner: str = "",
                             caller: Caller | None = None) -> BotSession:
        name = qualified(self.instance, self.new_id())
        status = reports.status_after(BotStatus.OK, status)

        async def body(tx: Tx) -> BotSession:
            old = await tx.row(
                "SELECT * FROM grid_sessions WHERE instance = %s AND bot_id = %s FOR UPDATE",
                (self.instance, bot_id))
            if old is not None:
                ownership.check_session(old["name"], old["owner"], caller)
                await jobs.close_session(tx, old, f"bot {bot_id!r} opened a new session",
                                         count_attempt=True)
            row = await tx.row(
                f"""INSERT INTO grid_sessions (name, instance, bot_id, status, properties,
                        capacity, created_at, last_seen, worker, owner)
                    VALUES (%s, %s, %s, %s, %s::jsonb, %s, {NOW}, {NOW}, %s, %s)
                    ON CONFLICT (instance, bot_id) DO NOTHING RETURNING *""",
                (name, self.instance, bot_id, int(status), properties_json(properties),
                 capacity, worker, owner))
            if row is None:
                raise Retry(f"bot {bot_id!r} registered twice at once")
            return session_view(row, 0)

        session = await self._transaction(body)
        log.info("bot %s registered as %s (capacity %d)", bot_id, name, capacity)
        self._live[session.name] = session
        return session

    async def get_session(self, name: str) -> BotSession:
        async with self.db.connection() as conn:
            row = await Tx(conn, Effects(), self.instance, self.settings).row(
                f"""SELECT s.*, (SELECT count(*) FROM grid_jobs j WHERE j.lease_session = s.name
                                 AND j.stage = {EXECUTING} AND j.{LIVE_LEASE}) AS held
                    FROM grid_sessions s WHERE s.name = %s AND s.instance = %s""",
                (name, self.instance))
        if row is None:
            raise NotFound(f"bot session {name!r} does not exist (or was closed)")
        return session_view(row, row["held"])

    async def update_session(self, name: str, *, bot_id: str, status: BotStatus,
                             leases: list[ReportedLease], properties: Properties | None = None,
                             capacity: int | None = None, worker: bytes | None = None,
                             wait: float = 0.0, caller: Caller | None = None
                             ) -> tuple[BotSession, list[Lease]]:
        """Apply a bot's report, hand it work, and long-poll up to `wait` seconds."""
        reports.check_reports(leases)
        self._open_calls[name] += 1
        # Registered before the first transaction (matching any work until the
        # session's properties are known), so that work announced while that
        # transaction runs still wakes this call.
        waiting = _Waiting(event=asyncio.Event(), properties=None, bot_id=bot_id)
        self._waiting[name] = waiting
        try:
            settled = await self._settler.settle(name, bot_id, status, leases, caller)
            report = bots.Report(bot_id=bot_id, status=status, leases=leases,
                                 properties=properties, capacity=capacity, worker=worker,
                                 caller=caller)
            outcome = await self._step(name, report, settled, may_wait=wait > 0)
            if outcome.answer is None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + timers.poll_wait(wait, holds_leases=outcome.holds,
                                                          settings=self.settings)
                waiting.properties = outcome.session.properties
                while outcome.answer is None:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, deadline - loop.time())):
                            await waiting.event.wait()
                    waiting.event.clear()
                    # Woken for work another bot may have claimed first: look, and keep
                    # waiting while there is time and nothing to say.
                    outcome = await self._step(name, None, {},
                                               may_wait=deadline - loop.time() > MIN_WAIT)
            assert outcome.answer is not None
            if not outcome.closed:
                self._seen(outcome.session)
            self._settler.remember(outcome)
            return outcome.session, outcome.answer
        finally:
            if self._waiting.get(name) is waiting:
                del self._waiting[name]
            self._open_calls[name] -= 1
            if not self._open_calls[name]:
                del self._open_calls[name]

    async def _step(self, name: str, report: bots.Report | None,
                    settled: dict[str, Completion | Requeue], *, may_wait: bool) -> bots.Outcome:
        return await self._transaction(
            lambda tx: bots.step(tx, name, report, settled, may_wait=may_wait,
                                 fairness=self.fairness,
                                 offer_pending=self.settings.offer_pending),
            pipeline=True)

    def _seen(self, session: BotSession) -> None:
        """Refresh this replica's view of a session it just served (the rest of the grid
        is read every tick)."""
        self._live.pop(session.name, None)
        self._live[session.name] = session

    async def post_event(self, name: str, event_type: str, message: str,
                         caller: Caller | None = None) -> BotEvent:
        """Record a bot's event on its session."""
        event = BotEvent(time=time.time(), type=event_type, message=message)

        async def body(tx: Tx) -> str:
            session = await tx.row(
                "SELECT bot_id, owner FROM grid_sessions WHERE name = %s AND instance = %s",
                (name, self.instance))
            if session is None:
                raise reports.reregister(name, await jobs.closed_reason(tx, name))
            ownership.check_session(name, session["owner"], caller)
            bot = session["bot_id"]
            await tx.execute(
                "INSERT INTO grid_bot_events (session, bot_id, time, type, message) "
                "VALUES (%s, %s, %s, %s, %s)", (name, bot, event.time, event_type, message))
            await tx.execute(
                """DELETE FROM grid_bot_events WHERE session = %s AND id <= (
                       SELECT id FROM grid_bot_events WHERE session = %s
                       ORDER BY id DESC OFFSET %s LIMIT 1)""", (name, name, MAX_EVENTS))
            return str(bot)

        bot_id = await self._transaction(body)
        level = logging.ERROR if event_type == "ERROR" else logging.INFO
        log.log(level, "bot %s (%s) reports: %s", bot_id, name, message)
        return event

    async def bot_events(self, bot_id: str) -> list[BotEvent]:
        """Recent events of the bot's current session."""
        async with self.db.connection() as conn:
            cursor = await conn.execute(
                """SELECT e.time, e.type, e.message FROM grid_bot_events e
                   JOIN grid_sessions s ON s.name = e.session
                   WHERE s.instance = %s AND s.bot_id = %s ORDER BY e.id""",
                (self.instance, bot_id))
            rows = await cursor.fetchall()
        return [BotEvent(time=t, type=k, message=m) for t, k, m in rows]

    # ------------------------------------------------------------- queries
    def is_polling(self, name: str) -> bool:
        """Whether an update of the session is being served here (it sees new work)."""
        return name in self._waiting

    def polling(self) -> int:
        return len(self._waiting)

    def live_sessions(self) -> Iterable[BotSession]:
        """The grid's live sessions as of the last housekeeping pass (one tick old at most)."""
        return list(self._live.values())

    def connected_bots(self) -> int:
        return len(self._live)

    def queue_groups(self) -> list[QueueGroup]:
        return list(self._groups)

    def build_kinds(self) -> list[BuildKindCount]:
        return list(self._build_kinds)

    # ------------------------------------------------------------------- drains
    async def add_drain(self, pattern: str) -> Drain:
        pattern = check_pattern(pattern)
        async with self.db.connection() as conn:
            row = await Tx(conn, Effects(), self.instance, self.settings).row(
                """INSERT INTO grid_drains (instance, pattern, created_at)
                   VALUES (%s, %s, extract(epoch from clock_timestamp()))
                   ON CONFLICT (instance, pattern) DO UPDATE SET pattern = EXCLUDED.pattern
                   RETURNING pattern, created_at, pg_notify(%s, %s)""",
                (self.instance, pattern, self.grid.channels["drains"], self.instance))
        assert row is not None
        drain = self._drains[pattern] = Drain(row["pattern"], row["created_at"])
        return drain

    async def remove_drain(self, pattern: str) -> bool:
        async with self.db.connection() as conn:
            row = await Tx(conn, Effects(), self.instance, self.settings).row(
                "DELETE FROM grid_drains WHERE instance = %s AND pattern = %s "
                "RETURNING pattern, pg_notify(%s, %s)",
                (self.instance, pattern.strip(), self.grid.channels["drains"], self.instance))
        self._drains.pop(pattern.strip(), None)
        if row is not None:
            self.wake_everything()  # bots waiting here may take work again
        return row is not None

    def drains(self) -> list[Drain]:
        return sorted(self._drains.values(), key=lambda drain: drain.pattern)

    def drains_changed(self) -> None:
        """A replica (this one included) added or removed a drain: read them again now
        rather than at the next tick."""
        if self._drains_reload is None or self._drains_reload.done():
            self._drains_reload = asyncio.get_running_loop().create_task(
                self._reload_drains(), name=f"drains of {self.instance!r}")

    async def _reload_drains(self) -> None:
        try:
            async with self.db.connection() as conn:
                await self._read_drains(Tx(conn, Effects(), self.instance, self.settings))
        except Exception as error:  # the next tick reads them anyway
            log.warning("could not read the drains of %r: %s", self.instance, error)

    async def _read_drains(self, tx: Tx) -> None:
        """Take the instance's drains from the database; wake the bots waiting here
        when one was lifted (they may take work now)."""
        rows = await tx.rows("SELECT pattern, created_at FROM grid_drains WHERE instance = %s",
                             (self.instance,))
        before = set(self._drains)
        self._drains = {row["pattern"]: Drain(row["pattern"], row["created_at"])
                        for row in rows}
        if before - set(self._drains):
            self.wake_everything()

    def is_drained(self, session: BotSession) -> bool:
        return drained(session.bot_id, session.properties, self._drains)

    def executing(self) -> int:
        return self._executing

    async def _refresh(self) -> None:
        """Read the grid-wide figures that synchronous queries answer from."""
        async with self.db.connection() as conn:
            tx = Tx(conn, Effects(), self.instance, self.settings)
            rows = await tx.rows(
                f"""SELECT s.*, (SELECT count(*) FROM grid_jobs j WHERE j.lease_session = s.name
                                 AND j.stage = {EXECUTING} AND j.{LIVE_LEASE}) AS held,
                           {NOW} - s.last_seen AS since_seen
                    FROM grid_sessions s
                    WHERE s.instance = %s AND s.last_seen > {NOW} - %s""",
                (self.instance, self.settings.keepalive))
            groups = await tx.rows(
                f"""SELECT requirements, count(*) AS queued, min(queued_at) AS oldest
                    FROM grid_jobs WHERE instance = %s AND stage = {QUEUED}
                    GROUP BY requirements""", (self.instance,))
            executing = await tx.value(
                f"SELECT count(*) FROM grid_jobs WHERE instance = %s AND stage = {EXECUTING}",
                (self.instance,))
            unfinished = await tx.rows(
                f"""SELECT stage, builds, count(*) AS jobs FROM grid_jobs
                    WHERE instance = %s AND stage IN ({QUEUED}, {EXECUTING})
                    GROUP BY stage, builds""", (self.instance,))
            finished = await tx.rows(
                f"""SELECT floor(completed_at / %s)::bigint AS slot, count(*) AS jobs
                    FROM grid_jobs WHERE instance = %s AND stage = {COMPLETED}
                    AND completed_at > {NOW} - %s GROUP BY 1""",
                (self.throughput.slot, self.instance, self.throughput.window))
            await self._read_drains(tx)
        self.throughput.replace({int(row["slot"]): int(row["jobs"]) for row in finished})
        self._live = {row["name"]: session_view(row, row["held"]) for row in rows}
        self._groups = [QueueGroup(properties_from(row["requirements"]), int(row["queued"]),
                                   float(row["oldest"])) for row in groups]
        self._queued = sum(group.queued for group in self._groups)
        self._executing = int(executing or 0)
        counts = invocations.count_by_kind(
            (row["builds"] for row in unfinished if row["stage"] == QUEUED
             for _ in range(int(row["jobs"]))),
            (row["builds"] for row in unfinished if row["stage"] == EXECUTING
             for _ in range(int(row["jobs"]))))
        self._build_kinds = [BuildKindCount(kind, *numbers) for kind, numbers in counts.items()]

    # ------------------------------------------------------------- housekeeping
    async def housekeep(self) -> None:
        """One pass: keep this replica's sessions alive, handle silent ones, end overdue
        jobs, fail unrunnable ones, forget old ones, wake bots for missed work."""
        open_here = list(self._open_calls)
        if open_here:
            async with self.db.connection() as conn:
                await conn.execute(
                    f"UPDATE grid_sessions SET last_seen = {NOW} WHERE name = ANY(%s::text[])",
                    (open_here,))
        await self._transaction(lambda tx: housekeeping.expire_silent(tx, open_here))
        await self._transaction(housekeeping.end_overdue)
        await self._transaction(housekeeping.fail_unmatched)
        await self._transaction(housekeeping.forget_old)
        self._forget_unwatched()
        await self._refresh()
        await self._rescue_waiters()

    def _forget_unwatched(self) -> None:
        """Release the registrations of queued operations nobody came to watch (the
        client went away between submission and watching)."""
        cutoff = time.monotonic() - RESYNC
        for name, (job_id, _, registered) in list(self._fresh.items()):
            if registered < cutoff:
                del self._fresh[name]
                self._unwatch(job_id)

    async def _rescue_waiters(self) -> None:
        """Wake bots waiting here for queued work they can run: a notification may have
        been lost (listening connection down), gone to a bot that could not take it,
        or a back-off may have ended."""
        if not self._waiting or not self._queued:
            return
        async with self.db.connection() as conn:
            wanted = [properties_from(text) for text in await housekeeping.queued_requirements(
                Tx(conn, Effects(), self.instance, self.settings))]
        for waiting in list(self._waiting.values()):
            properties = waiting.properties
            if properties is None or any(requirements <= properties for requirements in wanted):
                waiting.event.set()
