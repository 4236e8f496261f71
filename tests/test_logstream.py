"""Log streams (LogStream API + ByteStream): created, written in pieces, read live by
several readers, bounded in size, refused to anyone without the write name, expired."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

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
