"""The Remote Workers API Bots service (google.devtools.remoteworkers.v1test2.Bots).

Bots register with CreateBotSession and then call UpdateBotSession in a loop:
each call reports the state of the bot's leases and long-polls for new work.
This module only translates between the wire messages and the scheduler
(buildfleet.scheduler); every decision is the scheduler's.

`BotsService` serves several instances, each with its own scheduler, and routes
by the instance part of a request (`parent`, or the session name's prefix).
`UninstancedBotsService` hands every call to one scheduler whatever instance
name the bot gives.  What real bots send and expect is written down in the
project's wire contract; the translation below follows it:

- properties come from `worker.properties` and from every device's properties;
  empty keys are ignored and empty values kept;
- `capacity` (a worker config) is the number of leases a bot runs at once,
  1 when absent, INVALID_ARGUMENT when not a positive integer;
- a lease status left UNSET counts as OK;
- `version` is ours to set; whatever a bot echoes is ignored.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypedDict

import grpc
from google.protobuf.empty_pb2 import Empty
from google.rpc import status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from buildfleet.client import logstreams
from buildfleet.errors import InvalidArgument, PermissionDenied
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import (
    BotSession,
    BotStatus,
    Lease,
    LeaseState,
    Properties,
    ReportedLease,
)
from buildfleet.scheduler.protos import ACTION_URL, DIGEST_URL
from buildfleet.server import principal
from buildfleet.server.logstream.store import LogStreams
from buildfleet.server.rpc import add_service, rpc

__all__ = ["BaseBotsService", "BotMetrics", "BotsService", "UninstancedBotsService"]

UNKNOWN_LABEL = "unknown"
MIN_POLL = 0.05  # below this much remaining deadline, answer at once
LONG_POLL_FRACTION = 0.8  # share of a call's deadline a long-poll may use
MAX_CAPACITY = 10_000  # leases one bot may hold at once
MAX_EVENT_MESSAGE = 4096  # characters of a PostBotEventTemp message that are kept


class BotMetrics(TypedDict):
    """Counts over a scheduler's live bot sessions, keyed by bot status.

    `bots_total`: sessions per status, every status present (zero included).
    `bots_per_property_label`: sessions per (status, label), where the label is
    the value of the configured property key (OSFamily by default) or "unknown".
    `available_capacity_total` / `available_capacity_per_property_label`: the
    same with free lease slots instead of sessions.
    """

    bots_total: dict[BotStatus, int]
    bots_per_property_label: dict[tuple[BotStatus, str], int]
    available_capacity_total: dict[BotStatus, int]
    available_capacity_per_property_label: dict[tuple[BotStatus, str], int]


def instance_of_session(name: str) -> str:
    """The instance part of a session name `<instance>/<id>` ("" when there is none)."""
    return name.rsplit("/", 1)[0] if "/" in name else ""


def worker_properties(worker: worker_pb2.Worker) -> Properties:
    """Every (key, value) a bot advertises, from the worker and from its devices."""
    pairs = {(p.key, p.value) for p in worker.properties if p.key}
    for device in worker.devices:
        pairs.update((p.key, p.value) for p in device.properties if p.key)
    return frozenset(pairs)


def worker_capacity(worker: worker_pb2.Worker) -> int:
    """The `capacity` config: how many leases the bot runs at once (default 1)."""
    values = [c.value for c in worker.configs if c.key == "capacity"]
    if not values:
        return 1
    text = values[-1].strip()
    # ASCII digits only: str.isdigit() also accepts digits int() refuses ("²"), and
    # a bounded length keeps int() away from its limit on huge numbers.
    if not (text.isascii() and text.isdigit() and len(text) <= 9) or int(text) < 1:
        raise InvalidArgument(
            f"worker config capacity={values[-1]!r:.40} is not a positive whole number")
    if int(text) > MAX_CAPACITY:
        raise InvalidArgument(
            f"worker config capacity={text} is more than the {MAX_CAPACITY} leases a bot "
            "may run at once")
    return int(text)


def _lease_proto(lease: Lease, offer_pending: bool) -> bots_pb2.Lease:
    """A lease as sent to the bot: ACTIVE with the Action inline, or PENDING with its digest."""
    message = bots_pb2.Lease(id=lease.id, state=int(lease.state))  # type: ignore[arg-type]
    if lease.state == LeaseState.CANCELLED:
        return message
    if offer_pending:
        digest = lease.action_digest
        payload = re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)
        message.payload.type_url = DIGEST_URL
        message.payload.value = payload.SerializeToString()
    else:
        message.payload.type_url = ACTION_URL
        message.payload.value = lease.action
    for key, value in sorted(lease.requirements):
        message.requirements.properties.add(key=key, value=value)
    return message


def _reported(lease: bots_pb2.Lease) -> ReportedLease:
    status = lease.status if lease.HasField("status") else status_pb2.Status()
    return ReportedLease(
        id=lease.id, state=lease.state, status_code=status.code, status_message=status.message,
        result=lease.result if lease.HasField("result") else None)


MAX_RUNS = 100_000  # leases whose streams are remembered (the oldest forgotten first)


class BaseBotsService:
    """What both Bots services share: translation and the bot queries."""

    logs: LogStreams | None = None  # set to stream the output of running actions
    _runs: OrderedDict[str, tuple[str, str]]  # lease id -> (instance, action "hash/size")
    _run_of: dict[tuple[str, str], str]  # (instance, action) -> the lease running it

    def _end_run(self, lease_id: str) -> None:
        run = self._runs.pop(lease_id, None)
        if run is not None:
            if self._run_of.get(run) == lease_id:
                del self._run_of[run]
            assert self.logs is not None
            self.logs.end_action(*run)

    def _output_streams(self, instance_name: str, reported: Iterable[bots_pb2.Lease],
                        leases: Iterable[Lease], context: grpc.aio.ServicerContext) -> None:
        """End the streams of reported leases; give the bot those of its new ones."""
        logs = self.logs
        if logs is None:
            return
        runs = self._runs
        for report in reported:
            if report.state == bots_pb2.LeaseState.COMPLETED and report.id in runs:
                self._end_run(report.id)
        wanted = any(key == logstreams.WANTED for key, _ in
                     (context.invocation_metadata() or ()))
        told: dict[str, tuple[str, str]] = {}
        for lease in leases:
            if lease.state == LeaseState.CANCELLED and lease.id in runs:
                self._end_run(lease.id)  # readers of a cancelled action end
            if lease.state not in (LeaseState.ACTIVE, LeaseState.PENDING) or lease.id in runs:
                continue
            run = (instance_name, f"{lease.action_digest.hash}/{lease.action_digest.size_bytes}")
            earlier = self._run_of.get(run)
            if earlier is not None:  # a retry: the failed run's streams end
                self._end_run(earlier)
            runs[lease.id] = run
            self._run_of[run] = lease.id
            while len(runs) > MAX_RUNS:
                forgotten, old = runs.popitem(last=False)
                if self._run_of.get(old) == forgotten:
                    del self._run_of[old]
            output = logs.for_action(*run) if wanted else None
            if output is not None:
                told[lease.id] = (output.stdout[1], output.stderr[1])
        if told:  # see buildfleet.client.logstreams
            context.set_trailing_metadata(((logstreams.KEY, logstreams.encode(told)),))

    def _scheduler_for(self, instance_name: str) -> SchedulerAPI:
        raise NotImplementedError

    def _session_proto(self, scheduler: SchedulerAPI, session: BotSession, leases: Iterable[Lease],
                       worker: worker_pb2.Worker | None) -> bots_pb2.BotSession:
        message = bots_pb2.BotSession(
            name=session.name, bot_id=session.bot_id,
            status=int(session.status),  # type: ignore[arg-type]
            version=str(session.version))
        if worker is not None:
            message.worker.CopyFrom(worker)
        elif session.worker:
            message.worker.ParseFromString(session.worker)
        offer_pending = scheduler.settings.offer_pending
        message.leases.extend(_lease_proto(lease, offer_pending) for lease in leases)
        message.expire_time.FromNanoseconds(
            int((time.time() + scheduler.settings.keepalive) * 1e9))
        return message

    async def _create(self, request: bots_pb2.CreateBotSessionRequest,
                      scheduler: SchedulerAPI) -> bots_pb2.BotSession:
        body = request.bot_session
        if not body.bot_id:
            raise InvalidArgument("bot_session.bot_id is required")
        if body.status not in BotStatus._value2member_map_:
            raise InvalidArgument(f"bot_session.status {body.status} is not a BotStatus")
        session = await scheduler.create_session(
            body.bot_id, status=BotStatus(body.status),
            properties=worker_properties(body.worker), capacity=worker_capacity(body.worker),
            worker=body.worker.SerializeToString(), owner=principal.owner(),
            caller=principal.caller_on(request.parent))
        return self._session_proto(scheduler, session, [], body.worker)

    async def _update(self, request: bots_pb2.UpdateBotSessionRequest,
                      context: grpc.aio.ServicerContext,
                      scheduler: SchedulerAPI) -> bots_pb2.BotSession:
        body = request.bot_session
        if body.name and body.name != request.name:
            raise InvalidArgument(
                f"request name {request.name!r} differs from bot_session.name {body.name!r}")
        if body.status not in BotStatus._value2member_map_:
            raise InvalidArgument(f"bot_session.status {body.status} is not a BotStatus")
        has_worker = body.HasField("worker")
        remaining = context.time_remaining()
        if remaining is None:
            wait = scheduler.settings.long_poll
        else:
            # Keep a margin for the answer to travel back before the deadline.
            wait = min(remaining * LONG_POLL_FRACTION, remaining - 0.2)
            wait = 0.0 if wait < MIN_POLL else wait
        try:
            session, leases = await scheduler.update_session(
                request.name, bot_id=body.bot_id, status=BotStatus(body.status),
                leases=[_reported(lease) for lease in body.leases],
                properties=worker_properties(body.worker) if has_worker else None,
                capacity=worker_capacity(body.worker) if has_worker else None,
                worker=body.worker.SerializeToString() if has_worker else None,
                wait=wait, caller=principal.caller_on(instance_of_session(request.name)))
        except (InvalidArgument, PermissionDenied):
            scheduler.observations.reports_refused += 1  # malformed, closed, or not the bot's
            raise
        self._output_streams(session.instance, body.leases, leases, context)
        return self._session_proto(scheduler, session, leases,
                                   body.worker if has_worker else None)

    async def _post_event(self, request: bots_pb2.PostBotEventTempRequest,
                          scheduler: SchedulerAPI) -> Empty:
        names = bots_pb2.PostBotEventTempRequest.Type
        kind = names.Name(request.type) if request.type in names.values() else str(request.type)
        message = request.msg
        if len(message) > MAX_EVENT_MESSAGE:  # kept per session and logged: bounded
            message = (f"{message[:MAX_EVENT_MESSAGE]}... "
                       f"({len(message) - MAX_EVENT_MESSAGE} more characters dropped)")
        await scheduler.post_event(request.name, kind, message,
                                   principal.caller_on(instance_of_session(request.name)))
        return Empty()

    def query_connected_bots_for_instance(self, instance_name: str) -> int:
        """How many bot sessions of the instance are live right now.

        Live: not closed, and either in a call or heard from within the keepalive window.
        """
        return self._scheduler_for(instance_name).connected_bots()

    def get_bot_status_metrics(self, instance_name: str) -> BotMetrics:
        """Bot and free-capacity counts of the instance by status and property label."""
        scheduler = self._scheduler_for(instance_name)
        key = scheduler.settings.bot_label_key
        metrics = BotMetrics(
            bots_total={status: 0 for status in BotStatus},
            bots_per_property_label={},
            available_capacity_total={status: 0 for status in BotStatus},
            available_capacity_per_property_label={},
        )
        for session in scheduler.live_sessions():
            values = session.property_values(key)
            labels = values or [UNKNOWN_LABEL]
            status = session.status
            metrics["bots_total"][status] += 1
            metrics["available_capacity_total"][status] += session.free_slots
            for label in labels:
                for per_label in (metrics["bots_per_property_label"],
                                  metrics["available_capacity_per_property_label"]):
                    for other in BotStatus:
                        per_label.setdefault((other, label), 0)
                metrics["bots_per_property_label"][(status, label)] += 1
                metrics["available_capacity_per_property_label"][(status, label)] += \
                    session.free_slots
        return metrics


class BotsService(bots_pb2_grpc.BotsServicer, BaseBotsService):
    """The Bots service over several instances, one scheduler each."""

    SERVICE_NAME: ClassVar[str] = "Bots"
    FULL_NAME: ClassVar[str] = "google.devtools.remoteworkers.v1test2.Bots"

    def __init__(self, schedulers: Mapping[str, SchedulerAPI] | Any = None,
                 logs: LogStreams | None = None) -> None:
        self.logs = logs
        self._runs, self._run_of = OrderedDict(), {}
        self._schedulers: dict[str, SchedulerAPI] = {}
        if schedulers is not None:
            items = (schedulers.items() if isinstance(schedulers, Mapping)
                     else ((i.name, i.scheduler) for i in schedulers))
            for name, scheduler in items:
                if scheduler is not None:
                    self.add_instance(name, scheduler)

    def add_instance(self, instance_name: str, scheduler: SchedulerAPI) -> None:
        """Serve `instance_name` with `scheduler`."""
        self._schedulers[instance_name] = scheduler

    def REGISTER_METHOD(self, server: grpc.aio.Server) -> None:  # noqa: N802 - public name
        """Add this servicer to a grpc.aio server."""
        add_service(server, self, bots_pb2.DESCRIPTOR.services_by_name["Bots"])

    def register(self, server: grpc.aio.Server) -> None:
        self.REGISTER_METHOD(server)

    def _scheduler_for(self, instance_name: str) -> SchedulerAPI:
        scheduler = self._schedulers.get(instance_name)
        if scheduler is None:
            known = ", ".join(repr(n) for n in sorted(self._schedulers)) or "none"
            raise InvalidArgument(f"instance {instance_name!r} does not execute actions "
                                  f"(instances with bots: {known})")
        return scheduler

    @rpc
    async def CreateBotSession(self, request: bots_pb2.CreateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        """Register a bot under the instance named by `parent`."""
        return await self._create(request, self._scheduler_for(request.parent))

    @rpc
    async def UpdateBotSession(self, request: bots_pb2.UpdateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        """Report lease progress and long-poll for work; routed by the session name."""
        scheduler = self._scheduler_for(instance_of_session(request.name))
        return await self._update(request, context, scheduler)

    @rpc
    async def PostBotEventTemp(self, request: bots_pb2.PostBotEventTempRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> Empty:
        """Record an event a bot reports about itself."""
        return await self._post_event(request,
                                      self._scheduler_for(instance_of_session(request.name)))


class UninstancedBotsService(bots_pb2_grpc.BotsServicer, BaseBotsService):
    """The Bots service with one scheduler for every instance name a bot gives."""

    SERVICE_NAME: ClassVar[str] = "Bots"
    FULL_NAME: ClassVar[str] = "google.devtools.remoteworkers.v1test2.Bots"

    def __init__(self, scheduler: SchedulerAPI, logs: LogStreams | None = None) -> None:
        self._scheduler = scheduler
        self.logs = logs
        self._runs, self._run_of = OrderedDict(), {}

    async def start(self) -> None:
        """Start the scheduler's store (unless already started) and the scheduler itself."""
        await self._scheduler.store.start()
        await self._scheduler.start()

    def REGISTER_METHOD(self, server: grpc.aio.Server) -> None:  # noqa: N802 - public name
        """Add this servicer to a grpc.aio server."""
        add_service(server, self, bots_pb2.DESCRIPTOR.services_by_name["Bots"])

    def register(self, server: grpc.aio.Server) -> None:
        self.REGISTER_METHOD(server)

    def _scheduler_for(self, instance_name: str) -> SchedulerAPI:
        return self._scheduler

    @rpc
    async def CreateBotSession(self, request: bots_pb2.CreateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        """Register a bot, whatever `parent` says."""
        return await self._create(request, self._scheduler)

    @rpc
    async def UpdateBotSession(self, request: bots_pb2.UpdateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        """Report lease progress and long-poll for work."""
        return await self._update(request, context, self._scheduler)

    @rpc
    async def PostBotEventTemp(self, request: bots_pb2.PostBotEventTempRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> Empty:
        """Record an event a bot reports about itself."""
        return await self._post_event(request, self._scheduler)

    def get_bot_status_metrics(self, _: str = "") -> BotMetrics:
        """Bot and free-capacity counts by status and property label."""
        return super().get_bot_status_metrics("")
