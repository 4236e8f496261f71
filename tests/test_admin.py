"""The operator's commands against a running server, as an operator types them:
`buildfleet bots list|show|drain|undrain|drains` and `buildfleet queues`, each in
its table and its JSON form, and what bad input gets."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

from botkit import Client, StubBot
from botprocess import SERVER_CONFIG, wait_for
from procutil import run_buildfleet

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc

BOTH_SCHEDULERS = True  # the views and drains come from each strategy
# The stub bots below stay silent while a dozen CLI processes run: a keepalive long
# enough that a slow machine does not expire their sessions halfway.
SILENT_BOTS_CONFIG: dict[str, Any] = {"instances": {"": {"scheduler": {
    **SERVER_CONFIG["instances"][""]["scheduler"], "keepalive": 120}}}}


async def cli(server: Any, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`buildfleet ARGS --server ...` on a thread (the server runs on this loop)."""
    return await asyncio.to_thread(run_buildfleet, *args, "--server",
                                   f"grpc://{server.address}", cwd=tmp_path)


async def as_json(server: Any, tmp_path: Path, *args: str) -> Any:
    result = await cli(server, tmp_path, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def test_bots_queues_and_drains_from_the_command_line(start_server: Any,
                                                            tmp_path: Path) -> None:
    server = await start_server(SILENT_BOTS_CONFIG)
    spot = StubBot(server.channel, bot_id="spot-1",
                   properties=[("OSFamily", "linux"), ("pool", "spot")])
    steady = StubBot(server.channel, bot_id="steady-1",
                     properties=[("OSFamily", "linux"), ("pool", "steady")], capacity=2)
    await spot.register(status=1)
    await steady.register(status=1)
    assert spot.session is not None
    await bots_pb2_grpc.BotsStub(server.channel).PostBotEventTemp(
        bots_pb2.PostBotEventTempRequest(name=spot.session.name, msg="disk nearly full"))

    async def both_listed() -> Any:  # the replicated strategy's view is a tick old
        listed = await as_json(server, tmp_path, "bots", "list")
        return listed if len(listed.get("bots", [])) == 2 else None

    listed = await wait_for(both_listed, "both bots in `bots list`")
    assert [b["bot_id"] for b in listed["bots"]] == ["spot-1", "steady-1"]
    assert listed["bots"][1]["capacity"] == 2 and listed["bots"][0]["draining"] is False
    table = (await cli(server, tmp_path, "bots", "list")).stdout.splitlines()
    assert table[0].split() == ["BOT", "STATUS", "DRAINING", "RUNNING", "SEEN",
                                "PROPERTIES"]
    for line, expected in ((table[1], ["spot-1", "OK", "no", "0/1"]),
                           (table[2], ["steady-1", "OK", "no", "0/2"])):
        assert line.split()[:4] == expected
    assert table[1].split()[-1] == "OSFamily=linux,pool=spot"
    assert table[2].split()[-1] == "OSFamily=linux,pool=steady"
    # neither is in a call: both have been silent since they registered
    assert float(listed["bots"][0]["silent_for"].rstrip("s")) > 0
    only = await as_json(server, tmp_path, "bots", "list", "steady-*")
    assert [b["bot_id"] for b in only["bots"]] == ["steady-1"]

    shown = await cli(server, tmp_path, "bots", "show", "spot-1")
    assert shown.returncode == 0, shown.stderr
    assert f"session:    {spot.session.name}" in shown.stdout
    assert "disk nearly full" in shown.stdout
    detail = await as_json(server, tmp_path, "bots", "show", "spot-1")
    assert [e["message"] for e in detail["events"]] == ["disk nearly full"]
    events = await cli(server, tmp_path, "bots", "events", "spot-1")
    assert events.returncode == 0 and events.stdout.strip().endswith("disk nearly full")
    assert (await as_json(server, tmp_path, "bots", "events", "steady-1")).get(
        "events", []) == []
    assert (await cli(server, tmp_path, "bots", "events", "steady-1")).stdout.strip() == \
        "(none)"
    unknown = await cli(server, tmp_path, "bots", "show", "nobody")
    assert unknown.returncode == 1
    assert "NOT_FOUND: no live bot 'nobody'" in unknown.stderr

    drained = await cli(server, tmp_path, "bots", "drain", "pool=spot")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.splitlines()[1].split()[0] == "pool=spot"
    assert drained.stdout.splitlines()[1].split()[-1] == "spot-1"
    again = await as_json(server, tmp_path, "bots", "drain", "pool=spot")  # no change
    assert again["bot_ids"] == ["spot-1"]
    listed = await as_json(server, tmp_path, "bots", "list")
    assert [b["draining"] for b in listed["bots"]] == [True, False]
    drains = await as_json(server, tmp_path, "bots", "drains")
    assert [d["pattern"] for d in drains["drains"]] == ["pool=spot"]
    assert "pool=spot" in (await cli(server, tmp_path, "bots", "drains")).stdout

    # queued work: two bots could run it, one takes work
    client = Client(server.channel)
    call = client.execute(await client.action("true", platform=[("OSFamily", "linux")]))
    await client.first_operation(call)

    async def queued() -> Any:
        answer = await as_json(server, tmp_path, "queues")
        return answer if answer.get("queues") else None

    answer = await wait_for(queued, "the queued action in `queues`")
    (queue,) = answer["queues"]
    assert queue["queued"] == "1"  # int64 in JSON
    assert (queue["matching_bots"], queue["available_bots"]) == (2, 1)
    table = (await cli(server, tmp_path, "queues")).stdout.splitlines()
    assert table[0].split() == ["PLATFORM", "QUEUED", "OLDEST", "MATCHING", "BOTS",
                                "AVAILABLE"]
    assert table[1].split()[:2] == ["OSFamily=linux", "1"]
    assert table[-1] == "executing: 0"
    call.cancel()

    bad = await cli(server, tmp_path, "bots", "drain", "a b")
    assert bad.returncode == 1
    assert "INVALID_ARGUMENT: drain pattern 'a b' contains spaces" in bad.stderr
    lifted = await cli(server, tmp_path, "bots", "undrain", "pool=spot")
    assert lifted.returncode == 0 and lifted.stdout.strip() == "undrained pool=spot"
    missing = await cli(server, tmp_path, "bots", "undrain", "pool=spot")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    assert (await as_json(server, tmp_path, "bots", "drains")) == {"drains": []}


async def test_a_cache_only_instance_and_an_unknown_one_say_so(start_server: Any,
                                                               tmp_path: Path) -> None:
    server = await start_server({"instances": {"": {}, "cache": {
        "scheduler": {"enabled": False}}}})
    cache_only = await cli(server, tmp_path, "bots", "list", "--instance", "cache")
    assert cache_only.returncode == 1
    assert "UNIMPLEMENTED: instance 'cache' is a cache only" in cache_only.stderr
    unknown = await cli(server, tmp_path, "queues", "--instance", "nope")
    assert unknown.returncode == 1
    assert "INVALID_ARGUMENT: unknown instance name 'nope'" in unknown.stderr


async def test_operations_from_the_command_line(start_server: Any, tmp_path: Path) -> None:
    server = await start_server(SERVER_CONFIG)
    bot = StubBot(server.channel, bot_id="runner")
    await bot.register(status=1)
    client = Client(server.channel)
    ran = await client.action("echo", "hello", platform=[("OSFamily", "linux")])
    first = client.execute(ran)
    done_name = (await client.first_operation(first)).name
    session = await bot.update(timeout=5)
    (lease,) = session.leases

    async def running() -> Any:  # the replicated strategy's view is a tick old
        shown = await as_json(server, tmp_path, "bots", "show", "runner")
        return shown if shown.get("running_operations") else None

    shown = await wait_for(running, "the running operation in `bots show`")
    assert [o["name"] for o in shown["running_operations"]] == [done_name]
    assert done_name in (await cli(server, tmp_path, "bots", "show", "runner")).stdout
    bot.complete(lease.id, re_pb2.ActionResult(exit_code=7))
    await bot.update(timeout=0.2)
    async for operation in first:
        if operation.done:
            break
    waiting = client.execute(await client.action("sleep", "60",
                                                 platform=[("OSFamily", "plan9")]),
                             priority=-2)
    waiting_name = (await client.first_operation(waiting)).name

    listed = await as_json(server, tmp_path, "ops", "list")
    names = [o["name"] for o in listed["operations"]]
    assert names == [waiting_name, done_name]  # newest first
    assert listed["operations"][1]["exit_code"] == 7
    assert listed["operations"][1]["worker"] == "runner"
    queued = await as_json(server, tmp_path, "ops", "list", "--stage", "queued")
    assert [o["name"] for o in queued["operations"]] == [waiting_name]
    by_bot = await as_json(server, tmp_path, "ops", "list", "--bot", "runner")
    assert [o["name"] for o in by_bot["operations"]] == [done_name]
    by_action = await as_json(server, tmp_path, "ops", "list", "--action", ran.hash)
    assert [o["name"] for o in by_action["operations"]] == [done_name]
    table = (await cli(server, tmp_path, "ops", "list")).stdout.splitlines()
    assert table[0].split() == ["OPERATION", "STAGE", "OUTCOME", "QUEUED", "BOT", "ACTION",
                                "MNEMONIC"]
    assert table[2].split()[:4] == [done_name, "COMPLETED", "exit", "7"]

    shown = await cli(server, tmp_path, "ops", "show", done_name)
    assert shown.returncode == 0, shown.stderr
    assert "command:    echo hello" in shown.stdout
    assert "platform:   OSFamily=linux" in shown.stdout
    assert "bot:        runner" in shown.stdout
    detail = await as_json(server, tmp_path, "ops", "show", waiting_name)
    assert detail["arguments"] == ["sleep", "60"] and detail["summary"]["stage"] == "QUEUED"
    assert detail["summary"]["priority"] == -2
    assert "priority:   -2" in (await cli(server, tmp_path, "ops", "show", waiting_name)).stdout
    assert "priority:   0" in shown.stdout

    cancelled = await cli(server, tmp_path, "ops", "cancel", waiting_name)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"cancelled {waiting_name}"
    after = await as_json(server, tmp_path, "ops", "show", waiting_name)
    assert after["summary"]["cancelled"] is True
    missing = await cli(server, tmp_path, "ops", "show", "operations/nope")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    bad = await cli(server, tmp_path, "ops", "list", "--limit", "0")
    assert bad.returncode == 2  # refused by the command line itself
    waiting.cancel()
