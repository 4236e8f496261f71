"""The embedded strategy's state, and the changes that apply the core's decisions.

Everything here is synchronous and runs on the event loop, so no locks are
needed.  The rules come from `buildfleet.scheduler.rules`; this module only
keeps the indices that make them cheap to apply (the queue, the jobs in flight
by action, the long-polling sessions ...) and hands every change to the
`SchedulerStore`, which writes it behind.  Wake-ups go through the two
callbacks, so that waiting (asyncio) stays in `scheduler.py`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping

from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.scheduler.embedded.queue import JobQueue
from buildfleet.scheduler.embedded.records import (
    JobRecord,
    LeaseRecord,
    OperationRecord,
    SessionRecord,
)
from buildfleet.scheduler.embedded.store import SchedulerStore
from buildfleet.scheduler.model import BotStatus, LeaseState, Properties, Stage
from buildfleet.scheduler.rules import outcomes, reports, submissions, timers
from buildfleet.scheduler.rules.drains import Drain, drained
from buildfleet.scheduler.rules.invocations import build_key
from buildfleet.scheduler.rules.matching import (
    lease_id,
    may_take,
    may_yet_work,
    qualified,
    retry_delay,
    satisfies,
    takes_work,
)
from buildfleet.scheduler.rules.observations import Observations, Outcome
from buildfleet.scheduler.rules.outcomes import Completion, Requeue
from buildfleet.scheduler.rules.throughput import Throughput

log = logging.getLogger(__name__)

CLOSED_MEMORY = 10_000  # closed session names remembered for clear error messages
OPERATION, JOB = 0, 1  # kinds of entries in EmbeddedState.expiry


class EmbeddedState:
    """Jobs, operations and bot sessions of one instance, in memory."""

    def __init__(self, instance: str, settings: SchedulerConfig, store: SchedulerStore, *,
                 clock: Callable[[], float], wall: Callable[[], float],
                 new_id: Callable[[], str], wake_session: Callable[[SessionRecord], None],
                 wake_job: Callable[[JobRecord], None]) -> None:
        self.instance = instance
        self.settings = settings
        self.store = store
        self.clock = clock  # monotonic: session silence, lease start, back-off
        self.wall = wall  # wall clock: stored times, retention
        self.new_id = new_id
        self._wake_session = wake_session
        self._wake_job = wake_job
        self.jobs: dict[str, JobRecord] = {}
        self.operations: dict[str, OperationRecord] = {}
        self.sessions: dict[str, SessionRecord] = {}
        # Actions each build runs now (rules.invocations.build_key), for fair shares.
        self.running_builds: Counter[str] = Counter()
        self.queue = JobQueue(settings.fairness_share,
                              running=self.running_of if settings.fair_builds else None,
                              limit=settings.max_running_per_build)
        self.by_bot_id: dict[str, SessionRecord] = {}
        self.in_flight: dict[Digest, JobRecord] = {}  # unfinished cacheable jobs by action
        # Cacheable jobs that just succeeded, by action, in the order they did.
        self.recent: OrderedDict[Digest, JobRecord] = OrderedDict()
        self.executing: set[JobRecord] = set()
        self.waiting: dict[str, SessionRecord] = {}  # long-polling with free slots
        self.deferred: dict[str, JobRecord] = {}  # queued, only for bots that failed them
        self.closed: OrderedDict[str, str] = OrderedDict()  # session name -> reason
        self.unmatched_since: dict[Properties, float] = {}
        self.seq = itertools.count()
        # Job id or operation name -> `store.queued` right after it was saved done:
        # what a done snapshot waits for before a client is told.
        self.done_marks: dict[str, int] = {}
        # What may be forgotten once the retention period has passed, oldest first:
        # (ended at, OPERATION, name) for done operations, (completed at, JOB, id) for
        # done jobs no operation refers to.  Re-checked when due; stale ones cost a pop.
        self.expiry: list[tuple[float, int, str]] = []
        # Done operations in memory, in the order they ended: `retire` lets the oldest
        # go once there are more than the settings keep (the store still has them).
        self.finished: OrderedDict[str, None] = OrderedDict()
        self.stats: Counter[str] = Counter()
        self.observations = Observations()
        self.throughput = Throughput()
        self.drains: dict[str, Drain] = {}  # pattern -> drain

    # ------------------------------------------------------------------- drains
    def takes_work(self, session: SessionRecord) -> bool:
        """Whether the session may be offered work: its status, and no drain."""
        return takes_work(session.status) and not (
            self.drains and drained(session.bot_id, session.properties, self.drains))

    def add_drain(self, pattern: str) -> Drain:
        drain = self.drains.get(pattern)
        if drain is None:
            drain = self.drains[pattern] = Drain(pattern, self.wall())
            self.store.save_drain(self.instance, drain)
            for session in list(self.waiting.values()):  # idle bots it drains stop waiting
                if not self.takes_work(session):
                    self.waiting.pop(session.name, None)
        return drain

    def remove_drain(self, pattern: str) -> bool:
        if self.drains.pop(pattern, None) is None:
            return False
        self.store.delete_drain(self.instance, pattern)
        for session in self.sessions.values():  # their next poll may bring work
            if not session.closed:
                self._wake_session(session)
        return True

    # ----------------------------------------------------------------- submissions
    def submit(self, action_digest: Digest, action: bytes, requirements: Properties, *,
               priority: int, timeout: float, cacheable: bool, skip_cache_lookup: bool,
               owner: str = "", request_metadata: bytes = b"") -> OperationRecord:
        job = self._joinable(action_digest, skip_cache_lookup) if cacheable else None
        if job is None:
            submissions.check_room(self.instance, len(self.queue), self.settings.max_queued)
            job = JobRecord(
                id=self.new_id(), instance=self.instance, action_digest=action_digest,
                action=action, requirements=requirements, priority=priority,
                cacheable=cacheable, timeout=timeout,
                run_limit=timers.run_limit(timeout, self.settings), queued_at=self.wall(),
                seq=next(self.seq),
                builds={build_key(request_metadata, owner, self.settings.fair_share_by)})
            self.jobs[job.id] = job
            if cacheable:
                self.in_flight[action_digest] = job
            self.store.save_job(job)
            self.dispatch(job)
        else:
            self.observations.deduplicated += 1
            if not job.done:
                raised = submissions.joined_priority(job.priority, priority)
                if raised != job.priority:
                    job.priority = raised
                    self.queue.reprioritize(job)
                    self.store.save_job(job)
        return self.new_operation(job, owner, request_metadata)

    def _joinable(self, action_digest: Digest, skip_cache_lookup: bool) -> JobRecord | None:
        job = self.in_flight.get(action_digest)
        if job is not None:
            return job
        job = self.recent.get(action_digest)
        if job is not None and job.completed_at is not None and timers.answers_resubmission(
                job.completed_at, self.wall(), skip_cache_lookup=skip_cache_lookup):
            return job
        return None

    def cache_hit(self, action_digest: Digest, response: bytes, owner: str = "",
                  request_metadata: bytes = b"") -> OperationRecord:
        """A done operation answered from the action cache."""
        now = self.wall()
        job = JobRecord(id=self.new_id(), instance=self.instance, action_digest=action_digest,
                        action=b"", requirements=frozenset(), priority=0, cacheable=True,
                        timeout=0, run_limit=0, queued_at=now, seq=next(self.seq),
                        stage=Stage.COMPLETED, response=response, completed_at=now)
        self.jobs[job.id] = job
        self.store.save_job(job)
        self.observations.ended(Outcome.CACHE_HIT)
        return self.new_operation(job, owner, request_metadata)

    def new_operation(self, job: JobRecord, owner: str = "",
                      request_metadata: bytes = b"") -> OperationRecord:
        name = qualified(self.instance, f"operations/{self.new_id()}")
        operation = OperationRecord(name=name, instance=self.instance, job=job,
                                    created_at=self.wall(), owner=owner,
                                    request_metadata=request_metadata)
        self.operations[name] = operation
        job.operations.add(name)
        if not job.done:
            self.join_build(job, build_key(request_metadata, owner,
                                           self.settings.fair_share_by))
        self.store.save_operation(operation)
        if job.done:  # a cache hit, or a job that just succeeded: done from the start
            self.done_marks[name] = self.store.queued  # (it stays in memory until stored)
            self.expire_later(operation)
        return operation

    def operation(self, name: str) -> OperationRecord | None:
        return self.operations.get(name)

    def cancel_operation(self, operation: OperationRecord) -> None:
        """Cancel one operation; its job stops when no operation still wants it."""
        if operation.done:
            return
        operation.cancelled = True
        operation.own_response = outcomes.operation_cancelled()
        job = operation.job
        job.operations.discard(operation.name)
        self.store.save_operation(operation)
        self.done_marks[operation.name] = self.store.queued
        self.expire_later(operation)
        self._wake_job(job)
        if not job.operations:
            self.cancel_job(job)

    def cancel_job(self, job: JobRecord) -> None:
        if job.done:
            return
        self.queue.remove(job)
        if job.lease is not None:
            self.cancel_lease(job.lease)
        self.complete(job, outcomes.job_cancelled(), outcome=Outcome.CANCELLED)

    def delete_operation(self, operation: OperationRecord) -> None:
        """Forget an operation (the action itself keeps running for other waiters)."""
        del self.operations[operation.name]
        self.finished.pop(operation.name, None)
        operation.deleted = True
        job = operation.job
        job.operations.discard(operation.name)
        self.store.delete_operation(operation.name)
        self._wake_job(job)
        if job.done and not job.operations:
            self.forget_job(job)

    def forget_job(self, job: JobRecord) -> None:
        self.jobs.pop(job.id, None)
        if self.recent.get(job.action_digest) is job:
            del self.recent[job.action_digest]
        self.store.delete_job(job.id)

    # ----------------------------------------------------------------- leases
    def dispatch(self, job: JobRecord) -> None:
        """Lease `job` to a long-polling bot that may run it, or queue it."""
        now = self.clock()
        for session in self.waiting.values():
            if (session.free_slots and self.takes_work(session)
                    and satisfies(session.properties, job.requirements)
                    and self.may_run(job, session, now)):
                self.lease(job, session)
                self.waiting.pop(session.name, None)
                self._wake_session(session)
                return
        self.queue.push(job)
        if job.failed_on and job.retry_at is not None and job.retry_at > now:
            self.deferred[job.id] = job  # offered again once the back-off is over

    def may_run(self, job: JobRecord, session: SessionRecord, now: float) -> bool:
        if not job.failed_on:
            return True
        return may_take(bot_id=session.bot_id, failed_on=job.failed_on, retry_at=job.retry_at,
                        now=now, others_could=lambda: self._others_could(job, session, now))

    def _others_could(self, job: JobRecord, session: SessionRecord, now: float) -> bool:
        return any(other is not session and other.bot_id not in job.failed_on
                   and may_yet_work(other.status) and self.is_live(other, now)
                   and satisfies(other.properties, job.requirements)
                   for other in self.by_bot_id.values())

    # ------------------------------------------------------------- fair shares
    def running_of(self, build: str) -> int:
        """How many actions `build` runs now."""
        return self.running_builds.get(build, 0)

    def started(self, job: JobRecord) -> None:
        self.executing.add(job)
        for build in job.builds or ("",):
            self.running_builds[build] += 1

    def stopped(self, job: JobRecord) -> None:
        """`job` no longer runs (it ended, went back to the queue, or lost its lease)."""
        if job not in self.executing:
            return
        self.executing.discard(job)
        for build in job.builds or ("",):
            self.running_builds[build] -= 1
            if self.running_builds[build] <= 0:
                del self.running_builds[build]
            self.queue.build_changed(build)

    def join_build(self, job: JobRecord, build: str) -> None:
        """`build` waits for `job` too (a deduplicated submission): the job counts
        towards it from now on."""
        if build in job.builds:
            return
        if not job.builds and job in self.executing:  # counted as the anonymous build
            self.running_builds[""] -= 1
            if self.running_builds[""] <= 0:
                del self.running_builds[""]
        job.builds.add(build)
        if job in self.executing:
            self.running_builds[build] += 1
        else:
            self.queue.joined(job, build)

    def assign(self, session: SessionRecord) -> list[LeaseRecord]:
        """Lease queued work to the session up to its capacity."""
        leases: list[LeaseRecord] = []
        if session.closed or not self.takes_work(session):
            return leases
        now = self.clock()
        while session.free_slots:
            job = self.queue.pop_for(session.properties,
                                     lambda candidate: self.may_run(candidate, session, now))
            if job is None:
                break
            leases.append(self.lease(job, session))
        return leases

    def lease(self, job: JobRecord, session: SessionRecord) -> LeaseRecord:
        state = LeaseState.PENDING if self.settings.offer_pending else LeaseState.ACTIVE
        lease = LeaseRecord(id=lease_id(self.instance, job.id, job.attempts), job=job,
                            session=session, state=state)
        session.leases[lease.id] = lease
        job.lease = lease
        job.stage = Stage.EXECUTING
        job.started_at = self.clock()
        self.deferred.pop(job.id, None)
        self.started(job)
        self.stats["assigned"] += 1
        self.store.save_job(job)
        self._wake_job(job)
        return lease

    def redispatch_deferred(self, now: float) -> None:
        """Offer again the jobs whose back-off is over (a bot that failed one may be
        long-polling for it)."""
        for job in [job for job in self.deferred.values()
                    if job.retry_at is None or job.retry_at <= now]:
            del self.deferred[job.id]
            if self.queue.remove(job):
                self.dispatch(job)

    def cancel_lease(self, lease: LeaseRecord) -> None:
        """Tell the bot holding `lease` to stop; its later result is ignored."""
        session, job = lease.session, lease.job
        session.leases.pop(lease.id, None)
        if job.lease is lease:
            job.lease = None
            self.stopped(job)
        lease.state = LeaseState.CANCELLED
        if not session.closed:
            session.notices[lease.id] = lease
            self._wake_session(session)

    def finish(self, lease: LeaseRecord, outcome: Completion | Requeue) -> None:
        """Apply the settled outcome of a lease the bot reported COMPLETED."""
        if isinstance(outcome, Requeue):
            self.requeue(lease, outcome)
            return
        job = lease.job
        lease.session.leases.pop(lease.id, None)
        if job.lease is not lease or job.done:
            return  # cancelled or timed out while the result was being stored
        self.complete(job, outcome.response, worker=outcome.worker,
                      succeeded=outcome.succeeded, outcome=outcome.outcome)
        self.stats["completed"] += 1

    def requeue(self, lease: LeaseRecord, requeue: Requeue) -> None:
        """Take a lease back and queue its job again (or fail it when out of attempts)."""
        job = lease.job
        lease.session.leases.pop(lease.id, None)
        if job.lease is not lease or job.done:
            return
        job.lease = None
        job.started_at = None
        self.stopped(job)
        if requeue.failed_by:
            job.failed_on.add(requeue.failed_by)
        after = outcomes.requeued(requeue, attempts=job.attempts, last_failure=job.last_failure,
                                  max_attempts=self.settings.max_attempts)
        job.attempts, job.last_failure = after.attempts, after.last_failure
        if requeue.count_attempt:
            self.stats["retried"] += 1
        self.observations.requeues[requeue.cause] += 1
        if after.final is not None:
            self.complete(job, after.final, outcome=Outcome.FAILED)
            return
        if requeue.failed_by:
            job.retry_at = self.clock() + retry_delay(job.attempts, self.settings)
        log.info("requeueing %s: %s", job.action_digest, requeue.reason)
        job.stage = Stage.QUEUED
        self.store.save_job(job)
        self._wake_job(job)
        self.dispatch(job)

    def complete(self, job: JobRecord, response: bytes, *, outcome: Outcome,
                 worker: str = "", succeeded: bool = False) -> None:
        self.observations.ended(outcome, response)
        job.stage = Stage.COMPLETED
        job.response = response
        job.completed_at = self.wall()
        self.throughput.note(job.completed_at)
        job.succeeded = succeeded
        if worker:
            job.worker = worker
        if job.lease is not None:
            job.lease.session.leases.pop(job.lease.id, None)
            job.lease = None
        job.started_at = None
        self.stopped(job)
        self.queue.remove(job)
        self.deferred.pop(job.id, None)
        if self.in_flight.get(job.action_digest) is job:
            del self.in_flight[job.action_digest]
        if succeeded and job.cacheable:
            self.recent[job.action_digest] = job
            self.recent.move_to_end(job.action_digest)
        self.store.save_job(job)
        self.done_marks[job.id] = self.store.queued
        self.expire_job_later(job)
        self._wake_job(job)

    # ----------------------------------------------------------------- sessions
    def open_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                     capacity: int, worker: bytes, owner: str = "") -> SessionRecord:
        """Register a bot; an older session of the same bot_id is closed."""
        old = self.by_bot_id.get(bot_id)
        if old is not None:
            self.close_session(old, f"bot {bot_id!r} opened a new session", count_attempt=True)
        session = SessionRecord(
            name=qualified(self.instance, self.new_id()), instance=self.instance,
            bot_id=bot_id, status=reports.status_after(BotStatus.OK, status),
            properties=properties, capacity=capacity, created_at=self.wall(),
            last_seen=self.clock(), worker=worker, owner=owner)
        self.sessions[session.name] = session
        self.by_bot_id[bot_id] = session
        self.store.save_session(session)
        return session

    def live_session(self, name: str) -> SessionRecord:
        """The open session `name`; InvalidArgument (register again) otherwise."""
        session = self.sessions.get(name)
        if session is None or session.closed:
            raise reports.reregister(name, self.closed.get(name))
        return session

    def is_live(self, session: SessionRecord, now: float) -> bool:
        """Not closed, and in a call or heard from within the keepalive window."""
        return not session.closed and (session.open_calls > 0
                                       or now - session.last_seen <= self.settings.keepalive)

    def live_sessions(self) -> Iterator[SessionRecord]:
        now = self.clock()
        return (session for session in self.sessions.values() if self.is_live(session, now))

    def apply_status(self, session: SessionRecord, *, status: BotStatus,
                     properties: Properties | None, capacity: int | None,
                     worker: bytes | None) -> None:
        """What the bot says of itself; stored when it changed."""
        before = (session.status, session.properties, session.capacity, session.worker)
        session.status = reports.status_after(session.status, status)
        if properties is not None:
            session.properties = properties
        if capacity is not None:
            session.capacity = capacity
        if worker is not None:
            session.worker = worker
        if (session.status, session.properties, session.capacity, session.worker) != before:
            self.store.save_session(session)

    def apply_report(self, session: SessionRecord, report: reports.Reconciliation,
                     settled: Mapping[str, Completion | Requeue]) -> None:
        """Apply a reconciled report; completions with their settled outcomes."""
        for completed in report.completed:
            lease = session.leases.get(completed.id)
            outcome = settled.get(completed.id)
            if lease is not None and outcome is not None:
                self.finish(lease, outcome)
        for lease_id_ in report.given_back:
            lease = session.leases.get(lease_id_)
            if lease is not None:
                self.requeue(lease, Requeue("the bot gave the lease back", cause="given_back"))
        for lease_id_ in report.started:
            lease = session.leases.get(lease_id_)
            if lease is not None and lease.state == LeaseState.PENDING:
                lease.state = LeaseState.ACTIVE
                lease.job.started_at = self.clock()
                self.store.save_job(lease.job)
        for lease_id_ in report.acknowledged:
            session.notices.pop(lease_id_, None)

    def answer(self, session: SessionRecord) -> list[LeaseRecord]:
        """The leases to send back: every lease held (now delivered) and, once, the
        cancelled ones the bot has not been told of."""
        leases = list(session.leases.values())
        for lease in leases:
            lease.delivered = True
        if session.notices:
            leases.extend(session.notices.values())
            session.notices.clear()  # told once; afterwards the lease is simply absent
        return leases

    def abandon_leases(self, session: SessionRecord) -> None:
        """The bot went silent holding leases: they go back to the queue."""
        reason = timers.abandoned_reason(session.bot_id, self.settings)
        for lease in list(session.leases.values()):
            self.stats["abandoned_leases"] += 1
            self.requeue(lease, Requeue(reason, failed_by=session.bot_id,
                                        cause="lease_timeout"))

    def close_session(self, session: SessionRecord, reason: str, *, count_attempt: bool) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.name, None)
        if self.by_bot_id.get(session.bot_id) is session:
            del self.by_bot_id[session.bot_id]
        self.waiting.pop(session.name, None)
        self.closed[session.name] = reason
        while len(self.closed) > CLOSED_MEMORY:
            self.closed.popitem(last=False)
        for lease in list(session.leases.values()):
            self.requeue(lease, Requeue(f"bot {session.bot_id}: {reason}",
                                        count_attempt=count_attempt, cause="session_closed"))
        session.notices.clear()
        self.store.delete_session(session.name)
        self._wake_session(session)
        log.info("closed bot session %s of %s: %s", session.name, session.bot_id, reason)

    # ----------------------------------------------------------------- retention
    def expire_later(self, operation: OperationRecord) -> None:
        """Note a done operation, to be forgotten once the retention period has passed."""
        ended = timers.operation_ended(created_at=operation.created_at,
                                       own_end=operation.own_response is not None,
                                       job_completed_at=operation.job.completed_at)
        if ended is not None:
            heapq.heappush(self.expiry, (ended, OPERATION, operation.name))
            self.finished[operation.name] = None

    def retire(self, keep: int) -> int:
        """Let done operations beyond the newest `keep` leave memory, once what they
        show is durable (the scheduler reads them back from the store), with their
        jobs when no operation in memory is left on them.  How many left."""
        retired = 0
        while len(self.finished) > keep:
            name = next(iter(self.finished))
            operation = self.operations.get(name)
            if operation is not None and operation.done:
                job = operation.job
                marks = self.done_marks
                if max(marks.get(name, 0), marks.get(job.id, 0)) > self.store.durable:
                    break  # not durable yet: the next pass
                del self.operations[name]
                job.operations.discard(name)
                if job.done and not job.operations and self.recent.get(job.action_digest) \
                        is not job:
                    self.jobs.pop(job.id, None)
                retired += 1
            del self.finished[name]
        if retired and len(self.expiry) > 2 * (len(self.finished) + keep) + 1024:
            self._rebuild_expiry()
        return retired

    def _rebuild_expiry(self) -> None:
        """The retention heap without the entries of operations that left memory."""
        entries: list[tuple[float, int, str]] = []
        for ended, kind, key in self.expiry:
            if kind == JOB and key in self.jobs or kind == OPERATION and key in self.operations:
                entries.append((ended, kind, key))
        heapq.heapify(entries)
        self.expiry = entries

    def expire_job_later(self, job: JobRecord) -> None:
        """Note a job that just finished: it is forgotten with its operations, or by
        itself when none refers to it."""
        for name in job.operations:
            operation = self.operations.get(name)
            if operation is not None:
                self.expire_later(operation)
        if not job.operations:
            heapq.heappush(self.expiry, (job.completed_at or 0.0, JOB, job.id))
