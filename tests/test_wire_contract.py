"""The three bots of the wire contract (../shared/docs/wire-contract.md), simulated precisely.

Each bot below is written with nothing but the generated stubs and sends what
the contract says the real bot sends, field by field:

- `BuildboxWorker`: buildbox-worker 1.4 (parent "", status UNSET, device
  handle = bot id, properties on the worker and its device, `capacity` and
  `priority` configs, no gRPC deadline, echoes expire_time/version, takes an
  ACTIVE lease with the Action inline, completes with status {} and
  result = Any(ActionResult); on SIGTERM reports exit 143 with BOT_TERMINATING).
- `ReccWorker`: reccworker (empty device handle, a property with an empty
  value, the whole session every 250 ms without deadline, answers ACTIVE to a
  PENDING offer and waits for the acknowledgement, leaves lease.status UNSET
  on success, FAILED_PRECONDITION when inputs are missing, stdout raw, legacy
  output_files only).
- `BgdBot`: BuildGrid's former Python bot (bot id `<parent>.<host>.<pid>`,
  device properties only, random device handle, no configs, 31 s deadline,
  PENDING with Any(Digest), PENDING -> COMPLETED directly, does not echo
  expire_time/version, re-sends a COMPLETED lease until a response omits it,
  treats a lease missing from a response as cancelled).

Each runs actions end to end against the real server, through a real client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
from botkit import ACTIVE, CANCELLED, COMPLETED, PENDING, Client, digest_of, wait_for
from conftest import StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import (
    bots_pb2,
    bots_pb2_grpc,
    worker_pb2,
)

# Every test here runs on both schedulers (tests/conftest.py).
BOTH_SCHEDULERS = True

REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"
BOT_TERMINATING = bots_pb2.BotStatus.Value("BOT_TERMINATING")
LINUX = [("OSFamily", "linux"), ("ISA", "x86-64")]


def config(**scheduler: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"keepalive": 5, "long-poll": 0.5, "housekeeping-interval": 0.1}
    values.update({key.replace("_", "-"): value for key, value in scheduler.items()})
    return {"instances": {"": {"scheduler": values}}}



def stamp(seconds: float) -> Timestamp:
    result = Timestamp()
    result.FromNanoseconds(int(seconds * 1e9))
    return result


async def read_blob(channel: grpc.aio.Channel, instance: str,
                    digest: re_pb2.Digest) -> bytes | None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name=instance, digests=[digest]))
    (blob,) = response.responses
    return blob.data if blob.status.code == 0 else None


async def write_blobs(channel: grpc.aio.Channel, instance: str, *blobs: bytes) -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs]))
    assert all(r.status.code == 0 for r in response.responses), response


def fake_run(command: re_pb2.Command) -> tuple[int, bytes, bytes]:
    """What "running" a command yields here: exit code, stdout, one output file's bytes."""
    arguments = list(command.arguments)
    exit_code = int(arguments[1]) if arguments[0] == "exit" else 0
    return exit_code, " ".join(arguments).encode(), f"output of {arguments}".encode()


class BotLoop:
    """Runs a bot's poll loop as a task until stopped; failures surface in `stop()`."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self, loop: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        self._task = asyncio.create_task(loop(self._stop))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass


# ------------------------------------------------------------------ buildbox-worker
class BuildboxWorker:
    """buildbox-worker 1.4 as observed on the wire."""

    def __init__(self, channel: grpc.aio.Channel, bot_id: str, instance: str = "") -> None:
        self.channel = channel
        self.bot_id = bot_id  # verbatim, as the operator passed it
        self.instance = instance
        self.stub = bots_pb2_grpc.BotsStub(channel)
        metadata = re_pb2.RequestMetadata(tool_details=re_pb2.ToolDetails(
            tool_name="buildbox-worker", tool_version="1.4"))
        self.metadata = ((REQUEST_METADATA_KEY, metadata.SerializeToString()),)
        self.session = bots_pb2.BotSession()
        self.running: dict[str, asyncio.Task[re_pb2.ActionResult]] = {}
        self.sent: list[bots_pb2.BotSession] = []
        self.poll_seconds: list[float] = []
        self.terminating = False

    async def start(self) -> None:
        # It checks its instance first and would exit if the server rejected it.
        await re_grpc.CapabilitiesStub(self.channel).GetCapabilities(
            re_pb2.GetCapabilitiesRequest(instance_name=self.instance), metadata=self.metadata)
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle=self.bot_id)
        for key, value in LINUX:
            device.properties.add(key=key, value=value)
            worker.properties.add(key=key, value=value)
        worker.configs.add(key="capacity", value="1")
        worker.configs.add(key="priority", value="0")
        self.session = await self.stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            parent=self.instance, bot_session=bots_pb2.BotSession(bot_id=self.bot_id,
                                                                   worker=worker)),
            metadata=self.metadata)  # no deadline, status left UNSET

    async def _execute(self, action: re_pb2.Action) -> re_pb2.ActionResult:
        started = time.time()
        command = re_pb2.Command.FromString(
            await read_blob(self.channel, self.instance, action.command_digest) or b"")
        exit_code, stdout, output = fake_run(command)
        await write_blobs(self.channel, self.instance, stdout, output)
        result = re_pb2.ActionResult(exit_code=exit_code, stdout_digest=digest_of(stdout))
        result.output_files.add(path="out/result.txt", digest=digest_of(output))
        metadata = result.execution_metadata
        metadata.worker = self.bot_id
        for name in ("worker_start", "input_fetch_start", "input_fetch_completed",
                     "execution_start", "execution_completed", "output_upload_start",
                     "output_upload_completed", "worker_completed"):
            getattr(metadata, f"{name}_timestamp").CopyFrom(stamp(max(started, time.time())))
        return result

    async def update(self) -> bots_pb2.BotSession:
        """One UpdateBotSession: the last answer echoed (expire_time, version) with our changes."""
        body = bots_pb2.BotSession()
        body.CopyFrom(self.session)
        if self.terminating:
            body.status = BOT_TERMINATING  # type: ignore[assignment]
        for lease in body.leases:
            task = self.running.get(lease.id)
            if lease.state == ACTIVE and task is not None and task.done():
                lease.state = COMPLETED  # type: ignore[assignment]
                lease.status.CopyFrom(status_pb2.Status())  # present, code 0
                lease.result.Pack(task.result())
        self.sent.append(body)
        started = time.monotonic()
        response = await self.stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
            name=body.name, bot_session=body), metadata=self.metadata)  # no deadline
        self.poll_seconds.append(time.monotonic() - started)
        self.session = response
        for lease in response.leases:
            if lease.state == ACTIVE and lease.id not in self.running:
                action = re_pb2.Action()
                assert lease.payload.Unpack(action), lease.payload.type_url
                self.running[lease.id] = asyncio.create_task(self._execute(action))
            elif lease.state == CANCELLED and lease.id in self.running:
                self.running.pop(lease.id).cancel()
        current = {lease.id for lease in response.leases}
        for lease_id in [i for i in self.running if i not in current]:
            self.running.pop(lease_id)  # acknowledged (or cancelled): forget it
        return response

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            changed = any(task.done() for task in self.running.values())
            if changed:
                await asyncio.sleep(0.01)  # the real bot waits ~250 ms after a lease change
            await self.update()

    async def sigterm(self) -> bots_pb2.BotSession:
        """SIGTERM: kill the running command, report it exit 143 with BOT_TERMINATING."""
        self.terminating = True
        for task in self.running.values():
            task.cancel()
        body = bots_pb2.BotSession()
        body.CopyFrom(self.session)
        body.status = BOT_TERMINATING  # type: ignore[assignment]
        for lease in body.leases:
            if lease.state == ACTIVE:
                lease.state = COMPLETED  # type: ignore[assignment]
                lease.status.CopyFrom(status_pb2.Status())
                lease.result.Pack(re_pb2.ActionResult(exit_code=143))
        self.sent.append(body)
        return await self.stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
            name=body.name, bot_session=body), metadata=self.metadata)


async def test_buildbox_worker(start_server: StartServer) -> None:
    grid = await start_server(config(long_poll=0.5))
    client = Client(grid.channel)
    bot = BuildboxWorker(grid.channel, bot_id="buildbox-worker-01")
    await bot.start()
    assert bot.session.name and bot.session.bot_id == "buildbox-worker-01"
    assert bot.session.HasField("expire_time")
    loop = BotLoop()
    loop.start(bot.loop)
    try:
        digest = await client.action("echo", "hello", platform=[("OSFamily", "linux")])
        failing = await client.action("exit", "3", platform=[("OSFamily", "linux")])
        ok = await client.result(client.execute(digest))
        failed = await client.result(client.execute(failing))
    finally:
        await loop.stop()

    assert ok.status.code == 0 and not ok.cached_result
    assert ok.result.exit_code == 0
    assert ok.result.output_files[0].path == "out/result.txt"
    assert ok.result.stdout_digest == digest_of(b"echo hello")
    assert ok.result.execution_metadata.worker == "buildbox-worker-01"
    assert ok.result.execution_metadata.HasField("worker_completed_timestamp")
    cached = await grid.action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=digest))
    assert cached.stdout_digest == digest_of(b"echo hello")
    # A command exiting non-zero is a COMPLETED lease with status 0: the exit code
    # reaches the client, and such a result is not cached.
    assert failed.status.code == 0 and failed.result.exit_code == 3
    try:
        await grid.action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=failing))
        raise AssertionError("a failed result was cached")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND

    # What it echoed, it had been given; the server kept counting versions.
    versions = [int(body.version) for body in bot.sent if body.version]
    assert versions == sorted(versions) and len(set(versions)) == len(versions)
    assert all(body.HasField("expire_time") for body in bot.sent)
    # No deadline: the server bounded every held poll (long-poll 0.5 s) itself.
    assert max(bot.poll_seconds) < 2.0
    assert any(0.4 <= seconds for seconds in bot.poll_seconds)


async def test_buildbox_worker_sigterm_mid_action(start_server: StartServer) -> None:
    grid = await start_server(config(long_poll=0.5))
    client = Client(grid.channel)
    stopping = BuildboxWorker(grid.channel, bot_id="buildbox-stopping")
    await stopping.start()
    digest = await client.action("sleep", "forever")
    call = client.execute(digest)
    while not any(lease.state == ACTIVE for lease in stopping.session.leases):
        await stopping.update()
    for task in stopping.running.values():  # the command is still running at SIGTERM
        task.cancel()
    stopping.running.clear()
    last = await stopping.sigterm()
    assert not last.leases
    try:
        await stopping.update()
        raise AssertionError("the terminated session still answers")
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT

    successor = BuildboxWorker(grid.channel, bot_id="buildbox-successor")
    await successor.start()
    loop = BotLoop()
    loop.start(successor.loop)
    try:
        response = await client.result(call)
    finally:
        await loop.stop()
    assert response.status.code == 0 and response.result.exit_code == 0
    assert response.result.execution_metadata.worker == "buildbox-successor"
    cached = await grid.action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=digest))
    assert cached.exit_code == 0


# ------------------------------------------------------------------ reccworker
class ReccWorker:
    """reccworker (recc, 2019) as observed on the wire."""

    def __init__(self, channel: grpc.aio.Channel, bot_id: str, instance: str = "") -> None:
        self.channel = channel
        self.bot_id = bot_id
        self.instance = instance
        self.stub = bots_pb2_grpc.BotsStub(channel)
        self.session = bots_pb2.BotSession()
        self.offered_states: list[int] = []
        self.payload_types: set[str] = set()

    async def start(self) -> None:
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle="")  # empty handle
        for key, value in LINUX:
            device.properties.add(key=key, value=value)
        device.properties.add(key="chroot", value="")  # junk: empty value
        self.session = await self.stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            parent=self.instance,
            bot_session=bots_pb2.BotSession(bot_id=self.bot_id, worker=worker)))

    async def _action(self, lease: bots_pb2.Lease) -> re_pb2.Action:
        self.payload_types.add(lease.payload.type_url)
        action = re_pb2.Action()
        if lease.payload.type_url.endswith("/build.bazel.remote.execution.v2.Action"):
            lease.payload.Unpack(action)
            return action
        digest = re_pb2.Digest()
        assert lease.payload.Unpack(digest), lease.payload.type_url
        return re_pb2.Action.FromString(
            await read_blob(self.channel, self.instance, digest) or b"")

    async def _run(self, lease: bots_pb2.Lease) -> None:
        """Run an acknowledged lease and fill in its outcome the reccworker way."""
        action = await self._action(lease)
        root = await read_blob(self.channel, self.instance, action.input_root_digest)
        directory = re_pb2.Directory.FromString(root or b"")
        for entry in directory.files:
            if await read_blob(self.channel, self.instance, entry.digest) is None:
                lease.state = COMPLETED  # type: ignore[assignment]
                lease.status.CopyFrom(status_pb2.Status(
                    code=code_pb2.FAILED_PRECONDITION,
                    message=f"input {entry.name} ({entry.digest.hash}) is missing"))
                return
        command = re_pb2.Command.FromString(
            await read_blob(self.channel, self.instance, action.command_digest) or b"")
        exit_code, stdout, output = fake_run(command)
        await write_blobs(self.channel, self.instance, output)
        result = re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout)  # raw bytes
        result.output_files.add(path="legacy/out.txt", digest=digest_of(output))
        lease.state = COMPLETED  # type: ignore[assignment]
        lease.result.Pack(result)  # lease.status left UNSET on success

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # The whole session every time, echoing what the server sent.
            response = await self.stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
                name=self.session.name, bot_session=self.session))  # no deadline
            self.session = response
            for lease in self.session.leases:
                if lease.state == PENDING:
                    self.offered_states.append(PENDING)
                    lease.state = ACTIVE  # type: ignore[assignment]  # accept, await the ack
                elif lease.state == ACTIVE and not lease.HasField("result"):
                    await self._run(lease)  # acknowledged ACTIVE: start now
            await asyncio.sleep(0.25)  # it polls every 250 ms


async def test_reccworker(start_server: StartServer) -> None:
    grid = await start_server(config(lease_offer="pending", long_poll=0.5))
    client = Client(grid.channel)
    bot = ReccWorker(grid.channel, bot_id="reccworker-7")
    await bot.start()
    loop = BotLoop()
    loop.start(bot.loop)
    try:
        digest = await client.action("recc", "compile", platform=[("OSFamily", "linux")])
        ok = await client.result(client.execute(digest))
        # Inputs the bot cannot fetch: its FAILED_PRECONDITION is the action's status.
        missing_file = b"never uploaded"
        root = re_pb2.Directory()
        root.files.add(name="main.c", digest=digest_of(missing_file))
        command = re_pb2.Command(arguments=["cc", "main.c"])
        action = re_pb2.Action(command_digest=digest_of(command.SerializeToString()),
                               input_root_digest=digest_of(root.SerializeToString()))
        await client.upload(command.SerializeToString(), root.SerializeToString(),
                            action.SerializeToString())
        missing = await client.result(client.execute(digest_of(action.SerializeToString())))
    finally:
        await loop.stop()

    assert bot.offered_states and set(bot.offered_states) == {PENDING}
    assert bot.payload_types == {"type.googleapis.com/build.bazel.remote.execution.v2.Digest"}
    assert ok.status.code == 0 and ok.result.exit_code == 0
    assert ok.result.output_files[0].path == "legacy/out.txt"
    stdout = ok.result.stdout_raw or await read_blob(grid.channel, "", ok.result.stdout_digest)
    assert stdout == b"recc compile"
    assert ok.result.execution_metadata.worker == "reccworker-7"
    cached = await grid.action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=digest))
    assert cached.exit_code == 0
    assert missing.status.code == code_pb2.FAILED_PRECONDITION
    assert "main.c" in missing.status.message


async def test_reccworker_with_active_offers(start_server: StartServer) -> None:
    """reccworker also takes the default ACTIVE offer with the Action inline."""
    grid = await start_server(config(long_poll=0.5))
    client = Client(grid.channel)
    bot = ReccWorker(grid.channel, bot_id="reccworker-8")
    await bot.start()
    loop = BotLoop()
    loop.start(bot.loop)
    try:
        digest = await client.action("recc", "link")
        ok = await client.result(client.execute(digest))
    finally:
        await loop.stop()
    assert bot.payload_types == {"type.googleapis.com/build.bazel.remote.execution.v2.Action"}
    assert ok.status.code == 0 and ok.result.exit_code == 0


# ------------------------------------------------------------------ BuildGrid's bot
class BgdBot:
    """`bgd bot host-tools` (BuildGrid's former Python bot, 2019) as observed on the wire."""

    DEADLINE = 31.0

    def __init__(self, channel: grpc.aio.Channel, instance: str = "",
                 fail_first: int = 0, hold: bool = False) -> None:
        self.channel = channel
        self.instance = instance
        self.bot_id = f"{instance}.{socket.gethostname()}.{os.getpid()}"
        self.stub = bots_pb2_grpc.BotsStub(channel)
        self.name = ""
        self.leases: dict[str, bots_pb2.Lease] = {}  # its own view, by lease id
        self.cancelled: list[str] = []
        self.ran: list[str] = []
        self.fail_first = fail_first  # report this many runs as INTERNAL failures
        self.hold = hold  # leave runs unfinished (the lease stays PENDING on its side)

    def _body(self) -> bots_pb2.BotSession:
        worker = worker_pb2.Worker()
        device = worker.devices.add(handle=str(uuid.uuid4()))  # random handle
        for key, value in LINUX:
            device.properties.add(key=key, value=value)  # device properties only
        body = bots_pb2.BotSession(name=self.name, bot_id=self.bot_id,
                                   status="OK", worker=worker)
        body.leases.extend(self.leases.values())  # no expire_time, no version
        return body

    async def start(self) -> None:
        session = await self.stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            parent=self.instance, bot_session=self._body()), timeout=self.DEADLINE)
        self.name = session.name

    async def _run(self, lease: bots_pb2.Lease) -> None:
        if self.hold:
            return
        digest = re_pb2.Digest()
        assert lease.payload.Unpack(digest), lease.payload.type_url  # Any(Digest) only
        action = re_pb2.Action.FromString(
            await read_blob(self.channel, self.instance, digest) or b"")
        command = re_pb2.Command.FromString(
            await read_blob(self.channel, self.instance, action.command_digest) or b"")
        self.ran.append(lease.id)
        lease.state = COMPLETED  # type: ignore[assignment]  # straight from PENDING
        if self.fail_first > 0:
            self.fail_first -= 1
            lease.status.CopyFrom(status_pb2.Status(code=code_pb2.INTERNAL,
                                                    message="bot sandbox failure"))
            return
        exit_code, stdout, _ = fake_run(command)
        result = re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout)
        lease.status.CopyFrom(status_pb2.Status(code=code_pb2.OK))
        lease.result.CopyFrom(AnyProto())
        lease.result.Pack(result)

    async def update(self) -> bots_pb2.BotSession:
        response = await self.stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
            name=self.name, bot_session=self._body()), timeout=self.DEADLINE)
        offered = {lease.id: lease for lease in response.leases}
        for lease_id in list(self.leases):
            if lease_id not in offered:  # missing from the response: cancelled (or acked)
                if self.leases[lease_id].state != COMPLETED:
                    self.cancelled.append(lease_id)
                del self.leases[lease_id]
            elif offered[lease_id].state == CANCELLED:
                self.cancelled.append(lease_id)
                del self.leases[lease_id]
        for lease_id, lease in offered.items():
            if lease_id not in self.leases and lease.state == PENDING:
                self.leases[lease_id] = lease
                await self._run(lease)
            # A COMPLETED lease of ours still listed: keep re-sending it.
        return response

    async def loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.update()


async def test_bgd_bot(start_server: StartServer) -> None:
    grid = await start_server(config(lease_offer="pending", long_poll=5))
    client = Client(grid.channel)
    bot = BgdBot(grid.channel)
    await bot.start()
    assert bot.bot_id.startswith(f".{socket.gethostname()}.")
    loop = BotLoop()
    loop.start(bot.loop)
    try:
        started = time.monotonic()
        digest = await client.action("bgd", "job")
        ok = await client.result(client.execute(digest))
        elapsed = time.monotonic() - started
        await wait_for(lambda: not bot.leases)  # its re-sent COMPLETED lease was acknowledged
    finally:
        await loop.stop()
    # Its 31 s long-poll is woken by the assignment, not waited out.
    assert elapsed < 5, elapsed
    assert ok.status.code == 0 and ok.result.exit_code == 0
    stdout = ok.result.stdout_raw or await read_blob(grid.channel, "", ok.result.stdout_digest)
    assert stdout == b"bgd job"
    assert len(bot.ran) == 1 and not bot.cancelled and not bot.leases


async def test_bgd_bot_infrastructure_failure_is_retried(start_server: StartServer) -> None:
    """Its repeated COMPLETED(INTERNAL) report must not be taken for the retry's outcome."""
    grid = await start_server(config(lease_offer="pending", long_poll=5, max_attempts=3))
    client = Client(grid.channel)
    bot = BgdBot(grid.channel, fail_first=1)
    await bot.start()
    loop = BotLoop()
    loop.start(bot.loop)
    try:
        digest = await client.action("bgd", "retried")
        response = await client.result(client.execute(digest))
    finally:
        await loop.stop()
    assert response.status.code == 0, response.status
    assert response.result.exit_code == 0
    assert len(bot.ran) == 2  # the failed run and the retry, each once


async def test_bgd_bot_cancelled_lease(start_server: StartServer) -> None:
    grid = await start_server(config(lease_offer="pending", long_poll=5))
    client = Client(grid.channel)
    bot = BgdBot(grid.channel, hold=True)
    await bot.start()
    digest = await client.action("bgd", "cancelled")
    call = client.execute(digest)
    operation = await client.first_operation(call)
    await bot.update()  # takes the PENDING lease, does not finish it yet
    assert len(bot.leases) == 1
    await operations_pb2_grpc.OperationsStub(grid.channel).CancelOperation(
        operations_pb2.CancelOperationRequest(name=operation.name))
    await bot.update()
    assert bot.cancelled and not bot.leases
    assert (await client.result(call)).status.code == code_pb2.CANCELLED


async def test_three_bots_share_one_grid(start_server: StartServer) -> None:
    """The three kinds at once; the bgd bot insists on PENDING offers: its own instance."""
    grid = await start_server({"instances": {
        "": {"scheduler": {"keepalive": 5, "long-poll": 0.5}},
        "legacy": {"scheduler": {"keepalive": 5, "long-poll": 0.5, "lease-offer": "pending"}},
    }})
    buildbox = BuildboxWorker(grid.channel, bot_id="bb")
    recc = ReccWorker(grid.channel, bot_id="recc")
    bgd = BgdBot(grid.channel, instance="legacy")
    loops = []
    for bot in (buildbox, recc, bgd):
        await bot.start()
        loop = BotLoop()
        loop.start(bot.loop)
        loops.append(loop)
    try:
        client, legacy = Client(grid.channel), Client(grid.channel, instance="legacy")
        digests = [await client.action("shared", str(i)) for i in range(6)]
        legacy_digests = [await legacy.action("legacy", str(i)) for i in range(3)]
        responses = await asyncio.wait_for(asyncio.gather(
            *(client.result(client.execute(d)) for d in digests),
            *(legacy.result(legacy.execute(d)) for d in legacy_digests)), timeout=30)
    finally:
        for loop in loops:
            await loop.stop()
    assert all(r.status.code == 0 and r.result.exit_code == 0 for r in responses)
    assert len(bgd.ran) == 3
    workers = {r.result.execution_metadata.worker for r in responses[:6]}
    assert workers <= {"bb", "recc"}
