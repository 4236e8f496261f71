#!/usr/bin/env python3
"""CAS speed over gRPC: ByteStream write/read throughput, batch upload and lookup.

    python bench/cas.py                      # spawn a server with the disk store
    python bench/cas.py --target HOST:PORT   # an existing server
    python bench/cas.py --sizes 1KiB,1MiB --small-blobs 1000 --repeat 1   # smoke

With a spawned server it also reports the server's CPU time (user + system,
from /proc) per operation, the steadier figure on a shared machine:
``server_cpu_ms_write_64MiB`` per ByteStream write of one 64 MiB blob,
``server_cpu_ms_batch_update_10000_blobs`` per 10,000-blob upload, and so on
(medians, like the other figures).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grpc  # noqa: E402
from common import cpu_seconds, report, spawned_server  # noqa: E402

from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2 as re_pb2,
)
from buildfleet._proto.build.bazel.remote.execution.v2 import (  # noqa: E402
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.google.bytestream import (  # noqa: E402
    bytestream_pb2,
    bytestream_pb2_grpc,
)
from buildfleet.digest import Digest  # noqa: E402

CHUNK = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 64 << 20),
           ("grpc.max_send_message_length", 64 << 20)]
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(text[: -len(unit)]) * factor
    return int(text)


async def bytestream_write(stub: bytestream_pb2_grpc.ByteStreamStub, instance: str,
                           data: bytes, digest: Digest) -> None:
    prefix = f"{instance}/" if instance else ""
    name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    view = memoryview(data)

    def requests():  # type: ignore[no-untyped-def]
        offset = 0
        while True:
            piece = view[offset:offset + CHUNK]
            last = offset + len(piece) >= len(data)
            yield bytestream_pb2.WriteRequest(
                resource_name=name if offset == 0 else "", write_offset=offset,
                finish_write=last, data=bytes(piece))
            offset += len(piece)
            if last:
                return

    response = await stub.Write(requests())
    assert response.committed_size == digest.size_bytes, response


async def bytestream_read(stub: bytestream_pb2_grpc.ByteStreamStub, instance: str,
                          digest: Digest) -> int:
    prefix = f"{instance}/" if instance else ""
    received = 0
    async for response in stub.Read(bytestream_pb2.ReadRequest(
            resource_name=f"{prefix}blobs/{digest.hash}/{digest.size_bytes}")):
        received += len(response.data)
    assert received == digest.size_bytes
    return received


def proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


class ServerCpu:
    """CPU seconds the server spent inside each `with` block, when its pid is known."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.samples: list[float] = []
        self._started = 0.0

    def __enter__(self) -> None:
        if self.pid is not None:
            self._started = cpu_seconds(self.pid)

    def __exit__(self, *exc: object) -> None:
        if self.pid is not None:
            self.samples.append(cpu_seconds(self.pid) - self._started)

    def report(self, figures: dict[str, object], name: str) -> None:
        """The median per operation, in milliseconds (/proc counts 10 ms ticks)."""
        if self.samples:
            figures[f"server_cpu_ms_{name}"] = round(statistics.median(self.samples) * 1000, 1)


async def run(address: str, args: argparse.Namespace,
              server_pid: int | None = None) -> dict[str, object]:
    figures: dict[str, object] = {}
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stream = bytestream_pb2_grpc.ByteStreamStub(channel)
        cas = re_grpc.ContentAddressableStorageStub(channel)
        for text in args.sizes.split(","):
            size = parse_size(text)
            count = max(1, min(args.repeat * 20, (256 << 20) // max(size, 1))) \
                if size < (1 << 20) else args.repeat
            writes, reads = [], []
            write_cpu, read_cpu = ServerCpu(server_pid), ServerCpu(server_pid)
            for _ in range(count):
                data = os.urandom(size)
                digest = Digest.of(data)
                started = time.perf_counter()
                with write_cpu:
                    await bytestream_write(stream, args.instance, data, digest)
                writes.append(time.perf_counter() - started)
                started = time.perf_counter()
                with read_cpu:
                    await bytestream_read(stream, args.instance, digest)
                reads.append(time.perf_counter() - started)
            figures[f"write_{text}_MBps"] = round(size / statistics.median(writes) / 1e6, 1)
            figures[f"read_{text}_MBps"] = round(size / statistics.median(reads) / 1e6, 1)
            write_cpu.report(figures, f"write_{text}")
            read_cpu.report(figures, f"read_{text}")
        blobs = [os.urandom(args.small_size) for _ in range(args.small_blobs)]
        digests = [Digest.of(b) for b in blobs]
        timings = []
        batch_cpu = ServerCpu(server_pid)
        for _ in range(args.repeat):
            blobs = [os.urandom(args.small_size) for _ in range(args.small_blobs)]
            digests = [Digest.of(b) for b in blobs]
            started = time.perf_counter()
            with batch_cpu:
                for start in range(0, len(blobs), args.batch):
                    response = await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                        instance_name=args.instance,
                        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(d),
                                                                         data=b)
                                  for d, b in zip(digests[start:start + args.batch],
                                                  blobs[start:start + args.batch],
                                                  strict=True)]))
                    assert all(r.status.code == 0 for r in response.responses)
            timings.append(time.perf_counter() - started)
        figures[f"batch_update_{args.small_blobs}_blobs_s"] = round(statistics.median(timings), 3)
        batch_cpu.report(figures, f"batch_update_{args.small_blobs}_blobs")
        started = time.perf_counter()
        for start in range(0, len(digests), 1000):
            response = await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                instance_name=args.instance,
                blob_digests=[proto(d) for d in digests[start:start + 1000]]))
            assert not response.missing_blob_digests
        elapsed = time.perf_counter() - started
        figures["find_missing_digests_per_s"] = round(len(digests) / elapsed)
    return figures


def _find_missing_requests(args: argparse.Namespace) -> tuple[
        list[re_pb2.BatchUpdateBlobsRequest], list[re_pb2.FindMissingBlobsRequest]]:
    """`--find-missing` small blobs as upload batches, and their digests as
    FindMissingBlobs requests of 1,000 (the same on every call: a fixed seed)."""
    import random

    rng = random.Random(7)
    blobs = [rng.randbytes(args.small_size) for _ in range(args.find_missing)]
    digests = [proto(Digest.of(b)) for b in blobs]
    uploads = [re_pb2.BatchUpdateBlobsRequest(instance_name=args.instance, requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
        for d, b in zip(digests[start:start + args.batch], blobs[start:start + args.batch],
                        strict=True)]) for start in range(0, len(blobs), args.batch)]
    asks = [re_pb2.FindMissingBlobsRequest(instance_name=args.instance,
                                           blob_digests=digests[start:start + 1000])
            for start in range(0, len(digests), 1000)]
    return uploads, asks


async def find_missing_pass(address: str, args: argparse.Namespace, *, upload: bool
                            ) -> list[float]:
    """Seconds to ask FindMissingBlobs of every `--find-missing` digest, 1,000 per call
    and 8 calls at a time (as Bazel asks before a build): the first pass, then a
    repeat.  `upload`: first ask for them (all missing) and store them, as a client
    does before a build that needs them."""
    uploads, asks = _find_missing_requests(args)
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        if upload:  # as a client does: ask, then upload what is missing
            for request in asks:
                response = await cas.FindMissingBlobs(request)
                assert len(response.missing_blob_digests) == len(request.blob_digests)
            for request in uploads:
                await cas.BatchUpdateBlobs(request)
        slots = asyncio.Semaphore(8)

        async def ask(request: re_pb2.FindMissingBlobsRequest) -> None:
            async with slots:
                response = await cas.FindMissingBlobs(request)
                assert not response.missing_blob_digests

        timings = []
        for _ in range(2):
            started = time.perf_counter()
            await asyncio.gather(*(ask(r) for r in asks))
            timings.append(time.perf_counter() - started)
        return timings


def find_missing_figures(args: argparse.Namespace) -> dict[str, float]:
    """FindMissingBlobs of `--find-missing` stored digests: right after they were
    uploaded, and by a server started afresh on the same data directory (first pass
    and a repeat), medians of `--repeat` rounds."""
    count = args.find_missing
    after_upload, fresh, repeat = [], [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="buildfleet-bench-") as data:
            reuse = ["--data-dir", data]
            with spawned_server(reuse, config=args.config_text) as (address, _):
                after_upload.append(asyncio.run(find_missing_pass(address, args,
                                                                  upload=True))[0])
            with spawned_server(reuse, config=args.config_text) as (address, _):
                first, again = asyncio.run(find_missing_pass(address, args, upload=False))
                fresh.append(first)
                repeat.append(again)
    return {f"find_missing_{count}_after_upload_s": round(statistics.median(after_upload), 3),
            f"find_missing_{count}_fresh_server_s": round(statistics.median(fresh), 3),
            f"find_missing_{count}_repeat_s": round(statistics.median(repeat), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", help="HOST:PORT of a running server (default: spawn one)")
    parser.add_argument("--instance", default="")
    parser.add_argument("--sizes", default="1KiB,1MiB,64MiB")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (median)")
    parser.add_argument("--small-blobs", type=int, default=10_000)
    parser.add_argument("--small-size", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--find-missing", type=int, default=100_000,
                        help="digests asked of FindMissingBlobs by a spawned server, "
                             "after upload and after a restart (0: skip)")
    parser.add_argument("--config", type=Path,
                        help="the spawned server's configuration (YAML), e.g. s3 storage")
    args = parser.parse_args()
    args.config_text = args.config.read_text() if args.config else None
    if args.target:
        figures = asyncio.run(run(args.target, args))
    else:
        with spawned_server(config=args.config_text) as (address, process):
            figures = asyncio.run(run(address, args, process.pid))
        if args.find_missing:
            figures.update(find_missing_figures(args))
    report("cas", figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
