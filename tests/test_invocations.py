"""Whose build an action belongs to: the RequestMetadata that Bazel and other clients
send with Execute is kept with the operation, in both strategies, and shown where
operations are shown (the Admin API, `buildfleet ops`, filters by invocation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import grpc
import pytest
from botkit import Client
from conftest import RunningServer, StartServer
from pgkit import postgres_schema
from procutil import run_buildfleet

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc

BOTH_SCHEDULERS = True


def bazel_metadata(invocation: str, correlated: str = "", mnemonic: str = "CppCompile",
                   target: str = "//app:main") -> re_pb2.RequestMetadata:
    return re_pb2.RequestMetadata(
        tool_details=re_pb2.ToolDetails(tool_name="bazel", tool_version="7.4.1"),
        action_id="a" * 64, tool_invocation_id=invocation,
        correlated_invocations_id=correlated, action_mnemonic=mnemonic, target_id=target,
        configuration_id="k8-fastbuild")


async def summary(server: RunningServer, name: str) -> admin_pb2.OperationSummary:
    detail = await admin_grpc.AdminStub(server.channel).GetOperation(
        admin_pb2.GetOperationRequest(name=name))
    return detail.summary


async def listed(server: RunningServer, invocation: str) -> list[str]:
    answer = await admin_grpc.AdminStub(server.channel).ListOperations(
        admin_pb2.ListOperationsRequest(instance_name="", invocation=invocation))
    return [o.name for o in answer.operations]


async def test_the_request_metadata_is_kept_with_each_operation(
        start_server: StartServer) -> None:
    server = await start_server()
    client = Client(server.channel)
    action = await client.action("cc", "-c", "main.c")
    ci = bazel_metadata("inv-1", correlated="ci-job-42")
    first = client.execute(action, request_metadata=ci)
    first_name = (await client.first_operation(first)).name
    # the same action from a developer's build: one job, two operations, each its own
    laptop = bazel_metadata("inv-2", mnemonic="CppCompile", target="//app:main")
    second = client.execute(action, request_metadata=laptop)
    second_name = (await client.first_operation(second)).name
    anonymous = client.execute(await client.action("true"))
    anonymous_name = (await client.first_operation(anonymous)).name

    shown = await summary(server, first_name)
    assert shown.request_metadata == ci
    assert shown.build == "correlated:ci-job-42"
    shown = await summary(server, second_name)
    assert shown.request_metadata.tool_invocation_id == "inv-2"
    assert shown.build == "invocation:inv-2"
    shown = await summary(server, anonymous_name)
    assert shown.request_metadata == re_pb2.RequestMetadata() and shown.build == ""

    assert await listed(server, "inv-1") == [first_name]
    assert await listed(server, "ci-job-42") == [first_name]
    assert await listed(server, "invocation:inv-2") == [second_name]
    assert await listed(server, "inv-3") == []
    for call in (first, second, anonymous):
        call.cancel()


async def test_a_cache_hit_keeps_it_too(start_server: StartServer) -> None:
    server = await start_server()
    client = Client(server.channel)
    action = await client.action("echo", "cached")
    await server.action_cache.UpdateActionResult(re_pb2.UpdateActionResultRequest(
        action_digest=action, action_result=re_pb2.ActionResult(exit_code=0)))
    call = client.execute(action, request_metadata=bazel_metadata("inv-cached"))
    operation = await client.first_operation(call)
    assert operation.done
    shown = await summary(server, operation.name)
    assert shown.cached and shown.request_metadata.tool_invocation_id == "inv-cached"


@pytest.mark.parametrize(("header", "words"), [
    (b"\xff\xff\xff", "is not a serialized"),
    (re_pb2.RequestMetadata(target_id="x" * 5000).SerializeToString(), "more than the 4096"),
])
async def test_a_malformed_header_is_invalid_argument(
        start_server: StartServer, header: bytes, words: str) -> None:
    server = await start_server()
    client = Client(server.channel)
    call = client.execute(await client.action("true"), request_metadata=header)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await client.first_operation(call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (refused.value.details() or "")


async def test_it_survives_a_restart(start_server: StartServer, tmp_path: Path,
                                     scheduler_kind: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        config: dict[str, Any] = {}
        if scheduler_kind == "replicated":  # both servers on one database
            config["database"] = await stack.enter_async_context(postgres_schema())
        first = await start_server(config, data_dir=tmp_path / "kept")
        client = Client(first.channel)
        call = client.execute(await client.action("sleep", "1"),
                              request_metadata=bazel_metadata("inv-kept"))
        name = (await client.first_operation(call)).name
        call.cancel()
        await first.channel.close()
        await first.server.stop(0)
        second = await start_server(config, data_dir=tmp_path / "kept")
        shown = await summary(second, name)
        assert shown.request_metadata.tool_invocation_id == "inv-kept"
        await second.channel.close()
        await second.server.stop(0)


async def test_buildfleet_ops_shows_and_filters_by_invocation(
        start_server: StartServer, tmp_path: Path) -> None:
    server = await start_server()
    client = Client(server.channel)
    call = client.execute(await client.action("javac", "A.java"),
                          request_metadata=bazel_metadata("inv-cli", mnemonic="Javac",
                                                          target="//java:lib"))
    name = (await client.first_operation(call)).name

    def cli(*args: str) -> Any:
        return run_buildfleet(*args, "--server", f"grpc://{server.address}", cwd=tmp_path)

    shown = await asyncio.to_thread(cli, "ops", "show", name)
    assert shown.returncode == 0, shown.stderr
    for line in ("tool:       bazel 7.4.1", "invocation: inv-cli", "build:      invocation:inv-cli",
                 "mnemonic:   Javac", "target:     //java:lib"):
        assert line in shown.stdout, shown.stdout
    mine = await asyncio.to_thread(cli, "ops", "list", "--invocation", "inv-cli", "--json")
    assert [o["name"] for o in json.loads(mine.stdout)["operations"]] == [name]
    table = await asyncio.to_thread(cli, "ops", "list")
    assert "Javac" in table.stdout
    call.cancel()
