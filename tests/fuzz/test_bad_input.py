"""Hand-written bad input that the rest of the suite does not already cover.

Covered elsewhere (not repeated here): malformed digests (test_cas, test_action_cache,
test_execution), sizes that do not match on upload (test_cas, test_bytestream),
resource names with `..` or extra segments (test_bytestream), batches over
max_batch_total_size (test_cas), unsafe input trees on the bot (test_worker_inputs,
test_bot), timeouts above the maximum (test_execution), page tokens never issued
(test_operations, test_cas GetTree), leases a bot never received and results for
another bot's lease sent from the intruder's own session (test_bots).
"""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest
from botkit import (
    ACTIVE,
    COMPLETED,
    Client,
    StubBot,
    action_result,
    poll_leases,
    rpc_error,
    wait_execution,
    worker,
)
from conftest import RunningServer, StartServer, proto_digest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildfleet.digest import Digest
from buildfleet.scheduler.api import SchedulerAPI

from .fuzz_engine import METHODS, method_path

INVALID = grpc.StatusCode.INVALID_ARGUMENT
MiB = 1024 * 1024

pytestmark = pytest.mark.fuzz


async def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        result = call
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await result  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


# -- bytes that are no protobuf message ----------------------------------------------------

@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.containing_service.name}."
                                                         f"{m.name}")
async def test_undecodable_request_bytes_are_invalid_argument(grid: RunningServer,
                                                              method: object) -> None:
    path = method_path(method)  # type: ignore[arg-type]
    junk = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field running past the end
    if method.client_streaming:  # type: ignore[attr-defined]
        call: object = grid.channel.stream_unary(path)(iter([junk]), timeout=10)
    elif method.server_streaming:  # type: ignore[attr-defined]
        call = grid.channel.unary_stream(path)(junk, timeout=10)
    else:
        call = grid.channel.unary_unary(path)(junk, timeout=10)
    code, details = await code_of(call)
    assert code == INVALID, (code, details)
    assert method.input_type.full_name in details  # type: ignore[attr-defined]
    assert "Traceback" not in details and "Exception" not in details


async def test_undecodable_message_in_the_middle_of_an_upload(grid: RunningServer) -> None:
    data = b"x" * 100
    digest = proto_digest(data)
    name = f"uploads/u1/blobs/{digest.hash}/{digest.size_bytes}"
    first = bs_pb2.WriteRequest(resource_name=name, data=data[:50]).SerializeToString()
    call = grid.channel.stream_unary("/google.bytestream.ByteStream/Write")(
        iter([first, b"\x0a\xff\xff"]), timeout=10)
    code, details = await code_of(call)
    assert code == INVALID and "WriteRequest" in details
    missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[digest]))
    assert list(missing.missing_blob_digests) == [digest]
    # The server is fine: the same upload, done properly, goes through.
    response = await grid.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=name, data=data, finish_write=True)]))
    assert response.committed_size == 100


# -- a capacity that used to wedge the scheduler database ------------------------------------

@pytest.mark.parametrize("capacity", ["\u00b2", "\u0661", "99999999999999999999",
                                      "1" + "0" * 5000, "10001"])
async def test_capacity_beyond_what_a_bot_can_have(grid: RunningServer, capacity: str) -> None:
    """Unicode digits int() refuses, numbers beyond SQLite's integers or int()'s digit
    limit, more than MAX_CAPACITY: INVALID_ARGUMENT, and scheduling goes on."""
    stub = bots_pb2_grpc.BotsStub(grid.channel)
    bad = worker("greedy", [("OSFamily", "linux")], capacity=None)
    bad.configs.add(key="capacity", value=capacity)
    code, details = await code_of(stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
        bot_session=bots_pb2.BotSession(bot_id="greedy", worker=bad))))
    assert code == INVALID and "capacity" in details, (code, details)
    bot = StubBot(grid.channel, capacity=2)
    body = bots_pb2.BotSession()
    body.CopyFrom(await bot.register())
    body.worker.CopyFrom(bad)
    code, details = await code_of(stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
        name=body.name, bot_session=body)))
    assert code == INVALID and "capacity" in details
    # The scheduler (and its database) still work.
    client = Client(grid.channel)
    call = client.execute(await client.action("echo", "after", capacity))
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"fine"))
    await bot.update(timeout=1.0)
    assert (await client.result(call)).status.code == code_pb2.OK


def scheduler_of(grid: RunningServer) -> SchedulerAPI:
    scheduler = grid.server.instances.get("").scheduler
    assert scheduler is not None
    return scheduler


async def test_largest_capacity_is_accepted(grid: RunningServer) -> None:
    session = await StubBot(grid.channel, capacity=10_000).register()
    assert (await scheduler_of(grid).get_session(session.name)).capacity == 10_000


# -- digests whose size does not match what is stored --------------------------------------

async def test_known_hash_with_another_size_is_missing_everywhere(grid: RunningServer) -> None:
    client = Client(grid.channel)
    action = await client.action("true")
    directory = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=action)])
    root = await grid.upload(directory.SerializeToString())
    for real in (action, root):
        for size in (real.size_bytes - 1, real.size_bytes + 1, 0):
            wrong = re_pb2.Digest(hash=real.hash, size_bytes=size)
            missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                blob_digests=[wrong, real]))
            assert list(missing.missing_blob_digests) == [wrong]
            read = await grid.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[wrong]))
            assert read.responses[0].status.code == code_pb2.NOT_FOUND
            code, _ = await code_of(grid.bytestream.Read(bs_pb2.ReadRequest(
                resource_name=f"blobs/{wrong.hash}/{wrong.size_bytes}")))
            assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE)
            code, _ = await code_of(grid.cas.GetTree(re_pb2.GetTreeRequest(root_digest=wrong)))
            assert code == grpc.StatusCode.NOT_FOUND
    wrong_action = re_pb2.Digest(hash=action.hash, size_bytes=action.size_bytes + 1)
    error = await rpc_error(client.execute(wrong_action))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION


# -- requests beyond the advertised limits -------------------------------------------------

async def test_message_over_the_receive_limit(grid: RunningServer) -> None:
    """Beyond gRPC's message limit (well over max_batch_total_size): RESOURCE_EXHAUSTED
    from gRPC itself; the server carries on."""
    data = b"z" * (17 * MiB)
    code, _ = await code_of(grid.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(data),
                                                         data=data)])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    many = [re_pb2.Digest(hash="ab" * 32, size_bytes=n) for n in range(250_000)]
    code, _ = await code_of(grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=many)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = await code_of(grid.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=f"uploads/u/blobs/{proto_digest(data).hash}/{len(data)}", data=data,
        finish_write=True)])))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await grid.upload(b"still answering")


# -- directories: unsafe and duplicate names, shared subtrees, cycles ----------------------

async def test_get_tree_of_a_lattice_visits_each_directory_once(grid: RunningServer) -> None:
    """40 levels, each naming the next level twice: 2^40 paths, 41 directories."""
    child = await grid.upload(re_pb2.Directory().SerializeToString())
    levels = [child]
    for _ in range(40):
        directory = re_pb2.Directory(directories=[
            re_pb2.DirectoryNode(name="left", digest=levels[-1]),
            re_pb2.DirectoryNode(name="right", digest=levels[-1])])
        levels.append(await grid.upload(directory.SerializeToString()))
    pages = [page async for page in grid.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=levels[-1]))]
    directories = [d for page in pages for d in page.directories]
    assert len(directories) == 41
    assert [proto_digest(d.SerializeToString()) for d in directories] == levels[::-1]

    # The action cache's completeness check walks the same lattice (DIRECTORY_ONLY).
    result = re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(
        path="out", root_directory_digest=levels[-1])])
    key = proto_digest(b"lattice action")
    await grid.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=key, action_result=result))
    cached = await asyncio.wait_for(grid.action_cache.GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=key)), 10)
    assert cached.output_directories[0].root_directory_digest == levels[-1]


async def test_get_tree_over_a_cycle_planted_in_storage_terminates(grid: RunningServer) -> None:
    """A directory naming itself cannot be uploaded (its digest would have to be in its
    own bytes); planted in storage behind the CAS's back, it is found not to match its
    digest and treated as missing, so the walk ends."""
    cas = grid.server.instances.get("").cas
    fake = re_pb2.Digest(hash=hashlib.sha256(b"the cycle").hexdigest(), size_bytes=0)
    blob = b""
    while len(blob) != fake.size_bytes:  # a size that names itself: a true cycle
        fake.size_bytes = len(blob)
        blob = re_pb2.Directory(directories=[
            re_pb2.DirectoryNode(name="again", digest=fake)]).SerializeToString()
    await cas.store.put(Digest(fake.hash, fake.size_bytes), blob)
    parent = await grid.upload(re_pb2.Directory(directories=[
        re_pb2.DirectoryNode(name="loop", digest=fake)]).SerializeToString())
    pages = await asyncio.wait_for(_pages(grid, parent), 10)
    assert [proto_digest(d.SerializeToString()) for p in pages for d in p.directories] == [
        parent]
    missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[fake]))
    assert list(missing.missing_blob_digests) == [fake]


async def _pages(grid: RunningServer, root: re_pb2.Digest) -> list[re_pb2.GetTreeResponse]:
    return [page async for page in grid.cas.GetTree(re_pb2.GetTreeRequest(root_digest=root))]


async def test_unsafe_and_duplicate_names_are_stored_and_returned_as_they_are(
        grid: RunningServer) -> None:
    """The CAS does not interpret names (bots refuse unsafe trees, see test_worker_inputs):
    GetTree hands back such a directory unchanged and nothing breaks."""
    leaf = await grid.upload(re_pb2.Directory().SerializeToString())
    file = await grid.upload(b"content")
    odd = re_pb2.Directory(
        files=[re_pb2.FileNode(name="dup", digest=file), re_pb2.FileNode(name="dup", digest=file),
               re_pb2.FileNode(name="", digest=file)],
        directories=[re_pb2.DirectoryNode(name="..", digest=leaf),
                     re_pb2.DirectoryNode(name="a/b", digest=leaf),
                     re_pb2.DirectoryNode(name="\x00", digest=leaf)],
        symlinks=[re_pb2.SymlinkNode(name="up", target="../../etc/passwd")])
    root = await grid.upload(odd.SerializeToString())
    pages = await _pages(grid, root)
    assert [d for p in pages for d in p.directories] == [odd, re_pb2.Directory()]


# -- action timeouts ------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, nanos", [(-1, 0), (0, -5), (10**12, 0), (2**63 - 1, 0)])
async def test_negative_or_enormous_action_timeouts(grid: RunningServer, seconds: int,
                                                    nanos: int) -> None:
    client = Client(grid.channel)
    command = re_pb2.Command(arguments=["sleep", "1"])
    root = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(command_digest=proto_digest(command.SerializeToString()),
                           input_root_digest=proto_digest(root))
    action.timeout.seconds, action.timeout.nanos = seconds, nanos
    await client.upload(command.SerializeToString(), root, action.SerializeToString())
    error = await rpc_error(client.execute(proto_digest(action.SerializeToString())))
    assert error.code() == INVALID and "timeout" in (error.details() or "")


# -- names that belong to another instance -------------------------------------------------

async def test_session_and_operation_names_of_another_instance(
        start_server: StartServer) -> None:
    server = await start_server({"instances": {"a": {}, "b/c": {}}})
    bot = StubBot(server.channel, instance="a", bot_id="bot-a")
    await bot.register()
    assert bot.session is not None and bot.session.name.startswith("a/")
    session_id = bot.session.name.split("/", 1)[1]
    stub = bots_pb2_grpc.BotsStub(server.channel)
    for foreign in (f"b/c/{session_id}", session_id, f"b/{session_id}"):
        body = bots_pb2.BotSession()
        body.CopyFrom(bot.session)
        body.name = foreign
        code, details = await code_of(stub.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
            name=foreign, bot_session=body), timeout=2))
        assert code == INVALID, (foreign, code, details)
        code, _ = await code_of(stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
            name=foreign, msg="hello")))
        assert code == INVALID, foreign
    await bot.update(timeout=0.3)  # the real session is untouched

    client = Client(server.channel, instance="a")
    call = client.execute(await client.action("true"))
    name = (await client.first_operation(call)).name
    operation_id = name.split("/operations/", 1)[1]
    operations = operations_pb2_grpc.OperationsStub(server.channel)
    for foreign in (f"b/c/operations/{operation_id}", f"operations/{operation_id}",
                    f"z/operations/{operation_id}"):
        error = await rpc_error(wait_execution(server.channel, foreign))
        assert error.code() == grpc.StatusCode.NOT_FOUND, foreign
        for request in (operations.GetOperation(operations_pb2.GetOperationRequest(
                            name=foreign)),
                        operations.CancelOperation(operations_pb2.CancelOperationRequest(
                            name=foreign)),
                        operations.DeleteOperation(operations_pb2.DeleteOperationRequest(
                            name=foreign))):
            code, _ = await code_of(request)
            assert code == grpc.StatusCode.NOT_FOUND, foreign
    got = await operations.GetOperation(operations_pb2.GetOperationRequest(name=name))
    assert not got.done  # neither cancelled nor deleted through a foreign name
    call.cancel()


# -- a bot completing a lease held by another bot's session -------------------------------

async def test_lease_of_another_session_cannot_be_completed_through_its_name(
        grid: RunningServer) -> None:
    """The intruder sends the holder's session name (with its own bot id, or none): the
    report is refused or ignored, and the holder's result is the one that counts."""
    client = Client(grid.channel)
    holder, intruder = StubBot(grid.channel, bot_id="holder"), StubBot(grid.channel,
                                                                         bot_id="intruder")
    await holder.register()
    await intruder.register()
    digest = await client.action("echo", "mine")
    call = client.execute(digest)
    [lease] = await poll_leases(holder)
    assert holder.session is not None
    forged = bots_pb2.BotSession(name=holder.session.name, bot_id="intruder")
    forged.leases.add(id=lease.id, state=COMPLETED).result.Pack(
        action_result(0, b"forged"))
    code, details = await code_of(intruder.stub.UpdateBotSession(
        bots_pb2.UpdateBotSessionRequest(name=holder.session.name, bot_session=forged),
        timeout=2))
    assert code == INVALID and "belongs to bot 'holder'" in details
    assert not any(op.done for op in await scheduler_of(grid).list_operations())

    holder.complete(lease.id, action_result(0, b"the real result"))
    await holder.update(timeout=1.0)
    response = await client.result(call)
    assert response.status.code == code_pb2.OK
    assert response.result.stdout_digest == proto_digest(b"the real result")
    cached = await grid.action_cache.GetActionResult(re_pb2.GetActionResultRequest(
        action_digest=digest))
    assert cached.stdout_digest == proto_digest(b"the real result")
    assert (await intruder.update(timeout=0.3)).leases == []
    assert [item.state for item in holder.leases()] in ([], [ACTIVE])


async def test_oversized_bot_event_message_is_kept_bounded(grid: RunningServer,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    """PostBotEventTemp messages are kept per session and logged: a huge one is cut."""
    bot = StubBot(grid.channel, bot_id="chatty")
    session = await bot.register()
    huge = "x" * (8 * MiB)
    await bot.stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
        name=session.name, type=bots_pb2.PostBotEventTempRequest.ERROR, msg=huge))
    [event] = await scheduler_of(grid).bot_events("chatty")
    assert len(event.message) < 5000 and "more characters dropped" in event.message
    assert all(len(record.getMessage()) < 6000 for record in caplog.records)
