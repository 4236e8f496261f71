"""Helpers for the fault tests: real server and bot processes, and REAPI client bits.

`serving()` runs `buildfleet serve` (tests/procutil.py) with a YAML config and
yields it with a channel; `BotProcess` runs ``python -m buildfleet bot``;
`shell_action()` stores an action that runs a shell script.  Every wait is a
bounded poll on something observable.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import yaml
from botkit import wait_for
from fuzz.fuzz_engine import BUG_IN_LOG
from procutil import ServeProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.digest import Digest

WAIT = 30.0  # bound of a wait on a condition, seconds
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                   ("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 500)]


async def wait_until(predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    """botkit.wait_for with this suite's argument order and longer default bound."""
    return await wait_for(predicate, timeout, what)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def proto_digest(data: bytes) -> re_pb2.Digest:
    digest = Digest.of(data)
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


def start_serve(workdir: Path, data_dir: Path, config: dict[str, Any] | None = None,
                listen: str = "127.0.0.1:0") -> ServeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = None
    if config is not None:
        config_path = workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config))
    return ServeProcess.start(workdir, data_dir=data_dir, config=config_path, listen=(listen,))


@asynccontextmanager
async def serving(workdir: Path, data_dir: Path, config: dict[str, Any] | None = None,
                  listen: str = "127.0.0.1:0"
                  ) -> AsyncIterator[tuple[ServeProcess, grpc.aio.Channel]]:
    """A `buildfleet serve` process and a channel to it; killed at the end."""
    process = await asyncio.to_thread(start_serve, workdir, data_dir, config, listen)
    channel = grpc.aio.insecure_channel(process.address, options=CHANNEL_OPTIONS)
    try:
        yield process, channel
    finally:
        await channel.close()
        process.kill()


def scheduler_config(**scheduler: Any) -> dict[str, Any]:
    """A config with one instance "" and these scheduler settings (dashes in keys)."""
    settings = {key.replace("_", "-"): value for key, value in scheduler.items()}
    return {"instances": {"": {"scheduler": settings}}}


def log_has_no_traceback(output: str) -> list[str]:
    """Lines of a server log that show a bug (a traceback, an unexpected error)."""
    return [line for line in output.splitlines() if BUG_IN_LOG.search(line)]


class BotProcess:
    """A ``python -m buildfleet bot`` process with its log in a file."""

    def __init__(self, address: str, work_dir: Path, bot_id: str, *extra: str) -> None:
        self.bot_id = bot_id
        self.work_dir = work_dir
        self.log_path = work_dir.with_suffix(".log")
        work_dir.parent.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "buildfleet", "bot", "--server", f"grpc://{address}",
                "--bot-id", bot_id, "--work-dir", str(work_dir), "--poll-timeout", "5",
                "--reconnect-max-delay", "0.5", "--health-interval", "60",
                "--sandbox", "none", *extra]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT,
                                            env=dict(os.environ, PYTHONUNBUFFERED="1"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process.poll() is None

    async def wait_log(self, pattern: str, count: int = 1, timeout: float = WAIT) -> None:
        regex = re.compile(pattern)

        def found() -> bool:
            if not self.running():
                raise AssertionError(f"bot {self.bot_id} exited with "
                                     f"{self.process.returncode}:\n{self.log()}")
            return len(regex.findall(self.log())) >= count

        await wait_until(found, f"{pattern!r} in the log of bot {self.bot_id}", timeout)

    async def registered(self) -> None:
        await self.wait_log("registered as session")

    def kill(self) -> None:
        """SIGKILL and reap (the commands it runs are in their own sessions: not killed)."""
        if self.running():
            self.process.send_signal(signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass


def kill_process_group(pid_file: Path) -> None:
    """SIGKILL the process group led by the pid written in `pid_file`, if any."""
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return int(stream.read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


async def upload(channel: grpc.aio.Channel, *blobs: bytes, instance: str = "") -> None:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(b), data=b)
                  for b in blobs]))
    assert all(r.status.code == 0 for r in response.responses), response


def shell_action(script: str, *, salt: str = "") -> tuple[list[bytes], re_pb2.Digest]:
    """The blobs of an action running `/bin/sh -c script` (PATH set), and its digest."""
    command = re_pb2.Command(arguments=["/bin/sh", "-c", script])
    command.environment_variables.add(name="PATH", value=os.environ.get("PATH", "/usr/bin:/bin"))
    root = re_pb2.Directory().SerializeToString()
    action = re_pb2.Action(command_digest=proto_digest(command.SerializeToString()),
                           input_root_digest=proto_digest(root), salt=salt.encode())
    blob = action.SerializeToString()
    return [command.SerializeToString(), root, blob], proto_digest(blob)


async def blob_bytes(channel: grpc.aio.Channel, digest: re_pb2.Digest) -> bytes:
    cas = re_grpc.ContentAddressableStorageStub(channel)
    response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    (entry,) = response.responses
    assert entry.status.code == 0, entry.status
    return entry.data


async def stdout_of(channel: grpc.aio.Channel, result: re_pb2.ActionResult) -> bytes:
    if result.stdout_raw or not result.HasField("stdout_digest"):
        return result.stdout_raw
    return await blob_bytes(channel, result.stdout_digest)
