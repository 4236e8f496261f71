"""The scheduler of one instance: jobs, operations, bot sessions and leases.

All state lives in memory and changes only on the event loop, so no locks are
needed; every change is handed to the `SchedulerStore`, and calls that must not
be lost (a submission, an accepted result) await `store.flush()` before they
answer.  Waking is event-driven: a job submitted while a bot is long-polling is
leased to that bot at once and its call returns; a cancelled lease wakes the
bot holding it.  One housekeeping task per scheduler expires silent sessions,
enforces timeouts, fails actions no bot can run and forgets old operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from google.longrunning import operations_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import DecodeError
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import (
    BuildfleetError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from buildfleet.scheduler.model import (
    BotEvent,
    BotSession,
    BotStatus,
    Job,
    Lease,
    LeaseState,
    Operation,
    Properties,
    Stage,
    now,
)
from buildfleet.scheduler.protos import ACTION_RESULT_URL, execute_response, operation_proto
from buildfleet.scheduler.queue import JobQueue
from buildfleet.scheduler.settings import SchedulerSettings
from buildfleet.scheduler.store import SchedulerStore
from buildfleet.storage.action_cache import ActionCache

log = logging.getLogger(__name__)

INFRASTRUCTURE_CODES = (code_pb2.INTERNAL, code_pb2.UNAVAILABLE)
SHUTDOWN_EXIT_CODE = 143  # 128 + SIGTERM: the bot was stopped, not the action
CLOSED_MEMORY = 10_000  # closed session names remembered for clear error messages
_OPERATION, _JOB = 0, 1  # kinds of entries in Scheduler._expiry


@dataclass
class ReportedLease:
    """A lease as a bot reports it in UpdateBotSession."""

    id: str
    state: int
    status_code: int = 0
    status_message: str = ""
    result: AnyProto | None = None


def action_timeout(action: re_pb2.Action, max_timeout: float) -> float:
    """The action's timeout in seconds (0: none set); InvalidArgument when out of bounds."""
    if not action.HasField("timeout"):
        return 0.0
    seconds = action.timeout.seconds + action.timeout.nanos / 1e9
    if seconds < 0:
        raise InvalidArgument(f"action timeout {seconds}s is negative")
    if seconds > max_timeout:
        raise InvalidArgument(
            f"action timeout {seconds:.0f}s exceeds this instance's maximum of "
            f"{max_timeout:.0f}s")
    return seconds


def check_lease_reports(reported: list[ReportedLease]) -> None:
    """InvalidArgument for a lease reported twice or in a state a bot may not report."""
    seen: set[str] = set()
    for report in reported:
        if report.id in seen:
            raise InvalidArgument(f"lease {report.id!r} appears twice in the bot session")
        seen.add(report.id)
        if report.state not in (LeaseState.PENDING, LeaseState.ACTIVE,
                                LeaseState.COMPLETED, LeaseState.CANCELLED):
            raise InvalidArgument(f"lease {report.id!r} has invalid state {report.state}")


def parse_lease_result(report: ReportedLease) -> re_pb2.ActionResult | None:
    """The ActionResult a bot reported with a lease; ValueError/DecodeError if unusable."""
    if report.result is None or not report.result.type_url:
        return None
    if report.result.type_url.rsplit("/", 1)[-1] != re_pb2.ActionResult.DESCRIPTOR.full_name:
        raise ValueError(f"lease result is a {report.result.type_url}, not an ActionResult")
    result = re_pb2.ActionResult()
    result.ParseFromString(report.result.value)
    return result


def qualified(instance: str, name: str) -> str:
    """`<instance>/<name>`, or just `<name>` for the unnamed instance."""
    return f"{instance}/{name}" if instance else name


class Scheduler:
    """Schedules the actions of one instance onto its bots."""

    def __init__(self, instance: str, store: SchedulerStore, *,
                 action_cache: ActionCache | None = None,
                 settings: SchedulerSettings | None = None) -> None:
        self.instance = instance
        self.store = store
        self.action_cache = action_cache
        self.settings = settings or SchedulerSettings()
        self.jobs: dict[str, Job] = {}
        self.operations: dict[str, Operation] = {}
        self.sessions: dict[str, BotSession] = {}
        self.queue = JobQueue(self.settings.fairness_share)
        self._by_bot_id: dict[str, BotSession] = {}
        self._by_action: dict[Digest, Job] = {}  # cacheable jobs not yet finished
        self._executing: set[Job] = set()
        self._waiting: dict[str, BotSession] = {}  # long-polling with free slots
        self._closed: OrderedDict[str, str] = OrderedDict()  # name -> reason
        self._unmatched_since: dict[Properties, float] = {}
        self._seq = itertools.count()
        self._housekeeper: asyncio.Task[None] | None = None
        # Job id or operation name -> `store.queued` right after it was saved done
        # (completed, cancelled): what a done snapshot waits for before it is told.
        self._done_marks: dict[str, int] = {}
        # Job id -> its result's action-cache write, while in flight.
        self._caching: dict[str, asyncio.Future[None]] = {}
        # What may be forgotten once the retention period has passed, oldest first:
        # (finished at, _OPERATION, name) for done operations, (completed at, _JOB,
        # id) for done jobs that no operation refers to.  Entries are re-checked when
        # they come due, so a stale one costs nothing but its pop.
        self._expiry: list[tuple[float, int, str]] = []
        self.stats = {"assigned": 0, "completed": 0, "retried": 0, "expired_sessions": 0}

    # ------------------------------------------------------------------ life
    async def start(self) -> None:
        """Restore stored state and start housekeeping (once; later calls do nothing)."""
        if self._housekeeper is not None:
            return
        await self._restore()
        self._housekeeper = asyncio.create_task(self._housekeeping(),
                                                name=f"scheduler[{self.instance!r}]")

    async def close(self) -> None:
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        if self._caching:  # results being cached: let them land
            await asyncio.gather(*self._caching.values(), return_exceptions=True)
        for session in self.sessions.values():
            session.notifier.notify()
        for operation in self.operations.values():
            operation.notifier.notify()

    # ---------------------------------------------------------------- clients
    def check_timeout(self, action: re_pb2.Action) -> float:
        """The action's timeout in seconds; InvalidArgument when out of bounds."""
        return action_timeout(action, self.settings.max_timeout)

    async def submit(self, action_digest: Digest, action: re_pb2.Action,
                     requirements: Properties, *, priority: int = 0,
                     skip_cache_lookup: bool = False) -> Operation:
        """Queue an action (or join an identical one in flight); a new operation for it.

        (`skip_cache_lookup` matters to the replicated scheduler only, which may
        answer with a job that succeeded a moment ago.)
        """
        timeout = self.check_timeout(action)
        cacheable = not action.do_not_cache
        job = self._by_action.get(action_digest) if cacheable else None
        if job is not None:
            if priority < job.priority:
                job.priority = priority
                self.queue.reprioritize(job)
                self.store.save_job(job)
        else:
            if len(self.queue) >= self.settings.max_queued:
                raise ResourceExhausted(
                    f"instance {self.instance!r} has {len(self.queue)} queued actions, its "
                    "limit; retry later")
            job = Job(
                id=str(uuid.uuid4()), instance=self.instance, action_digest=action_digest,
                action=action.SerializeToString(deterministic=True), requirements=requirements,
                priority=priority, cacheable=cacheable, timeout=timeout,
                queued_at=time.time(), seq=next(self._seq))
            self.jobs[job.id] = job
            if cacheable:
                self._by_action[action_digest] = job
            self.store.save_job(job)
            self._dispatch(job)
        operation = self._new_operation(job)
        await self.store.flush()
        return operation

    async def record_cache_hit(self, action_digest: Digest,
                               result: re_pb2.ActionResult) -> Operation:
        """A completed operation answering from the action cache."""
        job = Job(id=str(uuid.uuid4()), instance=self.instance, action_digest=action_digest,
                  action=b"", requirements=frozenset(), priority=0, cacheable=True, timeout=0,
                  queued_at=time.time(), seq=next(self._seq), stage=Stage.COMPLETED,
                  response=execute_response(result=result, cached=True,
                                            message="served from the action cache"),
                  completed_at=time.time())
        self.jobs[job.id] = job
        self.store.save_job(job)
        operation = self._new_operation(job)
        await self.store.flush()
        return operation

    def _new_operation(self, job: Job) -> Operation:
        name = qualified(self.instance, f"operations/{uuid.uuid4()}")
        operation = Operation(name=name, instance=self.instance, job=job, created_at=time.time())
        self.operations[name] = operation
        job.operations.add(name)
        self.store.save_operation(operation)
        if job.done:  # a cache hit: done from the start
            self._expire_later(operation)
        return operation

    async def get_operation(self, name: str) -> Operation:
        operation = self.operation(name)
        await self._durable(operation)
        return operation

    async def list_operations(self) -> list[Operation]:
        """Every operation of the instance."""
        await self.store.flush()
        return list(self.operations.values())

    async def _durable(self, operation: Operation) -> None:
        """Wait until the end of a done operation (its result, its cancellation) is
        stored, and a result in the action cache too."""
        if not operation.done:
            return
        caching = self._caching.get(operation.job.id)
        if caching is not None and operation.own_response is None:
            await asyncio.shield(caching)
        if not self._done_marks:
            return
        mark = max(self._done_marks.get(operation.job.id, 0),
                   self._done_marks.get(operation.name, 0))
        if mark > self.store.durable:
            await self.store.flush_until(mark)

    def operation(self, name: str) -> Operation:
        """The operation called `name`; NotFound when there is none."""
        operation = self.operations.get(name)
        if operation is None:
            raise NotFound(f"operation {name!r} does not exist (or has expired)")
        return operation

    async def watch(self, operation: Operation) -> AsyncIterator[operations_pb2.Operation]:
        """Snapshots of the operation: now, then after each change, until it is done.

        Each snapshot is taken when it is yielded, so a change that happens while
        the consumer is busy with one is seen (and yielded) at the next step.
        A snapshot is yielded once what it shows is durable (a result accepted
        from a bot is stored before any client hears of it).
        NotFound when the operation is deleted meanwhile.
        """
        last: tuple[bool, Stage] | None = None
        while True:
            if operation.deleted:
                raise NotFound(f"operation {operation.name!r} was deleted")
            waiter = operation.notifier.waiter()
            state = (operation.done, operation.job.stage)
            if state != last:
                last = state
                snapshot = operation_proto(operation)
                await self._durable(operation)
                yield snapshot
                continue
            if operation.done:
                return
            await waiter.wait()

    async def cancel_operation(self, name: str) -> None:
        """Cancel one operation; the job stops when no operation still wants it."""
        operation = self.operation(name)
        if operation.done:
            return
        operation.cancelled = True
        operation.own_response = execute_response(code=code_pb2.CANCELLED,
                                                  message="the operation was cancelled")
        job = operation.job
        job.operations.discard(name)
        self.store.save_operation(operation)
        self._done_marks[name] = self.store.queued
        self._expire_later(operation)
        operation.notifier.notify()
        if not any(not self.operations[n].cancelled for n in job.operations
                   if n in self.operations):
            self._cancel_job(job, "every operation waiting for the action was cancelled")
        await self.store.flush()

    async def delete_operation(self, name: str) -> None:
        """Forget an operation (the action itself keeps running for other waiters)."""
        operation = self.operation(name)
        del self.operations[name]
        operation.deleted = True
        job = operation.job
        job.operations.discard(name)
        self.store.delete_operation(name)
        operation.notifier.notify()
        if job.done and not job.operations:
            self._forget_job(job)
        await self.store.flush()

    def _cancel_job(self, job: Job, reason: str) -> None:
        if job.done:
            return
        self.queue.remove(job)
        if job.lease is not None:
            self._cancel_lease(job.lease)
        self._complete(job, execute_response(code=code_pb2.CANCELLED, message=reason))

    # ------------------------------------------------------------------- bots
    def session_name(self) -> str:
        return qualified(self.instance, str(uuid.uuid4()))

    async def create_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                             capacity: int, worker: bytes = b"") -> BotSession:
        """Register a bot; an older session of the same bot_id is closed."""
        old = self._by_bot_id.get(bot_id)
        if old is not None:
            self._close_session(old, f"bot {bot_id!r} opened a new session", count_attempt=True)
        session = BotSession(
            name=self.session_name(), instance=self.instance, bot_id=bot_id,
            status=BotStatus.OK if status == BotStatus.UNSPECIFIED else status,
            properties=properties, capacity=capacity, created_at=time.time(), last_seen=now(),
            worker_proto=worker)
        self.sessions[session.name] = session
        self._by_bot_id[bot_id] = session
        self.store.save_session(session)
        await self.store.flush()
        log.info("bot %s registered as %s (capacity %d)", bot_id, session.name, capacity)
        return session

    def live_session(self, name: str) -> BotSession:
        """The open session `name`; InvalidArgument (re-register) otherwise."""
        session = self.sessions.get(name)
        if session is None or session.closed:
            reason = self._closed.get(name)
            if reason is not None:
                raise InvalidArgument(f"bot session {name!r} was closed ({reason}); "
                                      "create a new session")
            raise InvalidArgument(f"bot session {name!r} does not exist; create a new session")
        return session

    async def update_session(self, name: str, *, bot_id: str, status: BotStatus,
                             leases: list[ReportedLease], properties: Properties | None = None,
                             capacity: int | None = None, worker: bytes | None = None,
                             wait: float = 0.0) -> tuple[BotSession, list[Lease]]:
        """Apply a bot's report, hand it work, and long-poll up to `wait` seconds.

        Returns the session and the leases to send back: every lease the bot
        holds (new ones included) plus leases cancelled since its last call.
        """
        session = self.live_session(name)
        if bot_id and bot_id != session.bot_id:
            raise InvalidArgument(f"bot session {name!r} belongs to bot {session.bot_id!r}, "
                                  f"not {bot_id!r}")
        self._validate_report(session, leases)
        session.open_calls += 1
        try:
            return await self._update(session, status, leases, properties, capacity, worker,
                                      wait)
        finally:
            session.open_calls -= 1
            session.last_seen = now()

    async def _update(self, session: BotSession, status: BotStatus, leases: list[ReportedLease],
                      properties: Properties | None, capacity: int | None,
                      worker: bytes | None, wait: float) -> tuple[BotSession, list[Lease]]:
        mark = self.store.queued
        before = (session.status, session.properties, session.capacity, session.worker_proto)
        if status != BotStatus.UNSPECIFIED:
            session.status = status
        if properties is not None:
            session.properties = properties
        if capacity is not None:
            session.capacity = capacity
        if worker is not None:
            session.worker_proto = worker
        if (session.status, session.properties, session.capacity,
                session.worker_proto) != before:
            self.store.save_session(session)
        terminating = session.status == BotStatus.BOT_TERMINATING
        changed = await self._reconcile(session, leases, terminating)
        if terminating and not session.leases:
            self._close_session(session, "the bot terminated", count_attempt=False)
            await self.store.flush()  # the bot's last results must be durable before it goes
            return session, self._response_leases(session)
        changed = bool(self._assign(session)) or changed or bool(session.cancelled)
        if session.leases:
            # A bot that keeps one call in flight (buildbox-worker) cannot report a
            # finished lease until this call returns: hold it only briefly.
            wait = min(wait, self.settings.busy_poll)
        if not changed and wait > 0:
            await self._long_poll(session, wait)
        if session.closed:
            self.live_session(session.name)  # raises with the reason
        self._assign(session)
        response = self._response_leases(session)
        session.version += 1  # not stored: bots only echo it
        if self.store.queued != mark:
            # Results accepted or work assigned in this call (or by others meanwhile)
            # must be durable before the bot hears about them.
            await self.store.flush()
        return session, response

    async def _long_poll(self, session: BotSession, wait: float) -> None:
        waiter = session.notifier.waiter()
        session.polls += 1
        if session.accepts_work() and session.free_slots:
            self._waiting[session.name] = session
        try:
            async with asyncio.timeout(wait):
                await waiter.wait()
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            # The bot went away mid-poll: work leased to it during the wait never
            # reached it, so it goes back to the queue without counting an attempt.
            for lease in [lease for lease in session.leases.values() if not lease.delivered]:
                self._requeue(lease, count_attempt=False, reason="the bot's call was cancelled")
            raise
        finally:
            # A bot may cancel a poll and start the next one at once; the entry
            # belongs to whichever poll of this session is still waiting.
            session.polls -= 1
            if not session.polls:
                self._waiting.pop(session.name, None)

    def _response_leases(self, session: BotSession) -> list[Lease]:
        leases = list(session.leases.values())
        for lease in leases:
            lease.delivered = True
        leases.extend(session.cancelled.values())
        session.cancelled.clear()  # told once; afterwards the lease is simply absent
        return leases

    def _validate_report(self, session: BotSession, reported: list[ReportedLease]) -> None:
        check_lease_reports(reported)
        for report in reported:
            lease = session.leases.get(report.id)
            if lease is None:
                continue
            if report.state == LeaseState.PENDING and lease.state == LeaseState.ACTIVE:
                raise InvalidArgument(
                    f"lease {report.id!r} cannot go back from ACTIVE to PENDING")

    async def _reconcile(self, session: BotSession, reported: list[ReportedLease],
                         terminating: bool) -> bool:
        changed = False
        known = {report.id for report in reported}
        for report in reported:
            lease = session.leases.get(report.id)
            if lease is None:
                # Finished, cancelled or never ours: leaving it out of the response
                # tells the bot to drop it.  A cancelled lease the bot still runs (it
                # has not heard of the cancellation) stays to be answered CANCELLED.
                if report.state in (LeaseState.COMPLETED, LeaseState.CANCELLED):
                    session.cancelled.pop(report.id, None)
                changed = True
                continue
            if report.state == LeaseState.COMPLETED:
                await self._finish(lease, report, terminating)
                changed = True
            elif report.state == LeaseState.CANCELLED:
                self._requeue(lease, count_attempt=True, reason="the bot gave the lease back")
                changed = True
            elif report.state == LeaseState.ACTIVE and lease.state == LeaseState.PENDING:
                lease.state = LeaseState.ACTIVE
                lease.job.started_at = now()
                self.store.save_job(lease.job)
                changed = True
        for lease in session.leases.values():
            if lease.delivered and lease.id not in known:
                changed = True  # the bot lost our last answer: send the lease again
        return changed

    async def _finish(self, lease: Lease, report: ReportedLease, terminating: bool) -> None:
        """A bot reported a lease COMPLETED: decide the job's fate."""
        job, session = lease.job, lease.session
        session.leases.pop(lease.id, None)
        if job.lease is not lease or job.done:
            return  # a late result of a lease already cancelled or reassigned
        try:
            result = parse_lease_result(report)
        except (ValueError, DecodeError) as error:
            self._retry(lease, code_pb2.INTERNAL, f"bot {session.bot_id} sent an unusable "
                        f"result: {error}")
            return
        code = report.status_code
        if code in INFRASTRUCTURE_CODES:
            if terminating:  # the bot gave the action up because it is stopping
                self._requeue(lease, count_attempt=False,
                              reason=f"bot {session.bot_id} stopped before finishing the action")
            else:
                self._retry(lease, code, report.status_message or "infrastructure failure")
            return
        if code == code_pb2.OK and result is None:
            self._retry(lease, code_pb2.INTERNAL,
                        f"bot {session.bot_id} reported success without an ActionResult")
            return
        if (code == code_pb2.OK and terminating and result is not None
                and result.exit_code == SHUTDOWN_EXIT_CODE):
            self._requeue(lease, count_attempt=False,
                          reason=f"bot {session.bot_id} stopped while running the action")
            return
        if result is not None and self.action_cache is not None:
            # Bots like reccworker send stdout/stderr inline: keep those bytes in the
            # CAS so that the result (and its cached copy) references them by digest.
            try:
                await self.action_cache.externalize(result)
            except BuildfleetError as error:
                if job.lease is lease and not job.done:
                    self._retry(lease, code_pb2.INTERNAL, f"bot {session.bot_id} sent a "
                                f"result that could not be stored: {error.message}")
                return
            if job.lease is not lease or job.done:
                return  # cancelled or timed out meanwhile
        if result is not None:
            metadata = result.execution_metadata
            if not metadata.worker:
                metadata.worker = session.bot_id
            if not metadata.HasField("queued_timestamp"):
                metadata.queued_timestamp.FromNanoseconds(int(job.queued_at * 1e9))
        job.worker = session.bot_id
        job.lease = None
        self._executing.discard(job)
        if code != code_pb2.OK:
            response = execute_response(code=code, result=result, message=report.status_message
                                        or f"the action failed on bot {session.bot_id}")
        else:
            assert result is not None
            response = execute_response(result=result, message=f"ran on {session.bot_id}")
            if job.cacheable and (result.exit_code == 0 or self.settings.cache_failed_results):
                self._cache_soon(job, result)
        if not job.done:
            self._complete(job, response)
            self.stats["completed"] += 1

    def _cache_soon(self, job: Job, result: re_pb2.ActionResult) -> None:
        """Start writing the job's result to the action cache.

        The write overlaps the commit of the completion: the bot is answered once
        the result is durable, clients once it is durable *and* cached (see
        `_durable`), so a client that asks the action cache right after hearing of
        the result finds it.  Until the write ends the job stays the one an
        identical submission joins.
        """
        if self.action_cache is None:
            return
        task = asyncio.ensure_future(self._cache(job, result))
        self._caching[job.id] = task
        task.add_done_callback(lambda _: self._cached(job))

    def _cached(self, job: Job) -> None:
        self._caching.pop(job.id, None)
        if job.done and self._by_action.get(job.action_digest) is job:
            del self._by_action[job.action_digest]

    async def _cache(self, job: Job, result: re_pb2.ActionResult) -> None:
        if self.action_cache is None:
            return
        try:
            await self.action_cache.put(job.action_digest, result, check_blobs=True)
        except FailedPrecondition as error:
            log.warning("not caching the result of %s: %s", job.action_digest, error.message)
        except Exception:
            log.exception("could not cache the result of %s", job.action_digest)

    def _retry(self, lease: Lease, code: int, message: str) -> None:
        job = lease.job
        job.failed_on.add(lease.session.bot_id)
        self._requeue(lease, count_attempt=True, reason=message, code=code)

    def _requeue(self, lease: Lease, *, count_attempt: bool, reason: str,
                 code: int = code_pb2.UNAVAILABLE) -> None:
        """Take a lease back and queue its job again (or fail it when out of attempts)."""
        job = lease.job
        lease.session.leases.pop(lease.id, None)
        if job.lease is not lease or job.done:
            return
        job.lease = None
        job.started_at = None
        self._executing.discard(job)
        if count_attempt:
            job.attempts += 1
            job.last_failure = reason
            self.stats["retried"] += 1
            if job.attempts >= self.settings.max_attempts:
                self._complete(job, execute_response(
                    code=code, message=f"the action failed on {job.attempts} attempts; "
                    f"last failure: {reason}"))
                return
        log.info("requeueing %s: %s", job.action_digest, reason)
        job.stage = Stage.QUEUED
        self.store.save_job(job)
        self._notify(job)
        self._dispatch(job)

    def _dispatch(self, job: Job) -> None:
        """Lease `job` to a long-polling bot that can run it, or queue it."""
        for session in self._waiting.values():
            if (session.free_slots and session.accepts_work()
                    and job.requirements <= session.properties and self._may_run(job, session)):
                self._lease(job, session)
                self._waiting.pop(session.name, None)
                session.notifier.notify()
                return
        self.queue.push(job)

    def _may_run(self, job: Job, session: BotSession) -> bool:
        """A bot that failed this job gets it again only when no other bot could."""
        if session.bot_id not in job.failed_on:
            return True
        others = sum(1 for s in self._by_bot_id.values()
                     if s.bot_id not in job.failed_on and not s.closed
                     and job.requirements <= s.properties)
        return others == 0

    def _assign(self, session: BotSession) -> list[Lease]:
        leases: list[Lease] = []
        while session.accepts_work() and session.free_slots:
            job = self.queue.pop_for(session.properties, lambda j: self._may_run(j, session))
            if job is None:
                break
            leases.append(self._lease(job, session))
        return leases

    def _lease(self, job: Job, session: BotSession) -> Lease:
        state = LeaseState.PENDING if self.settings.offer_pending else LeaseState.ACTIVE
        # A retry gets its own lease id, so that a bot repeating its report of the
        # failed lease (one that was handed the retry itself) cannot end the retry.
        # `attempts` is stored, so the ids stay distinct across restarts.
        name = f"{job.id}.{job.attempts}" if job.attempts else job.id
        lease = Lease(id=qualified(self.instance, name), job=job, session=session,
                      state=state, offered_at=now())
        session.leases[lease.id] = lease
        job.lease = lease
        job.stage = Stage.EXECUTING
        job.started_at = now()
        self._executing.add(job)
        self.stats["assigned"] += 1
        self.store.save_job(job)
        self._notify(job)
        return lease

    def _cancel_lease(self, lease: Lease) -> None:
        """Tell the bot holding `lease` to stop; its later result is ignored."""
        session, job = lease.session, lease.job
        session.leases.pop(lease.id, None)
        if job.lease is lease:
            job.lease = None
            self._executing.discard(job)
        lease.state = LeaseState.CANCELLED
        if not session.closed:
            session.cancelled[lease.id] = lease
            session.notifier.notify()

    def _complete(self, job: Job, response: bytes) -> None:
        job.stage = Stage.COMPLETED
        job.response = response
        job.completed_at = time.time()
        job.lease = None
        self._executing.discard(job)
        self.queue.remove(job)
        if self._by_action.get(job.action_digest) is job and job.id not in self._caching:
            del self._by_action[job.action_digest]
        self.store.save_job(job)
        self._done_marks[job.id] = self.store.queued
        self._expire_job_later(job)
        self._notify(job)

    def _notify(self, job: Job) -> None:
        for name in job.operations:
            operation = self.operations.get(name)
            if operation is not None:
                operation.notifier.notify()

    def _forget_job(self, job: Job) -> None:
        self.jobs.pop(job.id, None)
        self.store.delete_job(job.id)

    def _close_session(self, session: BotSession, reason: str, *, count_attempt: bool) -> None:
        if session.closed:
            return
        session.closed = True
        session.close_reason = reason
        self.sessions.pop(session.name, None)
        if self._by_bot_id.get(session.bot_id) is session:
            del self._by_bot_id[session.bot_id]
        self._waiting.pop(session.name, None)
        self._closed[session.name] = reason
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)
        for lease in list(session.leases.values()):
            self._requeue(lease, count_attempt=count_attempt,
                          reason=f"bot {session.bot_id}: {reason}")
        session.cancelled.clear()
        self.store.delete_session(session.name)
        session.notifier.notify()
        log.info("closed bot session %s of %s: %s", session.name, session.bot_id, reason)

    async def post_event(self, name: str, event_type: str, message: str) -> BotEvent:
        """Record a bot's event on its session."""
        session = self.live_session(name)
        event = BotEvent(time=time.time(), type=event_type, message=message)
        session.events.append(event)
        if event_type == "ERROR":
            log.error("bot %s (%s) reports: %s", session.bot_id, name, message)
        else:
            log.info("bot %s (%s) reports: %s", session.bot_id, name, message)
        return event

    def bot_events(self, bot_id: str) -> list[BotEvent]:
        """Recent events of the bot's current session."""
        session = self._by_bot_id.get(bot_id)
        return list(session.events) if session else []

    # ------------------------------------------------------------- queries
    def live_sessions(self) -> Iterable[BotSession]:
        horizon = now() - self.settings.keepalive
        return (s for s in self.sessions.values()
                if not s.closed and (s.open_calls or s.last_seen >= horizon))

    def connected_bots(self) -> int:
        return sum(1 for _ in self.live_sessions())

    # ------------------------------------------------------------- housekeeping
    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tick)
            try:
                self.housekeep()
                await self.store.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler housekeeping failed")

    def housekeep(self) -> None:
        """One pass: expire sessions, time out jobs, fail unmatched jobs, forget old ones."""
        moment = now()
        durable = self.store.durable
        self._done_marks = {k: v for k, v in self._done_marks.items() if v > durable}
        for session in list(self.sessions.values()):
            if not session.open_calls and moment - session.last_seen > self.settings.keepalive:
                self.stats["expired_sessions"] += 1
                self._close_session(session, "no update within the keepalive window",
                                    count_attempt=True)
        for job in list(self._executing):
            if job.lease is None or job.started_at is None:
                continue
            limit = (job.timeout or self.settings.default_timeout) + self.settings.timeout_grace
            if moment - job.started_at > limit:
                self._cancel_lease(job.lease)
                self._complete(job, execute_response(
                    code=code_pb2.DEADLINE_EXCEEDED,
                    message=f"the action ran longer than its timeout of "
                    f"{job.timeout or self.settings.default_timeout:g}s"))
        self._fail_unmatched(time.time())
        self._forget_old(time.time())

    def _fail_unmatched(self, wall: float) -> None:
        live = [s.properties for s in self.live_sessions()
                if s.status != BotStatus.BOT_TERMINATING]
        for requirements, members in list(self.queue.groups()):
            if any(requirements <= properties for properties in live):
                self._unmatched_since.pop(requirements, None)
                continue
            since = self._unmatched_since.setdefault(requirements, wall)
            offered = set().union(*live) if live else set()
            lacking = sorted(requirements - offered) or sorted(requirements)
            described = ", ".join(f"{k}={v}" for k, v in lacking) or "(none)"
            for job in list(members):
                if wall - max(since, job.queued_at) > self.settings.unmatched_timeout:
                    self._complete(job, execute_response(
                        code=code_pb2.FAILED_PRECONDITION,
                        message=f"no bot can run this action: for "
                        f"{self.settings.unmatched_timeout:.0f}s no connected bot had the "
                        f"platform properties {described}"))
        for requirements in list(self._unmatched_since):
            if requirements not in dict(self.queue.groups()):
                del self._unmatched_since[requirements]

    @staticmethod
    def _finished_at(operation: Operation) -> float | None:
        """When a done operation ended (a cancelled one counts from its creation)."""
        if operation.own_response is not None:
            return operation.created_at
        return operation.job.completed_at

    def _expire_later(self, operation: Operation) -> None:
        """Note a done operation, to be forgotten once the retention period has passed."""
        finished = self._finished_at(operation)
        if finished is not None:
            heapq.heappush(self._expiry, (finished, _OPERATION, operation.name))

    def _expire_job_later(self, job: Job) -> None:
        """Note a job that just finished for forgetting after the retention period:
        through its operations (the job goes with the last of them), or by itself
        when no operation refers to it."""
        for name in job.operations:
            operation = self.operations.get(name)
            if operation is not None:
                self._expire_later(operation)
        if not job.operations:
            heapq.heappush(self._expiry, (job.completed_at or 0.0, _JOB, job.id))

    def _forget_old(self, wall: float) -> None:
        """Forget done operations, and done jobs left without one, older than the
        retention period: only what has come due is looked at."""
        cutoff = wall - self.settings.completed_retention
        expiry = self._expiry
        while expiry and expiry[0][0] < cutoff:
            _, kind, key = heapq.heappop(expiry)
            if kind == _JOB:
                job = self.jobs.get(key)
                if (job is not None and job.done and not job.operations
                        and (job.completed_at or 0) < cutoff):
                    self._forget_job(job)
                continue
            operation = self.operations.get(key)
            if operation is None or not operation.done:
                continue
            finished = self._finished_at(operation)
            if finished is None:
                continue
            if finished >= cutoff:  # it ended later than noted: wait for that time
                heapq.heappush(expiry, (finished, _OPERATION, key))
                continue
            del self.operations[key]
            job = operation.job
            job.operations.discard(key)
            self.store.delete_operation(key)
            if job.done and not job.operations:
                if (job.completed_at or 0) < cutoff:
                    self._forget_job(job)
                else:
                    heapq.heappush(expiry, (job.completed_at or 0.0, _JOB, job.id))

    # ----------------------------------------------------------------- restore
    async def _restore(self) -> None:
        state = await self.store.load(self.instance)
        moment = now()
        for row in state.sessions:
            session = BotSession(
                name=row["name"], instance=self.instance, bot_id=row["bot_id"],
                status=BotStatus(row["status"]),
                properties=frozenset(tuple(p) for p in json.loads(row["properties"])),
                capacity=row["capacity"], created_at=row["created_at"], last_seen=moment,
                version=row["version"], worker_proto=row["worker"])
            self.sessions[session.name] = session
            self._by_bot_id[session.bot_id] = session
        max_seq = -1
        for row in sorted(state.jobs, key=lambda r: r["seq"]):
            job = Job(
                id=row["id"], instance=self.instance,
                action_digest=Digest(row["action_hash"], row["action_size"]),
                action=row["action"],
                requirements=frozenset(tuple(p) for p in json.loads(row["requirements"])),
                priority=row["priority"], cacheable=bool(row["cacheable"]),
                timeout=row["timeout"], queued_at=row["queued_at"], seq=row["seq"],
                stage=Stage(row["stage"]), attempts=row["attempts"], response=row["response"],
                failed_on=set(json.loads(row["failed_on"])), last_failure=row["last_failure"],
                completed_at=row["completed_at"], worker=row["worker"])
            max_seq = max(max_seq, job.seq)
            self.jobs[job.id] = job
            if job.done:
                continue
            if job.cacheable:
                self._by_action[job.action_digest] = job
            holder = self.sessions.get(row["lease_session"] or "")
            if holder is not None and row["lease_state"] in (LeaseState.PENDING,
                                                              LeaseState.ACTIVE):
                lease = Lease(id=row["lease_id"], job=job, session=holder,
                              state=LeaseState(row["lease_state"]), offered_at=moment,
                              delivered=True)
                holder.leases[lease.id] = lease
                job.lease = lease
                job.stage = Stage.EXECUTING
                job.started_at = moment
                self._executing.add(job)
            else:
                job.stage = Stage.QUEUED
                self.queue.push(job)
        self._seq = itertools.count(max_seq + 1)
        for row in state.operations:
            target = self.jobs.get(row["job_id"])
            if target is None:
                self.store.delete_operation(row["name"])
                continue
            operation = Operation(name=row["name"], instance=self.instance, job=target,
                                  created_at=row["created_at"], cancelled=bool(row["cancelled"]),
                                  own_response=row["own_response"])
            self.operations[operation.name] = operation
            if not operation.cancelled:
                target.operations.add(operation.name)
            if operation.done:
                self._expire_later(operation)
        for job in self.jobs.values():
            if job.done and not job.operations:
                self._expire_job_later(job)
        if state.jobs or state.sessions:
            log.info("instance %r: restored %d jobs (%d queued), %d operations, %d bot sessions",
                     self.instance, len(self.jobs), len(self.queue), len(self.operations),
                     len(self.sessions))


def result_any(result: re_pb2.ActionResult) -> AnyProto:
    return AnyProto(type_url=ACTION_RESULT_URL, value=result.SerializeToString())
