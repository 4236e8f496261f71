"""The embedded strategy: one instance's scheduler with its state in memory.

State lives in `EmbeddedState` and changes only on the event loop; every change
is handed to the `SchedulerStore` (SQLite by default, or PostgreSQL for one
server), and calls whose change must not be lost (a submission, an accepted
result) await `store.flush()` before they answer, so many concurrent calls
share one commit.  Waking is event-driven: a job submitted while a bot
long-polls is leased to that bot at once and its call returns; a cancelled
lease wakes the bot holding it.  One housekeeping task applies the timers.

The decisions are the core's (`buildfleet.scheduler.rules`); how each former
difference between the two strategies was settled is written down in
`buildfleet.scheduler` (the package docstring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable

from google.longrunning import operations_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.errors import NotFound
from buildfleet.scheduler.embedded.housekeeping import housekeep
from buildfleet.scheduler.embedded.records import JobRecord, OperationRecord, SessionRecord
from buildfleet.scheduler.embedded.restore import restore, stored_view
from buildfleet.scheduler.embedded.state import EmbeddedState
from buildfleet.scheduler.embedded.store import SchedulerStore
from buildfleet.scheduler.model import (
    BotEvent,
    BotSession,
    BotStatus,
    BuildKindCount,
    Lease,
    LeaseState,
    Operation,
    Properties,
    QueueGroup,
    ReportedLease,
    random_id,
)
from buildfleet.scheduler.notify import Ticker, Wakers
from buildfleet.scheduler.protos import operation_proto
from buildfleet.scheduler.results import LeasedJob, settle
from buildfleet.scheduler.rules import (
    invocations,
    outcomes,
    ownership,
    reports,
    submissions,
    timers,
)
from buildfleet.scheduler.rules.drains import Drain, check_pattern, drained
from buildfleet.scheduler.rules.outcomes import Completion, Requeue
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.storage.action_cache import ActionCache

log = logging.getLogger(__name__)

STORE_EXPIRY_INTERVAL = 30.0  # seconds between deletions of expired rows in the store


class EmbeddedScheduler:
    """Schedules the actions of one instance onto its bots, state in memory."""

    def __init__(self, instance: str, store: SchedulerStore, *,
                 action_cache: ActionCache | None = None,
                 settings: SchedulerConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 new_id: Callable[[], str] = random_id) -> None:
        self.instance = instance
        self.store = store
        self.action_cache = action_cache
        self.settings = settings or SchedulerConfig()
        self._sessions = Wakers()  # session name -> its long-poll
        self._jobs = Wakers()  # job id -> watchers of its operations
        self.state = EmbeddedState(
            instance, self.settings, store, clock=clock, wall=wall, new_id=new_id,
            wake_session=lambda session: self._sessions.notify(session.name),
            wake_job=lambda job: self._jobs.notify(job.id))
        self.stats = self.state.stats
        self.observations = self.state.observations
        self.throughput = self.state.throughput
        self._next_store_expiry = 0.0
        self._housekeeper = Ticker(f"scheduler[{instance!r}] housekeeping",
                                   self.settings.tick, self.housekeep)

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        """Restore stored state and start housekeeping (once; later calls do nothing)."""
        if self._housekeeper.running:
            return
        restore(self.state, await self.store.load(self.instance))
        self._housekeeper.start()

    async def close(self) -> None:
        await self._housekeeper.stop()
        self._sessions.notify_all()
        self._jobs.notify_all()

    # ---------------------------------------------------------------- clients
    def check_timeout(self, action: re_pb2.Action) -> float:
        """The action's timeout in seconds; InvalidArgument when out of bounds."""
        return submissions.action_timeout(action, self.settings.max_timeout)

    async def submit(self, action_digest: Digest, action: re_pb2.Action,
                     requirements: Properties, *, priority: int = 0,
                     skip_cache_lookup: bool = False, owner: str = "",
                     request_metadata: bytes = b"") -> Operation:
        """Queue an action (or join an identical one); a new operation for it."""
        record = self.state.submit(
            action_digest, action.SerializeToString(deterministic=True), requirements,
            priority=priority, timeout=self.check_timeout(action),
            cacheable=not action.do_not_cache, skip_cache_lookup=skip_cache_lookup,
            owner=owner, request_metadata=request_metadata)
        await self.store.flush()
        return record.view()

    async def record_cache_hit(self, action_digest: Digest, result: re_pb2.ActionResult,
                               owner: str = "", request_metadata: bytes = b"") -> Operation:
        """A completed operation answering from the action cache."""
        record = self.state.cache_hit(action_digest, outcomes.cache_hit(result), owner,
                                      request_metadata)
        await self.store.flush()
        return record.view()

    def _operation(self, name: str, caller: Caller | None = None) -> OperationRecord:
        record = self.state.operation(name)
        if record is None:
            raise ownership.no_such_operation(name)
        ownership.check_operation(name, record.owner, caller)
        return record

    async def _stored(self, name: str, caller: Caller | None = None) -> Operation:
        """A done operation that has left memory (`EmbeddedState.retire`), from the
        store; NotFound as for one in memory."""
        rows = await self.store.load_operation(self.instance, name)
        if rows is None:
            raise ownership.no_such_operation(name)
        operation = stored_view(self.state, *rows)
        ownership.check_operation(name, operation.owner, caller)
        return operation

    async def get_operation(self, name: str, caller: Caller | None = None) -> Operation:
        record = self.state.operation(name)
        if record is None:
            return await self._stored(name, caller)
        ownership.check_operation(name, record.owner, caller)
        await self._durable(record)
        return record.view()

    async def list_operations(self, caller: Caller | None = None, *,
                              running_only: bool = False) -> list[Operation]:
        """Every operation of the instance that `caller` may see: those in memory and
        the done ones that have left it (with `running_only`, those not done yet)."""
        await self.store.flush()
        found = [record.view() for record in self.state.operations.values()
                 if ownership.sees(record.owner, caller)
                 and not (running_only and record.done)]
        if running_only:
            return found
        for operation, job in await self.store.load_done(self.instance):
            if (operation["name"] not in self.state.operations
                    and ownership.sees(operation.get("owner") or "", caller)):
                found.append(stored_view(self.state, operation, job))
        return found

    async def _durable(self, record: OperationRecord) -> None:
        """Wait until the end of a done operation (its result, its cancellation) is stored."""
        marks = self.state.done_marks
        if not record.done or not marks:
            return
        mark = max(marks.get(record.job.id, 0), marks.get(record.name, 0))
        if mark > self.store.durable:
            await self.store.flush_until(mark)

    async def watch(self, operation: Operation) -> AsyncIterator[operations_pb2.Operation]:
        """Snapshots of the operation: now, then after each change, until it is done.

        Each snapshot is taken when it is yielded, so a change that happens while
        the consumer is busy with one is seen (and yielded) at the next step.  A
        snapshot is yielded once what it shows is durable.  NotFound when the
        operation is deleted meanwhile.
        """
        if self.state.operation(operation.name) is None:  # done, and out of memory
            yield operation_proto(await self._stored(operation.name))
            return
        record = self._operation(operation.name)
        job: JobRecord = record.job
        notifier = self._jobs.subscribe(job.id)
        try:
            last: tuple[bool, int] | None = None
            while True:
                if record.deleted:
                    raise NotFound(f"operation {record.name!r} was deleted")
                waiter = notifier.waiter()
                state = (record.done, job.stage)
                if state != last:
                    last = state
                    snapshot = operation_proto(record.view())
                    await self._durable(record)
                    yield snapshot
                    continue
                if record.done:
                    return
                await waiter.wait()
        finally:
            self._jobs.release(job.id)

    async def cancel_operation(self, name: str, caller: Caller | None = None) -> None:
        """Cancel one operation; the job stops when no operation still wants it."""
        if self.state.operation(name) is None:
            await self._stored(name, caller)  # done already: nothing to cancel
            return
        self.state.cancel_operation(self._operation(name, caller))
        await self.store.flush()

    async def delete_operation(self, name: str, caller: Caller | None = None) -> None:
        """Forget an operation (the action itself keeps running for other waiters)."""
        if self.state.operation(name) is None:
            await self._stored(name, caller)
            self.store.delete_operation(name)  # its job's row goes with the retention
        else:
            self.state.delete_operation(self._operation(name, caller))
        await self.store.flush()

    async def queue_length(self) -> int:
        return len(self.state.queue)

    # ------------------------------------------------------------------- bots
    async def create_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                             capacity: int, worker: bytes = b"", owner: str = "",
                             caller: Caller | None = None) -> BotSession:
        """Register a bot; an older session of the same bot_id is closed (only by the
        principal that owns it, or an admin)."""
        old = self.state.by_bot_id.get(bot_id)
        if old is not None:
            ownership.check_session(old.name, old.owner, caller)
        session = self.state.open_session(bot_id, status=status, properties=properties,
                                          capacity=capacity, worker=worker, owner=owner)
        await self.store.flush()
        log.info("bot %s registered as %s (capacity %d)", bot_id, session.name, capacity)
        return session.view()

    async def get_session(self, name: str) -> BotSession:
        session = self.state.sessions.get(name)
        if session is None:
            raise NotFound(f"bot session {name!r} does not exist (or was closed)")
        return session.view()

    async def update_session(self, name: str, *, bot_id: str, status: BotStatus,
                             leases: list[ReportedLease], properties: Properties | None = None,
                             capacity: int | None = None, worker: bytes | None = None,
                             wait: float = 0.0, caller: Caller | None = None
                             ) -> tuple[BotSession, list[Lease]]:
        """Apply a bot's report, hand it work, and long-poll up to `wait` seconds.

        Returns the session and the leases to send back: every lease the bot
        holds (new ones included) plus leases cancelled since its last call.
        """
        session = self.state.live_session(name)
        ownership.check_session(name, session.owner, caller)
        reports.check_owner(name, session.bot_id, bot_id)
        reports.check_reports(leases, session.leases)
        session.open_calls += 1
        try:
            return await self._update(session, status, leases, properties, capacity, worker,
                                      wait)
        finally:
            session.open_calls -= 1
            session.last_seen = self.state.clock()

    async def _update(self, session: SessionRecord, status: BotStatus,
                      leases: list[ReportedLease], properties: Properties | None,
                      capacity: int | None, worker: bytes | None,
                      wait: float) -> tuple[BotSession, list[Lease]]:
        state = self.state
        mark = self.store.queued
        settled = await self._settle(session, leases, reports.status_after(session.status,
                                                                           status))
        if session.closed:  # closed while the results were being stored
            raise reports.reregister(session.name, state.closed.get(session.name))
        state.apply_status(session, status=status, properties=properties, capacity=capacity,
                           worker=worker)
        report = reports.reconcile(leases, session.leases, session.notices)
        state.apply_report(session, report, settled)
        if session.status == BotStatus.BOT_TERMINATING and not session.leases:
            state.close_session(session, "the bot terminated", count_attempt=False)
            await self.store.flush()  # the bot's last results must be durable before it goes
            return session.view(), [lease.view() for lease in state.answer(session)]
        changed = bool(state.assign(session)) or report.changed or bool(session.notices)
        wait = timers.poll_wait(wait, holds_leases=bool(session.leases), settings=self.settings)
        if not changed and wait > 0:
            await self._long_poll(session, wait)
        if session.closed:
            raise reports.reregister(session.name, state.closed.get(session.name))
        state.assign(session)
        answer = [lease.view() for lease in state.answer(session)]
        session.version += 1  # not stored: bots only echo it
        if self.store.queued != mark:
            # Results accepted or work assigned in this call (or by others meanwhile)
            # must be durable before the bot hears of them.
            await self.store.flush()
        return session.view(), answer

    async def _settle(self, session: SessionRecord, leases: list[ReportedLease],
                      status: BotStatus) -> dict[str, Completion | Requeue]:
        """The outcomes of the held leases reported COMPLETED, their blobs stored."""
        settled: dict[str, Completion | Requeue] = {}
        for report in leases:
            if report.state != LeaseState.COMPLETED:
                continue
            lease = session.leases.get(report.id)
            if lease is None:
                continue
            job = lease.job
            settled[report.id] = await settle(
                report, LeasedJob(job.action_digest, job.queued_at, job.cacheable),
                bot_id=session.bot_id, terminating=status == BotStatus.BOT_TERMINATING,
                action_cache=self.action_cache, settings=self.settings)
        return settled

    async def _long_poll(self, session: SessionRecord, wait: float) -> None:
        state = self.state
        notifier = self._sessions.subscribe(session.name)
        waiter = notifier.waiter()
        session.polls += 1
        if state.takes_work(session) and session.free_slots:
            state.waiting[session.name] = session
        try:
            async with asyncio.timeout(wait):
                await waiter.wait()
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # The bot went away mid-poll: work leased to it during the wait never
            # reached it, so it goes back to the queue without counting an attempt.
            for lease in [lease for lease in session.leases.values() if not lease.delivered]:
                state.requeue(lease, Requeue("the bot's call was cancelled",
                                             count_attempt=False, cause="call_cancelled"))
            raise
        finally:
            # A bot may cancel a poll and start the next one at once; the entry
            # belongs to whichever poll of this session is still waiting.
            session.polls -= 1
            if not session.polls:
                state.waiting.pop(session.name, None)
            self._sessions.release(session.name)

    async def post_event(self, name: str, event_type: str, message: str,
                         caller: Caller | None = None) -> BotEvent:
        """Record a bot's event on its session."""
        session = self.state.live_session(name)
        ownership.check_session(name, session.owner, caller)
        event = BotEvent(time=self.state.wall(), type=event_type, message=message)
        session.events.append(event)
        level = logging.ERROR if event_type == "ERROR" else logging.INFO
        log.log(level, "bot %s (%s) reports: %s", session.bot_id, name, message)
        return event

    async def bot_events(self, bot_id: str) -> list[BotEvent]:
        """Recent events of the bot's current session."""
        session = self.state.by_bot_id.get(bot_id)
        return list(session.events) if session else []

    # ------------------------------------------------------------- queries
    def is_polling(self, name: str) -> bool:
        """Whether an update of the session is being served (it sees new work at once)."""
        session = self.state.sessions.get(name)
        return session is not None and session.open_calls > 0

    def polling(self) -> int:
        """Sessions long-polling for work here."""
        return len(self.state.waiting)

    def live_sessions(self) -> Iterable[BotSession]:
        now = self.state.clock()
        return [session.view(now) for session in self.state.live_sessions()]

    def connected_bots(self) -> int:
        return sum(1 for _ in self.state.live_sessions())

    # ------------------------------------------------------------------- drains
    async def add_drain(self, pattern: str) -> Drain:
        drain = self.state.add_drain(check_pattern(pattern))
        await self.store.flush()
        return drain

    async def remove_drain(self, pattern: str) -> bool:
        removed = self.state.remove_drain(pattern.strip())
        await self.store.flush()
        return removed

    def drains(self) -> list[Drain]:
        return sorted(self.state.drains.values(), key=lambda drain: drain.pattern)

    def is_drained(self, session: BotSession) -> bool:
        return drained(session.bot_id, session.properties, self.state.drains)

    def queue_groups(self) -> list[QueueGroup]:
        return [QueueGroup(requirements, len(members),
                           min(job.queued_at for job in members))
                for requirements, members in self.state.queue.groups() if members]

    def build_kinds(self) -> list[BuildKindCount]:
        counts = invocations.count_by_kind((job.builds for job in self.state.queue.jobs()),
                                           (job.builds for job in self.state.executing))
        return [BuildKindCount(kind, *numbers) for kind, numbers in counts.items()]

    def executing(self) -> int:
        return len(self.state.executing)

    # ------------------------------------------------------------- housekeeping
    async def housekeep(self) -> None:
        """One housekeeping pass, its changes committed: the timers, then done
        operations beyond what memory keeps leave it, and now and then the store
        forgets those that have outlived the retention."""
        housekeep(self.state)
        self.state.retire(self.settings.completed_in_memory)
        now = self.state.clock()
        if now >= self._next_store_expiry:
            self._next_store_expiry = now + STORE_EXPIRY_INTERVAL
            self.store.expire_done(self.instance,
                                   timers.retention_cutoff(self.state.wall(), self.settings))
        await self.store.flush()
