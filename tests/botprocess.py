"""Real `buildfleet bot` processes for the tests, and a REAPI client that builds and
runs actions through them."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import botkit
import grpc
from botkit import Client
from google.longrunning import operations_pb2, operations_pb2_grpc

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.client.cas import CasClient, proto_digest
from buildfleet.digest import Digest

WAIT = 20.0  # bound of every wait on a condition, seconds
# Small server timers so that nothing in a test waits long.
SERVER_CONFIG: dict[str, Any] = {"instances": {"": {"scheduler": {
    "keepalive": 10, "timeout-grace": 5, "housekeeping-interval": 0.2}}}}


async def wait_for(predicate: Callable[[], object], what: str, timeout: float = WAIT) -> Any:
    """botkit.wait_for with this module's longer default bound."""
    return await botkit.wait_for(predicate, timeout, what)


def pid_alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            state = stream.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


class BotProcess:
    """A `buildfleet bot` process with its log in a file."""

    def __init__(self, args: list[str], log_path: Path, bot_id: str, work_dir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.args = args
        self.log_path = log_path
        self.bot_id = bot_id
        self.work_dir = work_dir
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "buildfleet", "bot", *args], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_log(self, pattern: str, count: int = 1) -> list[str]:
        regex = re.compile(pattern)

        def found() -> list[str]:
            lines = [line for line in self.log().splitlines() if regex.search(line)]
            if self.process.poll() is not None and len(lines) < count:
                raise AssertionError(f"bot exited with {self.process.returncode} before "
                                     f"logging {pattern!r}:\n{self.log()}")
            return lines if len(lines) >= count else []

        return await wait_for(found, f"{pattern!r} in the bot log")  # type: ignore[no-any-return]

    async def registered(self) -> None:
        await self.wait_log("registered as session")

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def exit_code(self, timeout: float = WAIT) -> int:
        await wait_for(lambda: self.process.poll() is not None, "the bot to exit", timeout)
        assert self.process.returncode is not None
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)

    def lease_lines(self) -> list[str]:
        return [line for line in self.log().splitlines() if " lease " in line
                and " action " in line]


SpawnBot = Callable[..., BotProcess]


async def grid_server(start_server: Any, **scheduler: Any) -> Any:
    config = {"instances": {"": {"scheduler": {**SERVER_CONFIG["instances"][""]["scheduler"],
                                               **scheduler}}}}
    return await start_server(config)


class Remote:
    """An REAPI client for the tests: builds actions with input trees, runs them."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.cas = CasClient(channel)
        self.client = Client(channel)

    async def action(self, *arguments: str, inputs: Path | None = None,
                     output_paths: Iterable[str] = (), output_files: Iterable[str] = (),
                     output_directories: Iterable[str] = (), working_directory: str = "",
                     env: dict[str, str] | None = None, timeout: float | None = None,
                     do_not_cache: bool = False, salt: bytes = b"",
                     root_digest: Digest | None = None,
                     output_directory_format: int = 0,
                     platform: dict[str, str] | None = None) -> Digest:
        command = re_pb2.Command(
            arguments=list(arguments), output_paths=sorted(output_paths),
            output_files=sorted(output_files), output_directories=sorted(output_directories),
            working_directory=working_directory,
            output_directory_format=output_directory_format)  # type: ignore[arg-type]
        for name, value in sorted((env or {"PATH": os.environ["PATH"]}).items()):
            command.environment_variables.add(name=name, value=value)
        for name, value in sorted((platform or {}).items()):
            command.platform.properties.add(name=name, value=value)
        if root_digest is None:
            if inputs is None:
                root_digest = await self.cas.upload_message(re_pb2.Directory())
            else:
                root_digest = (await self.cas.upload_directory(inputs)).root_digest
        command_digest = await self.cas.upload_message(command)
        action = re_pb2.Action(command_digest=proto_digest(command_digest),
                               input_root_digest=proto_digest(root_digest),
                               do_not_cache=do_not_cache, salt=salt,
                               platform=command.platform)
        if timeout is not None:
            action.timeout.FromNanoseconds(int(timeout * 1e9))
        return await self.cas.upload_message(action)

    def execute(self, digest: Digest, *, skip_cache_lookup: bool = False
                ) -> grpc.aio.UnaryStreamCall:
        return self.client.execute(proto_digest(digest), skip_cache_lookup=skip_cache_lookup)

    async def run(self, digest: Digest, *, skip_cache_lookup: bool = False,
                  timeout: float = WAIT) -> re_pb2.ExecuteResponse:
        async with asyncio.timeout(timeout):
            return await self.client.result(self.execute(digest,
                                                         skip_cache_lookup=skip_cache_lookup))

    async def blob(self, digest: re_pb2.Digest) -> bytes:
        return await self.cas.read_blob(Digest(digest.hash, digest.size_bytes))

    async def tree(self, digest: re_pb2.Digest) -> re_pb2.Tree:
        tree = re_pb2.Tree()
        tree.ParseFromString(await self.blob(digest))
        return tree

    async def cancel(self, operation_name: str) -> None:
        stub = operations_pb2_grpc.OperationsStub(self.channel)
        await stub.CancelOperation(operations_pb2.CancelOperationRequest(name=operation_name))

    async def wait_execution(self, name: str, timeout: float = WAIT) -> re_pb2.ExecuteResponse:
        stub = re_grpc.ExecutionStub(self.channel)
        async with asyncio.timeout(timeout):
            return await self.client.result(
                stub.WaitExecution(re_pb2.WaitExecutionRequest(name=name)))


def sessions_of(server: Any) -> dict[str, Any]:
    """bot_id -> live session in the in-process server's scheduler."""
    scheduler = server.server.instances.get("").scheduler
    return {s.bot_id: s for s in scheduler.live_sessions()}
