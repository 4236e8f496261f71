"""The scheduler for several server replicas sharing one PostgreSQL database.

Unlike `Scheduler` (in-memory state, written behind to a store), this one keeps
no authoritative state in the process: every job, operation, lease and bot
session is a row, and every decision is one transaction.  So any replica can
serve any call: a bot may send each UpdateBotSession to a different replica,
a client may watch an operation from a replica other than the one it submitted
to, and a replica may die at any moment without losing anything.

- Assignment claims queued jobs with ``FOR UPDATE SKIP LOCKED`` inside the
  transaction that hands them to the bot: two bots (on the same replica or
  not) never get the same job, and neither waits for the other.
- A bot session's transactions lock its session row first, then its jobs; any
  other transaction locks jobs only (a cancelled or timed-out lease is marked
  on the job row, not on the session).  That order rules out deadlocks between
  the two; the rare one PostgreSQL still reports is retried.
- Wake-ups cross replicas with LISTEN/NOTIFY, sent inside the transaction and
  so delivered only once it commits: a new or requeued job wakes one waiting
  bot that can run it on every replica (the first to claim it wins), a job
  change wakes the operation's watchers, a cancellation wakes the session.
  Housekeeping (once per tick) also wakes waiting bots for queued work they can
  run, which covers a notification lost while the listening connection was down.
- Housekeeping runs on every replica; each step claims its rows with
  ``SKIP LOCKED`` or is idempotent, so a lease expired by one replica is never
  requeued twice.
- Times that replicas compare (last seen, lease start) come from the database's
  clock, so the replicas' clocks need not agree.
- When the database is unreachable, calls fail with UNAVAILABLE and a retry
  hint (see `buildfleet.scheduler.postgres`); nothing needs restarting when it
  returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from google.longrunning import operations_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2
from psycopg.rows import dict_row

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import (
    BuildfleetError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from buildfleet.scheduler.model import (
    BotEvent,
    BotSession,
    BotStatus,
    Job,
    Lease,
    LeaseState,
    Notifier,
    Operation,
    Properties,
    Stage,
    now,
)
from buildfleet.scheduler.postgres import Database, migrate
from buildfleet.scheduler.protos import execute_response, operation_proto
from buildfleet.scheduler.scheduler import (
    INFRASTRUCTURE_CODES,
    SHUTDOWN_EXIT_CODE,
    ReportedLease,
    action_timeout,
    check_lease_reports,
    parse_lease_result,
    qualified,
)
from buildfleet.scheduler.settings import SchedulerSettings
from buildfleet.storage.action_cache import ActionCache

log = logging.getLogger(__name__)

T = TypeVar("T")
Row = dict[str, Any]

# The database's clock, in seconds since the epoch.
NOW = "(extract(epoch from clock_timestamp())::float8)"
RESYNC = 10.0  # seconds a watcher waits for a notification before reading again anyway
TX_ATTEMPTS = 5  # tries of a transaction that PostgreSQL aborted (deadlock, serialization)
MAX_EVENTS = 100  # bot events kept per session
# Seconds a succeeded job still answers identical submissions.  For that long it
# also keeps its place in the unique index (`dedup`): a submission whose
# statement began before the completion committed waits for it on the index,
# finds the slot taken, and joins the finished job rather than queuing again.
JUST_FINISHED = 10.0

LIVE_STATES = (int(LeaseState.PENDING), int(LeaseState.ACTIVE))

JOB_COLUMNS = (
    "j.id, j.instance, j.action_hash, j.action_size, j.action, j.requirements, j.priority, "
    "j.cacheable, j.timeout, j.queued_at, j.seq, j.stage, j.attempts, j.response, j.lease_id, "
    "j.lease_session, j.lease_state, j.lease_delivered, j.started_at, j.failed_on, "
    "j.last_failure, j.completed_at, j.worker")

# A new job, unless one for the same action is in flight (the unique index) or
# succeeded a moment ago: the common part of the two submissions below.
_NEW_CACHEABLE_JOB = f"""
    WITH recent AS (
        SELECT id, response FROM grid_jobs
        WHERE instance = %(instance)s AND action_hash = %(hash)s AND action_size = %(size)s
          AND cacheable AND succeeded AND completed_at > {NOW} - %(window)s
        ORDER BY completed_at DESC LIMIT 1),
    inserted AS (
        INSERT INTO grid_jobs (id, instance, action_hash, action_size, action, requirements,
                               priority, cacheable, timeout, queued_at, stage)
        SELECT %(id)s, %(instance)s, %(hash)s, %(size)s, %(action)s, %(requirements)s::jsonb,
               %(priority)s, true, %(timeout)s, {NOW}, 2
        WHERE NOT EXISTS (SELECT 1 FROM recent)
        ON CONFLICT (instance, action_hash, action_size) WHERE cacheable AND (stage <> 4 OR dedup)
        DO NOTHING RETURNING id)"""
# Returns (inserted id, recent id, recent response).
SUBMIT_CACHEABLE = _NEW_CACHEABLE_JOB + """
    SELECT (SELECT id FROM inserted), (SELECT id FROM recent), (SELECT response FROM recent)"""
# The same as one statement that also records the operation and announces new
# work: no transaction block, one round trip.  Nothing changes when the action is
# in flight already (the ids are then NULL) and the caller falls back to the
# transaction that joins it.  Returns (inserted id, recent id, recent response,
# notifications sent).
SUBMIT_CACHEABLE_AT_ONCE = _NEW_CACHEABLE_JOB + f""",
    target AS (
        SELECT id FROM inserted UNION ALL SELECT id FROM recent),
    operation AS (
        INSERT INTO grid_operations (name, instance, job_id, created_at)
        SELECT %(operation)s, %(instance)s, id, {NOW} FROM target),
    announced AS (
        SELECT pg_notify(%(channel)s, %(payload)s) FROM inserted)
    SELECT (SELECT id FROM inserted), (SELECT id FROM recent), (SELECT response FROM recent),
           (SELECT count(*) FROM announced)"""
SUBMIT_UNCACHEABLE = f"""
    INSERT INTO grid_jobs (id, instance, action_hash, action_size, action, requirements,
                           priority, cacheable, timeout, queued_at, stage)
    VALUES (%(id)s, %(instance)s, %(hash)s, %(size)s, %(action)s, %(requirements)s::jsonb,
            %(priority)s, false, %(timeout)s, {NOW}, 2)"""

# An operation with its job and the bot holding its lease (if any).
OPERATION_QUERY = f"""
    SELECT o.name AS op_name, o.created_at AS op_created_at, o.cancelled AS op_cancelled,
           o.own_response AS op_own_response, s.bot_id AS lease_bot, {JOB_COLUMNS}
    FROM grid_operations o JOIN grid_jobs j ON j.id = o.job_id
    LEFT JOIN grid_sessions s ON s.name = j.lease_session"""


def properties_json(properties: Properties) -> str:
    """`{"key": [values...]}`: the form `@>` (containment) matches requirements with."""
    grouped: dict[str, list[str]] = {}
    for key, value in sorted(properties):
        grouped.setdefault(key, []).append(value)
    return json.dumps(grouped, sort_keys=True)


def properties_from(value: Any) -> Properties:
    document = json.loads(value) if isinstance(value, str) else value
    return frozenset((key, item) for key, items in document.items() for item in items)


def _channel(schema: str, kind: str) -> str:
    """A LISTEN channel private to one database schema (tests share a database)."""
    return f"bf_{kind}_{hashlib.sha256(schema.encode()).hexdigest()[:16]}"


class _Retry(Exception):
    """A transaction lost a race it can simply run again."""


def _is_transient(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, psycopg.errors.TransactionRollback | _Retry):
            return True
        cause = cause.__cause__
    return False


async def _retrying(attempt: Callable[[], Awaitable[T]]) -> T:
    """`attempt()`, tried again (up to TX_ATTEMPTS times) while PostgreSQL aborts it
    for a transient reason (deadlock, serialization failure, `_Retry`)."""
    for number in range(1, TX_ATTEMPTS + 1):
        try:
            return await attempt()
        except Exception as error:
            if number < TX_ATTEMPTS and _is_transient(error):
                await asyncio.sleep(0.005 * number)
                continue
            raise
    raise AssertionError("unreachable")


def _just_finished(job: Job, recent: str, response: bytes | None) -> Job:
    """The job `recent`, which succeeded moments ago, answering the submission of `job`.

    Execute looked in the action cache just before it finished (a client retrying,
    on another replica, the Execute whose replica died is the usual case)."""
    return dataclasses.replace(job, id=recent, stage=Stage.COMPLETED,
                               response=bytes(response or b""))


@dataclass
class _Waiting:
    """A bot session long-polling on this replica."""

    event: asyncio.Event
    instance: str
    properties: Properties | None  # None: not known yet (any work wakes it)
    bot_id: str


@dataclass
class _TxEffects:
    """What a transaction must announce once it commits."""

    jobs: set[str] = field(default_factory=set)  # changed jobs (watchers)
    work: set[tuple[str, str]] = field(default_factory=set)  # (instance, requirements json)
    sessions: set[str] = field(default_factory=set)  # sessions to wake
    queued: int = 0  # jobs added to (or taken from, when negative) the queue


class ReplicatedGrid:
    """What the replicated schedulers of one server share: the database and LISTEN.

    `store` of each scheduler is this object, so that code starting a scheduler's
    store (`UninstancedBotsService.start`) starts the grid.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self.schedulers: dict[str, ReplicatedScheduler] = {}
        self.channels: dict[str, str] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._started = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._lock:
            if self._started:
                return
            await self.database.open()
            async with self.database.connection() as conn:
                await migrate(conn)
                schema = (await (await conn.execute("SELECT current_schema()")).fetchone()
                          or ("public",))[0]
            self.channels = {kind: _channel(schema, kind) for kind in ("work", "job", "session")}
            self._listener = asyncio.create_task(self._listen(), name="scheduler-listener")
            self._started = True
        # Notifications sent before LISTEN took effect would be lost: wait for it
        # (bounded: housekeeping's rescue covers the rest).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.database.settings.connect_timeout):
                await self._listening.wait()

    async def flush(self) -> None:
        """Every change is committed before the call that made it returns."""

    async def close(self) -> None:
        async with self._lock:
            if self._listener is not None:
                self._listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._listener
                self._listener = None
            if self._started:
                await self.database.close()
                self._started = False

    async def _listen(self) -> None:
        delay = 0.2
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self.database.listen_connection()
                for channel in self.channels.values():
                    await conn.execute(f"LISTEN {channel}")
                self._listening.set()
                delay = 0.2
                # Anything sent while we were not listening is lost: let every
                # waiter look again.
                for scheduler in self.schedulers.values():
                    scheduler.wake_everything()
                async for note in conn.notifies():
                    self._dispatch(note.channel, note.payload)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # reconnect after a pause
                self._listening.clear()
                log.warning("scheduler notifications interrupted (%s); reconnecting in %.1fs",
                            str(error).splitlines()[0] if str(error) else type(error).__name__,
                            delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()

    def _dispatch(self, channel: str, payload: str) -> None:
        instance, _, rest = payload.partition("\x1f")
        scheduler = self.schedulers.get(instance)
        if scheduler is None:
            return
        if channel == self.channels["work"]:
            scheduler.wake_for_work(properties_from(rest))
        elif channel == self.channels["job"]:
            scheduler.wake_watchers(rest)
        elif channel == self.channels["session"]:
            scheduler.wake_session(rest)


class ReplicatedScheduler:
    """Schedules one instance's actions with the state in PostgreSQL.

    It answers the same calls as `Scheduler`, so the services use either.
    """

    def __init__(self, instance: str, grid: ReplicatedGrid, *,
                 action_cache: ActionCache | None = None,
                 settings: SchedulerSettings | None = None) -> None:
        self.instance = instance
        self.grid = grid
        self.store = grid
        self.db = grid.database
        self.action_cache = action_cache
        self.settings = settings or SchedulerSettings()
        grid.schedulers[instance] = self
        self._waiting: dict[str, _Waiting] = {}  # session name -> its long-poll here
        self._open_calls: Counter[str] = Counter()  # session name -> calls open here
        self._watchers: dict[str, tuple[Notifier, int]] = {}  # job id -> (notifier, users)
        # Operations of jobs this replica just queued, registered for notifications
        # before the job existed, so that `watch` need not read them back:
        # operation name -> (job id, waiter, monotonic time).
        self._fresh: dict[str, tuple[str, asyncio.Event, float]] = {}
        # Grid-wide live sessions by name, read each tick (and on calls served here).
        self._live: dict[str, BotSession] = {}
        self._queued = 0  # grid-wide queued jobs, refreshed each tick
        self._housekeeper: asyncio.Task[None] | None = None
        share = self.settings.fairness_share
        self._fair_every = round(1 / share) if share > 0 else 0
        self._picks = 0  # assignments made here, for the fairness share
        self.stats = {"assigned": 0, "completed": 0, "retried": 0, "expired_sessions": 0}

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        if self._housekeeper is not None:
            return
        await self.grid.start()
        with contextlib.suppress(Unavailable):
            await self._refresh()
        self._housekeeper = asyncio.create_task(self._housekeeping(),
                                                name=f"replicated-scheduler[{self.instance!r}]")

    async def close(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        self.wake_everything()

    # ------------------------------------------------------------- wake-ups
    def wake_everything(self) -> None:
        for waiting in self._waiting.values():
            waiting.event.set()
        for notifier, _ in self._watchers.values():
            notifier.notify()

    def wake_for_work(self, requirements: Properties) -> None:
        """Wake one bot waiting here that can run a job with `requirements`."""
        for name, waiting in self._waiting.items():
            if not waiting.event.is_set() and (waiting.properties is None
                                               or requirements <= waiting.properties):
                waiting.event.set()
                # The next job goes to another waiting bot.
                self._waiting[name] = self._waiting.pop(name)
                return

    def wake_watchers(self, job_id: str) -> None:
        entry = self._watchers.get(job_id)
        if entry is not None:
            entry[0].notify()

    def is_waiting(self, name: str) -> bool:
        """Whether the session's UpdateBotSession is long-polling on this replica."""
        return name in self._waiting

    def wake_session(self, name: str) -> None:
        waiting = self._waiting.get(name)
        if waiting is not None:
            waiting.event.set()

    # ------------------------------------------------------------ transactions
    async def _transaction(self, body: Callable[[psycopg.AsyncConnection[Any], _TxEffects],
                                                Awaitable[T]], *, pipeline: bool = False) -> T:
        """Run `body` in a transaction, announce its effects after commit, retry races.

        With `pipeline` (see Database.transaction), statements whose results
        `body` does not fetch ride along with the next round trip."""
        async def attempt() -> T:
            effects = _TxEffects()
            async with self.db.transaction(pipeline=pipeline) as conn:
                result = await body(conn, effects)
                await self._announce(conn, effects)
            self._queued = max(0, self._queued + effects.queued)
            return result

        return await _retrying(attempt)

    async def _announce(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
        """NOTIFY inside the transaction: PostgreSQL delivers it at commit, or never."""
        prefix = self.instance + "\x1f"
        notes: list[tuple[str, str]] = []
        notes += [(self.grid.channels["job"], prefix + job) for job in sorted(effects.jobs)]
        notes += [(self.grid.channels["work"], prefix + reqs) for _, reqs in sorted(effects.work)]
        notes += [(self.grid.channels["session"], prefix + s) for s in sorted(effects.sessions)]
        if notes:
            await conn.execute(
                "SELECT pg_notify(c, p) FROM unnest(%s::text[], %s::text[]) AS n(c, p)",
                ([c for c, _ in notes], [p for _, p in notes]))

    # ---------------------------------------------------------------- clients
    def check_timeout(self, action: re_pb2.Action) -> float:
        return action_timeout(action, self.settings.max_timeout)

    async def submit(self, action_digest: Digest, action: re_pb2.Action,
                     requirements: Properties, *, priority: int = 0,
                     skip_cache_lookup: bool = False) -> Operation:
        """Queue an action (or join an identical one in flight); a new operation for it.

        Unless `skip_cache_lookup`, a job for the same action that succeeded a
        moment ago answers too (see SUBMIT_CACHEABLE).

        The operation returned is what this call knows (a new job is QUEUED);
        `watch` reads its current state.
        """
        timeout = self.check_timeout(action)
        cacheable = not action.do_not_cache
        payload = action.SerializeToString(deterministic=True)
        requirements_json = properties_json(requirements)
        name = qualified(self.instance, f"operations/{uuid.uuid4()}")
        job = Job(id=str(uuid.uuid4()), instance=self.instance, action_digest=action_digest,
                  action=payload, requirements=requirements, priority=priority,
                  cacheable=cacheable, timeout=timeout, queued_at=time.time(), seq=0)
        params = {"id": job.id, "instance": self.instance, "hash": action_digest.hash,
                  "size": action_digest.size_bytes, "action": payload,
                  "requirements": requirements_json, "priority": priority,
                  "cacheable": cacheable, "timeout": timeout,
                  "window": 0.0 if skip_cache_lookup else JUST_FINISHED}

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> Job:
            def queued_new() -> None:
                effects.work.add((self.instance, requirements_json))
                effects.queued += 1

            async def insert_cacheable() -> tuple[Any, ...]:
                cursor = await conn.execute(SUBMIT_CACHEABLE, params)
                found = await cursor.fetchone() or (None, None, None)
                if found[0] is not None:
                    queued_new()
                return found

            target = job
            if self._queued >= self.settings.max_queued:
                # Joining an action already queued adds nothing: still accepted.
                joined = await self._join(conn, action_digest, priority, effects)
                if joined is None or (joined.done and skip_cache_lookup):
                    raise ResourceExhausted(
                        f"instance {self.instance!r} has {self._queued} queued actions, its "
                        "limit; retry later")
                target = joined
            elif not cacheable:
                await conn.execute(SUBMIT_UNCACHEABLE, params)
                queued_new()
            else:
                inserted, recent, response = await insert_cacheable()
                if inserted is None and recent is not None:
                    target = _just_finished(job, recent, response)
                elif inserted is None:  # in flight already (queued here or elsewhere)
                    joined = await self._join(conn, action_digest, priority, effects)
                    if joined is None:
                        raise _Retry("the identical action finished meanwhile")
                    if joined.done and skip_cache_lookup:
                        # It succeeded just now, but this client wants a fresh run:
                        # free the action's slot and queue it again.
                        await conn.execute("UPDATE grid_jobs SET dedup = false WHERE id = %s",
                                           (joined.id,))
                        if (await insert_cacheable())[0] is None:
                            raise _Retry("the identical action was queued meanwhile")
                    else:
                        target = joined
            await conn.execute(
                f"INSERT INTO grid_operations (name, instance, job_id, created_at) "
                f"VALUES (%s, %s, %s, {NOW})", (name, self.instance, target.id))
            return target

        target: Job | None = None
        if cacheable and self._queued < self.settings.max_queued:
            # Listening for the job's changes before it exists: none can be missed.
            waiter = self._notifier(job.id).waiter()
            try:
                target = await self._submit_at_once(job, params, name, requirements_json)
            finally:
                if target is not job:
                    self._release(job.id)
            if target is job:
                self._fresh[name] = (job.id, waiter, time.monotonic())
        if target is None:
            target = await self._transaction(body)
        operation = Operation(name=name, instance=self.instance, job=target,
                              created_at=time.time())
        target.operations.add(name)
        return operation

    async def _submit_at_once(self, job: Job, params: dict[str, Any], name: str,
                              requirements_json: str) -> Job | None:
        """The common case of a cacheable submission in one statement (see
        SUBMIT_CACHEABLE_AT_ONCE): `job` when it was queued, the job that succeeded
        a moment ago when that answers, None when the action is in flight already
        (nothing was written: join it in a transaction)."""
        statement = {**params, "operation": name, "channel": self.grid.channels["work"],
                     "payload": f"{self.instance}\x1f{requirements_json}"}
        async def attempt() -> tuple[Any, ...]:
            async with self.db.connection() as conn:
                cursor = await conn.execute(SUBMIT_CACHEABLE_AT_ONCE, statement)
                return await cursor.fetchone() or (None,) * 4

        inserted, recent, response, _ = await _retrying(attempt)
        if inserted is not None:
            self._queued += 1
            return job
        if recent is not None:
            return _just_finished(job, recent, response)
        return None

    async def _join(self, conn: psycopg.AsyncConnection[Any], action_digest: Digest,
                    priority: int, effects: _TxEffects) -> Job | None:
        """The cacheable job holding `action_digest`'s place in the unique index, locked:
        unfinished (its priority raised to `priority` if that is more urgent), or
        succeeded a moment ago (see JUST_FINISHED).  None when there is none."""
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            f"SELECT {JOB_COLUMNS} FROM grid_jobs j WHERE j.instance = %s "
            "AND j.action_hash = %s AND j.action_size = %s AND j.cacheable "
            "AND (j.stage <> 4 OR j.dedup) FOR UPDATE",
            (self.instance, action_digest.hash, action_digest.size_bytes))
        row = await cursor.fetchone()
        if row is None:
            return None
        if row["stage"] == Stage.COMPLETED:
            return self._job(row)
        if priority < row["priority"]:
            await conn.execute("UPDATE grid_jobs SET priority = %s WHERE id = %s",
                               (priority, row["id"]))
            row["priority"] = priority
        effects.jobs.add(row["id"])
        return self._job(row)

    async def record_cache_hit(self, action_digest: Digest,
                               result: re_pb2.ActionResult) -> Operation:
        response = execute_response(result=result, cached=True,
                                    message="served from the action cache")
        name = qualified(self.instance, f"operations/{uuid.uuid4()}")
        job_id = str(uuid.uuid4())

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
            await conn.execute(
                f"""INSERT INTO grid_jobs (id, instance, action_hash, action_size, action,
                        requirements, priority, cacheable, timeout, queued_at, stage, response,
                        completed_at)
                    VALUES (%s, %s, %s, %s, ''::bytea, '{{}}'::jsonb, 0, true, 0, {NOW}, 4, %s,
                            {NOW})""",
                (job_id, self.instance, action_digest.hash, action_digest.size_bytes, response))
            await conn.execute(
                f"INSERT INTO grid_operations (name, instance, job_id, created_at) "
                f"VALUES (%s, %s, %s, {NOW})", (name, self.instance, job_id))

        await self._transaction(body)
        return await self.get_operation(name)

    async def get_operation(self, name: str) -> Operation:
        operation = await self._load_operation(name)
        if operation is None:
            raise NotFound(f"operation {name!r} does not exist (or has expired)")
        return operation

    async def _load_operation(self, name: str) -> Operation | None:
        async with self.db.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"{OPERATION_QUERY} WHERE o.name = %s AND o.instance = %s",
                                 (name, self.instance))
            row = await cursor.fetchone()
        return None if row is None else self._operation(row)

    async def list_operations(self) -> list[Operation]:
        """Every operation of the instance, grid-wide."""
        async with self.db.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"{OPERATION_QUERY} WHERE o.instance = %s", (self.instance,))
            rows = await cursor.fetchall()
        jobs: dict[str, Job] = {}
        return [self._operation(row, jobs) for row in rows]

    def _operation(self, row: Row, jobs: dict[str, Job] | None = None) -> Operation:
        job = (jobs or {}).get(row["id"]) or self._job(row)
        if jobs is not None:
            jobs[job.id] = job
        if row.get("lease_bot") and job.stage == Stage.EXECUTING and row["lease_id"]:
            holder = BotSession(name=row["lease_session"], instance=self.instance,
                                bot_id=row["lease_bot"], status=BotStatus.OK,
                                properties=frozenset(), capacity=1, created_at=0, last_seen=0)
            job.lease = Lease(id=row["lease_id"], job=job, session=holder,
                              state=LeaseState(row["lease_state"]), offered_at=0)
        return Operation(name=row["op_name"], instance=self.instance, job=job,
                         created_at=row["op_created_at"], cancelled=row["op_cancelled"],
                         own_response=row["op_own_response"])

    def _job(self, row: Row) -> Job:
        return Job(
            id=row["id"], instance=row["instance"],
            action_digest=Digest(row["action_hash"], row["action_size"]),
            action=bytes(row["action"]), requirements=properties_from(row["requirements"]),
            priority=row["priority"], cacheable=row["cacheable"], timeout=row["timeout"],
            queued_at=row["queued_at"], seq=row["seq"], stage=Stage(row["stage"]),
            attempts=row["attempts"],
            response=bytes(row["response"]) if row["response"] is not None else None,
            failed_on=set(row["failed_on"]), last_failure=row["last_failure"],
            completed_at=row["completed_at"], worker=row["worker"])

    def _notifier(self, job_id: str) -> Notifier:
        notifier, users = self._watchers.get(job_id, (Notifier(), 0))
        self._watchers[job_id] = (notifier, users + 1)
        return notifier

    def _release(self, job_id: str) -> None:
        notifier, users = self._watchers[job_id]
        if users <= 1:
            del self._watchers[job_id]
        else:
            self._watchers[job_id] = (notifier, users - 1)

    async def watch(self, operation: Operation) -> AsyncIterator[operations_pb2.Operation]:
        """Snapshots of the operation: now, then after each change, until it is done."""
        job_id = operation.job.id
        fresh = self._fresh.pop(operation.name, None)
        notifier = self._watchers[job_id][0] if fresh else self._notifier(job_id)
        try:
            last: tuple[bool, Stage] | None = None
            # Read again now that notifications reach this watcher: a change made
            # since `operation` was read would otherwise go unnoticed until RESYNC.
            # (Not for an operation this replica just queued: its watcher was
            # registered before the job existed.)
            current: Operation | None = operation if operation.done or fresh else None
            while True:
                waiter = fresh[1] if fresh else notifier.waiter()
                fresh = None
                if current is None:
                    current = await self._load_operation(operation.name)
                    if current is None:
                        raise NotFound(f"operation {operation.name!r} was deleted")
                state = (current.done, current.job.stage)
                if state != last:
                    last = state
                    yield operation_proto(current)
                if current.done:
                    return
                current = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RESYNC):
                        await waiter.wait()
        finally:
            self._release(job_id)

    async def cancel_operation(self, name: str) -> None:
        response = execute_response(code=code_pb2.CANCELLED,
                                    message="the operation was cancelled")

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"""SELECT o.cancelled AS op_cancelled, o.own_response AS op_own_response,
                           {JOB_COLUMNS}
                    FROM grid_operations o JOIN grid_jobs j ON j.id = o.job_id
                    WHERE o.name = %s AND o.instance = %s FOR UPDATE""", (name, self.instance))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"operation {name!r} does not exist (or has expired)")
            if row["op_own_response"] is not None or row["stage"] == Stage.COMPLETED:
                return
            await conn.execute(
                "UPDATE grid_operations SET cancelled = true, own_response = %s WHERE name = %s",
                (response, name))
            effects.jobs.add(row["id"])
            cursor = await conn.execute(
                "SELECT 1 FROM grid_operations WHERE job_id = %s AND NOT cancelled LIMIT 1",
                (row["id"],))
            if await cursor.fetchone() is None:
                await self._complete(conn, row, execute_response(
                    code=code_pb2.CANCELLED,
                    message="every operation waiting for the action was cancelled"),
                    effects, cancel_lease=True)

        await self._transaction(body)

    async def delete_operation(self, name: str) -> None:
        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
            cursor = await conn.execute(
                "DELETE FROM grid_operations WHERE name = %s AND instance = %s RETURNING job_id",
                (name, self.instance))
            row = await cursor.fetchone()
            if row is None:
                raise NotFound(f"operation {name!r} does not exist (or has expired)")
            job_id = row[0]
            effects.jobs.add(job_id)
            await conn.execute(
                "DELETE FROM grid_jobs WHERE id = %s AND stage = 4 AND NOT EXISTS "
                "(SELECT 1 FROM grid_operations WHERE job_id = %s)", (job_id, job_id))

        await self._transaction(body)

    # ------------------------------------------------------------------- bots
    async def create_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                             capacity: int, worker: bytes = b"") -> BotSession:
        name = qualified(self.instance, str(uuid.uuid4()))
        status = BotStatus.OK if status == BotStatus.UNSPECIFIED else status

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> Row:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "SELECT * FROM grid_sessions WHERE instance = %s AND bot_id = %s FOR UPDATE",
                (self.instance, bot_id))
            old = await cursor.fetchone()
            if old is not None:
                await self._close_session(conn, old, f"bot {bot_id!r} opened a new session",
                                          effects, count_attempt=True)
            await cursor.execute(
                f"""INSERT INTO grid_sessions (name, instance, bot_id, status, properties,
                        capacity, created_at, last_seen, worker)
                    VALUES (%s, %s, %s, %s, %s::jsonb, %s, {NOW}, {NOW}, %s)
                    ON CONFLICT (instance, bot_id) DO NOTHING RETURNING *""",
                (name, self.instance, bot_id, int(status), properties_json(properties),
                 capacity, worker))
            row = await cursor.fetchone()
            if row is None:
                raise _Retry(f"bot {bot_id!r} registered twice at once")
            return row

        row = await self._transaction(body)
        log.info("bot %s registered as %s (capacity %d)", bot_id, name, capacity)
        session = self._session(row)
        self._live[session.name] = session  # (closing the old one dropped it)
        return session

    def _seen(self, session: BotSession) -> None:
        """Refresh this replica's view of a session it just served (the rest of the grid
        is read every tick)."""
        self._live.pop(session.name, None)
        if not session.closed:
            self._live[session.name] = session

    def _session(self, row: Row) -> BotSession:
        return BotSession(
            name=row["name"], instance=self.instance, bot_id=row["bot_id"],
            status=BotStatus(row["status"]), properties=properties_from(row["properties"]),
            capacity=row["capacity"], created_at=row["created_at"], last_seen=now(),
            version=row["version"], worker_proto=bytes(row["worker"]))

    async def _closed_reason(self, conn: psycopg.AsyncConnection[Any], name: str) -> str | None:
        cursor = await conn.execute(
            "SELECT reason FROM grid_closed_sessions WHERE name = %s", (name,))
        row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def _lock_session(self, conn: psycopg.AsyncConnection[Any], name: str,
                            then: Callable[[], Awaitable[object]] | None = None) -> Row:
        """The session's row, locked; InvalidArgument when it is closed or unknown.

        `then` sends the next statement before the row is read (in a pipelined
        transaction, both go in one round trip)."""
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            "SELECT * FROM grid_sessions WHERE name = %s AND instance = %s FOR UPDATE",
            (name, self.instance))
        if then is not None:
            await then()
        row = await cursor.fetchone()
        if row is None:
            reason = await self._closed_reason(conn, name)
            if reason is not None:
                raise InvalidArgument(f"bot session {name!r} was closed ({reason}); "
                                      "create a new session")
            raise InvalidArgument(f"bot session {name!r} does not exist; create a new session")
        return row

    async def update_session(self, name: str, *, bot_id: str, status: BotStatus,
                             leases: list[ReportedLease], properties: Properties | None = None,
                             capacity: int | None = None, worker: bytes | None = None,
                             wait: float = 0.0) -> tuple[BotSession, list[Lease]]:
        """Apply a bot's report, hand it work, and long-poll up to `wait` seconds."""
        check_lease_reports(leases)
        self._open_calls[name] += 1
        # Registered before the first transaction (matching any work until the
        # session's properties are known), so that work announced while that
        # transaction runs still wakes this call.
        waiting = _Waiting(event=asyncio.Event(), instance=self.instance, properties=None,
                           bot_id=bot_id)
        self._waiting[name] = waiting
        try:
            report = _Report(bot_id=bot_id, status=status, leases=leases, properties=properties,
                             capacity=capacity, worker=worker)
            outcome = await self._transaction(
                lambda conn, effects: self._update_tx(conn, effects, name, report, wait > 0),
                pipeline=True)
            if outcome.response is None:
                waiting.properties = outcome.session.properties
                if outcome.holds:
                    wait = min(wait, self.settings.busy_poll)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await waiting.event.wait()
                outcome = await self._transaction(
                    lambda conn, effects: self._update_tx(conn, effects, name, None, False),
                    pipeline=True)
            assert outcome.response is not None
            self._seen(outcome.session)
            return outcome.session, outcome.response
        finally:
            if self._waiting.get(name) is waiting:
                del self._waiting[name]
            self._open_calls[name] -= 1
            if not self._open_calls[name]:
                del self._open_calls[name]

    async def _update_tx(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects,
                         name: str, report: _Report | None, may_wait: bool) -> _Outcome:
        """One step of an UpdateBotSession: apply the report (if any), assign work and,
        when there is anything to say or no waiting is wanted, build the response."""
        cursor = conn.cursor(row_factory=dict_row)

        async def select_held() -> None:
            await cursor.execute(
                f"SELECT {JOB_COLUMNS} FROM grid_jobs j WHERE j.lease_session = %s "
                "ORDER BY j.seq FOR UPDATE", (name,))

        row = await self._lock_session(conn, name, then=select_held)
        if report is not None and report.bot_id and report.bot_id != row["bot_id"]:
            raise InvalidArgument(f"bot session {name!r} belongs to bot {row['bot_id']!r}, "
                                  f"not {report.bot_id!r}")
        rows = await cursor.fetchall()
        held = {r["lease_id"]: r for r in rows
                if r["stage"] == Stage.EXECUTING and r["lease_state"] in LIVE_STATES}
        notices = {r["lease_id"]: r for r in rows if r["lease_state"] == LeaseState.CANCELLED}
        changed = False
        session = self._session(row)
        if report is not None:
            if report.status != BotStatus.UNSPECIFIED:
                session.status = report.status
            if report.properties is not None:
                session.properties = report.properties
            if report.capacity is not None:
                session.capacity = report.capacity
            if report.worker is not None:
                session.worker_proto = report.worker
            changed = await self._apply_report(conn, effects, session, report, held, notices)
        if session.status == BotStatus.BOT_TERMINATING and not held:
            await self._close_session(conn, row, "the bot terminated", effects,
                                      count_attempt=False)
            session.closed = True
            leases = await self._respond(conn, session, {}, notices)
            return _Outcome(session=session, response=leases, holds=False)
        if session.accepts_work() and session.capacity > len(held):
            for claimed in await self._claim(conn, effects, session,
                                             session.capacity - len(held)):
                held[claimed["lease_id"]] = claimed
                changed = True
        if notices:
            changed = True
        respond = changed or not may_wait
        answer = await self._respond(conn, session, held, notices) if respond else None
        # One write of the session per step: what the bot reported, that it was
        # seen now, and (when answering) the version it will echo.  The row is
        # locked, so the new version is known without reading it back (and the
        # statement goes with the commit).
        await conn.execute(
            f"""UPDATE grid_sessions SET status = %s, properties = %s::jsonb, capacity = %s,
                    worker = %s, last_seen = {NOW}, version = %s
                WHERE name = %s""",
            (int(session.status), properties_json(session.properties), session.capacity,
             session.worker_proto, row["version"] + int(respond), name))
        session.version = row["version"] + int(respond)
        return _Outcome(session=session, response=answer, holds=bool(held))

    async def _apply_report(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects,
                            session: BotSession, report: _Report, held: dict[str, Row],
                            notices: dict[str, Row]) -> bool:
        changed = False
        terminating = report.status == BotStatus.BOT_TERMINATING
        known = {lease.id for lease in report.leases}
        for lease in report.leases:
            row = held.get(lease.id)
            if row is None:
                # Finished, cancelled or never ours: leaving it out of the response
                # tells the bot to drop it.  A cancelled lease stays to be answered
                # CANCELLED until the bot reports it ended.
                if lease.state in (LeaseState.COMPLETED, LeaseState.CANCELLED):
                    notice = notices.pop(lease.id, None)
                    if notice is not None:
                        await conn.execute(
                            "UPDATE grid_jobs SET lease_session = NULL WHERE id = %s",
                            (notice["id"],))
                changed = True
                continue
            if lease.state == LeaseState.PENDING and row["lease_state"] == LeaseState.ACTIVE:
                raise InvalidArgument(
                    f"lease {lease.id!r} cannot go back from ACTIVE to PENDING")
            if lease.state == LeaseState.COMPLETED:
                del held[lease.id]
                await self._finish(conn, effects, session, row, lease, terminating)
                changed = True
            elif lease.state == LeaseState.CANCELLED:
                del held[lease.id]
                await self._requeue(conn, effects, row, count_attempt=True,
                                    reason="the bot gave the lease back")
                changed = True
            elif lease.state == LeaseState.ACTIVE and row["lease_state"] == LeaseState.PENDING:
                await conn.execute(
                    f"UPDATE grid_jobs SET lease_state = %s, started_at = {NOW} WHERE id = %s",
                    (int(LeaseState.ACTIVE), row["id"]))
                row["lease_state"] = int(LeaseState.ACTIVE)
                effects.jobs.add(row["id"])
                changed = True
        for lease_id, row in held.items():
            if row["lease_delivered"] and lease_id not in known:
                changed = True  # the bot lost our last answer: send the lease again
        return changed

    async def _claim(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects,
                     session: BotSession, slots: int) -> list[Row]:
        """Lease up to `slots` queued jobs the session can run, most urgent first,
        except that every 1/fairness-share-th pick (counted on this replica) takes
        the oldest job instead."""
        every = self._fair_every
        claimed: list[Row] = []
        while slots > 0:
            before_fair = (every - (self._picks + 1) % every) % every if every else slots
            oldest_first = every > 0 and before_fair == 0
            batch = 1 if oldest_first else min(slots, before_fair)
            rows = await self._claim_batch(conn, session, batch, oldest_first)
            claimed += rows
            self._picks += len(rows)
            slots -= len(rows)
            if len(rows) < batch:
                break
        for row in claimed:
            effects.jobs.add(row["id"])
        effects.queued -= len(claimed)
        self.stats["assigned"] += len(claimed)
        return claimed

    async def _claim_batch(self, conn: psycopg.AsyncConnection[Any], session: BotSession,
                           slots: int, oldest_first: bool) -> list[Row]:
        """Lease up to `slots` jobs in one statement.

        A bot that failed a job gets it again only when no other live bot could run it.
        """
        state = LeaseState.PENDING if self.settings.offer_pending else LeaseState.ACTIVE
        order = "j.seq" if oldest_first else "j.priority, j.seq"
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            f"""WITH picked AS (
                    SELECT j.id FROM grid_jobs j
                    WHERE j.instance = %(instance)s AND j.stage = 2
                      AND %(properties)s::jsonb @> j.requirements
                      AND (NOT j.failed_on ? %(bot)s OR NOT EXISTS (
                          SELECT 1 FROM grid_sessions s
                          WHERE s.instance = j.instance AND s.name <> %(name)s
                            AND s.last_seen > {NOW} - %(keepalive)s
                            AND s.properties @> j.requirements
                            AND NOT j.failed_on ? s.bot_id))
                    ORDER BY {order}
                    LIMIT %(slots)s
                    FOR UPDATE SKIP LOCKED)
                UPDATE grid_jobs j SET stage = 3,
                    lease_id = %(prefix)s || j.id
                        || CASE WHEN j.attempts > 0 THEN '.' || j.attempts ELSE '' END,
                    lease_session = %(name)s, lease_state = %(state)s,
                    -- Always answered in the transaction that makes the claim.
                    lease_delivered = true, started_at = {NOW}, unmatched_since = NULL
                FROM picked WHERE j.id = picked.id
                RETURNING {JOB_COLUMNS}""",
            {"instance": self.instance, "properties": properties_json(session.properties),
             "bot": session.bot_id, "name": session.name, "keepalive": self.settings.keepalive,
             "slots": slots, "prefix": qualified(self.instance, ""), "state": int(state)})
        claimed = await cursor.fetchall()
        claimed.sort(key=lambda r: (r["seq"],) if oldest_first else (r["priority"], r["seq"]))
        return claimed

    async def _respond(self, conn: psycopg.AsyncConnection[Any], session: BotSession,
                       held: dict[str, Row], notices: dict[str, Row]) -> list[Lease]:
        """The leases to send back; marks them delivered and clears the notices sent."""
        leases: list[Lease] = []
        for row in held.values():
            job = self._job(row)
            lease = Lease(id=row["lease_id"], job=job, session=session,
                          state=LeaseState(row["lease_state"]), offered_at=0, delivered=True)
            job.lease = lease
            job.stage = Stage.EXECUTING
            leases.append(lease)
        undelivered = [row["id"] for row in held.values() if not row["lease_delivered"]]
        if undelivered:
            await conn.execute(
                "UPDATE grid_jobs SET lease_delivered = true WHERE id = ANY(%s::text[])",
                (undelivered,))
        for row in notices.values():
            leases.append(Lease(id=row["lease_id"], job=self._job(row), session=session,
                                state=LeaseState.CANCELLED, offered_at=0))
        if notices:
            # Told once; afterwards the lease is simply absent.
            await conn.execute(
                "UPDATE grid_jobs SET lease_session = NULL WHERE id = ANY(%s::text[])",
                ([row["id"] for row in notices.values()],))
        session.leases = {lease.id: lease for lease in leases
                          if lease.state != LeaseState.CANCELLED}
        return leases

    async def _finish(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects,
                      session: BotSession, row: Row, report: ReportedLease,
                      terminating: bool) -> None:
        """A bot reported a lease COMPLETED: decide the job's fate."""
        bot = session.bot_id
        try:
            result = parse_lease_result(report)
        except (ValueError, DecodeError) as error:
            await self._retry(conn, effects, row, bot, code_pb2.INTERNAL,
                              f"bot {bot} sent an unusable result: {error}")
            return
        code = report.status_code
        if code in INFRASTRUCTURE_CODES:
            if terminating:
                await self._requeue(conn, effects, row, count_attempt=False,
                                    reason=f"bot {bot} stopped before finishing the action")
            else:
                await self._retry(conn, effects, row, bot, code,
                                  report.status_message or "infrastructure failure")
            return
        if code == code_pb2.OK and result is None:
            await self._retry(conn, effects, row, bot, code_pb2.INTERNAL,
                              f"bot {bot} reported success without an ActionResult")
            return
        if (code == code_pb2.OK and terminating and result is not None
                and result.exit_code == SHUTDOWN_EXIT_CODE):
            await self._requeue(conn, effects, row, count_attempt=False,
                                reason=f"bot {bot} stopped while running the action")
            return
        if result is not None and self.action_cache is not None:
            try:
                await self.action_cache.externalize(result)
            except BuildfleetError as error:
                await self._retry(conn, effects, row, bot, code_pb2.INTERNAL,
                                  f"bot {bot} sent a result that could not be stored: "
                                  f"{error.message}")
                return
        if result is not None:
            metadata = result.execution_metadata
            if not metadata.worker:
                metadata.worker = bot
            if not metadata.HasField("queued_timestamp"):
                metadata.queued_timestamp.FromNanoseconds(int(row["queued_at"] * 1e9))
        if code != code_pb2.OK:
            response = execute_response(code=code, result=result, message=report.status_message
                                        or f"the action failed on bot {bot}")
        else:
            assert result is not None
            response = execute_response(result=result, message=f"ran on {bot}")
            if row["cacheable"] and (result.exit_code == 0
                                     or self.settings.cache_failed_results):
                await self._cache(Digest(row["action_hash"], row["action_size"]), result)
        succeeded = code == code_pb2.OK and result is not None and result.exit_code == 0
        await self._complete(conn, row, response, effects, worker=bot, succeeded=succeeded)
        self.stats["completed"] += 1

    async def _cache(self, action_digest: Digest, result: re_pb2.ActionResult) -> None:
        if self.action_cache is None:
            return
        try:
            await self.action_cache.put(action_digest, result, check_blobs=True)
        except FailedPrecondition as error:
            log.warning("not caching the result of %s: %s", action_digest, error.message)
        except Exception:
            log.exception("could not cache the result of %s", action_digest)

    async def _retry(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects, row: Row,
                     bot_id: str, code: int, message: str) -> None:
        if bot_id not in row["failed_on"]:
            row["failed_on"] = [*row["failed_on"], bot_id]
        await self._requeue(conn, effects, row, count_attempt=True, reason=message, code=code)

    async def _requeue(self, conn: psycopg.AsyncConnection[Any], effects: _TxEffects,
                       row: Row, *, count_attempt: bool, reason: str,
                       code: int = code_pb2.UNAVAILABLE) -> None:
        """Take a lease back and queue its job again (or fail it when out of attempts)."""
        attempts = row["attempts"]
        last_failure = row["last_failure"]
        if count_attempt:
            attempts += 1
            last_failure = reason
            self.stats["retried"] += 1
            if attempts >= self.settings.max_attempts:
                row.update(attempts=attempts, last_failure=reason)
                await conn.execute(
                    "UPDATE grid_jobs SET attempts = %s, last_failure = %s, "
                    "failed_on = %s::jsonb WHERE id = %s",
                    (attempts, reason, json.dumps(row["failed_on"]), row["id"]))
                await self._complete(conn, row, execute_response(
                    code=code, message=f"the action failed on {attempts} attempts; "
                    f"last failure: {reason}"), effects)
                return
        log.info("requeueing %s/%s: %s", row["action_hash"], row["action_size"], reason)
        await conn.execute(
            """UPDATE grid_jobs SET stage = 2, lease_id = NULL, lease_session = NULL,
                   lease_state = NULL, lease_delivered = false, started_at = NULL,
                   attempts = %s, last_failure = %s, failed_on = %s::jsonb
               WHERE id = %s""",
            (attempts, last_failure, json.dumps(row["failed_on"]), row["id"]))
        effects.jobs.add(row["id"])
        effects.work.add((self.instance, json.dumps(row["requirements"], sort_keys=True)))
        effects.queued += 1

    async def _complete(self, conn: psycopg.AsyncConnection[Any], row: Row, response: bytes,
                        effects: _TxEffects, *, cancel_lease: bool = False,
                        worker: str | None = None, succeeded: bool = False) -> None:
        """Finish a job.  With `cancel_lease`, a bot still running it is told CANCELLED
        (the lease stays on the job row, marked, until the bot has been told)."""
        leased = row["stage"] == Stage.EXECUTING and row["lease_session"] is not None
        if cancel_lease and leased:
            await conn.execute(
                f"""UPDATE grid_jobs SET stage = 4, response = %s, completed_at = {NOW},
                        lease_state = %s, started_at = NULL
                    WHERE id = %s""", (response, int(LeaseState.CANCELLED), row["id"]))
            effects.sessions.add(row["lease_session"])
        else:
            await conn.execute(
                f"""UPDATE grid_jobs SET stage = 4, response = %s, completed_at = {NOW},
                        lease_session = NULL, lease_state = NULL, started_at = NULL,
                        worker = COALESCE(%s, worker), succeeded = %s,
                        dedup = %s AND cacheable
                    WHERE id = %s""", (response, worker, succeeded, succeeded, row["id"]))
        effects.jobs.add(row["id"])

    async def _close_session(self, conn: psycopg.AsyncConnection[Any], row: Row, reason: str,
                             effects: _TxEffects, *, count_attempt: bool) -> None:
        """Close a locked session: its running leases go back to the queue."""
        name = row["name"]
        cursor = conn.cursor(row_factory=dict_row)
        await cursor.execute(
            f"SELECT {JOB_COLUMNS} FROM grid_jobs j WHERE j.lease_session = %s FOR UPDATE",
            (name,))
        for job in await cursor.fetchall():
            if job["stage"] == Stage.EXECUTING and job["lease_state"] in LIVE_STATES:
                await self._requeue(conn, effects, job, count_attempt=count_attempt,
                                    reason=f"bot {row['bot_id']}: {reason}")
        await conn.execute("UPDATE grid_jobs SET lease_session = NULL WHERE lease_session = %s",
                           (name,))
        await conn.execute("DELETE FROM grid_sessions WHERE name = %s", (name,))
        await conn.execute(
            f"""INSERT INTO grid_closed_sessions (name, instance, reason, closed_at)
                VALUES (%s, %s, %s, {NOW}) ON CONFLICT (name) DO NOTHING""",
            (name, self.instance, reason))
        effects.sessions.add(name)
        self._live.pop(name, None)
        log.info("closed bot session %s of %s: %s", name, row["bot_id"], reason)

    async def post_event(self, name: str, event_type: str, message: str) -> BotEvent:
        """Record a bot's event on its session."""
        event = BotEvent(time=time.time(), type=event_type, message=message)

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> str:
            cursor = await conn.execute(
                "INSERT INTO grid_bot_events (session, bot_id, time, type, message) "
                "SELECT name, bot_id, %s, %s, %s FROM grid_sessions "
                "WHERE name = %s AND instance = %s RETURNING bot_id",
                (event.time, event_type, message, name, self.instance))
            row = await cursor.fetchone()
            if row is None:
                await self._lock_session(conn, name)  # raises with the reason
            return str(row[0]) if row else ""

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
    def live_sessions(self) -> Iterable[BotSession]:
        """The grid's live sessions as of the last housekeeping pass (one tick old at most)."""
        return list(self._live.values())

    def connected_bots(self) -> int:
        return len(self._live)

    async def _refresh(self) -> None:
        """Read the grid-wide figures that synchronous queries answer from."""
        async with self.db.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"""SELECT s.*, (SELECT count(*) FROM grid_jobs j WHERE j.lease_session = s.name
                                 AND j.stage = 3) AS held
                    FROM grid_sessions s
                    WHERE s.instance = %s AND s.last_seen > {NOW} - %s""",
                (self.instance, self.settings.keepalive))
            rows = await cursor.fetchall()
            await cursor.execute(
                "SELECT count(*) AS queued FROM grid_jobs WHERE instance = %s AND stage = 2",
                (self.instance,))
            queued = await cursor.fetchone()
        live = {}
        for row in rows:
            session = self._session(row)
            session.leases = {f"held-{i}": None for i in range(row["held"])}  # type: ignore[misc]
            live[session.name] = session
        self._live = live
        self._queued = int(queued["queued"]) if queued else 0

    # ------------------------------------------------------------- housekeeping
    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick)
            try:
                await self.housekeep()
            except asyncio.CancelledError:
                raise
            except Unavailable as error:
                log.warning("scheduler housekeeping skipped: %s", error.message)
            except Exception:
                log.exception("scheduler housekeeping failed")

    async def housekeep(self) -> None:
        """One pass: keep this replica's sessions alive, expire silent ones, time out
        jobs, fail unmatched ones, forget old ones, wake bots for missed work."""
        if self._open_calls:
            async with self.db.connection() as conn:
                await conn.execute(
                    f"UPDATE grid_sessions SET last_seen = {NOW} WHERE name = ANY(%s::text[])",
                    (list(self._open_calls),))
        await self._expire_sessions()
        await self._expire_leases()
        await self._fail_unmatched()
        await self._forget_old()
        self._forget_unwatched()
        await self._refresh()
        await self._rescue_waiters()

    async def _expire_sessions(self) -> None:
        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> int:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"""SELECT * FROM grid_sessions
                    WHERE instance = %s AND last_seen < {NOW} - %s AND NOT name = ANY(%s::text[])
                    LIMIT 100 FOR UPDATE SKIP LOCKED""",
                (self.instance, self.settings.keepalive, list(self._open_calls)))
            rows = await cursor.fetchall()
            for row in rows:
                await self._close_session(conn, row, "no update within the keepalive window",
                                          effects, count_attempt=True)
            return len(rows)

        expired = await self._transaction(body)
        self.stats["expired_sessions"] += expired

    async def _expire_leases(self) -> None:
        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"""SELECT {JOB_COLUMNS} FROM grid_jobs j
                    WHERE j.instance = %s AND j.stage = 3 AND j.started_at IS NOT NULL
                      AND j.started_at + (CASE WHEN j.timeout > 0 THEN j.timeout ELSE %s END)
                          + %s < {NOW}
                    LIMIT 100 FOR UPDATE SKIP LOCKED""",
                (self.instance, self.settings.default_timeout, self.settings.timeout_grace))
            for row in await cursor.fetchall():
                limit = row["timeout"] or self.settings.default_timeout
                await self._complete(conn, row, execute_response(
                    code=code_pb2.DEADLINE_EXCEEDED,
                    message=f"the action ran longer than its timeout of {limit:g}s"),
                    effects, cancel_lease=True)

        await self._transaction(body)

    async def _fail_unmatched(self) -> None:
        settings = self.settings

        async def body(conn: psycopg.AsyncConnection[Any], effects: _TxEffects) -> None:
            live = (f"SELECT 1 FROM grid_sessions s WHERE s.instance = j.instance "
                    f"AND s.status <> {int(BotStatus.BOT_TERMINATING)} "
                    f"AND s.last_seen > {NOW} - %(keepalive)s "
                    f"AND s.properties @> j.requirements")
            params = {"instance": self.instance, "keepalive": settings.keepalive,
                      "timeout": settings.unmatched_timeout}
            await conn.execute(
                f"""UPDATE grid_jobs j SET unmatched_since = NULL
                    WHERE j.instance = %(instance)s AND j.stage = 2
                      AND j.unmatched_since IS NOT NULL AND EXISTS ({live})""", params)
            await conn.execute(
                f"""UPDATE grid_jobs j SET unmatched_since = {NOW}
                    WHERE j.instance = %(instance)s AND j.stage = 2
                      AND j.unmatched_since IS NULL AND NOT EXISTS ({live})""", params)
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"""SELECT {JOB_COLUMNS} FROM grid_jobs j
                    WHERE j.instance = %(instance)s AND j.stage = 2
                      AND j.unmatched_since IS NOT NULL
                      AND {NOW} - GREATEST(j.unmatched_since, j.queued_at) > %(timeout)s
                    LIMIT 100 FOR UPDATE SKIP LOCKED""", params)
            doomed = await cursor.fetchall()
            if not doomed:
                return
            await cursor.execute(
                f"""SELECT properties FROM grid_sessions
                    WHERE instance = %s AND last_seen > {NOW} - %s AND status <> %s""",
                (self.instance, settings.keepalive, int(BotStatus.BOT_TERMINATING)))
            offered: set[tuple[str, str]] = set()
            for session in await cursor.fetchall():
                offered |= properties_from(session["properties"])
            for row in doomed:
                requirements = properties_from(row["requirements"])
                lacking = sorted(requirements - offered) or sorted(requirements)
                described = ", ".join(f"{k}={v}" for k, v in lacking) or "(none)"
                await self._complete(conn, row, execute_response(
                    code=code_pb2.FAILED_PRECONDITION,
                    message=f"no bot can run this action: for "
                    f"{settings.unmatched_timeout:.0f}s no connected bot had the platform "
                    f"properties {described}"), effects)

        await self._transaction(body)

    def _forget_unwatched(self) -> None:
        """Release the registrations of queued operations nobody came to watch (the
        client went away between submission and watching)."""
        cutoff = time.monotonic() - RESYNC
        for name, (job_id, _, registered) in list(self._fresh.items()):
            if registered < cutoff:
                del self._fresh[name]
                self._release(job_id)

    async def _forget_old(self) -> None:
        await self._transaction(self._forget_old_tx)

    async def _forget_old_tx(self, conn: psycopg.AsyncConnection[Any], _: _TxEffects) -> None:
        retention = self.settings.completed_retention
        await conn.execute(
            f"""UPDATE grid_jobs SET dedup = false
                WHERE instance = %s AND dedup AND completed_at < {NOW} - %s""",
            (self.instance, JUST_FINISHED))
        await conn.execute(
            f"""DELETE FROM grid_operations o USING grid_jobs j
                WHERE o.instance = %s AND j.id = o.job_id AND (
                    (o.own_response IS NOT NULL AND o.created_at < {NOW} - %s)
                    OR (j.stage = 4 AND j.completed_at < {NOW} - %s))""",
            (self.instance, retention, retention))
        await conn.execute(
            f"""DELETE FROM grid_jobs j WHERE j.instance = %s AND j.stage = 4
                  AND j.completed_at < {NOW} - %s AND j.lease_session IS NULL
                  AND NOT EXISTS (SELECT 1 FROM grid_operations o WHERE o.job_id = j.id)""",
            (self.instance, retention))
        await conn.execute(
            f"DELETE FROM grid_closed_sessions WHERE instance = %s AND closed_at < {NOW} - %s",
            (self.instance, max(retention, self.settings.keepalive)))
        await conn.execute(
            """DELETE FROM grid_bot_events e WHERE NOT EXISTS
                   (SELECT 1 FROM grid_sessions s WHERE s.name = e.session)""")
        await conn.execute(
            """DELETE FROM grid_bot_events WHERE id IN (
                   SELECT id FROM (SELECT id, row_number() OVER
                       (PARTITION BY session ORDER BY id DESC) AS position
                       FROM grid_bot_events) AS ranked
                   WHERE position > %s)""", (MAX_EVENTS,))

    async def _rescue_waiters(self) -> None:
        """Wake bots waiting here for queued work they can run: a notification may have
        been lost (listening connection down) or gone to a bot that could not take it."""
        if not self._waiting or not self._queued:
            return
        async with self.db.connection() as conn:
            cursor = await conn.execute(
                "SELECT DISTINCT requirements FROM grid_jobs WHERE instance = %s AND stage = 2",
                (self.instance,))
            wanted = [properties_from(row[0]) for row in await cursor.fetchall()]
        for waiting in list(self._waiting.values()):
            properties = waiting.properties
            if properties is None or any(requirements <= properties for requirements in wanted):
                waiting.event.set()


@dataclass
class _Report:
    bot_id: str
    status: BotStatus
    leases: list[ReportedLease]
    properties: Properties | None
    capacity: int | None
    worker: bytes | None


@dataclass
class _Outcome:
    session: BotSession
    response: list[Lease] | None  # None: nothing to say yet, long-poll
    holds: bool  # the bot runs leases
