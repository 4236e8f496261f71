"""Shared fixtures: a real buildfleet server on a loopback port in a temporary directory."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from botprocess import BotProcess, SpawnBot
from pgkit import StoreBackend, postgres_schema, store_backend
from s3kit import SeaweedFS, seaweedfs

from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.config import ServerConfig, parse_config
from buildfleet.digest import Digest
from buildfleet.server.app import BuildfleetServer


@dataclass
class RunningServer:
    """A started server plus a channel and stubs for talking to it."""

    server: BuildfleetServer
    address: str
    channel: grpc.aio.Channel
    data_dir: Path

    @property
    def cas(self) -> re_grpc.ContentAddressableStorageStub:
        return re_grpc.ContentAddressableStorageStub(self.channel)

    @property
    def bytestream(self) -> bs_grpc.ByteStreamStub:
        return bs_grpc.ByteStreamStub(self.channel)

    @property
    def action_cache(self) -> re_grpc.ActionCacheStub:
        return re_grpc.ActionCacheStub(self.channel)

    @property
    def capabilities(self) -> re_grpc.CapabilitiesStub:
        return re_grpc.CapabilitiesStub(self.channel)

    async def upload(self, data: bytes, instance: str = "") -> re_pb2.Digest:
        """Store a blob through BatchUpdateBlobs and return its digest."""
        digest = proto_digest(data)
        response = await self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]))
        assert response.responses[0].status.code == 0, response
        return digest


def proto_digest(data: bytes) -> re_pb2.Digest:
    digest = Digest.of(data)
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


StartServer = Callable[..., Any]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Modules that set ``BOTH_SCHEDULERS = True`` run their server tests twice: on the
    in-memory scheduler (SQLite) and on the replicated one (PostgreSQL)."""
    if ("start_server" in metafunc.fixturenames
            and getattr(metafunc.module, "BOTH_SCHEDULERS", False)):
        metafunc.parametrize("scheduler_kind", ["memory", "replicated"], indirect=True)


@pytest.fixture
def scheduler_kind(request: pytest.FixtureRequest) -> str:
    """Which scheduler `start_server` gives a server whose config names no `database`:
    "memory" (the embedded strategy on SQLite) unless the module opts into both
    (above) or env BUILDFLEET_TEST_SCHEDULER says "replicated"."""
    return str(getattr(request, "param",
                       os.environ.get("BUILDFLEET_TEST_SCHEDULER", "memory")))


@pytest.fixture
async def start_server(tmp_path: Path, scheduler_kind: str) -> AsyncIterator[StartServer]:
    """Factory: `await start_server(config_dict=None, data_dir=None)` -> RunningServer.

    Every server started is stopped at the end of the test.  `config_dict` is the
    YAML document as a dict; `listen` and `data-dir` default to a free loopback
    port and the test's temporary directory.  With `scheduler_kind` "replicated",
    a server whose config names no `database` runs the replicated scheduler on a
    fresh PostgreSQL schema of its own.
    """
    running: list[RunningServer] = []
    schemas = AsyncExitStack()

    async def start(config_dict: dict[str, Any] | None = None,
                    data_dir: Path | None = None) -> RunningServer:
        document = dict(config_dict or {})
        document.setdefault("listen", ["127.0.0.1:0"])
        document.setdefault("data-dir", str(data_dir or tmp_path / "data"))
        document.setdefault("grace-period", 1)
        if scheduler_kind == "replicated" and "database" not in document:
            document["database"] = await schemas.enter_async_context(postgres_schema())
        config: ServerConfig = parse_config(document)
        server = BuildfleetServer(config)
        ports = await server.start()
        address = f"127.0.0.1:{ports[0]}"
        channel = grpc.aio.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ])
        handle = RunningServer(server, address, channel, Path(config.data_dir))
        running.append(handle)
        return handle

    yield start
    for handle in running:
        await handle.channel.close()
        await handle.server.stop(0)
    await schemas.aclose()


@pytest.fixture
async def grid(start_server: StartServer) -> RunningServer:
    """A server with the embedded defaults (one instance "", disk storage)."""
    return await start_server()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL URL to a fresh schema of this test's own, dropped afterwards.

    Skips the test when PostgreSQL is unreachable (fails with
    BUILDFLEET_REQUIRE_POSTGRES=1).  With start_server, request pg_url first so
    that the schema outlives the servers.
    """
    async with postgres_schema() as url:
        yield url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedFS]:
    """One SeaweedFS for the session (tests/s3kit.py); each test takes a prefix."""
    with seaweedfs() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path
                  ) -> AsyncIterator[StoreBackend]:
    """Each scheduler store backend in turn (tests/pgkit.py StoreBackend)."""
    async with store_backend(request.param, tmp_path) as chosen:
        yield chosen


@pytest.fixture
async def spawn_bot(start_server: StartServer, tmp_path: Path) -> AsyncIterator[SpawnBot]:
    """Factory: `spawn_bot(address, *extra_args, bot_id=..., sandbox="none")` -> a running
    `buildfleet bot` process.  The bot tests that are not about the sandbox run
    unsandboxed (their commands write to the test's directory); tests/test_sandbox.py
    passes `sandbox="bwrap"`.

    Depends on `start_server` so that bots are stopped before the servers."""
    bots: list[BotProcess] = []

    def spawn(address: str, *extra: str, bot_id: str | None = None,
              work_dir: Path | None = None, sandbox: str = "none",
              env: dict[str, str] | None = None) -> BotProcess:
        index = len(bots)
        bot_id = bot_id or f"bot{index}-{os.getpid()}"
        work = work_dir or tmp_path / f"bot{index}"
        args = ["--server", f"grpc://{address}", "--bot-id", bot_id, "--work-dir", str(work),
                "--poll-timeout", "10", "--reconnect-max-delay", "0.5", "--sandbox", sandbox,
                *extra]
        bot = BotProcess(args, tmp_path / f"bot{index}.log", bot_id, work, env)
        bots.append(bot)
        return bot

    yield spawn
    for bot in bots:
        bot.kill()
