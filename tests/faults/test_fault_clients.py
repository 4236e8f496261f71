"""Clients that vanish or stall, against a real `buildfleet serve` process.

- A client process SIGKILLed in the middle of its Execute stream: the action
  still completes, its result is in the action cache, and a later WaitExecution
  (from another client) returns it.
- Slow or stalled ByteStream clients -- uploads that send one chunk and then
  nothing, downloads whose reader never consumes -- do not hold up anybody
  else: every other call keeps answering promptly and the server's memory stays
  bounded; and the unfinished uploads kept at once (each an open file) are bounded.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from botkit import ACTIVE, Client, StubBot, action_result, poll_leases, wait_execution
from conftest import RunningServer
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import code_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.server.bytestream.service import ByteStreamService

from .faultkit import (
    CHANNEL_OPTIONS,
    log_has_no_traceback,
    proto_digest,
    scheduler_config,
    serving,
    stdout_of,
    wait_until,
)

MiB = 1024 * 1024

pytestmark = pytest.mark.faults

# A client in its own process: Execute, print each operation (name and stage), and
# keep the stream open until killed.
CLIENT = """
import asyncio, sys
import grpc
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc

async def main():
    channel = grpc.aio.insecure_channel(sys.argv[1])
    digest = re_pb2.Digest(hash=sys.argv[2], size_bytes=int(sys.argv[3]))
    metadata = re_pb2.ExecuteOperationMetadata()
    async for operation in re_grpc.ExecutionStub(channel).Execute(
            re_pb2.ExecuteRequest(action_digest=digest)):
        operation.metadata.Unpack(metadata)
        print(operation.name, re_pb2.ExecutionStage.Value.Name(metadata.stage), flush=True)
    print("STREAM ENDED", flush=True)

asyncio.run(main())
"""


async def test_client_killed_mid_execute(tmp_path: Path) -> None:
    async with serving(tmp_path / "server", tmp_path / "data", scheduler_config(
            housekeeping_interval=0.2)) as (server, channel):
        client = Client(channel)
        digest = await client.action("echo", "orphaned")
        bot = StubBot(channel, bot_id="bot")
        await bot.register()
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENT, server.address, digest.hash, str(digest.size_bytes),
            stdout=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            name, stage = line.decode().split()
            assert stage == "QUEUED"
            [lease] = await poll_leases(bot)  # the action is now executing
            line = await asyncio.wait_for(process.stdout.readline(), 10)
            assert line.decode().split() == [name, "EXECUTING"]
            process.kill()  # SIGKILL in the middle of the stream
            await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()

        # The action is not cancelled with its only client gone: the bot keeps it.
        response = await bot.update(timeout=1.0)
        assert [(item.id, item.state) for item in response.leases] == [(lease.id, ACTIVE)]
        bot.complete(lease.id, action_result(0, b"finished for nobody"))
        await bot.update(timeout=1.0)

        cached = await re_grpc.ActionCacheStub(channel).GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=digest))
        assert await stdout_of(channel, cached) == b"finished for nobody"
        operation = await operations_pb2_grpc.OperationsStub(channel).GetOperation(
            operations_pb2.GetOperationRequest(name=name))
        assert operation.done
        late = await Client(channel).result(wait_execution(channel, name))
        assert late.status.code == code_pb2.OK
        assert await stdout_of(channel, late.result) == b"finished for nobody"
        assert not log_has_no_traceback(server.output())


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def timed(call: object) -> float:
    started = time.monotonic()
    await call  # type: ignore[misc]
    return time.monotonic() - started


async def test_stalled_bytestream_clients_do_not_block_others(tmp_path: Path) -> None:
    async with serving(tmp_path / "server", tmp_path / "data") as (server, channel):
        bytestream = bs_grpc.ByteStreamStub(channel)
        cas = re_grpc.ContentAddressableStorageStub(channel)
        big = os.urandom(4 * MiB) * 8  # 32 MiB
        big_digest = proto_digest(big)
        name = f"uploads/{uuid.uuid4()}/blobs/{big_digest.hash}/{big_digest.size_bytes}"
        await bytestream.Write(iter(
            [bs_pb2.WriteRequest(resource_name=name if offset == 0 else "", write_offset=offset,
                                 data=big[offset:offset + MiB],
                                 finish_write=offset + MiB >= len(big))
             for offset in range(0, len(big), MiB)]))
        small = os.urandom(MiB)
        small_digest = proto_digest(small)
        await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=small_digest, data=small)]))
        baseline_rss = rss_mib(server.pid)

        # Stallers on channels of their own (as separate clients would be).
        stall_channels = [grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
                          for _ in range(4)]
        release = asyncio.Event()

        async def stalled_upload(stub: bs_grpc.ByteStreamStub, n: int) -> bs_pb2.WriteResponse:
            data = os.urandom(2 * MiB)
            digest = proto_digest(data)
            upload_name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

            async def requests():  # type: ignore[no-untyped-def]
                yield bs_pb2.WriteRequest(resource_name=upload_name, data=data[:MiB])
                await release.wait()  # ... and nothing more until the end of the test

            return await stub.Write(requests())

        stalled_reads = []
        stalled_writes = []
        for n in range(24):
            stub = bs_grpc.ByteStreamStub(stall_channels[n % len(stall_channels)])
            read = stub.Read(bs_pb2.ReadRequest(
                resource_name=f"blobs/{big_digest.hash}/{big_digest.size_bytes}"))
            await read.wait_for_connection()  # started; never consumed
            stalled_reads.append(read)
            stalled_writes.append(asyncio.create_task(stalled_upload(stub, n)))
        await asyncio.sleep(0.5)  # let the server fill its flow-control windows

        latencies: list[float] = []
        for round_ in range(10):
            latencies.append(await timed(re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest())))
            latencies.append(await timed(cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                blob_digests=[small_digest, big_digest]))))
            response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                digests=[small_digest]))
            assert response.responses[0].data == small
            started = time.monotonic()
            chunks = [r.data async for r in bytestream.Read(bs_pb2.ReadRequest(
                resource_name=f"blobs/{small_digest.hash}/{small_digest.size_bytes}"))]
            latencies.append(time.monotonic() - started)
            assert b"".join(chunks) == small
            data = f"fresh blob {round_}".encode() * 1000
            digest = proto_digest(data)
            started = time.monotonic()
            await bytestream.Write(iter([bs_pb2.WriteRequest(
                resource_name=f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{len(data)}",
                data=data, finish_write=True)]))
            latencies.append(time.monotonic() - started)
        assert max(latencies) < 1.0, latencies
        assert sorted(latencies)[len(latencies) // 2] < 0.2, latencies
        # 24 stalled 32 MiB reads hold no more than their flow-control windows.
        assert rss_mib(server.pid) - baseline_rss < 300, (baseline_rss, rss_mib(server.pid))

        # The stalled reads, once consumed, still deliver the whole blob intact.
        hasher = hashlib.sha256()
        async for response in stalled_reads[0]:
            hasher.update(response.data)
        assert hasher.hexdigest() == big_digest.hash
        for read in stalled_reads[1:]:
            read.cancel()
        release.set()
        for write in stalled_writes:
            try:
                result = await asyncio.wait_for(write, 10)
                assert result.committed_size == MiB  # an unfinished, resumable upload
            except grpc.aio.AioRpcError as error:
                raise AssertionError(f"stalled upload ended with {error.code()}") from error
        for stall in stall_channels:
            await stall.close()
        assert server.running()
        assert not log_has_no_traceback(server.output())


def bytestream_service(grid: RunningServer) -> ByteStreamService:
    return next(s for s in grid.server.services if isinstance(s, ByteStreamService))


def partial_upload(n: int) -> tuple[str, bytes]:
    data = f"unfinished upload {n} ".encode() * 50
    digest = proto_digest(data)
    return f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}", data


async def committed(grid: RunningServer, name: str) -> int | grpc.StatusCode:
    try:
        response = await grid.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=name))
    except grpc.aio.AioRpcError as error:
        return error.code()
    return response.committed_size


async def test_unfinished_uploads_are_bounded(grid: RunningServer) -> None:
    """Each unfinished upload holds an open file: past the limit the longest-idle one is
    aborted, and when every one is being written a new upload is refused."""
    service = bytestream_service(grid)
    service.max_uploads = 3
    idle = []
    for n in range(4):
        name, data = partial_upload(n)
        response = await grid.bytestream.Write(iter([bs_pb2.WriteRequest(
            resource_name=name, data=data[:10])]))  # the stream ends without finish_write
        assert response.committed_size == 10
        idle.append(name)
    assert service.unfinished_uploads == 3
    assert await committed(grid, idle[0]) == grpc.StatusCode.NOT_FOUND  # the oldest went
    assert [await committed(grid, name) for name in idle[1:]] == [10, 10, 10]

    release = asyncio.Event()

    async def stalled(name: str, data: bytes) -> bs_pb2.WriteResponse:
        async def requests():  # type: ignore[no-untyped-def]
            yield bs_pb2.WriteRequest(resource_name=name, data=data[:10])
            await release.wait()

        return await grid.bytestream.Write(requests())

    busy = [partial_upload(10 + n) for n in range(3)]
    writers = [asyncio.create_task(stalled(name, data)) for name, data in busy]
    async def started(name: str) -> bool:
        return await committed(grid, name) == 10

    for name, _ in busy:
        await wait_until(functools.partial(started, name), f"upload {name} to start")
    assert [await committed(grid, name) for name in idle] == [grpc.StatusCode.NOT_FOUND] * 4
    name, data = partial_upload(99)
    error = await rpc_error_of(grid.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=name, data=data, finish_write=True)])))
    assert error[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in error[1]
    release.set()
    assert [(await writer).committed_size for writer in writers] == [10, 10, 10]
    # Room again: the refused upload goes through now.
    response = await grid.bytestream.Write(iter([bs_pb2.WriteRequest(
        resource_name=name, data=data, finish_write=True)]))
    assert response.committed_size == len(data)


async def rpc_error_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
