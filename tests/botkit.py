"""Test clients written with nothing but the generated stubs: a bot and an REAPI client."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.longrunning import operations_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)
from buildfleet.digest import Digest

PENDING, ACTIVE, COMPLETED, CANCELLED = (bots_pb2.LeaseState.Value(n) for n in
                                         ("PENDING", "ACTIVE", "COMPLETED", "CANCELLED"))


def digest_of(data: bytes) -> re_pb2.Digest:
    d = Digest.of(data)
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size_bytes)


def worker(bot_id: str, properties: Iterable[tuple[str, str]], capacity: int | None = 1
           ) -> worker_pb2.Worker:
    """A Worker the way buildbox-worker describes itself."""
    message = worker_pb2.Worker()
    device = message.devices.add(handle=bot_id)
    for key, value in properties:
        device.properties.add(key=key, value=value)
        message.properties.add(key=key, value=value)
    if capacity is not None:
        message.configs.add(key="capacity", value=str(capacity))
    return message


@dataclass
class StubBot:
    """A bot driven step by step by a test."""

    channel: grpc.aio.Channel
    instance: str = ""
    bot_id: str = field(default_factory=lambda: f"test-bot-{uuid.uuid4().hex[:8]}")
    properties: list[tuple[str, str]] = field(default_factory=lambda: [("OSFamily", "linux")])
    capacity: int | None = 1
    session: bots_pb2.BotSession | None = None

    @property
    def stub(self) -> bots_pb2_grpc.BotsStub:
        return bots_pb2_grpc.BotsStub(self.channel)

    async def register(self, status: int = 0) -> bots_pb2.BotSession:
        self.session = await self.stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            parent=self.instance,
            bot_session=bots_pb2.BotSession(
                bot_id=self.bot_id, status=status,  # type: ignore[arg-type]
                worker=worker(self.bot_id, self.properties, self.capacity))))
        return self.session

    async def update(self, timeout: float = 2.0, status: int | None = None
                     ) -> bots_pb2.BotSession:
        """Send the current session (with any lease changes made to it) and long-poll."""
        assert self.session is not None, "register first"
        if status is not None:
            self.session.status = status  # type: ignore[assignment]
        response = await self.stub.UpdateBotSession(
            bots_pb2.UpdateBotSessionRequest(name=self.session.name, bot_session=self.session),
            timeout=timeout)
        self.session = response
        return response

    def leases(self, state: int | None = None) -> list[bots_pb2.Lease]:
        assert self.session is not None
        return [lease for lease in self.session.leases if state is None or lease.state == state]

    def complete(self, lease_id: str, result: re_pb2.ActionResult | None = None,
                 code: int = 0, message: str = "") -> None:
        """Mark a lease COMPLETED in the session the next update sends."""
        assert self.session is not None
        for lease in self.session.leases:
            if lease.id == lease_id:
                lease.state = COMPLETED  # type: ignore[assignment]
                lease.status.CopyFrom(status_pb2.Status(code=code, message=message))
                if result is not None:
                    lease.result.Pack(result)
                return
        raise KeyError(lease_id)

    @staticmethod
    def action_of(lease: bots_pb2.Lease) -> re_pb2.Action:
        action = re_pb2.Action()
        assert lease.payload.Unpack(action), lease.payload.type_url
        return action


@dataclass
class Client:
    """An REAPI client: uploads actions, executes them, follows operations."""

    channel: grpc.aio.Channel
    instance: str = ""

    async def upload(self, *blobs: bytes) -> None:
        cas = re_grpc.ContentAddressableStorageStub(self.channel)
        response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name=self.instance,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b)
                      for b in blobs]))
        assert all(r.status.code == 0 for r in response.responses), response

    async def action(self, *arguments: str, platform: Iterable[tuple[str, str]] = (),
                     do_not_cache: bool = False, timeout: float | None = None,
                     salt: bytes = b"", upload: bool = True) -> re_pb2.Digest:
        """Store an Action (command, empty input root) and return its digest."""
        command = re_pb2.Command(arguments=list(arguments) or ["true"])
        for name, value in platform:
            command.platform.properties.add(name=name, value=value)
        root = re_pb2.Directory().SerializeToString()
        action = re_pb2.Action(
            command_digest=digest_of(command.SerializeToString()),
            input_root_digest=digest_of(root), do_not_cache=do_not_cache, salt=salt)
        action.platform.CopyFrom(command.platform)
        if timeout is not None:
            action.timeout.FromNanoseconds(int(timeout * 1e9))
        blob = action.SerializeToString()
        if upload:
            await self.upload(command.SerializeToString(), root, blob)
        return digest_of(blob)

    def execute(self, action_digest: re_pb2.Digest, *, skip_cache_lookup: bool = False,
                priority: int = 0, request_metadata: re_pb2.RequestMetadata | bytes | None = None
                ) -> grpc.aio.UnaryStreamCall:
        """Execute; `request_metadata` goes in the header REAPI clients send it in."""
        stub = re_grpc.ExecutionStub(self.channel)
        headers = None
        if request_metadata is not None:
            value = request_metadata if isinstance(request_metadata, bytes) \
                else request_metadata.SerializeToString()
            headers = (("build.bazel.remote.execution.v2.requestmetadata-bin", value),)
        return stub.Execute(re_pb2.ExecuteRequest(
            instance_name=self.instance, action_digest=action_digest,
            skip_cache_lookup=skip_cache_lookup,
            execution_policy=re_pb2.ExecutionPolicy(priority=priority)), metadata=headers)

    async def first_operation(self, call: grpc.aio.UnaryStreamCall) -> operations_pb2.Operation:
        async for operation in call:
            return operation
        raise AssertionError("the Execute stream ended without an operation")

    async def result(self, call: grpc.aio.UnaryStreamCall) -> re_pb2.ExecuteResponse:
        """Follow an Execute (or WaitExecution) stream to its end; the ExecuteResponse."""
        last = None
        async for operation in call:
            last = operation
        assert last is not None and last.done, last
        response = re_pb2.ExecuteResponse()
        assert last.response.Unpack(response)
        return response

    @staticmethod
    def metadata(operation: operations_pb2.Operation) -> re_pb2.ExecuteOperationMetadata:
        metadata = re_pb2.ExecuteOperationMetadata()
        assert operation.metadata.Unpack(metadata)
        return metadata


def any_result(result: re_pb2.ActionResult) -> AnyProto:
    packed = AnyProto()
    packed.Pack(result)
    return packed


# -- helpers for the Execution / Operations / restart tests -----------------------------

async def wait_for(predicate: Callable[[], object], timeout: float = 5.0,
                   what: str = "the condition") -> Any:
    """Poll `predicate` (sync or async) every 10 ms until it is truthy; its value.

    Fails the test when `timeout` seconds pass first.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


def action_result(exit_code: int = 0, stdout: bytes = b"") -> re_pb2.ActionResult:
    """An ActionResult referencing no CAS blob (stdout inline)."""
    return re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout)


async def poll_leases(bot: StubBot, count: int = 1, timeout: float = 10.0,
                      per_call: float = 2.0) -> list[bots_pb2.Lease]:
    """Send the bot's session (with its reported changes) and long-poll until it holds
    at least `count` ACTIVE leases; those leases."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        await bot.update(timeout=per_call)
        active = bot.leases(ACTIVE)
        if len(active) >= count:
            return active
        if loop.time() > deadline:
            raise AssertionError(f"bot {bot.bot_id} got {len(active)} of {count} leases "
                                 f"within {timeout} s")


async def command_platform_action(client: Client, *arguments: str,
                                  platform: Iterable[tuple[str, str]],
                                  action_platform: Iterable[tuple[str, str]] = (),
                                  salt: bytes = b"") -> re_pb2.Digest:
    """Like Client.action, but the platform is only in the Command (REAPI v2.1 style)
    unless `action_platform` is given, which then goes into the Action only."""
    command = re_pb2.Command(arguments=list(arguments) or ["true"])
    for name, value in platform:
        command.platform.properties.add(name=name, value=value)
    root = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(command_digest=digest_of(command.SerializeToString()),
                           input_root_digest=digest_of(root), salt=salt)
    for name, value in action_platform:
        action.platform.properties.add(name=name, value=value)
    blob = action.SerializeToString()
    await client.upload(command.SerializeToString(), root, blob)
    return digest_of(blob)


@dataclass
class WorkerBot(StubBot):
    """A StubBot that registers with a Worker message given by the test."""

    worker_message: worker_pb2.Worker | None = None

    async def register(self, status: int = 0) -> bots_pb2.BotSession:
        if self.worker_message is None:
            return await super().register(status)
        self.session = await self.stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            parent=self.instance,
            bot_session=bots_pb2.BotSession(
                bot_id=self.bot_id, status=status,  # type: ignore[arg-type]
                worker=self.worker_message)))
        return self.session


async def next_operation(call: grpc.aio.UnaryStreamCall) -> operations_pb2.Operation:
    """The next message of an Execute / WaitExecution stream (async-iterator style)."""
    return await anext(aiter(call))  # type: ignore[no-any-return]


def wait_execution(channel: grpc.aio.Channel, name: str) -> grpc.aio.UnaryStreamCall:
    return re_grpc.ExecutionStub(channel).WaitExecution(re_pb2.WaitExecutionRequest(name=name))


def execute_response(operation: operations_pb2.Operation) -> re_pb2.ExecuteResponse:
    response = re_pb2.ExecuteResponse()
    assert operation.done and operation.response.Unpack(response), operation
    return response


async def rpc_error(call: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """Drain a stream expecting it to fail; the error."""
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError("the stream ended without an error")


def status_details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call's `grpc-status-details-bin` trailer."""
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no grpc-status-details-bin trailer on {error!r}")


def stdout_is(result: re_pb2.ActionResult, data: bytes) -> bool:
    """Whether `result` carries `data` as stdout (inline, or moved into the CAS)."""
    if result.HasField("stdout_digest"):
        return result.stdout_digest == digest_of(data) and result.stdout_raw in (b"", data)
    return result.stdout_raw == data


def leased_action(lease: bots_pb2.Lease) -> re_pb2.Digest:
    """The digest of the Action a lease carries inline (lease offered ACTIVE)."""
    StubBot.action_of(lease)  # it is an Action
    return digest_of(lease.payload.value)


async def expect_no_work(bot: StubBot, timeout: float = 0.3) -> None:
    """Long-poll once and check that nothing changes for the bot: no new lease, no
    lease cancelled.

    A long-poll returns at once when there is news, so a call that holds until its
    deadline (DEADLINE_EXCEEDED on a loaded machine) also means "nothing".
    """
    before = [(lease.id, lease.state) for lease in bot.leases()]
    try:
        await bot.update(timeout=timeout)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return
    after = [(lease.id, lease.state) for lease in bot.leases()]
    assert after == before, f"bot {bot.bot_id} had {before}, was sent {after}"
