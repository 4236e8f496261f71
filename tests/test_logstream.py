"""Log streams (LogStream API + ByteStream): created, written in pieces, read live by
several readers, bounded in size, refused to anyone without the write name, expired."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import pytest
from botprocess import SERVER_CONFIG, Remote, wait_for
from google.longrunning import operations_pb2, operations_pb2_grpc
from webkit import Visitor, page_url, web_config

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.build.bazel.remote.logstream.v1 import remote_logstream_pb2 as ls_pb2
from buildfleet._proto.build.bazel.remote.logstream.v1 import (
    remote_logstream_pb2_grpc as ls_grpc,
)
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.errors import NotFound, ResourceExhausted
from buildfleet.server.logstream.store import LogStreamLimits, LogStreams, parse_log_name

WAIT = 10.0


class Log:
    """A client of one server's log streams."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.logs = ls_grpc.LogStreamServiceStub(channel)
        self.bytestream = bs_grpc.ByteStreamStub(channel)

    async def create(self, parent: str = "") -> ls_pb2.LogStream:
        return await self.logs.CreateLogStream(ls_pb2.CreateLogStreamRequest(parent=parent))

    async def write(self, name: str, offset: int, *pieces: bytes,
                    finish: bool = False) -> int:
        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            position = offset
            for number, piece in enumerate(pieces):
                last = number == len(pieces) - 1
                yield bs_pb2.WriteRequest(resource_name=name, write_offset=position,
                                          data=piece, finish_write=finish and last)
                position += len(piece)
        response = await self.bytestream.Write(requests())
        return response.committed_size

    def follow(self, name: str, offset: int = 0, limit: int = 0) -> Reader:
        return Reader(self.bytestream.Read(bs_pb2.ReadRequest(
            resource_name=name, read_offset=offset, read_limit=limit)))

    async def read_all(self, name: str, offset: int = 0, limit: int = 0) -> bytes:
        reader = self.follow(name, offset, limit)
        await asyncio.wait_for(reader.done, WAIT)
        return bytes(reader.received)


class Reader:
    """A ByteStream Read in the background, collecting what arrives."""

    def __init__(self, call: Any) -> None:
        self.received = bytearray()
        self.arrived = asyncio.Event()
        self.done = asyncio.ensure_future(self._run(call))

    async def _run(self, call: Any) -> None:
        async for response in call:
            self.received += response.data
            self.arrived.set()

    async def has(self, expected: bytes) -> None:
        """Wait (bounded) until exactly `expected` has arrived, and no more."""
        async def until() -> None:
            while len(self.received) < len(expected) and not self.done.done():
                self.arrived.clear()
                await self.arrived.wait()
        await asyncio.wait_for(until(), WAIT)
        assert bytes(self.received) == expected


@pytest.fixture
async def log(start_server: Any) -> Log:
    server = await start_server({"instances": {"": {}, "ci/linux": {}}})
    return Log(server.channel)


async def test_two_readers_follow_a_stream_live_one_of_them_late(log: Log) -> None:
    stream = await log.create()
    assert stream.name.startswith("logstreams/")
    assert stream.write_resource_name.startswith(stream.name + "/")
    early = log.follow(stream.name)
    assert await log.write(stream.write_resource_name, 0, b"compiling ", b"a.c\n") == 14
    await early.has(b"compiling a.c\n")
    assert not early.done.done()  # waits for more: the stream is not finished

    late = log.follow(stream.name)  # starts late: still gets it all from offset 0
    await late.has(b"compiling a.c\n")
    tail = log.follow(stream.name, offset=10)
    await tail.has(b"a.c\n")
    assert await log.write(stream.write_resource_name, 14, b"done\n", finish=True) == 19
    for reader in (early, late, tail):
        await asyncio.wait_for(reader.done, WAIT)
    assert bytes(early.received) == bytes(late.received) == b"compiling a.c\ndone\n"
    assert bytes(tail.received) == b"a.c\ndone\n"
    # a finished stream reads at once, with offsets and limits
    assert await log.read_all(stream.name) == b"compiling a.c\ndone\n"
    assert await log.read_all(stream.name, offset=10, limit=3) == b"a.c"
    with pytest.raises(grpc.aio.AioRpcError) as past:
        await log.read_all(stream.name, offset=100)
    assert past.value.code() == grpc.StatusCode.OUT_OF_RANGE


async def test_a_limited_read_of_an_unfinished_stream_ends_at_its_limit(log: Log) -> None:
    stream = await log.create("ci/linux")
    assert stream.name.startswith("ci/linux/logstreams/")
    reader = log.follow(stream.name, offset=2, limit=5)
    await log.write(stream.write_resource_name, 0, b"0123")
    await reader.has(b"23")
    await log.write(stream.write_resource_name, 4, b"456789")
    await asyncio.wait_for(reader.done, WAIT)
    assert bytes(reader.received) == b"23456"


async def test_only_the_write_name_writes_and_only_the_name_reads(log: Log) -> None:
    stream = await log.create()
    other = await log.create()
    cases = [
        (stream.name, grpc.StatusCode.INVALID_ARGUMENT, "read name"),
        (stream.name + "/" + "0" * 32, grpc.StatusCode.PERMISSION_DENIED, "wrong write token"),
        # another stream's secret does not open this one
        (stream.name + "/" + other.write_resource_name.rsplit("/", 1)[1],
         grpc.StatusCode.PERMISSION_DENIED, "wrong write token"),
        ("logstreams/" + "f" * 32 + "/x", grpc.StatusCode.NOT_FOUND, "is not known"),
        ("ci/linux/" + stream.name[len(""):] + "/x", grpc.StatusCode.NOT_FOUND, "is not known"),
    ]
    for name, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await log.write(name, 0, b"forged output")
        assert refused.value.code() == code, name
        assert words in (refused.value.details() or ""), name
    with pytest.raises(grpc.aio.AioRpcError) as by_write_name:
        await log.read_all(stream.write_resource_name)
    assert by_write_name.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # nothing forged got in; the writer goes on from offset 0
    assert await log.write(stream.write_resource_name, 0, b"real", finish=True) == 4
    assert await log.read_all(stream.name) == b"real"
    with pytest.raises(grpc.aio.AioRpcError) as after:
        await log.write(stream.write_resource_name, 4, b"more")
    assert after.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = await log.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=stream.write_resource_name))
    assert (status.committed_size, status.complete) == (4, True)


async def test_bad_requests_are_refused_with_a_reason(log: Log) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await log.create("no/such/instance")
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown instance name" in (unknown.value.details() or "")
    stream = await log.create()
    await log.write(stream.write_resource_name, 0, b"abc")
    with pytest.raises(grpc.aio.AioRpcError) as gap:
        await log.write(stream.write_resource_name, 5, b"x")
    assert gap.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected 3" in (gap.value.details() or "")
    for name in ("logstreams/", "logstreams/a/b/c", "x/logstreams//y"):
        with pytest.raises(grpc.aio.AioRpcError) as malformed:
            await log.read_all(name)
        assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name


async def test_a_stream_keeps_at_most_its_limit(start_server: Any) -> None:
    server = await start_server({"logstreams": {"max-stream-size": 10}})
    log = Log(server.channel)
    stream = await log.create()
    reader = log.follow(stream.name)
    await log.write(stream.write_resource_name, 0, b"123456")
    with pytest.raises(grpc.aio.AioRpcError) as full:
        await log.write(stream.write_resource_name, 6, b"7890abc")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 10 bytes" in (full.value.details() or "")
    await asyncio.wait_for(reader.done, WAIT)  # the stream is finished: readers end
    assert bytes(reader.received) == b"1234567890"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_streams_expire_after_they_end_and_when_their_writer_goes_silent() -> None:
    clock = Clock()
    logs = LogStreams(LogStreamLimits(keep_for=60, idle_timeout=300), clock)
    ended_name, ended_writer = logs.create("")
    silent_name, silent_writer = logs.create("")
    logs.write(parse_log_name(ended_writer), 0, b"all of it", finish=True)
    logs.write(parse_log_name(silent_writer), 0, b"half", finish=False)
    clock.now += 59
    assert logs.committed(parse_log_name(ended_writer)) == (9, True)
    clock.now += 1
    with pytest.raises(NotFound, match="expired"):
        logs.committed(parse_log_name(ended_writer))
    assert logs.committed(parse_log_name(silent_writer)) == (4, False)
    clock.now += 240  # 300 s without a write: finished, then kept 60 s more
    assert logs.committed(parse_log_name(silent_writer)) == (4, True)
    clock.now += 60
    with pytest.raises(NotFound):
        logs.committed(parse_log_name(silent_writer))
    assert len(logs) == 0 and logs.total_size == 0
    assert ended_name != silent_name


def test_the_oldest_finished_streams_make_room_and_unfinished_ones_are_kept() -> None:
    logs = LogStreams(LogStreamLimits(max_total_size=100, max_stream_size=100), Clock())
    old_name, old = logs.create("")
    logs.write(parse_log_name(old), 0, b"x" * 60, finish=True)
    live_name, live = logs.create("")
    logs.write(parse_log_name(live), 0, b"y" * 30, finish=False)
    new_name, new = logs.create("")
    logs.write(parse_log_name(new), 0, b"z" * 50, finish=False)  # drops the finished one
    with pytest.raises(NotFound):
        logs.committed(parse_log_name(old))
    assert logs.total_size == 80
    with pytest.raises(ResourceExhausted, match="max-total-size"):
        logs.write(parse_log_name(live), 30, b"w" * 30, finish=False)  # nothing to drop
    assert logs.committed(parse_log_name(new)) == (50, False)
    assert {old_name, live_name, new_name} and len(logs) == 2


# -- the output of running actions, end to end ------------------------------------

async def executing_metadata(call: Any) -> re_pb2.ExecuteOperationMetadata:
    """Follow an Execute stream to its first update that names the output streams."""
    async with asyncio.timeout(WAIT):
        async for operation in call:
            metadata = re_pb2.ExecuteOperationMetadata()
            operation.metadata.Unpack(metadata)
            if metadata.stdout_stream_name:
                assert metadata.stage == re_pb2.ExecutionStage.EXECUTING
                executing[metadata.stdout_stream_name] = operation.name
                return metadata
    raise AssertionError("the operation ended without naming its streams")


executing: dict[str, str] = {}  # stdout stream name -> its operation's name


@pytest.fixture
async def grid(start_server: Any, spawn_bot: Any) -> tuple[Any, Remote]:
    """A server (embedded scheduler) with one registered `buildfleet bot`."""
    server = await start_server(SERVER_CONFIG)
    bot = spawn_bot(server.address)
    await bot.registered()
    return server, Remote(server.channel)


async def running(remote: Remote, before: str, go: Path, after: str = "true"
                  ) -> tuple[Any, re_pb2.ExecuteOperationMetadata]:
    """Execute `before`, then wait for the file `go`, then `after`: the call, and the
    metadata of the update that names its streams (it runs by then)."""
    digest = await remote.action(
        "sh", "-c", f"{before}; while [ ! -e {go} ]; do sleep 0.05; done; {after}")
    call = remote.execute(digest)
    return call, await executing_metadata(call)


async def test_a_running_actions_output_is_read_live_and_ends_with_it(
        grid: tuple[Any, Remote], tmp_path: Path) -> None:
    server, remote = grid
    go = tmp_path / "go"
    call, metadata = await running(remote, "echo first; echo oops >&2", go, "echo second")
    assert metadata.stdout_stream_name.startswith("logstreams/")
    assert metadata.stderr_stream_name != metadata.stdout_stream_name
    # GetOperation and WaitExecution name the same streams while it runs
    name = executing[metadata.stdout_stream_name]
    got = await operations_pb2_grpc.OperationsStub(server.channel).GetOperation(
        operations_pb2.GetOperationRequest(name=name))
    waited = re_grpc.ExecutionStub(server.channel).WaitExecution(
        re_pb2.WaitExecutionRequest(name=name))
    assert await executing_metadata(waited) == metadata
    waited.cancel()
    seen = re_pb2.ExecuteOperationMetadata()
    got.metadata.Unpack(seen)
    assert (seen.stdout_stream_name, seen.stderr_stream_name) == (
        metadata.stdout_stream_name, metadata.stderr_stream_name)
    log = Log(server.channel)
    early = log.follow(metadata.stdout_stream_name)
    await early.has(b"first\n")  # before the action ends
    late = log.follow(metadata.stdout_stream_name)
    await late.has(b"first\n")
    errors = log.follow(metadata.stderr_stream_name)
    await errors.has(b"oops\n")
    assert not early.done.done()
    go.touch()
    async with asyncio.timeout(WAIT):
        result = await remote.client.result(call)
    for reader in (early, late, errors):
        await asyncio.wait_for(reader.done, WAIT)
    assert bytes(early.received) == bytes(late.received) == b"first\nsecond\n"
    assert bytes(errors.received) == b"oops\n"
    assert await remote.blob(result.result.stdout_digest) == b"first\nsecond\n"


async def test_a_burst_of_output_goes_in_few_calls(grid: tuple[Any, Remote],
                                                   tmp_path: Path) -> None:
    server, remote = grid
    go = tmp_path / "go"
    call, metadata = await running(remote, "seq 1 20000", go, "echo end")
    expected = "".join(f"{n}\n" for n in range(1, 20001)).encode()
    reader = Log(server.channel).follow(metadata.stdout_stream_name)
    await reader.has(expected)
    go.touch()
    async with asyncio.timeout(WAIT):
        await remote.client.result(call)
    await asyncio.wait_for(reader.done, WAIT)
    assert bytes(reader.received) == expected + b"end\n"
    # 20,000 lines (109 KB) and the end: a few calls per stream, not one per line
    assert server.server.logs.write_calls <= 12, server.server.logs.write_calls


async def test_writes_by_anyone_but_the_bot_holding_the_lease_are_refused(
        grid: tuple[Any, Remote], tmp_path: Path) -> None:
    server, remote = grid
    go = tmp_path / "go"
    call, metadata = await running(remote, "true", go)
    log = Log(server.channel)
    for forged in (metadata.stdout_stream_name, metadata.stdout_stream_name + "/guess"):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await log.write(forged, 0, b"fake compiler output")
        assert refused.value.code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                        grpc.StatusCode.PERMISSION_DENIED)
    go.touch()
    async with asyncio.timeout(WAIT):
        await remote.client.result(call)
    assert await log.read_all(metadata.stdout_stream_name) == b""


def test_an_actions_streams_last_for_its_run_and_silent_ones_go_soon() -> None:
    clock = Clock()
    logs = LogStreams(LogStreamLimits(keep_for=600), clock)
    first = logs.for_action("", "abc/3")
    assert first is not None and logs.for_action("", "abc/3") == first  # the same run
    assert logs.for_action("ci", "abc/3") != first  # another instance, other streams
    logs.write(parse_log_name(first.stdout[1]), 0, b"said something", finish=False)
    logs.end_action("", "abc/3")
    assert logs.committed(parse_log_name(first.stdout[1])) == (14, True)  # finished
    second = logs.for_action("", "abc/3")  # the next run of the same action
    assert second is not None and second != first
    clock.now += 10  # a stream nothing was written to is not kept long
    with pytest.raises(NotFound):
        logs.committed(parse_log_name(first.stderr[1]))
    assert logs.committed(parse_log_name(first.stdout[1])) == (14, True)
    clock.now += 590
    with pytest.raises(NotFound):
        logs.committed(parse_log_name(first.stdout[1]))


async def test_ops_logs_follows_a_running_action_from_the_terminal(
        grid: tuple[Any, Remote], tmp_path: Path) -> None:
    server, remote = grid
    go = tmp_path / "go"
    call, metadata = await running(remote, "echo compiling; echo warning >&2", go,
                                   "echo linked")
    name = executing[metadata.stdout_stream_name]
    command = [sys.executable, "-m", "buildfleet", "ops", "logs", name,
               "--server", f"grpc://{server.address}"]
    follower = await asyncio.create_subprocess_exec(*command, "--follow",
                                                    stdout=asyncio.subprocess.PIPE)
    assert follower.stdout is not None
    async with asyncio.timeout(WAIT):
        assert await follower.stdout.readline() == b"compiling\n"  # while it runs
    assert follower.returncode is None
    snapshot = await asyncio.create_subprocess_exec(*command, "--stderr",
                                                    stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        printed, _ = await snapshot.communicate()  # what is there now, then it exits
    assert (printed, snapshot.returncode) == (b"warning\n", 0)
    go.touch()
    async with asyncio.timeout(WAIT):
        rest = await follower.stdout.read()
        assert await follower.wait() == 0
    assert rest == b"linked\n"
    async with asyncio.timeout(WAIT):
        await remote.client.result(call)
    done = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    async with asyncio.timeout(WAIT):
        printed, _ = await done.communicate()  # from the result, once it is done
    assert (printed, done.returncode) == (b"compiling\nlinked\n", 0)


async def test_readers_of_a_cancelled_action_end(grid: tuple[Any, Remote],
                                                 tmp_path: Path) -> None:
    server, remote = grid
    call, metadata = await running(remote, "echo started", tmp_path / "never")
    reader = Log(server.channel).follow(metadata.stdout_stream_name)
    await reader.has(b"started\n")
    await remote.cancel(executing[metadata.stdout_stream_name])
    await asyncio.wait_for(reader.done, WAIT)  # the stream ends with the action
    assert bytes(reader.received) == b"started\n"


async def test_the_web_page_follows_a_running_actions_output(
        start_server: Any, spawn_bot: Any, tmp_path: Path) -> None:
    server = await start_server(web_config())
    bot = spawn_bot(server.address)
    await bot.registered()
    remote = Remote(server.channel)
    go = tmp_path / "go"
    call, metadata = await running(remote, "echo '<b>building</b>'", go, "echo done")
    name = executing[metadata.stdout_stream_name]
    visitor = Visitor(page_url(server, ""))
    try:
        status, page, _ = await visitor.get("/operation?" + urlencode({"name": name}))
        assert status == 200 and 'data-output="stdout"' in page

        async def output(offset: int) -> tuple[str, int, bool]:
            status, text, response = await visitor.get("/output?" + urlencode(
                {"name": name, "stream": "stdout", "offset": offset}))
            assert status == 200, text
            assert response.content_type == "text/plain"  # never HTML
            return (text, int(response.headers["X-Output-Next"]),
                    response.headers["X-Output-Complete"] == "1")

        async def printed() -> tuple[str, int, bool] | None:
            answer = await output(0)
            return answer if answer[0] else None

        text, offset, complete = await wait_for(printed, "the output on the page")
        assert (text, offset, complete) == ("<b>building</b>\n", 16, False)
        assert await output(offset) == ("", offset, False)
        status, refused, _ = await visitor.get("/output?" + urlencode(
            {"name": name, "stream": "nonsense"}))
        assert status == 400 and "stream must be stdout or stderr" in refused
        go.touch()
        async with asyncio.timeout(WAIT):
            await remote.client.result(call)
        assert (await output(offset))[2] is True  # ended: the result has it all
    finally:
        await visitor.close()
