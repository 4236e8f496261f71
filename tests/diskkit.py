"""A worker process driving a disk store, for the multi-process tests.

Run as ``python diskkit.py``: the worker reads one JSON command per line on stdin
and answers each with one JSON line on stdout (``{"error": ...}`` with the
traceback when a command raised).  `DiskWorker` starts one and talks to it.

Blob number ``n`` has fixed, checkable content (`blob_data`): numbers below 1000
are of assorted sizes (every fifth one 2.5 MiB, so that it streams in several
chunks), numbers from 1000 on are exactly 1000 bytes (for size-limit arithmetic).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from buildfleet.digest import Digest
from buildfleet.storage import Cas, DiskStore, SizeLimitedStore
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter

CHUNK = 256 * 1024


@functools.lru_cache(maxsize=512)
def blob_data(n: int) -> bytes:
    if n >= 1000:
        size = 1000
    elif n % 5 == 0:
        size = 2_500_000
    else:
        size = 100 + (n * 7919) % 50_000
    return hashlib.shake_256(f"blob-{n}".encode()).digest(size)


def blob(n: int) -> tuple[Digest, bytes]:
    data = blob_data(n)
    return Digest.of(data), data


# -- the worker (runs in its own process) ------------------------------------------------


def _exists(path: str) -> bool:
    return os.path.exists(path)


class _Worker:
    def __init__(self) -> None:
        self.disk: DiskStore | None = None
        self.store: BlobStore | None = None
        self.cas: Cas | None = None
        self.writer: BlobWriter | None = None
        self.held: tuple[int, BlobReader, bytes] | None = None

    def _store(self) -> BlobStore:
        assert self.store is not None, "open first"
        return self.store

    async def open(self, root: str, limit: int | None = None, fsync: bool = False,
                   anonymous: bool = True) -> dict[str, Any]:
        self.disk = DiskStore(root, fsync=fsync)
        if not anonymous:  # as on a filesystem without O_TMPFILE
            self.disk._use_tmpfile = False
        self.store = self.disk if limit is None else SizeLimitedStore(self.disk, limit)
        self.cas = Cas(self.store)
        await self.store.start()
        return {"pid": os.getpid()}

    async def put(self, ids: list[int], how: str = "put") -> dict[str, Any]:
        store = self._store()
        if how == "batch":
            errors = [str(e) for e in await store.put_batch([blob(n) for n in ids]) if e]
            return {"errors": errors}
        for n in ids:
            digest, data = blob(n)
            if how == "put":
                await store.put(digest, data)
            else:
                writer = await store.begin_write(digest)
                for start in range(0, len(data), CHUNK):
                    await writer.write(data[start:start + CHUNK])
                await writer.commit()
        return {"errors": []}

    async def hammer_write(self, ids: list[int], rounds: int, seed: int) -> dict[str, Any]:
        """Write every blob of `ids` `rounds` times, in a shuffled order, each time with
        one of the three ways of writing."""
        rng = random.Random(seed)
        errors: list[str] = []
        for _ in range(rounds):
            order = list(ids)
            rng.shuffle(order)
            for start in range(0, len(order), 10):
                group = order[start:start + 10]
                how = rng.choice(["put", "batch", "stream"])
                errors += (await self.put(group, how))["errors"]
        return {"errors": errors}

    async def hammer_churn(self, ids: list[int], iterations: int, seed: int
                           ) -> dict[str, Any]:
        """Store and delete blobs of `ids` at random."""
        rng = random.Random(seed)
        store = self._store()
        deleted = stored = 0
        for _ in range(iterations):
            n = rng.choice(ids)
            if rng.random() < 0.5:
                await self.put([n], rng.choice(["put", "batch", "stream"]))
                stored += 1
            else:
                deleted += await store.delete(blob(n)[0])
        return {"stored": stored, "deleted": deleted}

    async def hammer_read(self, ids: list[int], stop_file: str, seed: int,
                          max_seconds: float = 60.0) -> dict[str, Any]:
        """Read blobs of `ids` at random until `stop_file` exists: whole (get), streamed
        through Cas.read_verified, and looked up; any byte that differs is reported."""
        rng = random.Random(seed)
        store, cas = self._store(), self.cas
        assert cas is not None
        counts = {"whole": 0, "streamed": 0, "streamed_chunks": 0, "missing": 0}
        bad: list[str] = []
        deadline = time.monotonic() + max_seconds
        while not _exists(stop_file) and time.monotonic() < deadline:
            n = rng.choice(ids)
            digest, expected = blob(n)
            kind = rng.random()
            if kind < 0.4:
                data = await store.get(digest)
                if data is None:
                    counts["missing"] += 1
                elif data != expected:
                    bad.append(f"get {n}: {len(data)} bytes differ")
                else:
                    counts["whole"] += 1
            elif kind < 0.9:
                reader = await cas.open(digest)
                if reader is None:
                    counts["missing"] += 1
                    continue
                async with reader:
                    chunks = [c async for c in cas.read_verified(digest, reader,
                                                                 chunk_size=CHUNK)]
                if b"".join(chunks) != expected:
                    bad.append(f"stream {n}: bytes differ")
                else:
                    counts["streamed"] += 1
                    counts["streamed_chunks"] += len(chunks)
            else:
                await store.find_missing([digest])
        return {"counts": counts, "bad": bad}

    async def begin(self, n: int) -> dict[str, Any]:
        """Start a streamed write of blob `n` and write its first half."""
        digest, data = blob(n)
        self.writer = await self._store().begin_write(digest)
        await self.writer.write(data[:len(data) // 2])
        return {}

    async def finish(self, n: int) -> dict[str, Any]:
        assert self.writer is not None
        data = blob_data(n)
        await self.writer.write(data[len(data) // 2:])
        await self.writer.commit()
        self.writer = None
        return {}

    async def hold_read(self, n: int) -> dict[str, Any]:
        """Open blob `n` and read its first chunk; the rest is read by `finish_read`."""
        assert self.cas is not None
        digest, _ = blob(n)
        reader = await self.cas.open(digest)
        assert reader is not None, f"blob {n} is missing"
        first = await reader.read(0, CHUNK)
        self.held = (n, reader, first)
        return {}

    async def finish_read(self) -> dict[str, Any]:
        assert self.held is not None and self.cas is not None
        n, reader, first = self.held
        self.held = None
        digest, expected = blob(n)
        async with reader:
            chunks = [c async for c in self.cas.read_verified(digest, reader,
                                                              chunk_size=CHUNK)]
        return {"intact": first == expected[:CHUNK] and b"".join(chunks) == expected}

    async def check(self, ids: list[int]) -> dict[str, Any]:
        """Per blob: "ok", "missing" or "corrupt"."""
        store = self._store()
        result = {}
        for n in ids:
            digest, expected = blob(n)
            data = await store.get(digest)
            result[str(n)] = "missing" if data is None else \
                "ok" if data == expected else "corrupt"
        return {"blobs": result}

    async def delete(self, ids: list[int]) -> dict[str, Any]:
        store = self._store()
        return {"deleted": [await store.delete(blob(n)[0]) for n in ids]}

    async def missing(self, ids: list[int]) -> dict[str, Any]:
        found = await self._store().find_missing([blob(n)[0] for n in ids])
        by_digest = {blob(n)[0]: n for n in ids}
        return {"missing": [by_digest[d] for d in found]}

    async def rescan(self) -> dict[str, Any]:
        store = self._store()
        assert isinstance(store, SizeLimitedStore)
        await store.rescan()
        return {}

    async def total(self) -> dict[str, Any]:
        store = self._store()
        assert isinstance(store, SizeLimitedStore)
        return {"total": store.total_bytes}

    async def close(self) -> dict[str, Any]:
        if self.store is not None:
            await self.store.close()
        return {}


async def _serve() -> None:
    worker = _Worker()
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        command = json.loads(line)
        name = command.pop("command")
        try:
            answer = await getattr(worker, name)(**command)
        except BaseException:  # report everything, the test decides
            answer = {"error": traceback.format_exc()}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if name == "close":
            return


# -- the test side -----------------------------------------------------------------------


class DiskWorker:
    """One worker process; `call` sends a command and returns its answer."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, root: Path, limit: int | None = None, fsync: bool = False,
                    anonymous: bool = True) -> DiskWorker:
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__)), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE)
        worker = cls(process)
        await worker.call("open", root=str(root), limit=limit, fsync=fsync,
                          anonymous=anonymous)
        return worker

    async def send(self, command: str, **args: Any) -> None:
        """Send a command without waiting for its answer (see `answer`)."""
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"command": command, **args}) + "\n").encode())
        await self.process.stdin.drain()

    async def answer(self, timeout: float = 120.0) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert line, f"worker {self.process.pid} exited (code {await self.process.wait()})"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer

    async def call(self, command: str, timeout: float = 120.0, **args: Any) -> dict[str, Any]:
        await self.send(command, **args)
        return await self.answer(timeout)

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                await self.call("close", timeout=30)
            finally:
                if self.process.stdin is not None:
                    self.process.stdin.close()
                await asyncio.wait_for(self.process.wait(), 30)

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


if __name__ == "__main__":
    asyncio.run(_serve())
