"""Several `buildfleet serve` replicas on one PostgreSQL database behave as one grid.

Real server processes share a database schema (tests/pgkit.py) and one CAS and
action-cache directory.  Bots and clients talk to whichever replica they like;
when their replica dies or the database restarts they retry elsewhere or later,
the way Bazel and buildbox-worker do.  Every action must run exactly once and
every client must get its own action's result.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
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
    leased_action,
    stdout_is,
    wait_for,
)
from google.longrunning import operations_pb2
from procutil import ServeProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


@dataclass
class Replica:
    process: ServeProcess
    channel: grpc.aio.Channel


def replica_config(pg_url: str, shared: Path) -> dict[str, Any]:
    return {
        "database": pg_url,
        "storage": {"cas": {"type": "disk", "path": str(shared / "cas")},
                    "ac": {"type": "disk", "path": str(shared / "ac")}},
        "instances": {"": {"cas": "cas", "action-cache": "ac",
                           "scheduler": {"housekeeping-interval": 0.2}}},
    }


@asynccontextmanager
async def replicas(tmp_path: Path, pg_url: str, count: int = 2
                   ) -> AsyncIterator[list[Replica]]:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(replica_config(pg_url, tmp_path / "shared")))
    async with AsyncExitStack() as stack:
        started: list[Replica] = []
        for index in range(count):
            workdir = tmp_path / f"replica-{index}"
            process = await asyncio.to_thread(ServeProcess.start, workdir,
                                              data_dir=workdir / "data", config=config)
            stack.callback(process.kill)
            channel = grpc.aio.insecure_channel(process.address)
            stack.push_async_callback(channel.close)
            started.append(Replica(process, channel))
        yield started


@dataclass
class Load:
    """Bots and clients spread over replicas, retrying elsewhere on failure."""

    replicas: list[Replica]
    actions: int
    bots_per_replica: int
    runs: Counter[str] = field(default_factory=Counter)  # action hash -> times run
    ran_by: dict[str, list[str]] = field(default_factory=dict)  # action hash -> bot:lease

    def twice(self) -> dict[str, list[str]]:
        return {h: self.ran_by[h] for h, n in self.runs.items() if n > 1}
    finished: int = 0
    dead: set[int] = field(default_factory=set)  # replicas known to be gone

    def channel(self, preferred: int) -> grpc.aio.Channel:
        alive = [i for i in range(len(self.replicas)) if i not in self.dead]
        index = preferred if preferred in alive else alive[preferred % len(alive)]
        return self.replicas[index].channel

    async def run(self, timeout: float) -> None:
        client = Client(self.replicas[0].channel)
        digests = [await client.action("echo", str(number), salt=b"replicas")
                   for number in range(self.actions)]
        done = asyncio.Event()

        async def bots() -> None:
            async with asyncio.TaskGroup() as group:
                for index in range(self.bots_per_replica * len(self.replicas)):
                    group.create_task(self.bot(index, done))

        bot_task = asyncio.create_task(bots())
        try:
            async with asyncio.timeout(timeout):
                semaphore = asyncio.Semaphore(32)
                await asyncio.gather(*(self.client(i, digest, semaphore)
                                       for i, digest in enumerate(digests)))
        finally:
            done.set()
            await asyncio.wait_for(bot_task, 30)

    async def run_with_fault(self, fault: Callable[[], Awaitable[object]]) -> None:
        """Run the load; once a quarter of it has finished, inject `fault`."""
        runner = asyncio.create_task(self.run(timeout=240))
        await wait_for(lambda: self.finished >= self.actions // 4 or runner.done(), 120,
                       "a quarter of the actions finishing")
        assert self.finished < self.actions, "the load ended before the fault"
        await fault()
        await runner

    async def client(self, index: int, digest: re_pb2.Digest,
                     semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            name = ""
            attempt = 0
            while True:
                stub = re_grpc.ExecutionStub(self.channel(index + attempt))
                try:
                    if not name:
                        call = stub.Execute(re_pb2.ExecuteRequest(action_digest=digest))
                    else:
                        call = stub.WaitExecution(re_pb2.WaitExecutionRequest(name=name))
                    last: operations_pb2.Operation | None = None
                    async for operation in call:
                        name = name or operation.name
                        last = operation
                    assert last is not None and last.done, last
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    attempt += 1
                    await asyncio.sleep(min(0.05 * attempt, 1.0))
            response = re_pb2.ExecuteResponse()
            assert last.response.Unpack(response)
            assert response.status.code == 0, response.status
            # The bot's stdout names the action it ran: this client got its own result.
            assert stdout_is(response.result, f"ran {digest.hash}".encode()), response
            self.finished += 1

    async def bot(self, index: int, done: asyncio.Event) -> None:
        home = index % len(self.replicas)
        bot = StubBot(self.channel(home), bot_id=f"bot-{index}", capacity=2)
        attempt = 0
        while not done.is_set():
            try:
                if bot.session is None:
                    await bot.register()
                await bot.update(timeout=1.0)
                attempt = 0
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                    raise  # the session must survive every fault here
                if error.code() not in RETRYABLE:
                    raise
                attempt += 1
                bot.channel = self.channel(home + attempt)
                await asyncio.sleep(min(0.05 * attempt, 1.0))
                continue
            for lease in bot.leases(ACTIVE):
                action = leased_action(lease)
                self.runs[action.hash] += 1
                self.ran_by.setdefault(action.hash, []).append(f"{bot.bot_id}:{lease.id}")
                bot.complete(lease.id, action_result(0, f"ran {action.hash}".encode()))


async def test_two_replicas_run_every_action_exactly_once(tmp_path: Path, pg_url: str) -> None:
    async with replicas(tmp_path, pg_url) as grid:
        load = Load(grid, actions=1000, bots_per_replica=16)
        await load.run(timeout=240)
        assert load.finished == 1000
        assert len(load.runs) == 1000
        assert set(load.runs.values()) == {1}, load.twice()


async def test_work_and_results_cross_replicas(tmp_path: Path, pg_url: str) -> None:
    async with replicas(tmp_path, pg_url) as (a, b):
        bot = StubBot(a.channel, bot_id="only-bot")
        await bot.register()
        poll = asyncio.create_task(bot.update(timeout=20))
        client = Client(b.channel)
        digest = await client.action("echo", "crossing")
        call = client.execute(digest)
        first = await anext(aiter(call))
        await asyncio.wait_for(poll, 15)
        [lease] = bot.leases(ACTIVE)
        assert leased_action(lease) == digest
        # The bot reports through the other replica.
        bot.channel = b.channel
        bot.complete(lease.id, action_result(0, b"crossed"))
        await bot.update(timeout=1)
        # The operation answers the same on both replicas.
        for replica in (a, b):
            done = await operations_of(replica).GetOperation(
                operations_pb2.GetOperationRequest(name=first.name))
            assert done.done
        response = await client.result(call)
        assert stdout_is(response.result, b"crossed")


def operations_of(replica: Replica) -> Any:
    from google.longrunning import operations_pb2_grpc
    return operations_pb2_grpc.OperationsStub(replica.channel)


async def test_a_replica_killed_mid_load_loses_nothing(tmp_path: Path, pg_url: str) -> None:
    async with replicas(tmp_path, pg_url) as grid:
        load = Load(grid, actions=400, bots_per_replica=8)

        async def kill_first_replica() -> None:
            grid[0].process.kill()  # SIGKILL
            load.dead.add(0)

        await load.run_with_fault(kill_first_replica)
        assert load.finished == 400
        assert len(load.runs) == 400
        assert set(load.runs.values()) == {1}, load.twice()


def restart_postgres() -> Callable[[], None] | None:
    """A function restarting the machine's PostgreSQL cluster, or None when we cannot."""
    if shutil.which("pg_lsclusters") is None or shutil.which("pg_ctlcluster") is None:
        return None
    listing = subprocess.run(["pg_lsclusters", "--no-header"], capture_output=True, text=True)
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] == "5432" and fields[3] == "online":
            version, cluster = fields[0], fields[1]
            return lambda: subprocess.run(["pg_ctlcluster", version, cluster, "restart"],
                                          check=True, capture_output=True, timeout=120)
    return None


async def test_the_grid_recovers_from_a_database_restart_under_load(
        tmp_path: Path, pg_url: str) -> None:
    restart = restart_postgres()
    if restart is None:
        pytest.skip("cannot restart PostgreSQL here (pg_ctlcluster not available)")
    async with replicas(tmp_path, pg_url) as grid:
        load = Load(grid, actions=400, bots_per_replica=8)
        await load.run_with_fault(lambda: asyncio.to_thread(restart))
        assert load.finished == 400
        assert set(load.runs.values()) == {1}, load.twice()
        assert all(replica.process.running() for replica in grid)
        for replica in grid:
            assert "Traceback" not in replica.process.output(), replica.process.output()


class CuttableProxy:
    """A TCP relay to PostgreSQL that a test can cut (an outage) and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and break every open one."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))
        self._writers -= {writer, upstream_writer}


async def test_database_outage_answers_unavailable_with_a_retry_hint_then_recovers(
        start_server: Any, pg_url: str) -> None:
    from botkit import status_details
    from google.rpc import error_details_pb2
    from pgkit import with_address

    proxy = CuttableProxy(("127.0.0.1", 5432))
    await proxy.start()
    server = await start_server({
        "database": with_address(pg_url, "127.0.0.1", proxy.port),
        "postgres": {"connect-timeout": 1, "retry-after": 2},
    })
    client = Client(server.channel)
    bot = StubBot(server.channel, bot_id="outage-bot")
    await bot.register()
    digest = await client.action("echo", "before")
    await proxy.cut()

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await client.first_operation(client.execute(digest))
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "database" in (raised.value.details() or "")
    [detail] = status_details(raised.value).details
    hint = error_details_pb2.RetryInfo()
    assert detail.Unpack(hint) and hint.retry_delay.seconds == 2
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await bot.update(timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE

    # The database comes back on the same address: no restart needed.
    await proxy.start()

    async def executes() -> bool:
        try:
            await client.first_operation(client.execute(digest))
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return False
        return True

    await wait_for(executes, 30, "Execute working again after the outage")
    [lease] = await poll_leases_retrying(bot)
    bot.complete(lease.id, action_result(0, b"after"))
    await bot.update(timeout=1)
    await proxy.cut()


async def poll_leases_retrying(bot: StubBot) -> list[Any]:
    async def leased() -> list[Any]:
        try:
            await bot.update(timeout=2)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            return []
        return bot.leases(ACTIVE)

    return list(await wait_for(leased, 30, "the bot getting the action"))
