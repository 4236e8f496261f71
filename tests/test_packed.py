"""The packed store of small blobs (storage/packed.py) and what it promises beyond
the behaviour every store shares (tests/test_storage.py): group commits, all or
nothing after SIGKILL in the middle of a batch, several processes on one file,
corrupted rows found by the CAS, eviction that hands space back (also while others
read), FindMissingBlobs after a restart, and a data directory of the earlier
one-file-per-blob layout taken over without losing a blob."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from botkit import wait_for

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.storage import Cas, DiskStore, SizeLimitedStore
from buildfleet.storage.migrating import MigratingStore
from buildfleet.storage.packed import PackedStore


def blob(n: int, size: int = 100) -> tuple[Digest, bytes]:
    data = (f"blob-{n}-".encode() * size)[:size]
    return Digest.of(data), data


async def test_concurrent_batches_share_one_commit(tmp_path: Path) -> None:
    store = PackedStore(tmp_path / "packed.sqlite3")
    await store.start()
    try:
        batches = [[blob(b * 1000 + i) for i in range(50)] for b in range(10)]
        before = store.commits
        answers = await asyncio.gather(*(store.put_batch(batch) for batch in batches))
        assert all(error is None for answer in answers for error in answer)
        assert store.commits - before == 1  # ten calls, 500 blobs, one transaction
        wanted = [digest for batch in batches for digest, _ in batch]
        assert await store.find_missing(wanted) == []
        found = await store.get_many(wanted[::7])
        assert all(hashlib.sha256(data).hexdigest() == d.hash for d, data in found.items())
    finally:
        await store.close()


WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from buildfleet.digest import Digest
    from buildfleet.storage.packed import PackedStore

    async def main() -> None:
        store = PackedStore(Path(sys.argv[1]))
        await store.start()
        batch = 0
        while True:
            blobs = []
            for i in range(2000):
                data = f"batch-{batch}-blob-{i}-".encode() * 40
                blobs.append((Digest.of(data), data))
            await store.put_batch(blobs)
            print(batch, flush=True)  # acknowledged: committed
            batch += 1

    asyncio.run(main())
""")


async def test_a_blob_deleted_elsewhere_is_missing_at_once(tmp_path: Path) -> None:
    """Present keys are remembered only while nobody commits: a deletion by another
    connection (another process, or this one's own writer) is seen at once."""
    path = tmp_path / "packed.sqlite3"
    mine, other = PackedStore(path), PackedStore(path)
    try:
        blobs = [blob(i) for i in range(20)]
        await mine.put_many(blobs)
        digests = [d for d, _ in blobs]
        assert await mine.find_missing(digests) == []
        assert await mine.find_missing(digests) == []  # answered from what it has seen
        assert await other.delete(digests[3])
        assert await mine.find_missing(digests) == [digests[3]]
        assert await mine.delete(digests[4])
        assert await mine.find_missing(digests) == [digests[3], digests[4]]
        await other.put(*blobs[3])
        assert await mine.find_missing(digests) == [digests[4]]
    finally:
        await mine.close()
        await other.close()


async def test_sigkill_in_the_middle_of_batches_leaves_each_whole_or_absent(
        tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(path), stdout=subprocess.PIPE)
    assert process.stdout is not None
    acknowledged = -1
    try:
        while acknowledged < 3:
            line = await asyncio.wait_for(process.stdout.readline(), 60)
            assert line, "the writer exited"
            acknowledged = int(line)
        await asyncio.sleep(0.05)  # somewhere inside a later batch
    finally:
        process.send_signal(signal.SIGKILL)
        await process.wait()
    store = PackedStore(path)
    try:
        per_batch: dict[int, int] = {}
        async for stored in store.scan():
            data = await store.get(stored.digest)
            assert data is not None and Digest.of(data) == stored.digest  # never partial
            batch = int(data.split(b"-")[1])
            per_batch[batch] = per_batch.get(batch, 0) + 1
        assert all(per_batch.get(b) == 2000 for b in range(acknowledged + 1))
        assert all(count == 2000 for count in per_batch.values()), per_batch
    finally:
        await store.close()


READER_WRITER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from buildfleet.digest import Digest
    from buildfleet.storage.packed import PackedStore

    async def main() -> None:
        store = PackedStore(Path(sys.argv[1]))
        mine = [f"other-{i}".encode() for i in range(300)]
        for start in range(0, 300, 30):
            await store.put_batch([(Digest.of(d), d) for d in mine[start:start + 30]])
        theirs = [f"first-{i}".encode() for i in range(300)]
        missing = await store.find_missing([Digest.of(d) for d in theirs])
        print(len(missing), flush=True)
        await store.close()

    asyncio.run(main())
""")


async def test_two_processes_share_one_store(tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    store = PackedStore(path)
    await store.start()
    try:
        ours = [f"first-{i}".encode() for i in range(300)]
        writing = asyncio.gather(*(store.put_batch([(Digest.of(d), d)]) for d in ours))
        other = await asyncio.create_subprocess_exec(
            sys.executable, "-c", READER_WRITER, str(path), stdout=subprocess.PIPE)
        await writing
        out, _ = await asyncio.wait_for(other.communicate(), 60)
        assert other.returncode == 0
        assert int(out) in range(0, 301)  # it ran while we wrote: whatever it saw
        theirs = [Digest.of(f"other-{i}".encode()) for i in range(300)]
        assert await store.find_missing(theirs) == []  # every blob the other stored
        assert await store.find_missing([Digest.of(d) for d in ours]) == []
    finally:
        await store.close()


async def test_a_corrupted_row_is_reported_missing_and_removed(tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    store = PackedStore(path)
    cas = Cas(store)
    digest, data = blob(1)
    good, good_data = blob(2)
    await cas.put(digest, data)
    await cas.put(good, good_data)
    with sqlite3.connect(path) as db:  # the bytes change behind the server's back
        db.execute("UPDATE blobs SET data = ? WHERE hash = ?",
                   (b"Z" + data[1:], digest.hash))
    assert await cas.get(digest) is None
    assert await cas.find_missing([digest, good]) == [digest]
    assert await cas.get(good) == good_data
    await store.close()


async def test_eviction_hands_the_space_back(tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    packed = PackedStore(path)
    store = SizeLimitedStore(packed, 2 * 1024 * 1024)
    await store.start()
    try:
        def pages() -> tuple[int, int]:
            with sqlite3.connect(path) as db:
                return (db.execute("PRAGMA page_count").fetchone()[0],
                        db.execute("PRAGMA freelist_count").fetchone()[0])

        first = [blob(i, 60_000) for i in range(300)]  # 18 MB through a 2 MiB store
        for start in range(0, 300, 10):
            await store.put_many(first[start:start + 10])
        present = [d for d, _ in first if d not in set(await store.find_missing(
            [d for d, _ in first]))]
        assert 0 < len(present) <= 2 * 1024 * 1024 // 60_000
        assert present == [d for d, _ in first[-len(present):]]  # the most recent ones
        total, free = pages()
        assert total * 4096 < 8 * 1024 * 1024, (total, free)  # not 18 MB of dead pages
    finally:
        await store.close()


async def test_the_earlier_layout_moves_in_without_losing_a_blob(tmp_path: Path) -> None:
    old_dir = tmp_path / "cas"
    old = DiskStore(old_dir)
    small = [blob(i) for i in range(1200)]
    large = blob(9999, 100_000)
    for digest, data in [*small, large]:
        await old.put(digest, data)
    moving = MigratingStore(PackedStore(tmp_path / "cas.sqlite3"), DiskStore(old_dir),
                            max_blob_size=64 * 1024)
    await moving.start()
    try:
        # at once, while the move goes on: nothing missing, every blob readable
        assert await moving.find_missing([d for d, _ in small]) == []
        assert await moving.get(small[-1][0]) == small[-1][1]
        new, new_data = blob(5000)
        await moving.put(new, new_data)
        await moving.wait_moved()
        assert not moving.migrating and moving.moved == 1200
        assert await moving.find_missing([d for d, _ in small] + [new]) == []
        assert all(data == dict(small)[d]
                   for d, data in (await moving.get_many([d for d, _ in small])).items())
        # the small files are gone, the large one stays where the large side reads it
        assert not old.path(small[0][0]).exists() and old.path(large[0]).exists()
        assert await moving.find_missing([large[0]]) == [large[0]]  # not the small side's
    finally:
        await moving.close()


async def test_a_data_directory_of_the_earlier_layout_keeps_working(
        start_server: Any, tmp_path: Path) -> None:
    from botkit import digest_of

    from buildfleet._proto.build.bazel.remote.execution.v2 import (
        remote_execution_pb2_grpc as re_grpc,
    )

    data_dir = tmp_path / "data"
    old_cas = DiskStore(data_dir / "default" / "cas")
    old_ac = DiskStore(data_dir / "default" / "ac")
    small, large = b"a small blob", b"L" * 200_000
    for data in (small, large):
        await old_cas.put(Digest.of(data), data)
    action = Digest.of(b"an action")
    cached = re_pb2.ActionResult(exit_code=3)
    await old_ac.put(action, cached.SerializeToString())

    server = await start_server({"instances": {"": {"allow-action-cache-updates": True}}},
                                data_dir=data_dir)
    cas = re_grpc.ContentAddressableStorageStub(server.channel)
    missing = await cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[digest_of(small), digest_of(large)]))
    assert list(missing.missing_blob_digests) == []
    read = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[digest_of(small), digest_of(large)]))
    assert [r.data for r in read.responses] == [small, large]
    result = await re_grpc.ActionCacheStub(server.channel).GetActionResult(
        re_pb2.GetActionResultRequest(action_digest=re_pb2.Digest(
            hash=action.hash, size_bytes=action.size_bytes)))
    assert result.exit_code == 3
    fresh = b"written by this version"
    await cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
        re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(fresh), data=fresh)]))

    def moved() -> bool:
        return not old_cas.path(Digest.of(small)).exists()

    await wait_for(moved, 10)
    await wait_for(lambda: (data_dir / "default" / "cas.sqlite3.moved").exists(), 10)
    assert old_cas.path(Digest.of(large)).exists()  # large blobs stay in files
    with sqlite3.connect(data_dir / "default" / "cas.sqlite3") as db:
        stored = {bytes(row[0]) for row in db.execute("SELECT data FROM blobs")}
    assert {small, fresh} <= stored


async def test_eviction_and_compaction_leave_concurrent_reads_whole(tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    store = SizeLimitedStore(PackedStore(path), 1024 * 1024)
    await store.start()
    try:
        written: list[tuple[Digest, bytes]] = []
        wrong: list[Digest] = []
        reads = 0
        done = asyncio.Event()

        async def reader() -> None:
            nonlocal reads
            while not done.is_set():
                for digest, data in list(written[-20:]):  # recent ones, some evicted meanwhile
                    found = await store.get(digest)
                    reads += 1
                    if found is not None and found != data:
                        wrong.append(digest)
                await asyncio.sleep(0)

        readers = [asyncio.create_task(reader()) for _ in range(3)]
        for start in range(0, 400, 8):  # 16 MB through a 1 MiB store
            batch = [blob(n, 40_000) for n in range(start, start + 8)]
            await store.put_many(batch)
            written.extend(batch)
        done.set()
        await asyncio.gather(*readers)
        assert wrong == [] and reads > 100
        missing = set(await store.find_missing([d for d, _ in written]))
        kept = [(d, data) for d, data in written if d not in missing]
        # least recently used go first (the readers' reads count as use): the last
        # batch written is kept, and no more than the bound
        assert all(d not in missing for d, _ in written[-8:])
        assert sum(len(data) for _, data in kept) <= 1024 * 1024
        for digest, data in kept:
            assert await store.get(digest) == data
        with sqlite3.connect(path) as db:
            pages = db.execute("PRAGMA page_count").fetchone()[0]
        assert pages * 4096 < 6 * 1024 * 1024  # evicted space went back, not 16 MB
    finally:
        await store.close()


async def test_find_missing_blobs_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "packed.sqlite3"
    stored = [blob(n) for n in range(500)]
    absent = [blob(n)[0] for n in range(500, 600)]
    first = PackedStore(path)
    await first.start()
    try:
        await first.put_many(stored)
        assert set(await first.find_missing([d for d, _ in stored] + absent)) == set(absent)
    finally:
        await first.close()
    again = PackedStore(path)  # a new process on the same file
    await again.start()
    try:
        assert set(await again.find_missing([d for d, _ in stored] + absent)) == set(absent)
        assert await again.get(stored[7][0]) == stored[7][1]
    finally:
        await again.close()
