"""Live output: a running command's stdout or stderr file, sent to a log stream.

`OutputStreamer` follows one output file while the command runs: every
`FLUSH_INTERVAL` it sends what was added since (at most `MAX_CALL` bytes a call),
as one ByteStream Write to the stream's write name, so that a chatty command costs
a call per interval, not per line.  `close()` sends the rest and finishes the
stream.  Streaming is best effort: the first failure (or a server that is slow to
answer) turns it off for that stream with one log line, and never fails or
holds up the action; the whole output still goes into the ActionResult.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5  # seconds between sends while the command runs
MAX_CALL = 1024 * 1024  # bytes per Write call
CHUNK = 64 * 1024  # bytes per WriteRequest
CALL_TIMEOUT = 10.0  # seconds a Write may take before streaming is given up
CLOSE_TIMEOUT = 5.0  # seconds close() may take at the end of the action


class OutputStreamer:
    def __init__(self, bytestream: bs_grpc.ByteStreamStub, write_name: str, path: Path,
                 what: str) -> None:
        self.bytestream = bytestream
        self.write_name = write_name
        self.path = path
        self.what = what  # "stdout" or "stderr", for the log
        self.sent = 0
        self.calls = 0
        self.failed = False
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"stream {self.what}")

    async def close(self) -> None:
        """Send what is left and finish the stream (bounded in time, never raises)."""
        self._stop.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self._task is not None:
                    await self._task  # a send under way completes: offsets stay right
                await self._send(finish=True)
        except TimeoutError:
            self._give_up(f"it took longer than {CLOSE_TIMEOUT:g} s to finish")
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow(self) -> None:
        while not self.failed and not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), FLUSH_INTERVAL)
            if not self._stop.is_set():
                await self._send(finish=False)

    async def _send(self, finish: bool) -> None:
        while not self.failed:
            try:
                size = os.stat(self.path).st_size
            except OSError as error:
                self._give_up(f"cannot read the output: {error}")
                return
            if size <= self.sent and not finish:
                return
            end = min(size, self.sent + MAX_CALL)
            last = finish and end == size
            data = await asyncio.to_thread(_read, self.path, self.sent, end - self.sent)
            try:
                response = await self.bytestream.Write(self._requests(data, last),
                                                       timeout=CALL_TIMEOUT)
            except grpc.aio.AioRpcError as error:
                self._give_up(f"{error.code().name}: {error.details()}")
                return
            self.calls += 1
            self.sent = response.committed_size
            if last or (not finish and self.sent >= size):
                return

    async def _requests(self, data: bytes, finish: bool) -> AsyncIterator[bs_pb2.WriteRequest]:
        offset = self.sent
        pieces = [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        for number, piece in enumerate(pieces):
            yield bs_pb2.WriteRequest(
                resource_name=self.write_name if number == 0 else "", write_offset=offset,
                data=piece, finish_write=finish and number == len(pieces) - 1)
            offset += len(piece)

    def _give_up(self, why: str) -> None:
        if not self.failed:
            self.failed = True
            log.info("live %s stream stopped after %d bytes: %s (the result keeps the "
                     "whole output)", self.what, self.sent, why)


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as stream:
        stream.seek(offset)
        return stream.read(size)
