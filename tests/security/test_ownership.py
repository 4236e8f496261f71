"""Whose work is whose, on both scheduling strategies: an operation belongs to the
principal that submitted it (also when it joins an identical action in flight),
nothing reveals another principal's operations, an admin sees and steers them all,
ownership survives a restart; a bot session is driven only by its owner.  And the
attacks an open grid allowed: a forged cache entry, a rogue bot."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from authkit import Keys, channel
from botkit import ACTIVE, Client, StubBot, action_result, poll_leases
from conftest import StartServer
from google.longrunning import operations_pb2, operations_pb2_grpc

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc

BOTH_SCHEDULERS = True


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


def secure_config(keys: Keys) -> dict[str, object]:
    return {"tls": keys.tls(), "auth": keys.auth(),
            "instances": {"": {"scheduler": {"keepalive": 10, "long-poll": 2,
                                             "housekeeping-interval": 0.1}}}}


async def code_of(call: object) -> str:
    try:
        await call  # type: ignore[misc]
        return "OK"
    except grpc.aio.AioRpcError as error:
        return error.code().name


async def test_operations_are_their_submitters_own(start_server: StartServer, keys: Keys,
                                                   tmp_path: Path) -> None:
    grid = await start_server(secure_config(keys))
    alice, bob, root = (keys.token("alice", "execute"), keys.token("bob", "execute"),
                        keys.token("root", "admin"))
    runner = keys.token("runner", "bot")
    async with channel(grid.address, keys, token=alice) as as_alice, \
            channel(grid.address, keys, token=bob) as as_bob, \
            channel(grid.address, keys, token=root) as as_root, \
            channel(grid.address, keys, token=runner) as as_bot:
        # Alice and Bob submit the same action: one job, an operation each.
        alice_client, bob_client = Client(as_alice), Client(as_bob)
        digest = await alice_client.action("echo", "shared")
        alice_call = alice_client.execute(digest)
        alice_op = (await alice_client.first_operation(alice_call)).name
        bob_call = bob_client.execute(digest)
        bob_op = (await bob_client.first_operation(bob_call)).name
        assert alice_op != bob_op

        ops_as = {name: operations_pb2_grpc.OperationsStub(ch)
                  for name, ch in (("alice", as_alice), ("bob", as_bob), ("root", as_root))}
        assert await code_of(ops_as["alice"].GetOperation(
            operations_pb2.GetOperationRequest(name=alice_op))) == "OK"
        # Bob cannot see, wait for, cancel or delete Alice's: to him it does not exist.
        for call in (ops_as["bob"].GetOperation(operations_pb2.GetOperationRequest(
                         name=alice_op)),
                     ops_as["bob"].CancelOperation(operations_pb2.CancelOperationRequest(
                         name=alice_op)),
                     ops_as["bob"].DeleteOperation(operations_pb2.DeleteOperationRequest(
                         name=alice_op)),
                     ops_as["bob"].WaitOperation(operations_pb2.WaitOperationRequest(
                         name=alice_op)),
                     _drain(re_grpc.ExecutionStub(as_bob).WaitExecution(
                         re_pb2.WaitExecutionRequest(name=alice_op)))):
            assert await code_of(call) == "NOT_FOUND"
        listed = {who: [op.name for op in (await stub.ListOperations(
            operations_pb2.ListOperationsRequest(name=""))).operations]
            for who, stub in ops_as.items()}
        assert listed["alice"] == [alice_op] and listed["bob"] == [bob_op]
        assert sorted(listed["root"]) == sorted([alice_op, bob_op])

        # The action runs once; both get its result.
        bot = StubBot(as_bot, bot_id="runner-1")
        await bot.register()
        [lease] = await poll_leases(bot)
        bot.complete(lease.id, action_result(0, b"shared"))
        await bot.update(timeout=1.0)
        for client, call in ((alice_client, alice_call), (bob_client, bob_call)):
            assert (await client.result(call)).result.exit_code == 0
        assert not bot.leases(ACTIVE)
        # An admin may steer anyone's operation.
        assert await code_of(ops_as["root"].DeleteOperation(
            operations_pb2.DeleteOperationRequest(name=alice_op))) == "OK"


async def test_ownership_survives_a_restart(start_server: StartServer, keys: Keys,
                                            tmp_path: Path, scheduler_kind: str) -> None:
    config = secure_config(keys)
    if scheduler_kind == "replicated":
        from pgkit import postgres_schema

        schema = postgres_schema()
        config["database"] = await schema.__aenter__()
    try:
        first = await start_server(config, data_dir=tmp_path / "data")
        alice, bob = keys.token("alice", "execute"), keys.token("bob", "execute")
        async with channel(first.address, keys, token=alice) as as_alice:
            client = Client(as_alice)
            name = (await client.first_operation(client.execute(
                await client.action("sleep", "1")))).name
        await first.server.stop(0)
        second = await start_server(config, data_dir=tmp_path / "data")
        async with channel(second.address, keys, token=bob) as as_bob, \
                channel(second.address, keys, token=alice) as as_alice:
            get = operations_pb2.GetOperationRequest(name=name)
            assert await code_of(operations_pb2_grpc.OperationsStub(as_bob).GetOperation(
                get)) == "NOT_FOUND"
            assert await code_of(operations_pb2_grpc.OperationsStub(as_alice).GetOperation(
                get)) == "OK"
    finally:
        if scheduler_kind == "replicated":
            await second.server.stop(0)
            await schema.__aexit__(None, None, None)


async def test_no_one_takes_over_another_principals_bot_session(
        start_server: StartServer, keys: Keys) -> None:
    grid = await start_server(secure_config(keys))
    owner, rival = keys.token("bot-owner", "bot"), keys.token("bot-rival", "bot")
    async with channel(grid.address, keys, token=owner) as as_owner, \
            channel(grid.address, keys, token=rival) as as_rival:
        bot = StubBot(as_owner, bot_id="shared-id")
        session = await bot.register()
        rivals = bots_pb2_grpc.BotsStub(as_rival)
        for call in (rivals.UpdateBotSession(bots_pb2.UpdateBotSessionRequest(
                         name=session.name, bot_session=session)),
                     rivals.PostBotEventTemp(bots_pb2.PostBotEventTempRequest(
                         name=session.name, msg="mine now")),
                     rivals.CreateBotSession(bots_pb2.CreateBotSessionRequest(
                         bot_session=bots_pb2.BotSession(bot_id="shared-id")))):
            assert await code_of(call) == "PERMISSION_DENIED"
        # The owner's session is untouched.
        assert (await bot.update(timeout=0.5)).name == session.name


async def test_a_client_cannot_forge_a_cached_result_or_pose_as_a_bot(
        start_server: StartServer, keys: Keys) -> None:
    grid = await start_server(secure_config(keys))
    builder = keys.token("builder", "execute")
    linux_bots = keys.token("linux-pool", {"role": "bot", "bot-ids": "linux-*"})
    async with channel(grid.address, keys, token=builder) as as_builder, \
            channel(grid.address, keys, token=linux_bots) as as_pool:
        client = Client(as_builder)
        digest = await client.action("echo", "precious")
        forged = re_pb2.ActionResult(exit_code=0, stdout_raw=b"forged")
        assert await code_of(re_grpc.ActionCacheStub(as_builder).UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=digest,
                                             action_result=forged))) == "PERMISSION_DENIED"
        assert await code_of(re_grpc.ActionCacheStub(as_builder).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest))) == "NOT_FOUND"
        # A client cannot register a bot (and so never receives others' actions) ...
        assert await code_of(bots_pb2_grpc.BotsStub(as_builder).CreateBotSession(
            bots_pb2.CreateBotSessionRequest(bot_session=bots_pb2.BotSession(
                bot_id="linux-1")))) == "PERMISSION_DENIED"
        # ... and a bot credential only registers the bot ids it was given.
        pool = bots_pb2_grpc.BotsStub(as_pool)
        assert await code_of(pool.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            bot_session=bots_pb2.BotSession(bot_id="evil-1")))) == "PERMISSION_DENIED"
        assert await code_of(pool.CreateBotSession(bots_pb2.CreateBotSessionRequest(
            bot_session=bots_pb2.BotSession(bot_id="linux-1")))) == "OK"


async def _drain(call: object) -> None:
    async for _ in call:  # type: ignore[attr-defined]
        pass


async def test_the_admin_api_shows_a_principal_only_its_own_operations(
        start_server: StartServer, keys: Keys) -> None:
    from buildfleet._proto.buildfleet.admin.v1 import admin_pb2
    from buildfleet._proto.buildfleet.admin.v1 import admin_pb2_grpc as admin_grpc

    grid = await start_server(secure_config(keys))
    alice, reader, root = (keys.token("alice", "execute"), keys.token("carol", "read"),
                           keys.token("root", "admin"))
    async with channel(grid.address, keys, token=alice) as as_alice, \
            channel(grid.address, keys, token=reader) as as_reader, \
            channel(grid.address, keys, token=root) as as_root:
        client = Client(as_alice)
        call = client.execute(await client.action("echo", "private"))
        name = (await client.first_operation(call)).name

        async def listed(ch: grpc.aio.Channel) -> list[str]:
            answer = await admin_grpc.AdminStub(ch).ListOperations(
                admin_pb2.ListOperationsRequest(instance_name=""))
            return [op.name for op in answer.operations]

        assert await listed(as_alice) == [name]
        assert await listed(as_reader) == []  # a reader sees nobody else's work
        assert await listed(as_root) == [name]
        assert await code_of(admin_grpc.AdminStub(as_reader).GetOperation(
            admin_pb2.GetOperationRequest(name=name))) == "NOT_FOUND"
        shown = await admin_grpc.AdminStub(as_root).GetOperation(
            admin_pb2.GetOperationRequest(name=name))
        assert list(shown.arguments) == ["echo", "private"]
        assert shown.summary.submitter == "alice"
        # cancelling through the Admin API is the admin's, even for one's own
        assert await code_of(admin_grpc.AdminStub(as_alice).CancelOperation(
            admin_pb2.CancelOperationRequest(name=name))) == "PERMISSION_DENIED"
        cancelled = await admin_grpc.AdminStub(as_root).CancelOperation(
            admin_pb2.CancelOperationRequest(name=name))
        assert cancelled.summary.cancelled
        call.cancel()
