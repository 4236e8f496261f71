"""Prometheus metrics, scraped from `/metrics` as Prometheus would, after real actions
run by a real `buildfleet bot`: counts per outcome, queue depth while no bot can take
the work, bot gauges per status, CAS and action-cache counters, gRPC calls; and every
metric name held to buildfleet's list."""

from __future__ import annotations

import asyncio
import urllib.request
from typing import Any

import grpc
from botkit import Client, StubBot
from botprocess import SERVER_CONFIG, Remote, SpawnBot, wait_for
from google.rpc import code_pb2
from prometheus_client.parser import text_string_to_metric_families

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.server.metrics import NAMES

BOTH_SCHEDULERS = True  # the gauges come from each strategy's own views

ENV = {"PATH": "/usr/bin:/bin"}
CONFIG: dict[str, Any] = {
    "metrics": {"listen": "127.0.0.1:0"},
    "instances": {"": {"scheduler": {**SERVER_CONFIG["instances"][""]["scheduler"],
                                     "unmatched-timeout": 300}}}}


def scrape(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, from the server's /metrics."""
    url = server.server.metrics_url()
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def read(server: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return await asyncio.to_thread(scrape, server)


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_real_actions(start_server: Any, spawn_bot: SpawnBot) -> None:
    server = await start_server(CONFIG)
    bot = spawn_bot(server.address)
    await bot.registered()
    remote = Remote(server.channel)

    ok = await remote.action("sh", "-c", "echo hello", env=ENV)
    assert (await remote.run(ok)).result.exit_code == 0
    assert (await remote.run(ok)).cached_result  # the second time from the cache
    failed = await remote.action("sh", "-c", "exit 3", env=ENV, do_not_cache=True)
    assert (await remote.run(failed)).result.exit_code == 3
    slow = await remote.action("sleep", "30", env=ENV, timeout=1.0, do_not_cache=True)
    assert (await remote.run(slow)).status.code == code_pb2.DEADLINE_EXCEEDED
    cancelled = await remote.action("sleep", "30", env=ENV, do_not_cache=True)
    call = remote.execute(cancelled)
    operation = await remote.client.first_operation(call)

    async def running() -> bool:
        return value(await read(server), "buildfleet_actions_executing", instance="") == 1

    await wait_for(running, "the action to run (the executing gauge)")
    await remote.cancel(operation.name)
    call.cancel()

    # work no bot can take: queued, and its age grows
    windows = await remote.action("cmd.exe", env=ENV, do_not_cache=True,
                                  platform={"OSFamily": "windows"})
    waiting = remote.execute(windows)
    await remote.client.first_operation(waiting)

    async def settled() -> Any:
        samples = await read(server)
        done = sum(value(samples, "buildfleet_actions_total", instance="", outcome=o)
                   for o in ("success", "failed", "timeout", "cancelled", "cache_hit"))
        return samples if done >= 5 and value(
            samples, "buildfleet_queue_depth", instance="", platform="OSFamily=windows") else None

    samples = await wait_for(settled, "the five outcomes and the queued action", 30)
    for outcome, expected in (("success", 1), ("failed", 1), ("timeout", 1),
                              ("cancelled", 1), ("cache_hit", 1), ("unmatched", 0)):
        assert value(samples, "buildfleet_actions_total", instance="", outcome=outcome) \
            == expected, outcome
    assert value(samples, "buildfleet_queue_depth", instance="",
                 platform="OSFamily=windows") == 1
    assert value(samples, "buildfleet_queue_oldest_age_seconds", instance="",
                 platform="OSFamily=windows") >= 0
    assert value(samples, "buildfleet_actions_executing", instance="") == 0
    # by kind of build (one label per kind, never per invocation): the waiting action
    # came with no RequestMetadata and no principal
    assert value(samples, "buildfleet_build_actions", instance="", kind="anonymous",
                 state="queued") == 1
    assert value(samples, "buildfleet_builds", instance="", kind="anonymous") == 1
    assert value(samples, "buildfleet_build_actions", instance="", kind="invocation",
                 state="queued") == 0
    # three ran on the bot (success, failed, timeout) and came with their timings
    assert value(samples, "buildfleet_action_execution_seconds_count", instance="") == 3
    assert value(samples, "buildfleet_action_execution_seconds_bucket", instance="",
                 le="+Inf") == 3
    assert value(samples, "buildfleet_action_total_seconds_sum", instance="") > 0
    assert value(samples, "buildfleet_cas_written_bytes_total", instance="") > 0
    assert value(samples, "buildfleet_cas_read_bytes_total", instance="") > 0
    assert value(samples, "buildfleet_action_cache_requests_total", instance="",
                 result="hit") == 1
    assert value(samples, "buildfleet_action_cache_requests_total", instance="",
                 result="miss") == 1  # do_not_cache actions are not looked up
    execute = dict(service="build.bazel.remote.execution.v2.Execution", method="Execute")
    assert value(samples, "buildfleet_grpc_requests_total", **execute, code="OK") >= 4
    assert value(samples, "buildfleet_grpc_request_duration_seconds_count", **execute) >= 4
    assert value(samples, "buildfleet_bots", instance="", status="OK", label="linux") == 1
    assert value(samples, "buildfleet_bots_connected", instance="") == 1
    waiting.cancel()


async def test_bot_gauges_per_status_and_refused_reports(start_server: Any) -> None:
    server = await start_server(CONFIG)
    starting = StubBot(server.channel, bot_id="starting")
    await starting.register(status=5)  # INITIALIZING
    # a bot that stops while it runs an action shows as BOT_TERMINATING until it ends
    leaving = StubBot(server.channel, bot_id="leaving")
    await leaving.register(status=1)
    client = Client(server.channel)
    call = client.execute(await client.action("true", platform=[("OSFamily", "linux")]))
    await client.first_operation(call)
    session = await leaving.update(timeout=5)
    assert len(session.leases) == 1
    session.leases[0].state = 2  # ACTIVE
    await leaving.update(status=4, timeout=0.2)  # BOT_TERMINATING
    working = StubBot(server.channel, bot_id="working")
    await working.register(status=1)  # OK
    # a malformed report: one lease twice
    assert working.session is not None
    for _ in range(2):
        working.session.leases.add(id="made-up", state=2)  # ACTIVE
    try:
        await working.update(timeout=0.2)
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        raise AssertionError("a report naming a lease twice was accepted")

    async def gauges() -> Any:  # the replicated strategy's views are a tick old
        samples = await read(server)
        return samples if value(samples, "buildfleet_actions_executing", instance="") and \
            value(samples, "buildfleet_bots_connected", instance="") == 3 else None

    samples = await wait_for(gauges, "the gauges to show the bots and the running action")
    assert value(samples, "buildfleet_bots", instance="", status="INITIALIZING",
                 label="linux") == 1
    assert value(samples, "buildfleet_bots", instance="", status="BOT_TERMINATING",
                 label="linux") == 1
    assert value(samples, "buildfleet_bots", instance="", status="OK", label="linux") == 1
    assert value(samples, "buildfleet_lease_reports_refused_total", instance="") == 1
    assert value(samples, "buildfleet_bots_draining", instance="") == 0
    scheduler = server.server.instances.get("").scheduler
    await scheduler.add_drain("leav*")
    drained = await read(server)
    assert value(drained, "buildfleet_bots_draining", instance="") == 1
    assert value(samples, "buildfleet_actions_executing", instance="") == 1
    call.cancel()
    bots = dict(service="google.devtools.remoteworkers.v1test2.Bots",
                method="UpdateBotSession")
    assert value(samples, "buildfleet_grpc_requests_total", **bots,
                 code="INVALID_ARGUMENT") == 1


async def test_every_metric_has_a_listed_name_and_follows_the_conventions(
        start_server: Any) -> None:
    server = await start_server(CONFIG)
    stub = re_grpc.CapabilitiesStub(server.channel)
    await stub.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=""))
    url = server.server.metrics_url()
    text = await asyncio.to_thread(
        lambda: urllib.request.urlopen(url, timeout=10).read().decode())  # noqa: S310
    ours = {family.name for family in text_string_to_metric_families(text)
            if family.name.startswith("buildfleet_")}
    counters = {family.name for family in text_string_to_metric_families(text)
                if family.type == "counter"}
    # prometheus_client drops _total from a counter family's name
    exported = {f"{name}_total" if name in counters else name for name in ours}
    assert exported == NAMES
    for family in text_string_to_metric_families(text):
        if family.name.startswith("buildfleet_") and family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name


async def test_metrics_are_off_unless_asked_for(start_server: Any) -> None:
    server = await start_server()
    assert server.server.metrics_url() is None
