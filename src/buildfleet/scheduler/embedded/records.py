"""The embedded strategy's state: mutable records in memory, linked to each other.

These are the strategy's own bookkeeping (a job knows its lease, a lease its
session), changed only by `EmbeddedState` on the event loop.  Nothing outside
the strategy sees them: callers get the immutable values of
`buildfleet.scheduler.model`, built by the `view` methods.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from buildfleet.digest import Digest
from buildfleet.scheduler.model import (
    BotEvent,
    BotSession,
    BotStatus,
    Lease,
    LeaseState,
    Operation,
    Properties,
    Stage,
)
from buildfleet.scheduler.rules.timers import MAX_EVENTS


@dataclass(eq=False, slots=True)
class JobRecord:
    """One action to run, shared by every operation that asked for it."""

    id: str
    instance: str
    action_digest: Digest
    action: bytes  # the serialized Action, sent inline in leases
    requirements: Properties
    priority: int
    cacheable: bool
    timeout: float  # the Action's own timeout; 0 when it sets none
    run_limit: float  # seconds it may run (rules.timers.run_limit)
    queued_at: float  # wall clock
    seq: int  # submission order
    stage: Stage = Stage.QUEUED
    attempts: int = 0
    response: bytes | None = None  # the serialized ExecuteResponse once COMPLETED
    lease: LeaseRecord | None = None
    started_at: float | None = None  # monotonic, while leased
    failed_on: set[str] = field(default_factory=set)  # bots that failed it
    retry_at: float | None = None  # monotonic: before it, those bots may not take it
    last_failure: str = ""
    completed_at: float | None = None  # wall clock
    succeeded: bool = False
    operations: set[str] = field(default_factory=set)  # names of operations waiting for it
    builds: set[str] = field(default_factory=set)  # the builds they count towards
    worker: str = ""  # the bot that produced the result

    @property
    def done(self) -> bool:
        return self.stage == Stage.COMPLETED


@dataclass(eq=False, slots=True)
class OperationRecord:
    """A client's handle on a job."""

    name: str
    instance: str
    job: JobRecord
    created_at: float  # wall clock
    cancelled: bool = False
    deleted: bool = False
    own_response: bytes | None = None  # its end when it differs from the job's (cancelled)
    owner: str = ""
    request_metadata: bytes = b""  # the client's (rules.invocations)

    @property
    def done(self) -> bool:
        return self.own_response is not None or self.job.done

    @property
    def response(self) -> bytes | None:
        return self.own_response if self.own_response is not None else self.job.response

    def view(self) -> Operation:
        job = self.job
        done = self.done
        return Operation(
            name=self.name, instance=self.instance, job_id=job.id,
            action_digest=job.action_digest, stage=Stage.COMPLETED if done else job.stage,
            response=self.response if done else None, queued_at=job.queued_at,
            created_at=self.created_at,
            worker=job.lease.session.bot_id if job.lease is not None else job.worker,
            cancelled=self.cancelled, attempts=job.attempts, owner=self.owner,
            priority=job.priority, request_metadata=self.request_metadata)


@dataclass(eq=False, slots=True)
class LeaseRecord:
    """A job handed to one bot session."""

    id: str
    job: JobRecord
    session: SessionRecord
    state: LeaseState
    delivered: bool = False  # a response has carried it to the bot

    def view(self) -> Lease:
        job = self.job
        return Lease(id=self.id, state=self.state, action_digest=job.action_digest,
                     action=job.action, requirements=job.requirements)


@dataclass(eq=False, slots=True)
class SessionRecord:
    """One registered bot."""

    name: str
    instance: str
    bot_id: str
    status: BotStatus
    properties: Properties
    capacity: int
    created_at: float  # wall clock
    last_seen: float  # monotonic: end of its last call
    version: int = 0
    worker: bytes = b""
    owner: str = ""
    closed: bool = False
    open_calls: int = 0  # its calls being served now
    polls: int = 0  # those of them long-polling
    leases: dict[str, LeaseRecord] = field(default_factory=dict)
    # Leases whose end the bot still has to be told of (answered CANCELLED), by id.
    notices: dict[str, LeaseRecord] = field(default_factory=dict)
    events: deque[BotEvent] = field(default_factory=lambda: deque(maxlen=MAX_EVENTS))

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - len(self.leases))

    def view(self, now: float | None = None) -> BotSession:
        """The session as callers see it; with `now` (the monotonic clock), how long it
        has been silent."""
        silent = 0.0 if now is None or self.open_calls else max(0.0, now - self.last_seen)
        return BotSession(name=self.name, instance=self.instance, bot_id=self.bot_id,
                          status=self.status, properties=self.properties,
                          capacity=self.capacity, held=len(self.leases), version=self.version,
                          worker=self.worker, created_at=self.created_at, owner=self.owner,
                          silent_for=silent)
