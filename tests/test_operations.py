"""google.longrunning.Operations over executing instances, through real gRPC on loopback.

Operations are created with Execute (tests/botkit.py Client) and moved through
their stages by stub bots; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from botkit import (
    Client,
    StubBot,
    action_result,
    digest_of,
    execute_response,
    expect_no_work,
    poll_leases,
    wait_execution,
)
from conftest import RunningServer, StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

# Every test here runs on both schedulers (tests/conftest.py).
BOTH_SCHEDULERS = True

Stage = re_pb2.ExecutionStage


def operations(server: RunningServer) -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(server.channel)


async def get(server: RunningServer, name: str) -> operations_pb2.Operation:
    return await operations(server).GetOperation(operations_pb2.GetOperationRequest(name=name))


async def list_names(server: RunningServer, filter: str = "", instance: str = "") -> list[str]:
    """Every operation name ListOperations gives, following the pages."""
    names: list[str] = []
    token = ""
    while True:
        response = await operations(server).ListOperations(operations_pb2.ListOperationsRequest(
            name=instance, filter=filter, page_token=token, page_size=1000))
        names += [op.name for op in response.operations]
        token = response.next_page_token
        if not token:
            return names


async def submit(client: Client, *arguments: str, **options: object) -> tuple[str, re_pb2.Digest]:
    """Execute a new action; its operation name (once queued) and action digest."""
    digest = await client.action(*arguments)
    call = client.execute(digest, **options)  # type: ignore[arg-type]
    operation = await client.first_operation(call)
    call.cancel()
    return operation.name, digest


async def test_get_operation(grid: RunningServer) -> None:
    client = Client(grid.channel)
    name, digest = await submit(client, "echo", "get")
    operation = await get(grid, name)
    assert operation.name == name and not operation.done
    metadata = Client.metadata(operation)
    assert metadata.stage == Stage.QUEUED and metadata.action_digest == digest
    assert not operation.HasField("response") and not operation.HasField("error")

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    assert Client.metadata(await get(grid, name)).stage == Stage.EXECUTING
    bot.complete(lease.id, action_result(exit_code=3))
    await bot.update(timeout=1.0)
    operation = await get(grid, name)
    assert operation.done and Client.metadata(operation).stage == Stage.COMPLETED
    response = execute_response(operation)
    assert response.status.code == code_pb2.OK and response.result.exit_code == 3


async def test_list_operations_by_stage_and_done(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    completed, _ = await submit(client, "echo", "completed")
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    executing, _ = await submit(client, "echo", "executing")
    await poll_leases(bot)
    queued, _ = await submit(client, "echo", "queued")  # the capacity-1 bot is busy

    assert await list_names(grid, "stage=QUEUED") == [queued]
    assert await list_names(grid, "stage=EXECUTING") == [executing]
    assert await list_names(grid, "stage = COMPLETED") == [completed]
    assert await list_names(grid, "done=true") == [completed]
    assert await list_names(grid, "done=false") == [executing, queued]
    assert await list_names(grid) == [completed, executing, queued]
    listed = (await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
        name="", filter="stage=EXECUTING"))).operations
    assert Client.metadata(listed[0]).stage == Stage.EXECUTING and not listed[0].done


async def test_list_operations_pages(grid: RunningServer) -> None:
    client = Client(grid.channel)
    created = [(await submit(client, "page", str(i)))[0] for i in range(5)]
    pages: list[list[str]] = []
    token = ""
    while True:
        response = await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
            name="", page_size=2, page_token=token))
        pages.append([op.name for op in response.operations])
        token = response.next_page_token
        if not token:
            break
        assert len(pages) < 10, "paging does not end"
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [name for page in pages for name in page] == created


@pytest.mark.parametrize("token", ["bogus", "djE6MTpvdGhlcg==", "!!!", "v1:0:"])
async def test_bogus_page_token_is_invalid_argument(grid: RunningServer, token: str) -> None:
    await submit(Client(grid.channel), "true")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
            name="", page_token=token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (info.value.details() or "")


@pytest.mark.parametrize("filter", ["stage=RUNNING", "done=maybe", "name=x", "stage=QUEUED and",
                                    "garbage"])
async def test_bad_filter_is_invalid_argument(grid: RunningServer, filter: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
            name="", filter=filter))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "filter" in (info.value.details() or "")


async def test_list_operations_of_unknown_instance_is_invalid_argument(
        grid: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
            name="no-such-instance"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_cancel_queued_operation(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "cancel me")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    await operations(grid).CancelOperation(operations_pb2.CancelOperationRequest(name=name))

    response = await client.result(call)  # the open Execute stream ends
    assert response.status.code == code_pb2.CANCELLED
    operation = await get(grid, name)
    assert operation.done
    assert execute_response(operation).status.code == code_pb2.CANCELLED
    assert await list_names(grid, "stage=QUEUED") == []

    bot = StubBot(grid.channel)
    await bot.register()
    await expect_no_work(bot)
    # Cancelling again (or a done operation) is harmless.
    await operations(grid).CancelOperation(operations_pb2.CancelOperationRequest(name=name))
    assert execute_response(await get(grid, name)).status.code == code_pb2.CANCELLED


async def test_cancel_one_of_two_deduplicated_operations(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "wanted twice")
    first, second = client.execute(digest), client.execute(digest)
    first_name = (await client.first_operation(first)).name
    await client.first_operation(second)
    await operations(grid).CancelOperation(operations_pb2.CancelOperationRequest(
        name=first_name))
    assert (await client.result(first)).status.code == code_pb2.CANCELLED

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    response = await client.result(second)
    assert response.status.code == code_pb2.OK and response.result.exit_code == 0
    assert execute_response(await get(grid, first_name)).status.code == code_pb2.CANCELLED


async def test_cancel_one_of_two_operations_of_a_running_job(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "running for two")
    first = client.execute(digest)
    first_name = (await client.first_operation(first)).name
    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    second = client.execute(digest)
    await client.first_operation(second)
    await operations(grid).CancelOperation(operations_pb2.CancelOperationRequest(
        name=first_name))
    assert (await client.result(first)).status.code == code_pb2.CANCELLED
    await expect_no_work(bot)  # its lease is not cancelled
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    assert (await client.result(second)).status.code == code_pb2.OK


async def test_negative_page_size_is_invalid_argument(grid: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
            name="", page_size=-1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_operation(grid: RunningServer) -> None:
    client = Client(grid.channel)
    name, _ = await submit(client, "echo", "delete me")
    await operations(grid).DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await get(grid, name)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert name not in await list_names(grid)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_wait_operation(grid: RunningServer) -> None:
    client = Client(grid.channel)
    name, _ = await submit(client, "echo", "wait for me")
    started = time.monotonic()
    operation = await operations(grid).WaitOperation(operations_pb2.WaitOperationRequest(
        name=name, timeout=Duration(nanos=200_000_000)), timeout=5)
    assert 0.15 < time.monotonic() - started < 2
    assert operation.name == name and not operation.done

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    waiting = operations(grid).WaitOperation(operations_pb2.WaitOperationRequest(
        name=name, timeout=Duration(seconds=10)), timeout=15)
    bot.complete(lease.id, action_result(0))
    await bot.update(timeout=1.0)
    started = time.monotonic()
    operation = await waiting
    assert time.monotonic() - started < 2
    assert operation.done and execute_response(operation).status.code == code_pb2.OK
    # Once done it returns at once.
    again = await operations(grid).WaitOperation(operations_pb2.WaitOperationRequest(
        name=name, timeout=Duration(seconds=10)), timeout=2)
    assert again.done


async def test_wait_operation_bounded_by_the_call_deadline(grid: RunningServer) -> None:
    name, _ = await submit(Client(grid.channel), "echo", "deadline")
    operation = await operations(grid).WaitOperation(
        operations_pb2.WaitOperationRequest(name=name), timeout=1.0)
    assert operation.name == name and not operation.done


UNKNOWN_NAMES = [
    "operations/00000000-0000-0000-0000-000000000000",
    "not-an-operation",
    "missing/operations/00000000-0000-0000-0000-000000000000",
]


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
async def test_unknown_operation_is_not_found(grid: RunningServer, name: str) -> None:
    stub = operations(grid)
    for call in (stub.GetOperation(operations_pb2.GetOperationRequest(name=name)),
                 stub.CancelOperation(operations_pb2.CancelOperationRequest(name=name)),
                 stub.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name)),
                 stub.WaitOperation(operations_pb2.WaitOperationRequest(name=name),
                                    timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND, call


async def test_operations_of_a_named_instance(start_server: StartServer) -> None:
    server = await start_server({"instances": {"ci": {}, "": {}}})
    ci = Client(server.channel, instance="ci")
    digest = await ci.action("make")
    call = ci.execute(digest)
    name = (await ci.first_operation(call)).name
    assert name.startswith("ci/operations/")
    assert await list_names(server, instance="ci") == [name]
    assert await list_names(server, instance="") == []
    assert Client.metadata(await get(server, name)).action_digest == digest
    bot = StubBot(server.channel, instance="ci")
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    assert (await ci.result(wait_execution(server.channel, name))).status.code == code_pb2.OK
    assert digest == digest_of(lease.payload.value)

    # A page token is only good for the instance it was issued for.
    await ci.first_operation(ci.execute(await ci.action("make", "again")))
    page = await operations(server).ListOperations(operations_pb2.ListOperationsRequest(
        name="ci", page_size=1))
    assert page.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(server).ListOperations(operations_pb2.ListOperationsRequest(
            name="", page_token=page.next_page_token))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_paging_is_stable_when_operations_are_deleted(grid: RunningServer) -> None:
    client = Client(grid.channel)
    created = [(await submit(client, "stable", str(i)))[0] for i in range(5)]
    first = await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
        name="", page_size=2))
    assert [op.name for op in first.operations] == created[:2]
    # An operation already listed goes away before the next page is asked for.
    await operations(grid).DeleteOperation(operations_pb2.DeleteOperationRequest(
        name=created[0]))
    second = await operations(grid).ListOperations(operations_pb2.ListOperationsRequest(
        name="", page_size=2, page_token=first.next_page_token))
    assert [op.name for op in second.operations] == created[2:4]


async def test_deleting_a_watched_operation_ends_the_stream(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "watched")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    waiting = wait_execution(grid.channel, name)
    assert not (await anext(aiter(waiting))).done
    await operations(grid).DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    # Both streams end (with the result or NOT_FOUND) instead of hanging until their deadline.
    for stream in (call, waiting):
        try:
            async with asyncio.timeout(1):
                async for _ in stream:
                    pass
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("timeout", [Duration(seconds=2**62), Duration(seconds=315_576_000_000)])
async def test_wait_operation_with_a_huge_timeout_is_bounded_by_the_deadline(
        grid: RunningServer, timeout: Duration) -> None:
    name, _ = await submit(Client(grid.channel), "echo", "huge timeout")
    operation = await operations(grid).WaitOperation(
        operations_pb2.WaitOperationRequest(name=name, timeout=timeout), timeout=1.0)
    assert operation.name == name and not operation.done


async def test_wait_operation_with_a_negative_timeout_is_invalid_argument(
        grid: RunningServer) -> None:
    name, _ = await submit(Client(grid.channel), "echo", "negative timeout")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await operations(grid).WaitOperation(operations_pb2.WaitOperationRequest(
            name=name, timeout=Duration(seconds=-1)), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
