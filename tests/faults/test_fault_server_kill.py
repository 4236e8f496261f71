"""The server SIGKILLed with 200 actions queued and 8 executing, then restarted.

Two real `buildfleet bot` processes (4 actions at once each) run shell commands
that log their start and then wait for a gate file.  208 actions are submitted
(each client keeps its Execute stream open); once 8 are running and 200 are
queued, the server is SIGKILLed, the gate is opened (the 8 finish while the
server is down and their bots keep the results), and the server is started
again on the same data directory and port.  Each client reconnects with
WaitExecution on its operation name.  Every action must complete exactly once as
the clients see it, run exactly once, with one action-cache entry each, and the
same bot processes -- never restarted -- must have reconnected and run the rest.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc
import pytest
from botkit import Client, execute_response, wait_execution
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

from .faultkit import (
    CHANNEL_OPTIONS,
    BotProcess,
    free_port,
    log_has_no_traceback,
    scheduler_config,
    shell_action,
    start_serve,
    stdout_of,
    upload,
    wait_until,
)

QUEUED, EXECUTING = 200, 8
ACTIONS = QUEUED + EXECUTING
Stage = re_pb2.ExecutionStage

pytestmark = pytest.mark.faults


class Follower:
    """One client: follows its operation to the end, reconnecting with WaitExecution."""

    def __init__(self, channel: grpc.aio.Channel, name: str) -> None:
        self.channel = channel
        self.name = name
        self.done_messages: list[operations_pb2.Operation] = []
        self.reconnects = 0

    async def follow(self, first: grpc.aio.UnaryStreamCall) -> operations_pb2.Operation:
        call = first
        while True:
            try:
                async for operation in call:
                    assert operation.name == self.name
                    if operation.done:
                        self.done_messages.append(operation)
                if self.done_messages:
                    return self.done_messages[-1]
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.CANCELLED):
                    raise
            self.reconnects += 1
            await asyncio.sleep(random.uniform(0.05, 0.2))
            call = wait_execution(self.channel, self.name)


async def count_stages(channel: grpc.aio.Channel) -> dict[str, int]:
    stub = operations_pb2_grpc.OperationsStub(channel)
    counts = {}
    for stage in ("QUEUED", "EXECUTING", "COMPLETED"):
        response = await stub.ListOperations(operations_pb2.ListOperationsRequest(
            name="", filter=f"stage={stage}", page_size=1000))
        counts[stage] = len(response.operations)
    return counts


def runs(run_log: Path) -> list[str]:
    try:
        return run_log.read_text().split()
    except FileNotFoundError:
        return []


async def test_server_killed_with_work_queued_and_running(tmp_path: Path) -> None:
    port = free_port()
    listen = f"127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    config = scheduler_config(keepalive=60, housekeeping_interval=0.2)
    run_log, gate = tmp_path / "runs.log", tmp_path / "gate"
    actions = []
    for n in range(ACTIONS):
        script = (f"echo {n} >> {run_log}; "
                  f"while [ ! -e {gate} ]; do sleep 0.05; done; echo out-{n}")
        actions.append(shell_action(script))

    first = await asyncio.to_thread(start_serve, tmp_path / "first", data_dir, config, listen)
    channel = grpc.aio.insecure_channel(listen, options=CHANNEL_OPTIONS)
    bots: list[BotProcess] = []
    second = None
    try:
        for index in range(0, ACTIONS, 50):
            await upload(channel, *(b for blobs, _ in actions[index:index + 50] for b in blobs))
        client = Client(channel)
        followers, tasks = [], []
        for _, digest in actions:
            call = client.execute(digest)
            operation = await client.first_operation(call)
            assert Client.metadata(operation).stage == Stage.QUEUED
            follower = Follower(channel, operation.name)
            followers.append(follower)
            tasks.append(asyncio.create_task(follower.follow(call)))

        bots = [BotProcess(listen, tmp_path / f"bot-{n}", f"bot-{n}", "--concurrency", "4")
                for n in range(2)]
        await wait_until(lambda: len(runs(run_log)) >= EXECUTING, "8 actions to start", 60)
        await wait_until(lambda: count_stages(channel), "the server to answer")
        stages = await count_stages(channel)
        assert stages == {"QUEUED": QUEUED, "EXECUTING": EXECUTING, "COMPLETED": 0}, stages
        started_before = sorted(runs(run_log))
        assert len(started_before) == EXECUTING

        first.kill()  # SIGKILL
        gate.touch()  # the 8 finish while the server is down; their bots keep the results
        second = await asyncio.to_thread(start_serve, tmp_path / "second", data_dir, config,
                                         listen)
        finals = await asyncio.wait_for(asyncio.gather(*tasks), 180)

        # Exactly once as the clients see it: one done message per operation, OK, with
        # the output of its own action.
        action_cache = re_grpc.ActionCacheStub(channel)
        workers = set()
        for follower, (_, digest), final, n in zip(followers, actions, finals, range(ACTIONS),
                                                  strict=True):
            assert len(follower.done_messages) == 1, (follower.name, follower.done_messages)
            response = execute_response(final)
            assert response.status.code == code_pb2.OK, (n, response.status)
            assert await stdout_of(channel, response.result) == f"out-{n}\n".encode()
            workers.add(response.result.execution_metadata.worker)
            cached = await action_cache.GetActionResult(
                re_pb2.GetActionResultRequest(action_digest=digest))
            assert await stdout_of(channel, cached) == f"out-{n}\n".encode()
            again = [op async for op in wait_execution(channel, follower.name)]
            assert len(again) == 1 and execute_response(again[0]) == response
        assert all(f.reconnects >= 1 for f in followers)  # every client lived through it
        # Every action ran exactly once; the 8 that were running were not run again.
        assert sorted(runs(run_log), key=int) == [str(n) for n in range(ACTIONS)]
        # The same bot processes reconnected on their own and ran the queued work.
        assert all(bot.running() for bot in bots), [bot.log()[-2000:] for bot in bots]
        assert workers == {"bot-0", "bot-1"}
        stages = await count_stages(channel)
        assert stages == {"QUEUED": 0, "EXECUTING": 0, "COMPLETED": ACTIONS}, stages
        assert not log_has_no_traceback(second.output()), second.output()[-5000:]
    finally:
        await channel.close()
        for bot in bots:
            bot.kill()
        first.kill()
        if second is not None:
            second.kill()
