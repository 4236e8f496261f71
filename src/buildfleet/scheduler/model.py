"""The scheduler's domain values: what the services hand in and get back.

Plain, immutable values with no runtime machinery (no events, no call counts):
each strategy keeps its state its own way (`embedded`: objects in memory,
`replicated`: rows in PostgreSQL) and answers with these.  The enums carry the
numbers of the wire protocols, so they convert to protos by value.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.any_pb2 import Any as AnyProto

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


@dataclass(frozen=True, slots=True)
class ReportedLease:
    """A lease as a bot reports it in UpdateBotSession."""

    id: str
    state: int
    status_code: int = 0
    status_message: str = ""
    result: AnyProto | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """A client's handle on a job (google.longrunning.Operation), as it stands."""

    name: str
    instance: str
    job_id: str
    action_digest: Digest
    stage: Stage  # COMPLETED once the operation is done (also when only it was cancelled)
    response: bytes | None  # the serialized ExecuteResponse once done
    queued_at: float  # wall clock
    created_at: float  # wall clock
    worker: str = ""  # the bot running the action, or the one that ran it
    cancelled: bool = False
    attempts: int = 0  # leases of the job that ended without a final result
    owner: str = ""  # the principal that submitted it ("": authentication is off)
    priority: int = 0  # the job's (REAPI: lower runs sooner)
    # the client's serialized RequestMetadata (rules.invocations), b"" when it sent none
    request_metadata: bytes = b""

    @property
    def done(self) -> bool:
        return self.stage == Stage.COMPLETED


@dataclass(frozen=True, slots=True)
class Lease:
    """A lease as the bot is told of it."""

    id: str
    state: LeaseState
    action_digest: Digest
    action: bytes  # the serialized Action (sent inline unless offers are PENDING)
    requirements: Properties


@dataclass(frozen=True, slots=True)
class BotSession:
    """One registered bot (google.devtools.remoteworkers.v1test2.BotSession)."""

    name: str
    instance: str
    bot_id: str
    status: BotStatus
    properties: Properties
    capacity: int
    held: int = 0  # leases it runs now
    version: int = 0
    worker: bytes = b""  # the Worker message as last sent, echoed back
    created_at: float = 0.0  # wall clock
    owner: str = ""  # the principal that created it ("": authentication is off)
    silent_for: float = 0.0  # seconds since its last call ended (0: in a call now)

    @property
    def free_slots(self) -> int:
        return max(0, self.capacity - self.held)

    def property_values(self, key: str) -> list[str]:
        return sorted(v for k, v in self.properties if k == key)


@dataclass(frozen=True, slots=True)
class BotEvent:
    """A PostBotEventTemp record."""

    time: float
    type: str
    message: str


def random_id() -> str:
    """A new unique id (for jobs, operations, sessions): the default id generator."""
    return str(uuid.uuid4())


@dataclass(frozen=True, slots=True)
class BuildKindCount:
    """The builds of one kind (rules.invocations.build_kind) with work, and their
    actions: queued and running (an action two builds wait for counts for each)."""

    kind: str
    builds: int
    queued: int
    running: int


@dataclass(frozen=True, slots=True)
class QueueGroup:
    """Queued jobs that need the same platform: how many, and since when the oldest."""

    requirements: Properties
    queued: int
    oldest_queued_at: float  # wall-clock seconds
