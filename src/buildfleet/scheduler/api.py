"""What the services ask of a scheduler, whichever strategy keeps its state.

Two strategies answer this protocol with the same behaviour (held to it by the
contract suite, tests/contract): `EmbeddedScheduler` keeps the state in memory
and writes it behind to SQLite (or PostgreSQL for one server);
`ReplicatedScheduler` keeps it in PostgreSQL, shared by several server
replicas.  Both take every decision from the scheduling core
(`buildfleet.scheduler.rules`).  The values in and out are those of
`buildfleet.scheduler.model`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Iterable
from typing import Protocol

from google.longrunning import operations_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
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
)
from buildfleet.scheduler.rules.drains import Drain
from buildfleet.scheduler.rules.observations import Observations
from buildfleet.scheduler.rules.ownership import Caller
from buildfleet.scheduler.rules.throughput import Throughput


class Startable(Protocol):
    async def start(self) -> None: ...

    async def close(self) -> None: ...


class SchedulerAPI(Protocol):
    instance: str
    settings: SchedulerConfig
    # assigned, completed, retried, expired_sessions, abandoned_leases: counted once
    # per event, on the process where it happened.
    stats: Counter[str]
    # How jobs ended, why leases went back, durations: for metrics (rules.observations).
    observations: Observations
    # Jobs finished per slot of the last minutes, grid-wide (rules.throughput; the
    # replicated strategy's: a tick old).
    throughput: Throughput

    @property
    def store(self) -> Startable: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    # -- clients
    def check_timeout(self, action: re_pb2.Action) -> float: ...

    async def submit(self, action_digest: Digest, action: re_pb2.Action,
                     requirements: Properties, *, priority: int = 0,
                     skip_cache_lookup: bool = False, owner: str = "",
                     request_metadata: bytes = b"") -> Operation: ...

    async def record_cache_hit(self, action_digest: Digest, result: re_pb2.ActionResult,
                               owner: str = "", request_metadata: bytes = b"") -> Operation: ...

    # A `caller` sees only its own operations unless it is an admin (NotFound, as for
    # one that does not exist); None: anyone (authentication is off).
    async def get_operation(self, name: str, caller: Caller | None = None) -> Operation: ...

    # `running_only`: only those not done yet (no done ones are read back).
    async def list_operations(self, caller: Caller | None = None, *,
                              running_only: bool = False) -> list[Operation]: ...

    def watch(self, operation: Operation) -> AsyncIterator[operations_pb2.Operation]: ...

    async def cancel_operation(self, name: str, caller: Caller | None = None) -> None: ...

    async def delete_operation(self, name: str, caller: Caller | None = None) -> None: ...

    async def queue_length(self) -> int: ...

    # -- bots
    # A bot session is driven only by the principal that created it (or an admin):
    # PermissionDenied for any other `caller`.
    async def create_session(self, bot_id: str, *, status: BotStatus, properties: Properties,
                             capacity: int, worker: bytes = b"", owner: str = "",
                             caller: Caller | None = None) -> BotSession: ...

    async def update_session(self, name: str, *, bot_id: str, status: BotStatus,
                             leases: list[ReportedLease], properties: Properties | None = None,
                             capacity: int | None = None, worker: bytes | None = None,
                             wait: float = 0.0, caller: Caller | None = None
                             ) -> tuple[BotSession, list[Lease]]: ...

    async def get_session(self, name: str) -> BotSession: ...

    async def post_event(self, name: str, event_type: str, message: str,
                         caller: Caller | None = None) -> BotEvent: ...

    async def bot_events(self, bot_id: str) -> list[BotEvent]: ...

    def is_polling(self, name: str) -> bool: ...

    def polling(self) -> int: ...

    def live_sessions(self) -> Iterable[BotSession]: ...

    def connected_bots(self) -> int: ...

    # -- drains (rules.drains): bots matching a stored pattern take no new work.
    # InvalidArgument for a malformed pattern; adding one that exists changes nothing.
    async def add_drain(self, pattern: str) -> Drain: ...

    async def remove_drain(self, pattern: str) -> bool: ...  # False: there was none

    def drains(self) -> list[Drain]: ...  # (the replicated strategy's: a tick old)

    def is_drained(self, session: BotSession) -> bool: ...

    # -- views (for metrics; the replicated strategy's are a housekeeping tick old)
    def queue_groups(self) -> list[QueueGroup]: ...

    def build_kinds(self) -> list[BuildKindCount]: ...

    def executing(self) -> int: ...

    # -- time
    async def housekeep(self) -> None: ...
