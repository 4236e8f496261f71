"""buildfleet.admin.v1.Admin: the operator's view of an instance's bots and queues,
and its drains.  Thin: the views come from the scheduler, the drain rules from the
scheduling core (scheduler.rules.drains)."""

from __future__ import annotations

import time
from fnmatch import fnmatchcase

import grpc

from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet.errors import NotFound
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import BotSession, Properties
from buildfleet.scheduler.rules.drains import Drain, matches
from buildfleet.scheduler.rules.matching import satisfies, takes_work
from buildfleet.server.execution.service import executing_scheduler
from buildfleet.server.instance import Instances
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
