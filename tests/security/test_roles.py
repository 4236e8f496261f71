"""Every role against every method of every service: which roles pass (any answer
but PERMISSION_DENIED: the request may still be refused on its own merits), per
instance, and with the message a refused principal gets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from authkit import Keys, channel
from conftest import RunningServer, StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc

from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.build.bazel.remote.logstream.v1 import remote_logstream_pb2 as ls_pb2
from buildfleet._proto.build.bazel.remote.logstream.v1 import (
    remote_logstream_pb2_grpc as ls_grpc,
)
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc

EMPTY = re_pb2.Digest(hash="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
MISSING = re_pb2.Digest(hash="a" * 64, size_bytes=3)
Call = Callable[[grpc.aio.Channel, str], Awaitable[Any]]


async def _stream(call: Any) -> None:
    async for _ in call:
        pass


def _writes(instance: str) -> Any:
    prefix = f"{instance}/" if instance else ""

    async def requests() -> Any:
        yield bs_pb2.WriteRequest(
            resource_name=f"{prefix}uploads/0b1f2a44-4c53-4a4e-9bce-4e5d6a7b8c9d/blobs/"
            f"{EMPTY.hash}/0", finish_write=True)
    return requests()


def _log_writes(instance: str) -> Any:
    prefix = f"{instance}/" if instance else ""

    async def requests() -> Any:
        yield bs_pb2.WriteRequest(resource_name=f"{prefix}logstreams/nope/secret",
                                  data=b"output", finish_write=True)
    return requests()


def _op(instance: str) -> str:
    return f"{instance}/operations/nope" if instance else "operations/nope"


METHODS: dict[str, tuple[Call, set[str]]] = {
    "GetCapabilities": (lambda ch, i: re_grpc.CapabilitiesStub(ch).GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=i)), {"read", "execute", "bot"}),
    "FindMissingBlobs": (lambda ch, i: re_grpc.ContentAddressableStorageStub(ch)
                         .FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                             instance_name=i, blob_digests=[MISSING])),
                         {"read", "execute", "bot"}),
    "BatchReadBlobs": (lambda ch, i: re_grpc.ContentAddressableStorageStub(ch).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(instance_name=i, digests=[MISSING])),
        {"read", "execute", "bot"}),
    "GetTree": (lambda ch, i: _stream(re_grpc.ContentAddressableStorageStub(ch).GetTree(
        re_pb2.GetTreeRequest(instance_name=i, root_digest=MISSING))),
        {"read", "execute", "bot"}),
    "BatchUpdateBlobs": (lambda ch, i: re_grpc.ContentAddressableStorageStub(ch)
                         .BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                             instance_name=i, requests=[
                                 re_pb2.BatchUpdateBlobsRequest.Request(digest=EMPTY)])),
                         {"execute", "bot"}),
    "GetActionResult": (lambda ch, i: re_grpc.ActionCacheStub(ch).GetActionResult(
        re_pb2.GetActionResultRequest(instance_name=i, action_digest=MISSING)),
        {"read", "execute"}),
    "UpdateActionResult": (lambda ch, i: re_grpc.ActionCacheStub(ch).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(instance_name=i, action_digest=MISSING,
                                         action_result=re_pb2.ActionResult())),
        {"cache-write"}),
    "Execute": (lambda ch, i: _stream(re_grpc.ExecutionStub(ch).Execute(
        re_pb2.ExecuteRequest(instance_name=i, action_digest=MISSING))), {"execute"}),
    "WaitExecution": (lambda ch, i: _stream(re_grpc.ExecutionStub(ch).WaitExecution(
        re_pb2.WaitExecutionRequest(name=_op(i)))), {"execute"}),
    "ByteStream.Read": (lambda ch, i: _stream(bs_grpc.ByteStreamStub(ch).Read(
        bs_pb2.ReadRequest(resource_name=(f"{i}/" if i else "") +
                           f"blobs/{MISSING.hash}/3"))), {"read", "execute", "bot"}),
    "ByteStream.Write": (lambda ch, i: bs_grpc.ByteStreamStub(ch).Write(_writes(i)),
                         {"execute", "bot"}),
    "QueryWriteStatus": (lambda ch, i: bs_grpc.ByteStreamStub(ch).QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=(f"{i}/" if i else "") +
                                       f"uploads/x/blobs/{MISSING.hash}/3")),
        {"execute", "bot"}),
    "CreateLogStream": (lambda ch, i: ls_grpc.LogStreamServiceStub(ch).CreateLogStream(
        ls_pb2.CreateLogStreamRequest(parent=i)), {"bot"}),
    "ByteStream.Write (log stream)": (lambda ch, i: bs_grpc.ByteStreamStub(ch).Write(
        _log_writes(i)), {"bot"}),
    "QueryWriteStatus (log stream)": (lambda ch, i: bs_grpc.ByteStreamStub(ch)
                                      .QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(
                                          resource_name=(f"{i}/" if i else "") +
                                          "logstreams/nope/secret")), {"bot"}),
    "ByteStream.Read (log stream)": (lambda ch, i: _stream(bs_grpc.ByteStreamStub(ch).Read(
        bs_pb2.ReadRequest(resource_name=(f"{i}/" if i else "") + "logstreams/nope"))),
        {"read", "execute", "bot"}),
    "FetchBlob": (lambda ch, i: ra_grpc.FetchStub(ch).FetchBlob(ra_pb2.FetchBlobRequest(
        instance_name=i, uris=["urn:role-test"])), {"read", "execute"}),
    "FetchDirectory": (lambda ch, i: ra_grpc.FetchStub(ch).FetchDirectory(
        ra_pb2.FetchDirectoryRequest(instance_name=i, uris=["urn:role-test"])),
        {"read", "execute"}),
    "PushBlob": (lambda ch, i: ra_grpc.PushStub(ch).PushBlob(ra_pb2.PushBlobRequest(
        instance_name=i, uris=["urn:role-test"], blob_digest=EMPTY)), {"cache-write"}),
    "PushDirectory": (lambda ch, i: ra_grpc.PushStub(ch).PushDirectory(
        ra_pb2.PushDirectoryRequest(instance_name=i, uris=["urn:role-test"],
                                    root_directory_digest=MISSING)), {"cache-write"}),
    "GetOperation": (lambda ch, i: operations_pb2_grpc.OperationsStub(ch).GetOperation(
        operations_pb2.GetOperationRequest(name=_op(i))), {"execute"}),
    "ListOperations": (lambda ch, i: operations_pb2_grpc.OperationsStub(ch).ListOperations(
        operations_pb2.ListOperationsRequest(name=i)), {"execute"}),
    "CancelOperation": (lambda ch, i: operations_pb2_grpc.OperationsStub(ch).CancelOperation(
        operations_pb2.CancelOperationRequest(name=_op(i))), {"execute"}),
    "DeleteOperation": (lambda ch, i: operations_pb2_grpc.OperationsStub(ch).DeleteOperation(
        operations_pb2.DeleteOperationRequest(name=_op(i))), {"execute"}),
    "WaitOperation": (lambda ch, i: operations_pb2_grpc.OperationsStub(ch).WaitOperation(
        operations_pb2.WaitOperationRequest(name=_op(i))), {"execute"}),
    "CreateBotSession": (lambda ch, i: bots_pb2_grpc.BotsStub(ch).CreateBotSession(
        bots_pb2.CreateBotSessionRequest(parent=i, bot_session=bots_pb2.BotSession(
            bot_id="role-test-bot"))), {"bot"}),
    "UpdateBotSession": (lambda ch, i: bots_pb2_grpc.BotsStub(ch).UpdateBotSession(
        bots_pb2.UpdateBotSessionRequest(name=f"{i}/nope" if i else "nope")), {"bot"}),
    "PostBotEventTemp": (lambda ch, i: bots_pb2_grpc.BotsStub(ch).PostBotEventTemp(
        bots_pb2.PostBotEventTempRequest(name=f"{i}/nope" if i else "nope", msg="hi")),
        {"bot"}),
    "Admin.ListBots": (lambda ch, i: admin_grpc.AdminStub(ch).ListBots(
        admin_pb2.ListBotsRequest(instance_name=i)), {"read", "execute"}),
    "Admin.GetBot": (lambda ch, i: admin_grpc.AdminStub(ch).GetBot(
        admin_pb2.GetBotRequest(instance_name=i, bot_id="nope")), {"read", "execute"}),
    "Admin.ListQueues": (lambda ch, i: admin_grpc.AdminStub(ch).ListQueues(
        admin_pb2.ListQueuesRequest(instance_name=i)), {"read", "execute"}),
    "Admin.ListDrains": (lambda ch, i: admin_grpc.AdminStub(ch).ListDrains(
        admin_pb2.ListDrainsRequest(instance_name=i)), {"read", "execute"}),
    "Admin.ListOperations": (lambda ch, i: admin_grpc.AdminStub(ch).ListOperations(
        admin_pb2.ListOperationsRequest(instance_name=i)), {"read", "execute"}),
    "Admin.GetOperation": (lambda ch, i: admin_grpc.AdminStub(ch).GetOperation(
        admin_pb2.GetOperationRequest(name=_op(i))), {"read", "execute"}),
    "Admin.CancelOperation": (lambda ch, i: admin_grpc.AdminStub(ch).CancelOperation(
        admin_pb2.CancelOperationRequest(name=_op(i))), set()),
    "Admin.AddDrain": (lambda ch, i: admin_grpc.AdminStub(ch).AddDrain(
        admin_pb2.AddDrainRequest(instance_name=i, pattern="role-test-*")), set()),
    "Admin.RemoveDrain": (lambda ch, i: admin_grpc.AdminStub(ch).RemoveDrain(
        admin_pb2.RemoveDrainRequest(instance_name=i, pattern="nope")), set()),
}
ROLES = ["read", "execute", "cache-write", "bot", "admin"]


async def outcome(call: Call, ch: grpc.aio.Channel, instance: str) -> str:
    try:
        await call(ch, instance)
        return "OK"
    except grpc.aio.AioRpcError as error:
        return error.code().name


@pytest.fixture
async def grid(start_server: StartServer, tmp_path: Path) -> tuple[Keys, RunningServer]:
    keys = Keys(tmp_path / "keys")
    server = await start_server({
        "tls": keys.tls(), "auth": keys.auth(),
        "instances": {"": {}, "ci/linux": {}}})
    return keys, server


@pytest.mark.parametrize("role", ROLES)
async def test_which_roles_may_call_which_methods(grid: tuple[Keys, RunningServer],
                                                  role: str) -> None:
    keys, server = grid
    token = keys.token(f"holder-of-{role}", role)
    wrong = []
    async with channel(server.address, keys, token=token) as ch:
        for method, (call, allowed) in METHODS.items():
            result = await outcome(call, ch, "")
            expected_allowed = role == "admin" or role in allowed
            if (result != "PERMISSION_DENIED") != expected_allowed or result in (
                    "UNAUTHENTICATED", "INTERNAL", "UNKNOWN"):
                wrong.append((method, result))
    assert not wrong, f"{role}: {wrong}"


async def test_grants_hold_on_the_instances_they_name(grid: tuple[Keys, RunningServer]
                                                      ) -> None:
    keys, server = grid
    token = keys.token("ci-only", "execute:ci/*")
    call = METHODS["FindMissingBlobs"][0]
    async with channel(server.address, keys, token=token) as ch:
        assert await outcome(call, ch, "ci/linux") == "OK"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(ch, "")
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        details = caught.value.details() or ""
        assert "principal 'ci-only'" in details and "instance ''" in details
        assert "one of the roles bot, execute, read" in details


async def test_health_stays_open_and_unauthenticated_calls_are_refused(
        grid: tuple[Keys, RunningServer]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    keys, server = grid
    async with channel(server.address, keys) as anonymous:
        answer = await health_pb2_grpc.HealthStub(anonymous).Check(
            health_pb2.HealthCheckRequest(service=""))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        for method, (call, _) in METHODS.items():
            assert await outcome(call, anonymous, "") == "UNAUTHENTICATED", method
