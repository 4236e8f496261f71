"""Bots that die or keep failing, against a real `buildfleet serve` process.

- A `buildfleet bot` process SIGKILLed while it runs a lease: once the keepalive
  window has passed, the action runs on another bot and the client sees one
  result; with the default settings, once the lease timeout (10 s) has passed,
  on either scheduling strategy.
- Bots that fail every lease with INTERNAL: the action is retried on the other
  bots (never twice on a bot that failed it while another could take it) up to
  the attempt limit, then fails with a message naming the attempts.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from botkit import (
    ACTIVE,
    Client,
    StubBot,
    action_result,
    execute_response,
    leased_action,
    wait_execution,
)
from google.longrunning import operations_pb2
from google.rpc import code_pb2
from pgkit import postgres_schema
from procutil import ServeProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

from .faultkit import (
    BotProcess,
    kill_process_group,
    log_has_no_traceback,
    parent_pid,
    scheduler_config,
    serving,
    shell_action,
    stdout_of,
    upload,
    wait_until,
)

KEEPALIVE = 2.0

pytestmark = pytest.mark.faults


async def collect(call: object) -> list[operations_pb2.Operation]:
    return [operation async for operation in call]  # type: ignore[attr-defined]


@dataclass
class Killed:
    """A bot SIGKILLed while it ran the action, and what the client then got."""

    server: ServeProcess
    channel: grpc.aio.Channel
    digest: re_pb2.Digest
    stream: list[operations_pb2.Operation]  # the client's Execute, to its end
    elapsed: float  # seconds from the kill to the end of the stream


@asynccontextmanager
async def a_bot_killed_mid_action(tmp_path: Path, config: dict[str, Any],
                                  timeout: float) -> AsyncIterator[Killed]:
    """Run an action on bot "doomed" (its first run hangs), register bot "survivor",
    SIGKILL the first: what the client's Execute then sees (within `timeout` s)."""
    started, pid_file = tmp_path / "started", tmp_path / "first-run.pid"
    # The first run records its pid and hangs; a second run finds the marker and ends.
    script = (f"if [ -e {started} ]; then echo ran-again; "
              f"else echo $$ > {pid_file}; touch {started}; exec sleep 120; fi")
    blobs, digest = shell_action(script)
    bots: list[BotProcess] = []
    async with serving(tmp_path / "server", tmp_path / "data", config) as (server, channel):
        try:
            await upload(channel, *blobs)
            doomed = BotProcess(server.address, tmp_path / "doomed", "doomed")
            bots.append(doomed)
            await doomed.registered()
            follower = asyncio.create_task(collect(Client(channel).execute(digest)))
            await wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(),
                             "the command to start on the first bot")
            assert parent_pid(int(pid_file.read_text())) == doomed.pid
            survivor = BotProcess(server.address, tmp_path / "survivor", "survivor")
            bots.append(survivor)
            await survivor.registered()
            killed_at = time.monotonic()
            doomed.kill()
            stream = await asyncio.wait_for(follower, timeout)
            yield Killed(server, channel, digest, stream, time.monotonic() - killed_at)
        finally:
            kill_process_group(pid_file)
            for bot in bots:
                bot.kill()


async def test_bot_killed_mid_lease_completes_on_another_bot(tmp_path: Path) -> None:
    config = scheduler_config(keepalive=KEEPALIVE, housekeeping_interval=0.2)
    async with a_bot_killed_mid_action(tmp_path, config, KEEPALIVE + 10) as killed:
        assert killed.elapsed < KEEPALIVE + 5, killed.elapsed
        stream, channel = killed.stream, killed.channel
        assert [op.done for op in stream].count(True) == 1 and stream[-1].done
        response = execute_response(stream[-1])
        assert response.status.code == code_pb2.OK, response.status
        assert response.result.exit_code == 0
        assert response.result.execution_metadata.worker == "survivor"
        assert await stdout_of(channel, response.result) == b"ran-again\n"
        cached = await re_grpc.ActionCacheStub(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=killed.digest))
        assert await stdout_of(channel, cached) == b"ran-again\n"
        # A later WaitExecution gives the same single result.
        again = await collect(wait_execution(channel, stream[-1].name))
        assert len(again) == 1 and execute_response(again[0]) == response
        assert not log_has_no_traceback(killed.server.output())


@pytest.fixture(params=["embedded", "replicated"])
async def strategy(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Each scheduling strategy in turn: its name and the server config that picks it."""
    if request.param == "embedded":
        yield "embedded", {}
        return
    async with postgres_schema() as url:
        yield "replicated", {"database": url}


async def test_a_dead_bots_lease_moves_on_within_the_lease_timeout(
        tmp_path: Path, strategy: tuple[str, dict[str, Any]]) -> None:
    """With the default settings (lease timeout 10 s, keepalive 60 s), a `buildfleet
    bot` SIGKILLed while it runs an action: the action completes on another bot
    within 15 s of the kill, long before the dead bot's session expires."""
    name, config = strategy
    async with a_bot_killed_mid_action(tmp_path, config, 30) as killed:
        print(f"{name}: the action completed on another bot {killed.elapsed:.1f} s "
              "after its first bot was killed")
        assert killed.elapsed < 15, killed.elapsed
        response = execute_response(killed.stream[-1])
        assert response.status.code == code_pb2.OK, response.status
        assert response.result.execution_metadata.worker == "survivor"
        assert await stdout_of(killed.channel, response.result) == b"ran-again\n"
        assert not log_has_no_traceback(killed.server.output())


async def run_bot(bot: StubBot, leased: dict[str, list[str]], done: Callable[[], bool], *,
                  fail: bool, register: bool = True) -> None:
    """Take leases until `done()`: fail each with INTERNAL, or complete it."""
    if register:
        await bot.register()
    while not done():
        await bot.update(timeout=0.5)
        for lease in bot.leases(ACTIVE):
            action = leased_action(lease)
            leased[bot.bot_id].append(action.hash)
            if fail:
                bot.complete(lease.id, code=code_pb2.INTERNAL,
                             message=f"{bot.bot_id}: the runner crashed")
            else:
                bot.complete(lease.id, action_result(0, f"{bot.bot_id} ran it".encode()))


async def test_failing_bots_retry_elsewhere_then_fail_naming_the_attempts(
        tmp_path: Path) -> None:
    config = scheduler_config(max_attempts=3, housekeeping_interval=0.2)
    async with serving(tmp_path / "server", tmp_path / "data", config) as (server, channel):
        client = Client(channel)
        digest = await client.action("doomed-everywhere")
        call = client.execute(digest)
        leased: dict[str, list[str]] = defaultdict(list)
        finished = asyncio.create_task(client.result(call))
        bots = [StubBot(channel, bot_id=f"broken-{n}") for n in range(3)]
        workers = [asyncio.create_task(run_bot(bot, leased, finished.done, fail=True))
                   for bot in bots]
        response = await asyncio.wait_for(finished, 30)
        await asyncio.gather(*workers)

        assert response.status.code == code_pb2.INTERNAL
        assert "3 attempts" in response.status.message, response.status.message
        assert "the runner crashed" in response.status.message
        # One attempt on each bot: none was handed the action twice while another
        # bot that had not failed it was there.
        assert sorted(leased) == sorted(bot.bot_id for bot in bots)
        assert all(hashes == [digest.hash] for hashes in leased.values()), leased
        assert not log_has_no_traceback(server.output())


async def test_failing_bot_never_gets_the_same_action_twice(tmp_path: Path) -> None:
    config = scheduler_config(max_attempts=3, housekeeping_interval=0.2)
    async with serving(tmp_path / "server", tmp_path / "data", config) as (server, channel):
        client = Client(channel)
        digests = [await client.action("work", str(n)) for n in range(8)]
        calls = [client.execute(digest) for digest in digests]
        results = asyncio.gather(*(client.result(call) for call in calls))
        leased: dict[str, list[str]] = defaultdict(list)
        broken = StubBot(channel, bot_id="broken", capacity=2)
        healthy = [StubBot(channel, bot_id=f"healthy-{n}") for n in (1, 2)]
        for bot in healthy:
            await bot.register()  # connected, but not asking for work yet
        done = results.done
        workers = [asyncio.create_task(run_bot(broken, leased, done, fail=True))]
        # The broken bot fails leases while the others are idle: none comes back to it.
        await wait_until(lambda: len(leased["broken"]) >= 4, "the broken bot to fail leases")
        for bot in healthy:
            workers.append(asyncio.create_task(run_bot(bot, leased, done, fail=False,
                                                       register=False)))
        responses = await asyncio.wait_for(results, 60)
        await asyncio.gather(*workers)

        for response in responses:
            assert response.status.code == code_pb2.OK, response.status
            assert response.result.execution_metadata.worker in ("healthy-1", "healthy-2")
        failed = leased["broken"]
        assert len(failed) == len(set(failed)), f"the broken bot got an action twice: {failed}"
        ran = leased["healthy-1"] + leased["healthy-2"]
        assert sorted(ran) == sorted(d.hash for d in digests)  # each ran once, healthy
        assert not log_has_no_traceback(server.output())
