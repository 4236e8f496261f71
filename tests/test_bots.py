"""The Bots service and the bot side of the scheduler, through real gRPC on loopback.

Bots and clients here are written with nothing but the generated stubs
(tests/botkit.py); the server is the real one (conftest's `start_server`), with
small keepalive / long-poll / housekeeping settings so that every test is fast.
Waits are bounded polls on a condition, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from botkit import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    PENDING,
    Client,
    StubBot,
    digest_of,
    wait_for,
    worker,
)
from conftest import RunningServer, StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf.empty_pb2 import Empty
from google.rpc import code_pb2
from strategies import KINDS, open_scheduler

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildfleet.config import SchedulerConfig
from buildfleet.digest import Digest
from buildfleet.scheduler.api import SchedulerAPI
from buildfleet.scheduler.model import BotStatus, Operation, Stage
from buildfleet.server.bots.service import UninstancedBotsService

OK, UNHEALTHY, HOST_REBOOTING, BOT_TERMINATING, INITIALIZING = (
    bots_pb2.BotStatus.Value(n) for n in
    ("OK", "UNHEALTHY", "HOST_REBOOTING", "BOT_TERMINATING", "INITIALIZING"))

# Fast defaults for tests; a test overrides what it is about.
FAST = {"keepalive": 5, "long-poll": 2, "housekeeping-interval": 0.1}


# Every test here runs on both schedulers (tests/conftest.py), except those that
# inspect the in-memory scheduler's objects.
BOTH_SCHEDULERS = True


def scheduler_config(instance: str = "", **settings: Any) -> dict[str, Any]:
    """A server config with one executing instance and the given scheduler settings."""
    values = dict(FAST)
    values.update({key.replace("_", "-"): value for key, value in settings.items()})
    return {"instances": {instance: {"scheduler": values}}}




def scheduler_of(grid: RunningServer, instance: str = "") -> SchedulerAPI:
    scheduler = grid.server.instances.get(instance).scheduler
    assert scheduler is not None
    return scheduler


async def operation_of(grid: RunningServer, name: str, instance: str = "") -> Operation:
    """The operation as the scheduler has it now."""
    return await scheduler_of(grid, instance).get_operation(name)


def result_for(action: re_pb2.Action, exit_code: int = 0, worker_name: str = ""
               ) -> re_pb2.ActionResult:
    """An ActionResult that names the action it answers (stdout = its command digest)."""
    result = re_pb2.ActionResult(
        exit_code=exit_code, stdout_raw=action.command_digest.hash.encode())
    result.execution_metadata.worker = worker_name
    return result


def names(result: re_pb2.ActionResult, action: re_pb2.Action) -> bool:
    """Whether `result` is the one `result_for` made for `action` (stdout inline or stored)."""
    expected = action.command_digest.hash.encode()
    return result.stdout_raw == expected or result.stdout_digest == digest_of(expected)


async def assert_status(call: Any, code: grpc.StatusCode, *words: str) -> str:
    """Await a gRPC call and check that it fails with `code` and a message naming `words`."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value
    details = caught.value.details() or ""
    for word in words:
        assert word in details, details
    return details


async def fetch_action(grid: RunningServer, digest: re_pb2.Digest) -> re_pb2.Action:
    """Read an Action from the CAS, as a bot offered only its digest does."""
    response = await grid.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    (blob,) = response.responses
    assert blob.status.code == 0, blob.status
    return re_pb2.Action.FromString(blob.data)


async def queued(grid: RunningServer, count: int, instance: str = "") -> None:
    scheduler = scheduler_of(grid, instance)

    async def enough() -> bool:
        return await scheduler.queue_length() >= count

    await wait_for(enough, what=f"{count} queued jobs")


async def submit(client: Client, *arguments: str, **kwargs: Any
                 ) -> tuple[re_pb2.Digest, grpc.aio.UnaryStreamCall, operations_pb2.Operation]:
    """Store and Execute an action; its digest, the Execute stream and the first operation."""
    digest = await client.action(*arguments, **kwargs)
    call = client.execute(digest)
    operation = await client.first_operation(call)
    return digest, call, operation


def ops(grid: RunningServer) -> operations_pb2_grpc.OperationsStub:
    return operations_pb2_grpc.OperationsStub(grid.channel)


async def cached(grid: RunningServer, digest: re_pb2.Digest) -> re_pb2.ActionResult | None:
    try:
        return await grid.action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
        return None


async def run_lease(bot: StubBot, exit_code: int = 0) -> re_pb2.Action:
    """Complete the bot's only ACTIVE lease with a result naming its action; report it."""
    (lease,) = bot.leases(ACTIVE)
    action = bot.action_of(lease)
    bot.complete(lease.id, result_for(action, exit_code, bot.bot_id))
    await bot.update(timeout=2)
    return action


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def copy_session(bot: StubBot) -> bots_pb2.BotSession:
    assert bot.session is not None
    body = bots_pb2.BotSession()
    body.CopyFrom(bot.session)
    return body


async def send(bot: StubBot, body: bots_pb2.BotSession, timeout: float = 2.0,
               name: str | None = None) -> bots_pb2.BotSession:
    """UpdateBotSession with an explicit body (the bot's own state is not changed)."""
    return await bot.stub.UpdateBotSession(
        bots_pb2.UpdateBotSessionRequest(name=body.name if name is None else name,
                                         bot_session=body), timeout=timeout)


async def poll_until_leased(bot: StubBot, count: int = 1, timeout: float = 5.0
                            ) -> list[bots_pb2.Lease]:
    """Update until the bot holds `count` leases (bounded)."""
    deadline = time.monotonic() + timeout
    while len(bot.leases()) < count:
        assert time.monotonic() < deadline, f"bot {bot.bot_id} got no work"
        await bot.update(timeout=max(0.2, min(2.0, deadline - time.monotonic())))
    return bot.leases()


# ---------------------------------------------------------------- registration
async def test_smoke_end_to_end(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    digest, call, _ = await submit(client, "echo", "hi")
    await bot.update()
    action = await run_lease(bot)
    response = await client.result(call)
    assert response.status.code == 0
    assert names(response.result, action)
    assert response.result.execution_metadata.worker == bot.bot_id
    assert (await cached(grid, digest)) is not None


async def test_create_requires_bot_id(grid: RunningServer) -> None:
    stub = bots_pb2_grpc.BotsStub(grid.channel)
    await assert_status(stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
        parent="", bot_session=bots_pb2.BotSession(worker=worker("", [])))), INVALID, "bot_id")
    assert scheduler_of(grid).connected_bots() == 0


async def test_create_unknown_instance(grid: RunningServer) -> None:
    bot = StubBot(grid.channel, instance="no-such-instance")
    await assert_status(bot.register(), INVALID, "no-such-instance")
    assert scheduler_of(grid).connected_bots() == 0


async def test_session_name_routes_back_and_unset_status_is_ok(
        start_server: StartServer) -> None:
    grid = await start_server({"instances": {"": {"scheduler": FAST},
                                             "ci/linux": {"scheduler": FAST}}})
    for instance in ("", "ci/linux"):
        bot = StubBot(grid.channel, instance=instance)
        before = time.time()
        session = await bot.register()  # status left UNSET, as buildbox-worker does
        if instance:
            assert session.name.startswith(instance + "/") and session.name != instance + "/"
        else:
            assert session.name and not session.name.startswith("/")
        assert session.bot_id == bot.bot_id
        assert session.status == OK
        assert session.expire_time.ToNanoseconds() / 1e9 > before
        # The session name routes the bot back to its instance: it runs that instance's work.
        client = Client(grid.channel, instance=instance)
        _, call, _ = await submit(client, "routed", instance)
        await poll_until_leased(bot)
        action = await run_lease(bot)
        response = await client.result(call)
        assert response.status.code == 0 and names(response.result, action)
        assert scheduler_of(grid, instance).connected_bots() == 1
        assert bot.session is not None and bot.session.HasField("expire_time")
        await bot.stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
            name=bot.session.name, type="INFO", msg=f"hello from {instance!r}"))
        events = await scheduler_of(grid, instance).bot_events(bot.bot_id)
        assert [e.message for e in events] == [f"hello from {instance!r}"]


async def test_duplicate_bot_id_closes_older_session(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(max_attempts=5))
    client = Client(grid.channel)
    old = StubBot(grid.channel, bot_id="twin")
    await old.register()
    _, call, operation = await submit(client, "twin-work")
    (lease,) = await poll_until_leased(old)
    assert (await operation_of(grid, operation.name)).attempts == 0

    # The old bot is long-polling when its successor registers under the same id.
    poll = asyncio.create_task(old.update(timeout=10))
    await waiting(grid, old)
    new = StubBot(grid.channel, bot_id="twin")
    await new.register()
    assert new.session is not None and old.session is not None
    assert new.session.name != old.session.name
    # The older session's lease went back to the queue, counted as an attempt.
    requeued = await operation_of(grid, operation.name)
    assert requeued.stage == Stage.QUEUED and requeued.attempts == 1
    # The older session is closed: its pending call and its next update tell its bot
    # to register again (the held call at once, not at the end of its poll).
    started = time.monotonic()
    await assert_status(poll, INVALID, old.session.name)
    assert time.monotonic() - started < 1.0
    await assert_status(old.update(), INVALID, old.session.name)
    await poll_until_leased(new)
    action = await run_lease(new)
    response = await client.result(call)
    assert response.status.code == 0 and names(response.result, action)
    assert scheduler_of(grid).connected_bots() == 1


async def test_duplicate_bot_id_attempts_are_bounded(start_server: StartServer) -> None:
    """Re-registering a bot counts against max-attempts like any other lost lease."""
    grid = await start_server(scheduler_config(max_attempts=2))
    client = Client(grid.channel)
    _, call, _ = await submit(client, "flapping")
    for _ in range(2):
        bot = StubBot(grid.channel, bot_id="flapper")
        await bot.register()
        await poll_until_leased(bot)
    await StubBot(grid.channel, bot_id="flapper").register()
    response = await client.result(call)
    assert response.status.code == code_pb2.UNAVAILABLE
    assert "2 attempts" in response.status.message


# ---------------------------------------------------------------- bad input
async def test_update_name_must_match_body(grid: RunningServer) -> None:
    first, second = StubBot(grid.channel), StubBot(grid.channel)
    await first.register()
    await second.register()
    assert second.session is not None
    body = copy_session(first)
    await assert_status(send(first, body, name=second.session.name), INVALID, "differs")
    # Both sessions still work.
    await first.update(timeout=0.2)
    await second.update(timeout=0.2)


async def test_update_unknown_session(grid: RunningServer) -> None:
    bot = StubBot(grid.channel)
    await bot.register()
    body = copy_session(bot)
    for name, named in (("no-such-session", "no-such-session"),
                        ("no-such-instance/abc", "no-such-instance")):
        body.name = name
        await assert_status(send(bot, body), INVALID, named)
    await assert_status(send(bot, bots_pb2.BotSession(), name=""), INVALID)


async def test_update_closed_session(grid: RunningServer) -> None:
    bot = StubBot(grid.channel)
    await bot.register()
    await bot.update(status=BOT_TERMINATING)  # no leases: the session closes at once
    await assert_status(bot.update(), INVALID, "closed")
    assert scheduler_of(grid).connected_bots() == 0


@pytest.mark.parametrize("capacity", ["many", "", "-1", "0", "2.5"])
async def test_non_numeric_capacity(grid: RunningServer, capacity: str) -> None:
    bad = worker("bot", [("OSFamily", "linux")], capacity=None)
    bad.configs.add(key="capacity", value=capacity)
    stub = bots_pb2_grpc.BotsStub(grid.channel)
    await assert_status(stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
        bot_session=bots_pb2.BotSession(bot_id="bot", worker=bad))), INVALID, "capacity")

    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    body = copy_session(bot)
    body.worker.CopyFrom(bad)
    await assert_status(send(bot, body), INVALID, "capacity")
    assert (await scheduler_of(grid).get_session(body.name)).capacity == 2  # nothing applied


async def test_illegal_lease_transitions_apply_nothing(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    _, call_a, op_a = await submit(client, "a")
    _, call_b, op_b = await submit(client, "b")
    await poll_until_leased(bot, 2)
    first, second = bot.leases(ACTIVE)
    for bad_state in (PENDING, bots_pb2.LeaseState.Value("LEASE_STATE_UNSPECIFIED")):
        body = copy_session(bot)
        # A legal completion next to an illegal transition: nothing may be applied.
        action = bot.action_of(first)
        body.leases[0].state = COMPLETED  # type: ignore[assignment]
        body.leases[0].result.Pack(result_for(action))
        body.leases[1].state = bad_state  # type: ignore[assignment]
        await assert_status(send(bot, body), INVALID, second.id)
        for name in (op_a.name, op_b.name):
            assert (await operation_of(grid, name)).stage == Stage.EXECUTING
    # The bot's real report is still accepted afterwards.
    bot.complete(first.id, result_for(bot.action_of(first)))
    bot.complete(second.id, result_for(bot.action_of(second)))
    await bot.update()
    assert not bot.leases()
    for call in (call_a, call_b):
        assert (await client.result(call)).status.code == 0


async def test_foreign_and_unknown_leases_are_dropped(grid: RunningServer) -> None:
    """A bot can never complete a lease it does not hold."""
    client = Client(grid.channel)
    holder, intruder = StubBot(grid.channel), StubBot(grid.channel)
    await holder.register()
    await intruder.register()
    digest, call, operation = await submit(client, "held")
    (lease,) = await poll_until_leased(holder)
    action = holder.action_of(lease)

    body = copy_session(intruder)
    forged = body.leases.add(id=lease.id, state=COMPLETED)
    forged.result.Pack(result_for(action, exit_code=0, worker_name="intruder-result"))
    body.leases.add(id="never-offered", state=COMPLETED)
    body.leases.add(id="never-offered-active", state=ACTIVE)
    response = await send(intruder, body)
    assert not response.leases  # dropped, not an error
    still = await operation_of(grid, operation.name)
    assert still.stage == Stage.EXECUTING and still.worker == holder.bot_id

    holder.complete(lease.id, result_for(action, worker_name="holder-result"))
    await holder.update()
    result = await client.result(call)
    assert result.status.code == 0
    assert result.result.execution_metadata.worker == "holder-result"
    stored = await cached(grid, digest)
    assert stored is not None and stored.execution_metadata.worker == "holder-result"


async def test_completed_lease_resent_is_acknowledged_not_reapplied(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    digest, call, _ = await submit(client, "once")
    (lease,) = await poll_until_leased(bot)
    action = bot.action_of(lease)
    bot.complete(lease.id, result_for(action, worker_name="first-report"))
    report = copy_session(bot)
    response = await bot.update()
    assert not response.leases
    assert (await client.result(call)).result.execution_metadata.worker == "first-report"

    # The same completion again (a bot that lost our answer), then with another result.
    assert not (await send(bot, report)).leases
    report.leases[0].result.Pack(result_for(action, exit_code=0, worker_name="second-report"))
    assert not (await send(bot, report)).leases
    stored = await cached(grid, digest)
    assert stored is not None and stored.execution_metadata.worker == "first-report"
    assert scheduler_of(grid).stats["completed"] == 1


@pytest.mark.parametrize("version", ["", "banana", "-3", "99999999999999999999999"])
async def test_version_missing_or_junk_is_harmless(grid: RunningServer, version: str) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    _, call, _ = await submit(client, "versioned", version)
    body = copy_session(bot)
    body.version = version
    bot.session = await send(bot, body)
    assert bot.session.version  # the server keeps its own counter
    await poll_until_leased(bot)
    assert bot.session is not None
    bot.session.version = version
    action = await run_lease(bot)
    assert names((await client.result(call)).result, action)


# ---------------------------------------------------------------- capacity
async def test_capacity_three_gets_three_leases_at_once(grid: RunningServer) -> None:
    client = Client(grid.channel)
    calls = [(await submit(client, "cap", str(i)))[1] for i in range(3)]
    await queued(grid, 3)
    bot = StubBot(grid.channel, capacity=3)
    await bot.register()
    response = await bot.update()
    assert len(response.leases) == 3 and all(lease.state == ACTIVE for lease in response.leases)
    actions = {}
    for lease in bot.leases():
        action = bot.action_of(lease)
        actions[action.command_digest.hash] = action
        bot.complete(lease.id, result_for(action))
    await bot.update()
    for call in calls:
        result = (await client.result(call)).result
        assert any(names(result, action) for action in actions.values())
    assert len(actions) == 3


async def test_capacity_defaults_to_one(grid: RunningServer) -> None:
    client = Client(grid.channel)
    calls = [(await submit(client, "one", str(i)))[1] for i in range(2)]
    await queued(grid, 2)
    bot = StubBot(grid.channel, capacity=None)
    await bot.register()
    response = await bot.update()
    assert len(response.leases) == 1
    assert await scheduler_of(grid).queue_length() == 1
    await run_lease(bot)
    await poll_until_leased(bot)
    await run_lease(bot)
    for call in calls:
        assert (await client.result(call)).status.code == 0


# ---------------------------------------------------------------- statuses
@pytest.mark.parametrize("status", [UNHEALTHY, HOST_REBOOTING, INITIALIZING])
async def test_unwell_bot_keeps_leases_but_gets_no_new_work(grid: RunningServer,
                                                            status: int) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    _, call_a, _ = await submit(client, "before", str(status))
    (lease,) = await poll_until_leased(bot)
    response = await bot.update(timeout=0.3, status=status)
    assert [lease.id for lease in response.leases] == [lease.id]
    assert response.status == status

    _, call_b, op_b = await submit(client, "while-unwell", str(status))
    await queued(grid, 1)
    response = await bot.update(timeout=0.3)
    assert [lease.id for lease in response.leases] == [lease.id]  # no new work
    assert (await operation_of(grid, op_b.name)).stage == Stage.QUEUED
    # A bot registering in that status gets nothing either.
    other = StubBot(grid.channel)
    await other.register(status=status)
    assert not (await other.update(timeout=0.3)).leases
    # Its current lease still completes normally.
    action = await run_lease(bot)
    assert names((await client.result(call_a)).result, action)
    # Once it reports OK, the queued work goes to it.
    assert bot.session is not None
    bot.session.status = OK  # type: ignore[assignment]
    (second,) = await poll_until_leased(bot)
    await run_lease(bot)
    assert (await client.result(call_b)).status.code == 0


async def test_terminating_bot_finishes_its_leases_then_closes(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel, capacity=2)
    await bot.register()
    _, call_a, _ = await submit(client, "last-job")
    (lease,) = await poll_until_leased(bot)
    _, call_b, op_b = await submit(client, "for-someone-else")
    await queued(grid, 1)
    response = await bot.update(timeout=0.3, status=BOT_TERMINATING)
    assert [lease.id for lease in response.leases] == [lease.id]  # no new work
    assert (await operation_of(grid, op_b.name)).stage == Stage.QUEUED
    action = await run_lease(bot)  # its last lease: the session closes
    assert names((await client.result(call_a)).result, action)
    await assert_status(bot.update(), INVALID, "closed")
    successor = StubBot(grid.channel)
    await successor.register()
    await poll_until_leased(successor)
    await run_lease(successor)
    assert (await client.result(call_b)).status.code == 0


# ---------------------------------------------------------------- long-poll
async def waiting(grid: RunningServer, bot: StubBot) -> None:
    """Until the bot's UpdateBotSession is being held by the server."""
    assert bot.session is not None
    scheduler, name = scheduler_of(grid), bot.session.name
    await wait_for(lambda: scheduler.is_polling(name), what="the bot's long-poll")


async def test_long_poll_wakes_at_once_on_new_work(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(long_poll=30))
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    latencies = []
    for round_ in range(5):
        digest = await client.action("wake", str(round_))
        poll = asyncio.create_task(bot.update(timeout=10))
        await waiting(grid, bot)
        started = time.monotonic()
        call = client.execute(digest)
        response = await poll
        latencies.append(time.monotonic() - started)
        assert len(response.leases) == 1
        assert digest_of(response.leases[0].payload.value) == digest
        await run_lease(bot)
        assert (await client.result(call)).status.code == 0
    print(f"long-poll wake-up latency: max {max(latencies) * 1000:.1f} ms, "
          f"min {min(latencies) * 1000:.1f} ms over {len(latencies)} rounds "
          "(poll held for up to 8 s)")
    assert max(latencies) < 1.0, latencies


async def test_cancel_wakes_the_bot_and_discards_its_late_result(
        start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(long_poll=30))
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    digest, call, operation = await submit(client, "doomed")
    (lease,) = await poll_until_leased(bot)
    action = bot.action_of(lease)
    poll = asyncio.create_task(bot.update(timeout=10))  # nothing changed: held
    await waiting(grid, bot)
    started = time.monotonic()
    await ops(grid).CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
    response = await poll
    elapsed = time.monotonic() - started
    print(f"long-poll wake-up on cancellation: {elapsed * 1000:.1f} ms")
    assert elapsed < 1.0
    assert [(item.id, item.state) for item in response.leases] == [(lease.id, CANCELLED)]

    # The bot's late completion (it had not seen the cancellation) is discarded...
    late = copy_session(bot)
    late.leases[0].state = COMPLETED  # type: ignore[assignment]
    late.leases[0].result.Pack(result_for(action))
    assert not (await send(bot, late)).leases  # ...and the lease is gone from the response
    final = await client.result(call)
    assert final.status.code == code_pb2.CANCELLED
    assert (await cached(grid, digest)) is None
    # The next response (the bot echoing the CANCELLED lease) omits it too.
    assert not (await bot.update(timeout=0.3)).leases


async def test_cancel_between_calls_is_reported_cancelled(grid: RunningServer) -> None:
    """A bot that was not polling when its lease was cancelled is told on its next call."""
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    digest, call, operation = await submit(client, "cancelled-while-away")
    (lease,) = await poll_until_leased(bot)
    await ops(grid).CancelOperation(operations_pb2.CancelOperationRequest(name=operation.name))
    response = await bot.update(timeout=0.5)  # still reports the lease ACTIVE
    assert [(item.id, item.state) for item in response.leases] == [(lease.id, CANCELLED)]
    assert not (await bot.update(timeout=0.3)).leases
    assert (await client.result(call)).status.code == code_pb2.CANCELLED
    assert (await cached(grid, digest)) is None


async def test_resent_failure_report_does_not_touch_the_retry(start_server: StartServer
                                                              ) -> None:
    """A bot re-sending an infrastructure failure cannot fail the retry it was handed."""
    grid = await start_server(scheduler_config(max_attempts=3))
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    _, call, operation = await submit(client, "retried-on-the-same-bot")
    (lease,) = await poll_until_leased(bot)
    bot.complete(lease.id, code=code_pb2.INTERNAL, message="sandbox broke")
    failure = copy_session(bot)
    await bot.update()  # the only bot: it is handed the retry
    (retry,) = await poll_until_leased(bot)
    assert (await operation_of(grid, operation.name)).attempts == 1
    # The same report again (the bot lost our answer and repeats itself).
    await send(bot, failure, timeout=0.5)
    await send(bot, failure, timeout=0.5)
    again = await operation_of(grid, operation.name)
    assert again.attempts == 1 and again.stage == Stage.EXECUTING
    assert bot.session is not None
    bot.session.leases[0].CopyFrom(retry)
    action = await run_lease(bot)
    response = await client.result(call)
    assert response.status.code == 0 and names(response.result, action)


async def test_long_poll_without_deadline_is_bounded(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(long_poll=0.5))
    bot = StubBot(grid.channel)
    await bot.register()
    assert bot.session is not None
    started = time.monotonic()
    response = await bot.stub.UpdateBotSession(  # no timeout: no gRPC deadline
        bots_pb2.UpdateBotSessionRequest(name=bot.session.name, bot_session=bot.session))
    elapsed = time.monotonic() - started
    assert not response.leases
    assert 0.4 <= elapsed < 3.0, elapsed


async def test_long_poll_uses_most_of_the_deadline(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(long_poll=30))
    bot = StubBot(grid.channel)
    await bot.register()
    started = time.monotonic()
    await bot.update(timeout=1.0)  # held about 80% of the deadline, then answered
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 1.0, elapsed


# ---------------------------------------------------------------- keepalive
async def test_silent_bot_expires_and_its_lease_moves_on(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(keepalive=1, housekeeping_interval=0.1,
                                               long_poll=10))
    bots = grid.server.bots
    client = Client(grid.channel)
    silent = StubBot(grid.channel, bot_id="silent")
    await silent.register()
    _, call, operation = await submit(client, "orphan")
    (lease,) = await poll_until_leased(silent)
    alive = StubBot(grid.channel, bot_id="alive")
    await alive.register()
    assert bots.query_connected_bots_for_instance("") == 2

    started = time.monotonic()
    response = await alive.update(timeout=8)  # held until the silent bot's lease is freed
    elapsed = time.monotonic() - started
    assert [item.payload for item in response.leases] == [lease.payload]
    assert 0.5 < elapsed < 5, elapsed
    assert bots.query_connected_bots_for_instance("") == 1
    assert (await operation_of(grid, operation.name)).attempts == 1
    await assert_status(silent.update(), INVALID, "keepalive")

    action = await run_lease(alive)
    result = (await client.result(call)).result
    assert names(result, action) and result.execution_metadata.worker == "alive"


# ---------------------------------------------------------------- attempts
@pytest.mark.parametrize("code", [code_pb2.INTERNAL, code_pb2.UNAVAILABLE])
async def test_infrastructure_failures_are_retried_then_fail(start_server: StartServer,
                                                            code: int) -> None:
    grid = await start_server(scheduler_config(max_attempts=3))
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    _, call, operation = await submit(client, "flaky")
    for attempt in range(3):
        (lease,) = await poll_until_leased(bot)
        bot.complete(lease.id, code=code, message=f"runner crashed #{attempt}")
        await bot.update(timeout=0.3)
    response = await client.result(call)
    assert response.status.code == code
    assert "3 attempts" in response.status.message
    assert "runner crashed #2" in response.status.message
    assert (await operation_of(grid, operation.name)).attempts == 3
    assert not bot.leases()


async def test_failing_bot_is_not_handed_the_action_again(grid: RunningServer) -> None:
    client = Client(grid.channel)
    broken, healthy = StubBot(grid.channel, bot_id="broken"), StubBot(grid.channel,
                                                                         bot_id="healthy")
    await broken.register()
    _, call_a, _ = await submit(client, "retry-me")
    (lease,) = await poll_until_leased(broken)
    await healthy.register()
    # The healthy bot long-polls while the broken one reports an infrastructure failure.
    poll = asyncio.create_task(healthy.update(timeout=5))
    await waiting(grid, healthy)
    broken.complete(lease.id, code=code_pb2.INTERNAL, message="no space left")
    assert not (await broken.update(timeout=0.3)).leases
    assert [item.payload for item in (await poll).leases] == [lease.payload]
    action = await run_lease(healthy)
    assert names((await client.result(call_a)).result, action)

    # Same when the healthy bot is idle but not in a call at that moment.
    _, call_b, _ = await submit(client, "retry-me-too")
    (lease,) = await poll_until_leased(broken)
    broken.complete(lease.id, code=code_pb2.UNAVAILABLE, message="lost the runner")
    assert not (await broken.update(timeout=0.3)).leases
    assert [item.payload for item in await poll_until_leased(healthy)] == [lease.payload]
    await run_lease(healthy)
    assert (await client.result(call_b)).status.code == 0


async def test_other_lease_status_is_the_final_status(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()
    digest, call, operation = await submit(client, "missing-inputs")
    (lease,) = await poll_until_leased(bot)
    bot.complete(lease.id, code=code_pb2.FAILED_PRECONDITION, message="input blob gone")
    assert not (await bot.update(timeout=0.3)).leases
    response = await client.result(call)
    assert response.status.code == code_pb2.FAILED_PRECONDITION
    assert "input blob gone" in response.status.message
    assert (await operation_of(grid, operation.name)).attempts == 0
    assert (await cached(grid, digest)) is None


# ---------------------------------------------------------------- shutdown
async def test_bot_stopped_mid_action_is_retried_elsewhere(grid: RunningServer) -> None:
    client = Client(grid.channel)
    stopping = StubBot(grid.channel, bot_id="stopping")
    await stopping.register()
    digest, call, operation = await submit(client, "interrupted")
    (lease,) = await poll_until_leased(stopping)
    action = stopping.action_of(lease)
    # buildbox-worker on SIGTERM: kills the command, reports it with exit code 143
    # in the same update that says BOT_TERMINATING.
    stopping.complete(lease.id, result_for(action, exit_code=143))
    await stopping.update(status=BOT_TERMINATING)
    await assert_status(stopping.update(), INVALID, "closed")
    requeued = await operation_of(grid, operation.name)
    assert requeued.stage == Stage.QUEUED and requeued.attempts == 0
    assert (await cached(grid, digest)) is None

    successor = StubBot(grid.channel, bot_id="successor")
    await successor.register()
    assert [item.payload for item in await poll_until_leased(successor)] == [lease.payload]
    await run_lease(successor)
    response = await client.result(call)
    assert response.status.code == 0 and response.result.exit_code == 0
    assert response.result.execution_metadata.worker == "successor"
    stored = await cached(grid, digest)
    assert stored is not None and stored.exit_code == 0


# ---------------------------------------------------------------- offer styles
async def test_default_offer_is_active_with_the_action_inline(grid: RunningServer) -> None:
    client = Client(grid.channel)
    bot = StubBot(grid.channel, properties=[("OSFamily", "linux"), ("ISA", "x86-64")])
    await bot.register()
    digest, call, _ = await submit(client, "inline", platform=[("OSFamily", "linux")])
    (lease,) = await poll_until_leased(bot)
    assert lease.state == ACTIVE
    assert lease.payload.type_url.endswith("/build.bazel.remote.execution.v2.Action")
    assert digest_of(lease.payload.value) == digest
    assert [(p.key, p.value) for p in lease.requirements.properties] == [("OSFamily", "linux")]
    await run_lease(bot)
    assert (await client.result(call)).status.code == 0


async def test_pending_offer_with_digest(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(lease_offer="pending"))
    client = Client(grid.channel)
    bot = StubBot(grid.channel)
    await bot.register()

    # PENDING -> ACTIVE -> COMPLETED
    digest, call, _ = await submit(client, "pending", "1")
    (lease,) = await poll_until_leased(bot)
    assert lease.state == PENDING
    offered = re_pb2.Digest()
    assert lease.payload.Unpack(offered) and offered == digest
    bot.session.leases[0].state = ACTIVE  # type: ignore[union-attr, assignment]
    response = await bot.update()
    assert [(item.id, item.state) for item in response.leases] == [(lease.id, ACTIVE)]
    action = await fetch_action(grid, offered)
    bot.complete(lease.id, result_for(action))
    assert not (await bot.update()).leases
    assert names((await client.result(call)).result, action)

    # PENDING -> COMPLETED (a short job; the server never sees ACTIVE)
    digest, call, _ = await submit(client, "pending", "2")
    (lease,) = await poll_until_leased(bot)
    assert lease.state == PENDING
    bot.complete(lease.id, result_for(re_pb2.Action(command_digest=digest)))
    assert not (await bot.update()).leases
    assert (await client.result(call)).status.code == 0


# ---------------------------------------------------------------- PostBotEventTemp
async def test_post_bot_event(grid: RunningServer, caplog: pytest.LogCaptureFixture) -> None:
    stub = bots_pb2_grpc.BotsStub(grid.channel)
    await assert_status(stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
        name="no-such-session", type="INFO", msg="hello")), INVALID,
        "no-such-session")
    bot = StubBot(grid.channel)
    await bot.register()
    assert bot.session is not None
    before = time.time()
    for kind, message in (("INFO", "starting up"), ("ERROR", "disk on fire")):
        answer = await stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
            name=bot.session.name, type=kind, msg=message))
        assert answer == Empty()
    events = await scheduler_of(grid).bot_events(bot.bot_id)
    assert [(e.type, e.message) for e in events] == [("INFO", "starting up"),
                                                     ("ERROR", "disk on fire")]
    assert all(before <= e.time <= time.time() for e in events)
    assert any(r.levelname == "ERROR" and "disk on fire" in r.getMessage()
               for r in caplog.records)
    # A closed session cannot post.
    await bot.update(status=BOT_TERMINATING)
    await assert_status(stub.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
        name=bot.session.name, type="INFO", msg="late")), INVALID, "closed")


# ---------------------------------------------------------------- queries
STATUSES = list(BotStatus)


async def check_metrics(service: Any, instance: str, channel: grpc.aio.Channel,
                        label_key: str, run_one: Callable[[StubBot], Any]) -> None:
    """Register bots of every kind and check both query methods against them."""
    def bot(bot_id: str, labels: list[str], capacity: int | None) -> StubBot:
        properties = [("ISA", "x86-64")] + [(label_key, label) for label in labels]
        return StubBot(channel, instance=instance, bot_id=bot_id, properties=properties,
                       capacity=capacity)

    assert service.query_connected_bots_for_instance(instance) == 0
    empty = service.get_bot_status_metrics(instance)
    assert empty["bots_total"] == {status: 0 for status in STATUSES}
    assert empty["available_capacity_total"] == {status: 0 for status in STATUSES}

    busy = bot("busy", ["big"], 3)  # OK, 1 of 3 slots taken
    await busy.register()
    await run_one(busy)
    unwell = bot("unwell", ["big"], 1)
    await unwell.register(status=UNHEALTHY)
    plain = bot("plain", [], None)  # no label: "unknown"; capacity defaults to 1
    await plain.register()
    booting = bot("booting", ["small", "big"], 2)  # multi-valued label
    await booting.register(status=INITIALIZING)
    assert service.query_connected_bots_for_instance(instance) == 4

    metrics = service.get_bot_status_metrics(instance)
    assert set(metrics) == {"bots_total", "bots_per_property_label",
                            "available_capacity_total", "available_capacity_per_property_label"}
    expected_total = {status: 0 for status in STATUSES}
    expected_total.update({BotStatus.OK: 2, BotStatus.UNHEALTHY: 1, BotStatus.INITIALIZING: 1})
    assert metrics["bots_total"] == expected_total
    expected_free = {status: 0 for status in STATUSES}
    expected_free.update({BotStatus.OK: 2 + 1, BotStatus.UNHEALTHY: 1,
                          BotStatus.INITIALIZING: 2})
    assert metrics["available_capacity_total"] == expected_free

    def nonzero(counts: dict[tuple[BotStatus, str], int]) -> dict[tuple[BotStatus, str], int]:
        return {key: value for key, value in counts.items() if value}

    assert nonzero(metrics["bots_per_property_label"]) == {
        (BotStatus.OK, "big"): 1, (BotStatus.UNHEALTHY, "big"): 1,
        (BotStatus.OK, "unknown"): 1,
        (BotStatus.INITIALIZING, "small"): 1, (BotStatus.INITIALIZING, "big"): 1}
    assert nonzero(metrics["available_capacity_per_property_label"]) == {
        (BotStatus.OK, "big"): 2, (BotStatus.UNHEALTHY, "big"): 1,
        (BotStatus.OK, "unknown"): 1,
        (BotStatus.INITIALIZING, "small"): 2, (BotStatus.INITIALIZING, "big"): 2}
    for counts in (metrics["bots_per_property_label"],
                   metrics["available_capacity_per_property_label"]):
        assert all(isinstance(status, BotStatus) and isinstance(label, str)
                   for status, label in counts)

    # A bot that terminates leaves the counts.
    await plain.update(status=BOT_TERMINATING)
    assert service.query_connected_bots_for_instance(instance) == 3
    assert service.get_bot_status_metrics(instance)["bots_total"][BotStatus.OK] == 1


async def test_bots_service_queries(start_server: StartServer) -> None:
    grid = await start_server({"instances": {
        "": {"scheduler": FAST},
        "pool/a": {"scheduler": {**FAST, "bot-label-key": "pool"}}}})
    client = Client(grid.channel, instance="pool/a")

    async def run_one(bot: StubBot) -> None:
        await submit(client, "hold", bot.bot_id)
        await poll_until_leased(bot)

    await check_metrics(grid.server.bots, "pool/a", grid.channel, "pool", run_one)
    # Per instance: the other instance has no bots.
    assert grid.server.bots.query_connected_bots_for_instance("") == 0
    assert grid.server.bots.get_bot_status_metrics("")["bots_total"] == {
        status: 0 for status in STATUSES}
    with pytest.raises(Exception) as caught:
        grid.server.bots.query_connected_bots_for_instance("no-such-instance")
    assert "no-such-instance" in str(caught.value)


@pytest.fixture(params=KINDS)
async def uninstanced(request: pytest.FixtureRequest
                      ) -> AsyncIterator[tuple[UninstancedBotsService, SchedulerAPI,
                                               grpc.aio.Channel]]:
    """An UninstancedBotsService over each strategy in turn, on its own grpc.aio server."""
    settings = SchedulerConfig(keepalive=5, long_poll=1, housekeeping_interval=0.1,
                               bot_label_key="OSFamily")
    async with open_scheduler(request.param, settings) as scheduler:
        service = UninstancedBotsService(scheduler)
        await service.start()
        server = grpc.aio.server()
        service.REGISTER_METHOD(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield service, scheduler, channel
        finally:
            await channel.close()
            await server.stop(0)


async def test_uninstanced_bots_service(
        uninstanced: tuple[UninstancedBotsService, SchedulerAPI, grpc.aio.Channel]) -> None:
    service, scheduler, channel = uninstanced
    assert service.FULL_NAME == "google.devtools.remoteworkers.v1test2.Bots"
    assert service.SERVICE_NAME == "Bots"

    async def run_one(bot: StubBot) -> None:
        action = re_pb2.Action(command_digest=digest_of(bot.bot_id.encode()),
                               input_root_digest=digest_of(b""))
        await scheduler.submit(Digest.of(action.SerializeToString()), action, frozenset())
        await poll_until_leased(bot)

    # Whatever instance name a bot gives, it is served by the one scheduler.
    await check_metrics(service, "any/instance", channel, "OSFamily", run_one)
    assert service.query_connected_bots_for_instance("another") == 3
    bot = StubBot(channel, instance="yet-another")
    await bot.register()
    action = re_pb2.Action(command_digest=digest_of(b"uninstanced"),
                           input_root_digest=digest_of(b""))
    operation = await scheduler.submit(Digest.of(action.SerializeToString()), action,
                                       frozenset())
    (lease,) = await poll_until_leased(bot)
    assert digest_of(lease.payload.value) == digest_of(action.SerializeToString())
    await run_lease(bot)
    done = await scheduler.get_operation(operation.name)
    assert done.done
    response = re_pb2.ExecuteResponse.FromString(done.response or b"")
    assert response.status.code == 0 and names(response.result, action)
    assert bot.session is not None
    await bots_pb2_grpc.BotsStub(channel).PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
        name=bot.session.name, type="INFO",
        msg="served"))
    assert [e.message for e in await scheduler.bot_events(bot.bot_id)] == ["served"]



# ---------------------------------------------------------------- load
async def run_bot(bot: StubBot, stop: asyncio.Event, completions: dict[str, int]) -> None:
    """A bot loop: complete every ACTIVE lease at once with a result naming its action."""
    await bot.register()
    while not stop.is_set():
        for lease in bot.leases(ACTIVE):
            action = bot.action_of(lease)
            key = action.command_digest.hash
            completions[key] = completions.get(key, 0) + 1
            bot.complete(lease.id, result_for(action, worker_name=bot.bot_id))
        await bot.update(timeout=1.0)


async def test_thousand_actions_none_lost_none_run_twice(start_server: StartServer) -> None:
    grid = await start_server(scheduler_config(long_poll=1))
    client = Client(grid.channel)
    count = 1000
    root = re_pb2.Directory().SerializeToString()
    blobs = [root]
    actions: list[re_pb2.Action] = []
    for index in range(count):
        command = re_pb2.Command(arguments=["job", str(index)]).SerializeToString()
        actions.append(re_pb2.Action(command_digest=digest_of(command),
                                     input_root_digest=digest_of(root)))
        blobs += [command, actions[-1].SerializeToString()]
    for start in range(0, len(blobs), 500):
        await client.upload(*blobs[start:start + 500])

    started = time.monotonic()
    calls = [client.execute(digest_of(action.SerializeToString())) for action in actions]

    stop = asyncio.Event()
    completions: dict[str, int] = {}
    bots = [asyncio.create_task(run_bot(StubBot(grid.channel, bot_id=f"load-{i}", capacity=8),
                                        stop, completions)) for i in range(4)]
    try:
        responses = await asyncio.wait_for(
            asyncio.gather(*(client.result(call) for call in calls)), timeout=90)
    finally:
        stop.set()
        await asyncio.gather(*bots, return_exceptions=True)
    elapsed = time.monotonic() - started
    print(f"{count} actions through 4 stub bots (capacity 8) in {elapsed:.1f} s "
          f"({count / elapsed:.0f} actions/s)")
    for action, response in zip(actions, responses, strict=True):
        assert response.status.code == 0, response.status
        assert names(response.result, action)  # each client got its own action's result
    assert len(completions) == count  # none lost
    assert set(completions.values()) == {1}  # none run twice to completion
    assert scheduler_of(grid).stats["completed"] == count
    assert elapsed < 60


async def test_thousands_of_bots_long_poll_at_once(start_server: StartServer) -> None:
    """More bots than gRPC's default pending-call limits (about 2,300 open calls) all
    register and park in UpdateBotSession, and new work still reaches one of them."""
    grid = await start_server()
    count = 2600
    parked = 0

    async def one(bot: StubBot) -> None:
        nonlocal parked
        await bot.register()
        parked += 1
        while True:
            await bot.update(timeout=30)
            if bot.leases(ACTIVE):
                return

    bots = [StubBot(grid.channel, bot_id=f"crowd-{index}") for index in range(count)]
    tasks = [asyncio.create_task(one(bot)) for bot in bots]
    try:
        await wait_for(lambda: parked == count, 60, f"{count} bots to register")
        scheduler = grid.server.instances.get("").scheduler
        await wait_for(lambda: scheduler.polling() == count, 60,
                       f"{count} bots to be long-polling")
        client = Client(grid.channel)
        call = client.execute(await client.action("echo", "crowd"))
        done, _ = await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1, "the action reached no waiting bot"
        call.cancel()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
