"""buildfleet.admin.v1.Admin: the operator's view of an instance's bots and queues,
and its drains.  Thin: the views come from the scheduler, the drain rules from the
scheduling core (scheduler.rules.drains)."""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import grpc
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet.client.cas import proto_digest
from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, InvalidArgument, NotFound
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import BotSession, Operation, Properties, Stage
from buildfleet.scheduler.rules import invocations
from buildfleet.scheduler.rules.drains import Drain, matches
from buildfleet.scheduler.rules.matching import satisfies, takes_work
from buildfleet.server import principal
from buildfleet.server.execution.service import (
    executing_scheduler,
    scheduler_for_operation,
)
from buildfleet.server.instance import Instances
from buildfleet.server.operations.service import caller_of_operation, paged
from buildfleet.server.rpc import add_service, rpc

EVENTS_SHOWN = 50  # a bot's latest events in GetBot


def _properties(properties: Properties) -> list[admin_pb2.Property]:
    return [admin_pb2.Property(name=name, value=value) for name, value in sorted(properties)]


class AdminService:
    FULL_NAME = "buildfleet.admin.v1.Admin"

    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, admin_pb2.DESCRIPTOR.services_by_name["Admin"])

    def _scheduler(self, instance_name: str) -> SchedulerAPI:
        return executing_scheduler(self.instances.get(instance_name))

    @staticmethod
    def _bot(scheduler: SchedulerAPI, session: BotSession) -> admin_pb2.Bot:
        bot = admin_pb2.Bot(
            instance_name=session.instance, bot_id=session.bot_id, session=session.name,
            status=session.status.name, properties=_properties(session.properties),
            capacity=session.capacity, running=session.held,
            draining=scheduler.is_drained(session))
        bot.registered.FromNanoseconds(int(session.created_at * 1e9))
        bot.silent_for.FromNanoseconds(int(session.silent_for * 1e9))
        return bot

    @rpc
    async def ListBots(self, request: admin_pb2.ListBotsRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> admin_pb2.ListBotsResponse:
        scheduler = self._scheduler(request.instance_name)
        pattern = request.bot_id_pattern or "*"
        sessions = sorted((s for s in scheduler.live_sessions()
                           if fnmatchcase(s.bot_id, pattern)), key=lambda s: s.bot_id)
        return admin_pb2.ListBotsResponse(bots=[self._bot(scheduler, s) for s in sessions])

    @rpc
    async def GetBot(self, request: admin_pb2.GetBotRequest,  # noqa: N802
                     context: grpc.aio.ServicerContext) -> admin_pb2.Bot:
        scheduler = self._scheduler(request.instance_name)
        session = next((s for s in scheduler.live_sessions() if s.bot_id == request.bot_id),
                       None)
        if session is None:
            raise NotFound(f"no live bot {request.bot_id!r} on instance "
                           f"{request.instance_name!r}")
        bot = self._bot(scheduler, session)
        caller = principal.caller_on(request.instance_name)
        bot.running_operations.extend(
            self._summary(op) for op in sorted(
                await scheduler.list_operations(caller, running_only=True),
                key=lambda op: op.created_at)
            if op.worker == session.bot_id and op.stage == Stage.EXECUTING)
        for event in (await scheduler.bot_events(session.bot_id))[-EVENTS_SHOWN:]:
            shown = bot.events.add(type=event.type, message=event.message)
            shown.time.FromNanoseconds(int(event.time * 1e9))
        return bot

    @rpc
    async def ListQueues(self, request: admin_pb2.ListQueuesRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListQueuesResponse:
        scheduler = self._scheduler(request.instance_name)
        sessions = list(scheduler.live_sessions())
        now = time.time()
        answer = admin_pb2.ListQueuesResponse(executing=scheduler.executing())
        length = int(scheduler.throughput.slot * 1e9)
        for start, jobs in scheduler.throughput.series(now):
            slot = answer.finished.add(jobs=jobs)
            slot.start.FromNanoseconds(int(start * 1e9))
            slot.length.FromNanoseconds(length)
        for group in sorted(scheduler.queue_groups(), key=lambda g: sorted(g.requirements)):
            matching = [s for s in sessions if satisfies(s.properties, group.requirements)]
            queue = answer.queues.add(
                requirements=_properties(group.requirements), queued=group.queued,
                matching_bots=len(matching),
                available_bots=sum(1 for s in matching if takes_work(s.status)
                                   and not scheduler.is_drained(s)))
            queue.oldest_age.FromNanoseconds(int(max(0.0, now - group.oldest_queued_at) * 1e9))
        return answer

    def _drain(self, scheduler: SchedulerAPI, instance: str, drain: Drain
               ) -> admin_pb2.Drain:
        shown = admin_pb2.Drain(instance_name=instance, pattern=drain.pattern, bot_ids=sorted(
            s.bot_id for s in scheduler.live_sessions()
            if matches(drain.pattern, s.bot_id, s.properties)))
        shown.created.FromNanoseconds(int(drain.created_at * 1e9))
        return shown

    @rpc
    async def ListDrains(self, request: admin_pb2.ListDrainsRequest,  # noqa: N802
                         context: grpc.aio.ServicerContext) -> admin_pb2.ListDrainsResponse:
        scheduler = self._scheduler(request.instance_name)
        return admin_pb2.ListDrainsResponse(drains=[
            self._drain(scheduler, request.instance_name, d) for d in scheduler.drains()])

    @rpc
    async def AddDrain(self, request: admin_pb2.AddDrainRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> admin_pb2.Drain:
        scheduler = self._scheduler(request.instance_name)
        drain = await scheduler.add_drain(request.pattern)
        return self._drain(scheduler, request.instance_name, drain)

    @rpc
    async def RemoveDrain(self, request: admin_pb2.RemoveDrainRequest,  # noqa: N802
                          context: grpc.aio.ServicerContext) -> admin_pb2.Drain:
        scheduler = self._scheduler(request.instance_name)
        existing = next((d for d in scheduler.drains() if d.pattern == request.pattern.strip()),
                        None)
        if not await scheduler.remove_drain(request.pattern):
            raise NotFound(f"instance {request.instance_name!r} has no drain "
                           f"{request.pattern.strip()!r}")
        return self._drain(scheduler, request.instance_name,
                           existing or Drain(request.pattern.strip(), time.time()))

    # --------------------------------------------------------------- operations
    def _build_keys(self, instance: str) -> tuple[str, ...]:
        """What makes a build on `instance` (its scheduler's `fair-share-by`)."""
        found = self.instances.by_name.get(instance)
        return invocations.KEYS if found is None else found.settings.scheduler.fair_share_by

    def _summary(self, operation: Operation, response: re_pb2.ExecuteResponse | None = None
                 ) -> admin_pb2.OperationSummary:
        """`response`: the operation's, when the caller has parsed it already."""
        summary = admin_pb2.OperationSummary(
            name=operation.name, stage=operation.stage.name,
            action_digest=proto_digest(operation.action_digest), submitter=operation.owner,
            worker=operation.worker, attempts=operation.attempts,
            cancelled=operation.cancelled, priority=operation.priority,
            request_metadata=invocations.request_metadata(operation.request_metadata),
            build=invocations.build_key(operation.request_metadata, operation.owner,
                                        self._build_keys(operation.instance)))
        summary.queued.FromNanoseconds(int(operation.queued_at * 1e9))
        if response is None:
            response = _response(operation)
        if response is not None:
            code = response.status.code
            summary.status = code_pb2.Code.Name(code) if code in code_pb2.Code.values() \
                else str(code)
            summary.message = response.status.message or response.message
            summary.cached = response.cached_result
            if response.HasField("result"):
                summary.ran, summary.exit_code = True, response.result.exit_code
        return summary

    @rpc
    async def ListOperations(self, request: admin_pb2.ListOperationsRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext
                             ) -> admin_pb2.ListOperationsResponse:
        scheduler = self._scheduler(request.instance_name)
        stage = request.stage.upper()
        if stage and stage not in ("QUEUED", "EXECUTING", "COMPLETED"):
            raise InvalidArgument(f"stage {request.stage!r}: use QUEUED, EXECUTING or "
                                  "COMPLETED")
        caller = principal.caller_on(request.instance_name)
        running_only = stage in ("QUEUED", "EXECUTING")
        keys = self._build_keys(request.instance_name)
        selected = [op for op in await scheduler.list_operations(caller,
                                                                running_only=running_only)
                    if (not stage or op.stage.name == stage)
                    and (not request.bot_id or op.worker == request.bot_id)
                    and (not request.action_hash or op.action_digest.hash == request.action_hash)
                    and (not request.submitter or op.owner == request.submitter)
                    and (not request.invocation
                         or invocations.of_build(op.request_metadata, op.owner,
                                                 request.invocation, keys))]
        page, token = paged(selected, instance=request.instance_name,
                            page_size=request.page_size, page_token=request.page_token,
                            newest_first=True)
        if caller is not None and caller.admin:
            principal.note_admin("listed the operations of instance "
                                 f"{request.instance_name!r}", "*")
        return admin_pb2.ListOperationsResponse(
            operations=[self._summary(op) for op in page], next_page_token=token)

    async def _detail(self, operation: Operation) -> admin_pb2.OperationDetail:
        response = _response(operation)
        detail = admin_pb2.OperationDetail(summary=self._summary(operation, response))
        instance = self.instances.get(operation.instance)
        try:
            action = await instance.cas.get_message(operation.action_digest, re_pb2.Action,
                                                    "action")
            command = None if action is None else await instance.cas.get_message(
                Digest.from_proto(action.command_digest, "command"), re_pb2.Command,
                "command")
        except BuildfleetError:
            action = command = None  # gone or unreadable: the operation is still shown
        if action is not None:
            if action.HasField("timeout"):
                detail.timeout.CopyFrom(action.timeout)
            platform = action.platform if action.platform.properties else (
                command.platform if command is not None else re_pb2.Platform())
            detail.platform.extend(_properties(frozenset(
                (p.name, p.value) for p in platform.properties)))
        if command is not None:
            detail.arguments.extend(command.arguments)
            detail.working_directory = command.working_directory
            detail.output_paths.extend(command.output_paths or [
                *command.output_files, *command.output_directories])
        if response is not None and response.HasField("result"):
            result = response.result
            detail.execution_metadata.CopyFrom(result.execution_metadata)
            detail.stdout_digest.CopyFrom(result.stdout_digest)
            detail.stderr_digest.CopyFrom(result.stderr_digest)
        return detail

    @rpc
    async def GetOperation(self, request: admin_pb2.GetOperationRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> admin_pb2.OperationDetail:
        scheduler = scheduler_for_operation(self.instances, request.name)
        operation = await scheduler.get_operation(request.name,
                                                  caller_of_operation(request.name))
        principal.note_admin(f"read operation {request.name!r}", operation.owner)
        return await self._detail(operation)

    @rpc
    async def CancelOperation(self, request: admin_pb2.CancelOperationRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> admin_pb2.OperationDetail:
        scheduler = scheduler_for_operation(self.instances, request.name)
        caller = caller_of_operation(request.name)
        owner = (await scheduler.get_operation(request.name, caller)).owner
        await scheduler.cancel_operation(request.name, caller)
        principal.note_admin(f"cancelled operation {request.name!r}", owner)
        return await self._detail(await scheduler.get_operation(request.name, caller))


def _response(operation: Operation) -> re_pb2.ExecuteResponse | None:
    if operation.response is None:
        return None
    response = re_pb2.ExecuteResponse()
    response.ParseFromString(operation.response)
    return response

