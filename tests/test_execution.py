"""Execution service end to end: Execute, WaitExecution, and how the scheduler runs actions.

Every test goes through real gRPC on loopback: a client (tests/botkit.py Client)
submits actions, stub bots (StubBot) take leases through the Bots service and
report results.  Waits are bounded: long-polls carry a deadline and conditions
are polled with a bound.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from botkit import (
    ACTIVE,
    CANCELLED,
    Client,
    StubBot,
    WorkerBot,
    action_result,
    command_platform_action,
    digest_of,
    execute_response,
    expect_no_work,
    next_operation,
    poll_leases,
    rpc_error,
    status_details,
    stdout_is,
    wait_execution,
    wait_for,
)
from conftest import RunningServer, StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2, error_details_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, worker_pb2
from buildfleet.server.capabilities.service import EXECUTION_PRIORITY_MAX, EXECUTION_PRIORITY_MIN

# Every test here runs on both schedulers (tests/conftest.py).
BOTH_SCHEDULERS = True

Stage = re_pb2.ExecutionStage
LINUX = [("OSFamily", "linux")]


def scheduler_config(**settings: Any) -> dict[str, Any]:
    """A config document whose instance "" has these scheduler settings (dashed keys)."""
    return {"instances": {"": {"scheduler": {k.replace("_", "-"): v
                                             for k, v in settings.items()}}}}


async def get_action_result(server: RunningServer, digest: re_pb2.Digest
                            ) -> re_pb2.ActionResult | None:
    try:
        return await server.action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return None


def leased(lease: bots_pb2.Lease) -> re_pb2.Digest:
    """The digest of the Action a lease carries inline."""
    StubBot.action_of(lease)  # it is an Action
    return digest_of(lease.payload.value)


async def run_leases_in_order(bot: StubBot, count: int) -> list[re_pb2.Digest]:
    """Let a capacity-1 bot take and complete `count` leases one by one; their actions."""
    order: list[re_pb2.Digest] = []
    leases = await poll_leases(bot)
    while True:
        assert len(leases) == 1, leases
        order.append(leased(leases[0]))
        bot.complete(leases[0].id, action_result())
        if len(order) == count:
            await bot.update(timeout=1.0)
            return order
        leases = await poll_leases(bot)


# ----------------------------------------------------------------- bad requests

async def test_missing_action_is_failed_precondition_listing_it(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "never uploaded", upload=False)
    error = await rpc_error(client.execute(digest))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = status_details(error)
    assert status.code == code_pb2.FAILED_PRECONDITION
    failures = [error_details_pb2.PreconditionFailure.FromString(d.value)
                for d in status.details if d.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR)]
    assert len(failures) == 1
    assert [(v.type, v.subject) for v in failures[0].violations] == [
        ("MISSING", f"blobs/{digest.hash}/{digest.size_bytes}")]


def _violations(error: grpc.aio.AioRpcError) -> set[tuple[str, str]]:
    status = status_details(error)
    found: set[tuple[str, str]] = set()
    for detail in status.details:
        failure = error_details_pb2.PreconditionFailure()
        if detail.Unpack(failure):
            found.update((v.type, v.subject) for v in failure.violations)
    return found


async def test_missing_command_and_input_root_are_each_listed(grid: RunningServer) -> None:
    client = Client(grid.channel)
    command = re_pb2.Command(arguments=["cat", "input"]).SerializeToString()
    file_blob = b"an input file"
    root = re_pb2.Directory(files=[re_pb2.FileNode(name="input", digest=digest_of(file_blob))]
                            ).SerializeToString()
    action = re_pb2.Action(command_digest=digest_of(command),
                           input_root_digest=digest_of(root)).SerializeToString()
    await client.upload(action)
    error = await rpc_error(client.execute(digest_of(action)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    subject = "blobs/{0.hash}/{0.size_bytes}".format
    assert _violations(error) == {("MISSING", subject(digest_of(command))),
                                  ("MISSING", subject(digest_of(root)))}

    await client.upload(command)
    error = await rpc_error(client.execute(digest_of(action)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert _violations(error) == {("MISSING", subject(digest_of(root)))}

    # With everything present the action is accepted (and queued: no bot).
    await client.upload(root, file_blob)
    call = client.execute(digest_of(action))
    first = await client.first_operation(call)
    assert not first.done and Client.metadata(first).stage == Stage.QUEUED
    call.cancel()


@pytest.mark.parametrize("digest", [
    re_pb2.Digest(hash="not-hex", size_bytes=3),
    re_pb2.Digest(hash="A" * 64, size_bytes=3),
    re_pb2.Digest(hash="a" * 64, size_bytes=-1),
    re_pb2.Digest(),
])
async def test_malformed_action_digest_is_invalid_argument(grid: RunningServer,
                                                           digest: re_pb2.Digest) -> None:
    error = await rpc_error(Client(grid.channel).execute(digest))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "action_digest" in (error.details() or "")


async def test_unparsable_action_or_empty_command_is_invalid_argument(
        grid: RunningServer) -> None:
    client = Client(grid.channel)
    garbage = b"\xff\xff\xff not an Action"
    await client.upload(garbage)
    error = await rpc_error(client.execute(digest_of(garbage)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Action" in (error.details() or "")

    command = re_pb2.Command(arguments=[]).SerializeToString()
    root = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(command_digest=digest_of(command),
                           input_root_digest=digest_of(root)).SerializeToString()
    await client.upload(command, root, action)
    error = await rpc_error(client.execute(digest_of(action)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "arguments" in (error.details() or "")


async def test_unsupported_digest_function_is_invalid_argument(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("true")
    call = re_grpc.ExecutionStub(grid.channel).Execute(re_pb2.ExecuteRequest(
        action_digest=digest, digest_function=re_pb2.DigestFunction.MD5))
    error = await rpc_error(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest_function" in (error.details() or "")


async def test_unknown_instance_is_invalid_argument(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("true")
    error = await rpc_error(Client(grid.channel, instance="no-such-instance").execute(digest))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no-such-instance" in (error.details() or "")


async def test_instance_without_scheduler_is_unimplemented(start_server: StartServer) -> None:
    server = await start_server({"instances": {"cache": {"scheduler": {"enabled": False}},
                                               "": {}}})
    cache = Client(server.channel, instance="cache")
    digest = await cache.action("true")
    error = await rpc_error(cache.execute(digest))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "cache" in (error.details() or "")
    capabilities = await server.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name="cache"))
    assert not capabilities.execution_capabilities.exec_enabled
    capabilities = await server.capabilities.GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=""))
    assert capabilities.execution_capabilities.exec_enabled
    # The executing instance next to it still executes.
    executing = Client(server.channel)
    call = executing.execute(await executing.action("true"))
    assert Client.metadata(await executing.first_operation(call)).stage == Stage.QUEUED
    call.cancel()


async def test_timeout_above_maximum_is_invalid_argument(start_server: StartServer) -> None:
    server = await start_server(scheduler_config(max_timeout=10))
    client = Client(server.channel)
    error = await rpc_error(client.execute(await client.action("sleep", "20", timeout=20)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "timeout" in (error.details() or "")
    call = client.execute(await client.action("sleep", "10", timeout=10))
    assert not (await client.first_operation(call)).done
    call.cancel()


# ------------------------------------------------------------ stages and caching

async def test_execute_streams_stages_and_caches_success(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "hello")
    call = client.execute(digest)
    first = await client.first_operation(call)
    assert first.name and not first.done
    metadata = Client.metadata(first)
    assert metadata.stage == Stage.QUEUED and metadata.action_digest == digest

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    assert leased(lease) == digest
    executing = await next_operation(call)
    assert executing.name == first.name and not executing.done
    assert Client.metadata(executing).stage == Stage.EXECUTING
    assert Client.metadata(executing).action_digest == digest

    bot.complete(lease.id, action_result(0, b"hello\n"))
    await bot.update(timeout=1.0)
    completed = await next_operation(call)
    assert completed.name == first.name and completed.done
    assert Client.metadata(completed).stage == Stage.COMPLETED
    assert Client.metadata(completed).action_digest == digest
    response = execute_response(completed)
    assert response.status.code == code_pb2.OK
    assert response.result.exit_code == 0 and stdout_is(response.result, b"hello\n")
    assert response.result.execution_metadata.worker == bot.bot_id
    assert not response.cached_result
    assert response.message
    with pytest.raises(StopAsyncIteration):
        await next_operation(call)

    cached = await get_action_result(grid, digest)
    assert cached is not None and stdout_is(cached, b"hello\n")

    # A second Execute is a cache hit, done in its first message.
    again = client.execute(digest)
    hit = await client.first_operation(again)
    assert hit.done and hit.name != first.name
    assert Client.metadata(hit).stage == Stage.COMPLETED
    hit_response = execute_response(hit)
    assert hit_response.cached_result and hit_response.status.code == code_pb2.OK
    assert stdout_is(hit_response.result, b"hello\n")
    with pytest.raises(StopAsyncIteration):
        await next_operation(again)

    # skip_cache_lookup runs it again.
    rerun = client.execute(digest, skip_cache_lookup=True)
    queued = await client.first_operation(rerun)
    assert not queued.done and Client.metadata(queued).stage == Stage.QUEUED
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"hello again\n"))
    await bot.update(timeout=1.0)
    response = await client.result(rerun)
    assert not response.cached_result and stdout_is(response.result, b"hello again\n")


async def test_failed_and_do_not_cache_results_are_not_cached(grid: RunningServer) -> None:
    client = Client(grid.channel)
    failing = await client.action("false")
    uncached = await client.action("echo", "volatile", do_not_cache=True)
    calls = [client.execute(failing), client.execute(uncached)]
    for call in calls:
        assert not (await client.first_operation(call)).done
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    leases = await poll_leases(bot, count=2)
    exit_codes = {failing.hash: 1, uncached.hash: 0}
    for lease in leases:
        bot.complete(lease.id, action_result(exit_codes[leased(lease).hash]))
    await bot.update(timeout=1.0)
    failed = await client.result(calls[0])
    assert failed.status.code == code_pb2.OK and failed.result.exit_code == 1
    assert not failed.cached_result
    volatile = await client.result(calls[1])
    assert volatile.status.code == code_pb2.OK and volatile.result.exit_code == 0

    assert await get_action_result(grid, failing) is None
    assert await get_action_result(grid, uncached) is None
    # Neither is a cache hit the next time.
    for digest in (failing, uncached):
        call = client.execute(digest)
        assert not (await client.first_operation(call)).done
        call.cancel()


# ---------------------------------------------------------------- WaitExecution

async def test_wait_execution_during_and_after(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "wait")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    call.cancel()

    waiting = wait_execution(grid.channel, name)
    first = await next_operation(waiting)
    assert first.name == name and not first.done
    assert Client.metadata(first).stage == Stage.QUEUED

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"waited"))
    await bot.update(timeout=1.0)
    response = await client.result(waiting)
    assert stdout_is(response.result, b"waited") and response.status.code == code_pb2.OK

    after = wait_execution(grid.channel, name)
    done = await next_operation(after)
    assert done.name == name and done.done
    assert stdout_is(execute_response(done).result, b"waited")
    with pytest.raises(StopAsyncIteration):
        await next_operation(after)


@pytest.mark.parametrize("name", [
    "operations/00000000-0000-0000-0000-000000000000",
    "not-an-operation",
    "other-instance/operations/00000000-0000-0000-0000-000000000000",
    "",
])
async def test_wait_execution_unknown_operation_is_not_found(grid: RunningServer,
                                                             name: str) -> None:
    error = await rpc_error(wait_execution(grid.channel, name))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_client_disconnecting_mid_stream_does_not_lose_the_action(
        grid: RunningServer) -> None:
    channel = grpc.aio.insecure_channel(grid.address)
    client = Client(channel)
    digest = await client.action("echo", "orphan")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    await channel.close()

    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result(0, b"still ran"))
    await bot.update(timeout=1.0)

    cached = await get_action_result(grid, digest)
    assert cached is not None and stdout_is(cached, b"still ran")
    response = await Client(grid.channel).result(wait_execution(grid.channel, name))
    assert stdout_is(response.result, b"still ran")


# ------------------------------------------------------------- platform matching

async def test_action_platform_is_matched_exactly(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("uname", platform=[("OSFamily", "linux"), ("ISA", "arm64")])
    call = client.execute(digest)
    await client.first_operation(call)

    plain = StubBot(grid.channel, properties=LINUX)
    wrong_value = StubBot(grid.channel, properties=[("OSFamily", "linux"), ("ISA", "x86-64")])
    right = StubBot(grid.channel, properties=[("OSFamily", "linux"), ("ISA", "arm64"),
                                              ("extra", "ignored")])
    for bot in (plain, wrong_value, right):
        await bot.register()
    for bot in (plain, wrong_value):
        await expect_no_work(bot)
    [lease] = await poll_leases(right)
    assert leased(lease) == digest
    assert {(p.key, p.value) for p in lease.requirements.properties} == {
        ("OSFamily", "linux"), ("ISA", "arm64")}
    right.complete(lease.id, action_result())
    await right.update(timeout=1.0)
    assert (await client.result(call)).status.code == code_pb2.OK


async def test_command_platform_is_the_fallback(grid: RunningServer) -> None:
    client = Client(grid.channel)
    windows_only = await command_platform_action(client, "ver", platform=[("OSFamily",
                                                                             "windows")])
    # When the Action has a platform, the Command's is ignored.
    action_wins = await command_platform_action(client, "uname", platform=[("OSFamily",
                                                                              "windows")],
                                                action_platform=LINUX)
    calls = [client.execute(windows_only), client.execute(action_wins)]
    for call in calls:
        await client.first_operation(call)

    linux = StubBot(grid.channel, properties=LINUX, capacity=2)
    windows = StubBot(grid.channel, properties=[("OSFamily", "windows")])
    await linux.register()
    await windows.register()
    [on_linux] = await poll_leases(linux)
    assert leased(on_linux) == action_wins
    [on_windows] = await poll_leases(windows)
    assert leased(on_windows) == windows_only
    linux.complete(on_linux.id, action_result())
    windows.complete(on_windows.id, action_result())
    await linux.update(timeout=1.0)
    assert not linux.leases()  # nothing else for the linux bot
    await windows.update(timeout=1.0)
    for call in calls:
        assert (await client.result(call)).status.code == code_pb2.OK


async def test_multi_valued_properties(grid: RunningServer) -> None:
    client = Client(grid.channel)
    both = await client.action("isa", "both", platform=[("ISA", "x86-64"),
                                                        ("ISA", "x86-64-v3")])
    absent = await client.action("isa", "v4", platform=[("ISA", "x86-64"),
                                                        ("ISA", "x86-64-v4")])
    calls = [client.execute(both), client.execute(absent)]
    for call in calls:
        await client.first_operation(call)
    bot = StubBot(grid.channel, capacity=2,
                  properties=[("ISA", "x86-64"), ("ISA", "x86-64-v3"), *LINUX])
    await bot.register()
    [lease] = await poll_leases(bot)
    assert leased(lease) == both
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    assert not bot.leases()  # the v4 action is not for this bot
    assert (await client.result(calls[0])).status.code == code_pb2.OK
    operations = operations_pb2_grpc.OperationsStub(grid.channel)
    name = (await operations.ListOperations(operations_pb2.ListOperationsRequest(
        name="", filter="stage=QUEUED"))).operations[0].name
    assert Client.metadata(await operations.GetOperation(
        operations_pb2.GetOperationRequest(name=name))).action_digest == absent


async def test_worker_and_device_properties_both_count(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("nvidia-smi", platform=[("OSFamily", "linux"),
                                                         ("gpu", "nvidia")])
    call = client.execute(digest)
    await client.first_operation(call)

    def make_worker(bot_id: str, worker_level: list[tuple[str, str]],
                    device_level: list[tuple[str, str]]) -> worker_pb2.Worker:
        message = worker_pb2.Worker()
        for key, value in worker_level:
            message.properties.add(key=key, value=value)
        device = message.devices.add(handle=bot_id)
        for key, value in device_level:
            device.properties.add(key=key, value=value)
        return message

    worker_only = WorkerBot(grid.channel, bot_id="worker-only")
    worker_only.worker_message = make_worker("worker-only", LINUX, [])
    device_only = WorkerBot(grid.channel, bot_id="device-only")
    device_only.worker_message = make_worker("device-only", [], [("gpu", "nvidia")])
    mixed = WorkerBot(grid.channel, bot_id="mixed")
    mixed.worker_message = make_worker("mixed", LINUX, [("gpu", "nvidia")])
    for bot in (worker_only, device_only, mixed):
        await bot.register()
    for bot in (worker_only, device_only):
        await expect_no_work(bot)
    [lease] = await poll_leases(mixed)
    mixed.complete(lease.id, action_result())
    await mixed.update(timeout=1.0)
    assert (await client.result(call)).result.execution_metadata.worker == "mixed"

    # Device properties alone are enough as well (BuildGrid's old bot sends only those).
    gpu_only = await client.action("nvidia-smi", "-L", platform=[("gpu", "nvidia")])
    call = client.execute(gpu_only)
    await client.first_operation(call)
    [lease] = await poll_leases(device_only)
    device_only.complete(lease.id, action_result())
    await device_only.update(timeout=1.0)
    assert (await client.result(call)).result.execution_metadata.worker == "device-only"


async def test_action_no_bot_can_run_fails_naming_the_properties(
        start_server: StartServer) -> None:
    server = await start_server(scheduler_config(unmatched_timeout=1,
                                                 housekeeping_interval=0.1))
    bot = StubBot(server.channel, properties=LINUX)
    await bot.register()
    client = Client(server.channel)
    plan9 = client.execute(await client.action("rc", platform=[("OSFamily", "plan9")]))
    linux = client.execute(await client.action("sh", platform=LINUX))
    await client.first_operation(plan9)
    linux_name = (await client.first_operation(linux)).name
    started = time.monotonic()
    response = await client.result(plan9)
    assert time.monotonic() - started < 5
    assert response.status.code == code_pb2.FAILED_PRECONDITION
    assert "OSFamily=plan9" in response.status.message
    assert not response.HasField("result") or response.result == re_pb2.ActionResult()
    # The action a connected bot can run is still waiting for it, and runs.
    operations = operations_pb2_grpc.OperationsStub(server.channel)
    assert not (await operations.GetOperation(
        operations_pb2.GetOperationRequest(name=linux_name))).done
    [lease] = await poll_leases(bot)
    bot.complete(lease.id, action_result())
    await bot.update(timeout=1.0)
    assert (await client.result(linux)).status.code == code_pb2.OK


# ------------------------------------------------------------------------ order

async def test_priority_order(start_server: StartServer) -> None:
    server = await start_server(scheduler_config(fairness_share=0))
    client = Client(server.channel)
    calls = []
    digests = {}
    for priority in (5, -1, 3, 0):
        digests[priority] = await client.action("prio", str(priority))
        call = client.execute(digests[priority], priority=priority)
        await client.first_operation(call)
        calls.append(call)
    bot = StubBot(server.channel)
    await bot.register()
    order = await run_leases_in_order(bot, 4)
    assert order == [digests[p] for p in (-1, 0, 3, 5)]
    for call in calls:
        assert (await client.result(call)).status.code == code_pb2.OK


async def test_priority_beyond_the_advertised_range_is_clamped(
        start_server: StartServer) -> None:
    # A priority beyond either end of the advertised range is clamped to that
    # end: it ties with the job submitted there before it and runs after it.
    server = await start_server(scheduler_config(fairness_share=0))
    client = Client(server.channel)
    calls, digests = [], []
    for n, priority in enumerate((EXECUTION_PRIORITY_MIN, -2**31, EXECUTION_PRIORITY_MAX,
                                  2**31 - 1)):
        digests.append(await client.action("clamp", str(n)))
        call = client.execute(digests[-1], priority=priority)
        await client.first_operation(call)
        calls.append(call)
    bot = StubBot(server.channel)
    await bot.register()
    assert await run_leases_in_order(bot, 4) == digests
    for call in calls:
        assert (await client.result(call)).status.code == code_pb2.OK


async def test_fairness_share_takes_the_oldest_on_alternate_picks(
        start_server: StartServer) -> None:
    server = await start_server(scheduler_config(fairness_share=0.5))
    client = Client(server.channel)
    digests = {}
    for priority in (5, -1, 3, 0):  # submitted in this order: 5 is the oldest
        digests[priority] = await client.action("fair", str(priority))
        call = client.execute(digests[priority], priority=priority)
        await client.first_operation(call)
        call.cancel()
    bot = StubBot(server.channel)
    await bot.register()
    order = await run_leases_in_order(bot, 4)
    # priority pick, oldest pick, priority pick, oldest pick
    assert order == [digests[p] for p in (-1, 5, 0, 3)]


# ------------------------------------------------------------------------ dedup

async def test_identical_actions_in_flight_share_one_job(grid: RunningServer) -> None:
    first_client, second_client = Client(grid.channel), Client(grid.channel)
    digest = await first_client.action("echo", "shared")
    first = first_client.execute(digest)
    second = second_client.execute(digest)
    names = {(await first_client.first_operation(first)).name,
             (await second_client.first_operation(second)).name}
    assert len(names) == 2

    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    leases = await poll_leases(bot)
    assert len(leases) == 1
    bot.complete(leases[0].id, action_result(0, b"once"))
    await bot.update(timeout=1.0)
    assert not bot.leases()  # no second lease for the same action
    for client, call in ((first_client, first), (second_client, second)):
        response = await client.result(call)
        assert stdout_is(response.result, b"once") and not response.cached_result


async def test_more_urgent_duplicate_raises_the_jobs_priority(
        start_server: StartServer) -> None:
    server = await start_server(scheduler_config(fairness_share=0))
    client = Client(server.channel)
    other_digest = await client.action("other")
    other = client.execute(other_digest, priority=0)
    await client.first_operation(other)
    digest = await client.action("urgent")
    calls = [client.execute(digest, priority=5)]
    await client.first_operation(calls[0])
    calls.append(client.execute(digest, priority=-5))
    await client.first_operation(calls[1])
    bot = StubBot(server.channel)
    await bot.register()
    order = await run_leases_in_order(bot, 2)
    assert order == [digest, other_digest]
    for call in [*calls, other]:
        assert (await client.result(call)).status.code == code_pb2.OK


async def test_do_not_cache_actions_are_never_deduplicated(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("date", do_not_cache=True)
    calls = [client.execute(digest), client.execute(digest)]
    for call in calls:
        await client.first_operation(call)
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    leases = await poll_leases(bot, count=2)
    assert len(leases) == 2 and len({lease.id for lease in leases}) == 2
    for index, lease in enumerate(leases):
        bot.complete(lease.id, action_result(0, str(index).encode()))
    await bot.update(timeout=1.0)
    results = [(await client.result(call)).result for call in calls]
    assert sorted(stdout_is(r, b"0") for r in results) == [False, True]
    assert sorted(stdout_is(r, b"1") for r in results) == [False, True]


# ---------------------------------------------------------- cancel and timeout

async def test_cancel_of_a_running_job_reaches_the_bot(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("sleep", "1000")
    call = client.execute(digest)
    name = (await client.first_operation(call)).name
    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    assert Client.metadata(await next_operation(call)).stage == Stage.EXECUTING

    polling = asyncio.create_task(bot.update(timeout=5.0))  # holds up to 4 s
    scheduler = grid.server.instances.get("").scheduler
    assert scheduler is not None and bot.session is not None
    session = bot.session.name
    await wait_for(lambda: scheduler.is_polling(session), what="the bot's long-poll")
    started = time.monotonic()
    await operations_pb2_grpc.OperationsStub(grid.channel).CancelOperation(
        operations_pb2.CancelOperationRequest(name=name))
    await polling
    assert time.monotonic() - started < 1.0  # woken by the cancel, not by the deadline
    assert [(item.id, item.state) for item in bot.leases()] == [(lease.id, CANCELLED)]

    response = await client.result(call)
    assert response.status.code == code_pb2.CANCELLED

    # The lease is dropped after being reported once; a late result is discarded.
    await bot.update(timeout=1.0)
    assert not bot.leases()
    bot.session.leases.add().CopyFrom(lease)  # type: ignore[union-attr]
    bot.complete(lease.id, action_result(0, b"too late"))
    await bot.update(timeout=1.0)
    assert not bot.leases()
    assert await get_action_result(grid, digest) is None


async def test_job_running_past_its_timeout_is_deadline_exceeded(
        start_server: StartServer) -> None:
    server = await start_server(scheduler_config(timeout_grace=0, housekeeping_interval=0.1))
    client = Client(server.channel)
    digest = await client.action("sleep", "forever", timeout=0.5)
    call = client.execute(digest)
    await client.first_operation(call)
    bot = StubBot(server.channel)
    await bot.register()
    started = time.monotonic()  # before the lease starts
    [lease] = await poll_leases(bot)
    polling = asyncio.create_task(bot.update(timeout=10.0))
    response = await client.result(call)
    assert 0.5 <= time.monotonic() - started < 5
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    await polling
    assert [(item.id, item.state) for item in bot.leases()] == [(lease.id, CANCELLED)]
    assert await get_action_result(server, digest) is None


# -------------------------------------------------------------------- queue size

async def test_queue_limit_is_resource_exhausted(start_server: StartServer) -> None:
    server = await start_server(scheduler_config(max_queued=2))
    client = Client(server.channel)
    digests = [await client.action("queued", str(i)) for i in range(3)]
    calls = [client.execute(digest) for digest in digests[:2]]
    for call in calls:
        await client.first_operation(call)
    error = await rpc_error(client.execute(digests[2]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Joining an action already queued adds nothing to the queue: accepted.
    joined = client.execute(digests[0])
    assert not (await client.first_operation(joined)).done
    # Once a bot takes one, there is room again.
    bot = StubBot(server.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    assert lease.state == ACTIVE
    retry = client.execute(digests[2])
    assert not (await client.first_operation(retry)).done
    for call in (*calls, joined, retry):
        call.cancel()



async def test_cancel_reaches_a_bot_that_was_not_polling(grid: RunningServer) -> None:
    client = Client(grid.channel)
    call = client.execute(await client.action("sleep", "between polls"))
    name = (await client.first_operation(call)).name
    bot = StubBot(grid.channel)
    await bot.register()
    [lease] = await poll_leases(bot)
    # The bot is busy running the action (no call open) when the client cancels.
    await operations_pb2_grpc.OperationsStub(grid.channel).CancelOperation(
        operations_pb2.CancelOperationRequest(name=name))
    assert (await client.result(call)).status.code == code_pb2.CANCELLED
    started = time.monotonic()
    await bot.update(timeout=5.0)
    assert time.monotonic() - started < 1.0
    assert [(item.id, item.state) for item in bot.leases()] == [(lease.id, CANCELLED)]


async def test_execute_joins_a_running_job(grid: RunningServer) -> None:
    client = Client(grid.channel)
    digest = await client.action("echo", "running")
    first = client.execute(digest)
    await client.first_operation(first)
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    [lease] = await poll_leases(bot)
    second = client.execute(digest)
    joined = await client.first_operation(second)
    assert not joined.done and Client.metadata(joined).stage == Stage.EXECUTING
    bot.complete(lease.id, action_result(0, b"shared"))
    await bot.update(timeout=1.0)
    assert not bot.leases()
    for call in (first, second):
        assert stdout_is((await client.result(call)).result, b"shared")
