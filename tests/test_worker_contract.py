"""The bot against a Bots server that is not buildfleet's, as the wire contract describes
BuildGrid's: a hand-written fake Bots service on its own port, the CAS on buildfleet
(`--cas`), a real `buildfleet bot` process.

The fake names sessions itself, offers leases PENDING with Any(Digest) or ACTIVE with
Any(Action), cancels a lease by leaving it out of a response, acknowledges a
COMPLETED lease only by leaving it out (after listing it for a while), forgets a
session (INVALID_ARGUMENT) and has no Capabilities service.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from botprocess import BotProcess, Remote, pid_alive, read_pid, wait_for
from google.protobuf.any_pb2 import Any as AnyProto

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildfleet.client.cas import proto_digest
from buildfleet.worker.session import ACTIVE_REPORT_DELAY

PENDING, ACTIVE, COMPLETED = (bots_pb2.LeaseState.Value(n) for n in
                              ("PENDING", "ACTIVE", "COMPLETED"))
BOT_TERMINATING = bots_pb2.BotStatus.Value("BOT_TERMINATING")
HOLD = 0.3  # the fake's long-poll when it has nothing new to say


@dataclass
class FakeBots(bots_pb2_grpc.BotsServicer):
    """A Bots service following the contract's BuildGrid conventions, for one bot."""

    creates: list[bots_pb2.CreateBotSessionRequest] = field(default_factory=list)
    requests: list[bots_pb2.UpdateBotSessionRequest] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)  # monotonic time of each request
    deadlines: list[float | None] = field(default_factory=list)
    sent_versions: set[str] = field(default_factory=set)
    sessions: set[str] = field(default_factory=set)
    leases: dict[str, bots_pb2.Lease] = field(default_factory=dict)  # listed in responses
    results: dict[str, bots_pb2.Lease] = field(default_factory=dict)  # accepted COMPLETED
    hold_completed: dict[str, int] = field(default_factory=dict)  # keep listing N times
    forget_on_complete: set[str] = field(default_factory=set)  # drop the session then
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    max_in_flight: int = 0
    version: int = 0

    def offer(self, lease: bots_pb2.Lease) -> None:
        self.leases[lease.id] = lease
        self.changed.set()

    def withdraw(self, lease_id: str) -> None:
        del self.leases[lease_id]
        self.changed.set()

    def _next_version(self) -> str:
        self.version += 1
        self.sent_versions.add(str(self.version))
        return str(self.version)

    async def CreateBotSession(self, request: bots_pb2.CreateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        self.creates.append(request)
        session = bots_pb2.BotSession()
        session.CopyFrom(request.bot_session)
        session.name = f"{request.parent}/{uuid.uuid4()}" if request.parent \
            else str(uuid.uuid4())
        session.version = self._next_version()
        session.expire_time.GetCurrentTime()
        self.sessions.add(session.name)
        return session

    async def UpdateBotSession(self, request: bots_pb2.UpdateBotSessionRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> bots_pb2.BotSession:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.requests.append(request)
            self.arrived.append(time.monotonic())
            self.deadlines.append(context.time_remaining())
            if request.name not in self.sessions:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"unknown bot session {request.name}")
            for lease in request.bot_session.leases:
                if lease.state != COMPLETED or lease.id not in self.leases:
                    continue
                if lease.id in self.forget_on_complete:
                    self.forget_on_complete.discard(lease.id)
                    self.sessions.discard(request.name)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                        f"unknown bot session {request.name}")
                if self.hold_completed.get(lease.id, 0) > 0:
                    self.hold_completed[lease.id] -= 1
                    self.leases[lease.id].state = COMPLETED  # type: ignore[assignment]
                    continue
                self.results[lease.id] = lease
                del self.leases[lease.id]
            self.changed.clear()
            try:
                async with asyncio.timeout(HOLD):
                    await self.changed.wait()
            except TimeoutError:
                pass
            response = bots_pb2.BotSession(
                name=request.name, bot_id=request.bot_session.bot_id,
                status=request.bot_session.status, version=self._next_version(),
                leases=list(self.leases.values()))
            response.expire_time.GetCurrentTime()
            return response
        finally:
            self.in_flight -= 1

    def reported(self, lease_id: str, state: int, session: str | None = None
                 ) -> list[bots_pb2.Lease]:
        return [lease for request in self.requests for lease in request.bot_session.leases
                if lease.id == lease_id and lease.state == state
                and (session is None or request.name == session)]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeBots, str]]:
    servicer = FakeBots()
    server = grpc.aio.server()
    bots_pb2_grpc.add_BotsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(0)


def lease_with(payload: Any, state: int) -> bots_pb2.Lease:
    packed = AnyProto()
    packed.Pack(payload)
    return bots_pb2.Lease(id=f"lease-{uuid.uuid4()}", state=state,  # type: ignore[arg-type]
                          payload=packed)


async def test_bot_follows_the_buildgrid_conventions(start_server: Any, tmp_path: Path,
                                                     fake: tuple[FakeBots, str]) -> None:
    bots, address = fake
    cas_server = await start_server()
    remote = Remote(cas_server.channel)
    bot = BotProcess(["--server", f"grpc://{address}", "--cas", f"grpc://{cas_server.address}",
                      "--bot-id", "contract-bot", "--work-dir", str(tmp_path / "bot"),
                      "--poll-timeout", "5", "--reconnect-max-delay", "0.3",
                      "--sandbox", "none"],
                     tmp_path / "bot.log", "contract-bot", tmp_path / "bot")
    try:
        await bot.registered()
        (create,) = bots.creates
        assert create.bot_session.bot_id == "contract-bot" and not create.bot_session.name
        assert [d.handle for d in create.bot_session.worker.devices] == ["contract-bot"]

        # 1. PENDING with Any(Digest): answered ACTIVE, run; cancelled by omission: killed.
        pid_file = tmp_path / "sleeper.pid"
        sleeper_action = await remote.action("sh", "-c", f"echo $$ > {pid_file}; exec sleep 1000")
        first = lease_with(proto_digest(sleeper_action), PENDING)
        bots.offer(first)
        pid = await wait_for(lambda: read_pid(pid_file), "the command to start")
        await wait_for(lambda: bots.reported(first.id, ACTIVE), "the lease reported ACTIVE")
        assert not bots.reported(first.id, PENDING)
        bots.withdraw(first.id)
        await wait_for(lambda: not pid_alive(pid), "the withdrawn command to be killed", 10)
        mark = len(bots.requests)
        await wait_for(lambda: len(bots.requests) > mark + 1, "two more updates")
        assert all(first.id not in {lease.id for lease in r.bot_session.leases}
                   for r in bots.requests[mark + 1:])

        # 2. ACTIVE with Any(Action): COMPLETED re-sent until the server leaves it out.
        #    A bot at its capacity does not echo ACTIVE at once: the action has a
        #    moment to finish, and then its first report is the result.
        action = re_pb2.Action()
        action.ParseFromString(await remote.cas.read_blob(
            await remote.action("sh", "-c", "echo contract")))
        second = lease_with(action, ACTIVE)
        bots.hold_completed[second.id] = 2
        offered = time.monotonic()
        bots.offer(second)
        await wait_for(lambda: second.id in bots.results, "the result to be accepted")
        assert len(bots.reported(second.id, COMPLETED)) == 3
        echoed = [when for when, r in zip(bots.arrived, bots.requests, strict=True)
                  if any(lease.id == second.id and lease.state == ACTIVE
                         for lease in r.bot_session.leases)]
        assert all(when - offered >= ACTIVE_REPORT_DELAY * 0.9 for when in echoed), (
            [when - offered for when in echoed])
        accepted = bots.results[second.id]
        assert accepted.status.code == 0
        result = re_pb2.ActionResult()
        assert accepted.result.Unpack(result)
        assert result.exit_code == 0 and result.execution_metadata.worker == "contract-bot"
        assert await remote.blob(result.stdout_digest) == b"contract\n"
        mark = len(bots.requests)
        await wait_for(lambda: len(bots.requests) > mark + 1, "two more updates")
        assert all(second.id not in {lease.id for lease in r.bot_session.leases}
                   for r in bots.requests[mark + 1:])

        # 3. The session is forgotten while a result is on its way: the bot registers
        #    again and sends the finished result in the new session's first update.
        third = lease_with(proto_digest(await remote.action("sh", "-c", "echo third")), PENDING)
        bots.forget_on_complete.add(third.id)
        bots.offer(third)
        await wait_for(lambda: len(bots.creates) == 2, "a second registration")
        await wait_for(lambda: third.id in bots.results, "the result in the new session")
        new_session = next(iter(bots.sessions))
        first_update = next(r for r in bots.requests if r.name == new_session)
        assert [(lease.id, lease.state) for lease in first_update.bot_session.leases] == [
            (third.id, COMPLETED)]

        # 4. Always one call in flight, with a deadline, echoing the server's version.
        assert bots.max_in_flight == 1
        assert all(d is not None and 3 < d < 5.5 for d in bots.deadlines), bots.deadlines
        assert all(r.bot_session.version in bots.sent_versions for r in bots.requests)
        assert all(r.bot_session.name == r.name for r in bots.requests)

        # 5. SIGTERM with nothing running: a BOT_TERMINATING update, then exit 0.
        bot.signal(signal.SIGTERM)
        assert await bot.exit_code() == 0
        assert bots.requests[-1].bot_session.status == BOT_TERMINATING
    finally:
        bot.kill()
