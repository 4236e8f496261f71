"""The scheduler's domain objects: jobs, operations, bot sessions and leases.

These are plain in-memory objects.  The `Scheduler` owns them and is the only
code that changes them; every change is handed to the `SchedulerStore` so that
it survives a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from buildfleet.digest import Digest

# A platform requirement or bot capability set: (name, value) pairs.  A name may
# appear several times (multi-valued properties).
Properties = frozenset[tuple[str, str]]


class Stage(IntEnum):
    """ExecutionStage.Value numbers from remote_execution.proto."""

    UNKNOWN = 0
    CACHE_CHECK = 1
    QUEUED = 2
    EXECUTING = 3
    COMPLETED = 4


class LeaseState(IntEnum):
    """LeaseState numbers from bots.proto."""

    UNSPECIFIED = 0
    PENDING = 1
    ACTIVE = 2
    COMPLETED = 4
    CANCELLED = 5


class BotStatus(IntEnum):
    """BotStatus numbers from bots.proto."""

    UNSPECIFIED = 0
    OK = 1
    UNHEALTHY = 2
    HOST_REBOOTING = 3
    BOT_TERMINATING = 4
    INITIALIZING = 5


class Notifier:
    """Wakes every coroutine waiting for the next change of one object."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    def waiter(self) -> asyncio.Event:
        """An event that is set at the next `notify()`; take it before checking state."""
        if self._event is None:
            self._event = asyncio.Event()
        return self._event


@dataclass(eq=False)
class Job:
    """One action to run, shared by every operation that asked for it."""

    id: str
    instance: str
    action_digest: Digest
    action: bytes  # the serialized Action, sent inline in leases
    requirements: Properties
    priority: int
    cacheable: bool
    timeout: float  # seconds; 0 means the scheduler's default
    queued_at: float  # wall-clock time of submission
    seq: int  # submission order, for FIFO among equal priorities
    stage: Stage = Stage.QUEUED
    attempts: int = 0  # leases that ended without a final result
    response: bytes | None = None  # the serialized ExecuteResponse once COMPLETED
    lease: Lease | None = None
    started_at: float | None = None  # monotonic time the current lease started
    unmatched_since: float | None = None  # monotonic time since no live bot matches
    failed_on: set[str] = field(default_factory=set)  # bot ids that failed it
    last_failure: str = ""
    completed_at: float | None = None  # wall-clock time
    operations: set[str] = field(default_factory=set)
    worker: str = ""  # bot id of the lease that produced the result

    @property
    def done(self) -> bool:
        return self.stage == Stage.COMPLETED


@dataclass(eq=False)
class Operation:
    """A client's handle on a job (google.longrunning.Operation)."""

    name: str
    instance: str
    job: Job
    created_at: float
    cancelled: bool = False
    deleted: bool = False
    # The response of this operation when it differs from the job's (cancelled).
    own_response: bytes | None = None
    notifier: Notifier = field(default_factory=Notifier)

    @property
    def done(self) -> bool:
        return self.own_response is not None or self.job.done

    @property
    def response(self) -> bytes | None:
        return self.own_response if self.own_response is not None else self.job.response


@dataclass(eq=False)
class Lease:
    """A job handed to one bot session."""

    id: str
    job: Job
    session: BotSession
    state: LeaseState
    offered_at: float  # monotonic
    # True once the bot has been told about the lease (a response carried it).
    delivered: bool = False


@dataclass
class BotEvent:
    """A PostBotEventTemp record."""

    time: float
    type: str
    message: str


@dataclass(eq=False)
class BotSession:
    """One registered bot (google.devtools.remoteworkers.v1test2.BotSession)."""

    name: str
    instance: str
    bot_id: str
    status: BotStatus
    properties: Properties
    capacity: int
    created_at: float  # wall clock
    last_seen: float  # monotonic: end of the last call, or now while a call is open
    version: int = 0
    closed: bool = False
    close_reason: str = ""
    open_calls: int = 0
    polls: int = 0  # calls of this session waiting in a long-poll
    leases: dict[str, Lease] = field(default_factory=dict)
    # Leases whose end the bot still has to be told about (CANCELLED), by id.
    cancelled: dict[str, Lease] = field(default_factory=dict)
    events: deque[BotEvent] = field(default_factory=lambda: deque(maxlen=100))
    notifier: Notifier = field(default_factory=Notifier)
    worker_proto: bytes = b""  # the Worker message as last sent, echoed back

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - len(self.leases))

    def accepts_work(self) -> bool:
        return not self.closed and self.status in (BotStatus.OK, BotStatus.UNSPECIFIED)

    def property_values(self, key: str) -> list[str]:
        return sorted(v for k, v in self.properties if k == key)


def now() -> float:
    return time.monotonic()
