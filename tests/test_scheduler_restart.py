"""A real `buildfleet serve` process killed with SIGKILL and restarted on its data dir.

Clients submit actions with no bot connected and remember their operation
names; a bot takes two of them; the server is SIGKILLed and started again on
the same data directory.  Every old operation must still be known, the queued
actions must run, the two that were executing must complete once (from the
returning bot, or retried elsewhere when it does not come back), and every
client must get its result through WaitExecution.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from botkit import (
    ACTIVE,
    Client,
    StubBot,
    action_result,
    execute_response,
    leased_action,
    poll_leases,
    stdout_is,
    wait_execution,
)
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2
from procutil import ServeProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

ACTIONS = 20
Stage = re_pb2.ExecutionStage


def write_config(workdir: Path, config: dict[str, Any]) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@asynccontextmanager
async def serving(workdir: Path, data_dir: Path, config: dict[str, Any] | None = None
                  ) -> AsyncIterator[tuple[ServeProcess, grpc.aio.Channel]]:
    """A `buildfleet serve` process on a free port and a channel to it."""
    config_path = None if config is None else write_config(workdir, config)
    process = await asyncio.to_thread(ServeProcess.start, workdir, data_dir=data_dir,
                                      config=config_path)
    channel = grpc.aio.insecure_channel(process.address)
    try:
        yield process, channel
    finally:
        await channel.close()
        process.kill()


@dataclass
class Runs:
    """Which bot reported which action COMPLETED (by action digest hash)."""

    by_action: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def output(self, bot_id: str, action: re_pb2.Digest) -> bytes:
        return f"{bot_id} ran {action.hash}".encode()


async def work(bot: StubBot, runs: Runs, done: Callable[[], bool]) -> None:
    """Complete every lease the bot gets until `done()`; then report the last ones."""
    while not done():
        await bot.update(timeout=1.0)
        for lease in bot.leases(ACTIVE):
            action = leased_action(lease)
            runs.by_action[action.hash].append(bot.bot_id)
            bot.complete(lease.id, action_result(0, runs.output(bot.bot_id, action)))
    if any(lease.state != ACTIVE for lease in bot.leases()):
        await bot.update(timeout=0.5)


async def follow(channel: grpc.aio.Channel, name: str) -> list[operations_pb2.Operation]:
    """Every message of a WaitExecution stream."""
    return [operation async for operation in wait_execution(channel, name)]


@dataclass
class Submitted:
    names: list[str]
    digests: list[re_pb2.Digest]
    old_bot: StubBot
    executing: list[re_pb2.Digest]
    runs: Runs = field(default_factory=Runs)
    cancelled: set[str] = field(default_factory=set)  # action digest hashes
    completed: set[str] = field(default_factory=set)  # before the kill


async def submit_and_lease_two(channel: grpc.aio.Channel, *, finish_and_cancel: bool = False
                               ) -> Submitted:
    """Queue ACTIONS actions with no bot, then let a capacity-2 bot take two.

    With `finish_and_cancel`, first the last action's operation is cancelled and
    the bot completes one action and takes another before the kill.
    """
    client = Client(channel)
    digests = [await client.action("step", str(i)) for i in range(ACTIONS)]
    names = []
    for digest in digests:
        call = client.execute(digest)
        operation = await client.first_operation(call)
        assert not operation.done and Client.metadata(operation).stage == Stage.QUEUED
        names.append(operation.name)
        call.cancel()
    assert len(set(names)) == ACTIONS
    submitted = Submitted(names, digests, StubBot(channel, bot_id="returning-bot",
                                                  capacity=2), [])
    if finish_and_cancel:
        await operations_pb2_grpc.OperationsStub(channel).CancelOperation(
            operations_pb2.CancelOperationRequest(name=names[-1]))
        submitted.cancelled.add(digests[-1].hash)
    old_bot = submitted.old_bot
    await old_bot.register()
    leases = await poll_leases(old_bot, count=2)
    if finish_and_cancel:
        action = leased_action(leases[0])
        submitted.runs.by_action[action.hash].append(old_bot.bot_id)
        old_bot.complete(leases[0].id, action_result(0, submitted.runs.output(old_bot.bot_id,
                                                                              action)))
        submitted.completed.add(action.hash)
        leases = await poll_leases(old_bot, count=2)
    assert len(leases) == 2
    submitted.executing = [leased_action(lease) for lease in leases]
    return submitted


async def check_old_operations(channel: grpc.aio.Channel, submitted: Submitted) -> None:
    stub = operations_pb2_grpc.OperationsStub(channel)
    executing = {d.hash for d in submitted.executing}
    for name, digest in zip(submitted.names, submitted.digests, strict=True):
        operation = await stub.GetOperation(operations_pb2.GetOperationRequest(name=name))
        assert operation.name == name
        metadata = Client.metadata(operation)
        assert metadata.action_digest == digest
        finished = submitted.cancelled | submitted.completed
        assert operation.done == (digest.hash in finished)
        if digest.hash in finished:
            expected = Stage.COMPLETED
        else:
            expected = Stage.EXECUTING if digest.hash in executing else Stage.QUEUED
        assert metadata.stage == expected, (name, metadata)


async def run_to_completion(channel: grpc.aio.Channel, submitted: Submitted,
                            bots: list[StubBot], runs: Runs
                            ) -> list[list[operations_pb2.Operation]]:
    """Follow every old operation with WaitExecution while `bots` work; the streams."""
    followers = [asyncio.create_task(follow(channel, name)) for name in submitted.names]
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(work(bot, runs, lambda: all(f.done() for f in followers))
                                   for bot in bots))
            return await asyncio.gather(*followers)
    finally:
        for follower in followers:
            follower.cancel()


async def check_results(channel: grpc.aio.Channel, submitted: Submitted, runs: Runs,
                        streams: list[list[operations_pb2.Operation]],
                        ran_by: Callable[[re_pb2.Digest], str]) -> None:
    """Each action ran exactly once, by the expected bot; every waiter and the action
    cache have that run's result.  Cancelled actions never ran."""
    assert sorted(runs.by_action) == sorted(d.hash for d in submitted.digests
                                            if d.hash not in submitted.cancelled)
    action_cache = re_grpc.ActionCacheStub(channel)
    for name, digest, stream in zip(submitted.names, submitted.digests, streams, strict=True):
        assert [op.done for op in stream].count(True) == 1 and stream[-1].done
        assert all(op.name == name for op in stream)
        response = execute_response(stream[-1])
        if digest.hash in submitted.cancelled:
            assert response.status.code == code_pb2.CANCELLED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await action_cache.GetActionResult(
                    re_pb2.GetActionResultRequest(action_digest=digest))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            continue
        assert runs.by_action[digest.hash] == [ran_by(digest)], (digest, runs.by_action)
        assert response.status.code == code_pb2.OK and response.result.exit_code == 0
        expected = runs.output(ran_by(digest), digest)
        assert stdout_is(response.result, expected), response
        cached = await action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest))
        assert stdout_is(cached, expected)


async def test_restart_after_sigkill_with_the_bot_coming_back(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with serving(tmp_path / "first", data_dir) as (first, channel):
        submitted = await submit_and_lease_two(channel)
        first.kill()  # SIGKILL

    async with serving(tmp_path / "second", data_dir) as (_, channel):
        await check_old_operations(channel, submitted)
        # The old bot session comes back and reports its two leases COMPLETED.
        returning = StubBot(channel, bot_id=submitted.old_bot.bot_id, capacity=2,
                            session=submitted.old_bot.session)
        runs = submitted.runs
        for lease in returning.leases(ACTIVE):
            action = leased_action(lease)
            runs.by_action[action.hash].append(returning.bot_id)
            returning.complete(lease.id, action_result(0, runs.output(returning.bot_id,
                                                                      action)))
        newcomer = StubBot(channel, bot_id="new-bot", capacity=2)
        await newcomer.register()
        streams = await run_to_completion(channel, submitted, [returning, newcomer], runs)

        first_runs = {d.hash for d in submitted.executing}

        def ran_by(digest: re_pb2.Digest) -> str:
            if digest.hash in first_runs:
                return returning.bot_id
            return runs.by_action[digest.hash][0]  # either bot may run the queued ones

        await check_results(channel, submitted, runs, streams, ran_by)


async def test_restart_after_sigkill_retries_when_the_bot_does_not_come_back(
        tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with serving(tmp_path / "first", data_dir) as (first, channel):
        submitted = await submit_and_lease_two(channel, finish_and_cancel=True)
        first.kill()  # SIGKILL

    config = {"instances": {"": {"scheduler": {"keepalive": 1,
                                               "housekeeping-interval": 0.1}}}}
    async with serving(tmp_path / "second", data_dir, config) as (_, channel):
        await check_old_operations(channel, submitted)
        newcomer = StubBot(channel, bot_id="new-bot", capacity=2)
        await newcomer.register()
        runs = submitted.runs
        streams = await run_to_completion(channel, submitted, [newcomer], runs)

        def ran_by(digest: re_pb2.Digest) -> str:
            if digest.hash in submitted.completed:
                return submitted.old_bot.bot_id
            return newcomer.bot_id

        await check_results(channel, submitted, runs, streams, ran_by)

        # The old session was closed when its keepalive ran out: it must register again.
        late = StubBot(channel, bot_id=submitted.old_bot.bot_id,
                       session=submitted.old_bot.session)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await late.update(timeout=2.0)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
