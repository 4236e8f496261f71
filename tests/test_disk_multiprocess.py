"""Several processes sharing one disk store directory (replicas on one volume).

Every test runs real worker processes (tests/diskkit.py) on one directory and
checks, from a fresh store, that every blob is intact:

- writers of overlapping blobs (whole, batched and streamed) all succeed;
- readers running while other processes store and delete the same blobs get
  either the exact bytes or "missing", never part of a blob or an error, also
  when the blob is deleted or replaced while they stream it;
- a store starting up removes the temporary files of a killed writer but leaves
  those of a live one (which then completes), and of other machines until stale;
- size-limited stores on one directory tolerate blobs that another process
  evicted, and after a rescan (explicit, or every `rescan-interval` seconds)
  each counts the whole directory against the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from botkit import wait_for
from diskkit import DiskWorker, blob, blob_data

from buildfleet.config import parse_config
from buildfleet.digest import Digest
from buildfleet.errors import Unavailable
from buildfleet.storage import Cas, DiskStore, SizeLimitedStore
from buildfleet.storage.factory import StoreFactory

IDS = list(range(60))  # includes 12 blobs of 2.5 MiB


@asynccontextmanager
async def workers(root: Path, count: int, limit: int | None = None, fsync: bool = False,
                  anonymous: bool = True) -> AsyncIterator[list[DiskWorker]]:
    started: list[DiskWorker] = []
    try:
        for _ in range(count):
            started.append(await DiskWorker.start(root, limit, fsync, anonymous))
        yield started
        for worker in started:
            await worker.stop()
    finally:
        for worker in started:
            worker.kill()


async def stored_blobs(root: Path) -> dict[Digest, bytes | None]:
    """Every blob a fresh store finds, with its bytes."""
    store = DiskStore(root)
    await store.start()
    found = {b.digest: await store.get(b.digest) async for b in store.scan()}
    await store.close()
    return found


def temp_files(root: Path) -> list[str]:
    return sorted(os.listdir(root / "tmp"))


@pytest.mark.parametrize("anonymous", [True, False], ids=["o_tmpfile", "named-temp-files"])
async def test_concurrent_writers_of_overlapping_blobs(tmp_path: Path, anonymous: bool) -> None:
    root = tmp_path / "cas"
    async with workers(root, 4, anonymous=anonymous) as writers:
        for index, worker in enumerate(writers):
            await worker.send("hammer_write", ids=IDS, rounds=3, seed=index)
        for worker in writers:
            assert (await worker.answer())["errors"] == []
    found = await stored_blobs(root)
    assert found == dict(blob(n) for n in IDS)  # every blob present, every byte right
    assert temp_files(root) == []


async def test_reads_while_other_processes_write_and_delete(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    stop = tmp_path / "stop"
    async with workers(root, 4) as (churn1, churn2, reader1, reader2):
        await churn1.call("put", ids=IDS, how="batch")
        for index, reader in enumerate((reader1, reader2)):
            await reader.send("hammer_read", ids=IDS, stop_file=str(stop), seed=index)
        await churn1.send("hammer_churn", ids=IDS, iterations=400, seed=10)
        await churn2.send("hammer_churn", ids=IDS, iterations=400, seed=11)
        await churn1.answer()
        await churn2.answer()
        stop.touch()
        results = [await reader1.answer(), await reader2.answer()]
    for result in results:
        assert result["bad"] == []
        counts = result["counts"]
        assert counts["whole"] > 0 and counts["streamed"] > 0
        # Multi-chunk blobs were streamed (not only single-chunk ones).
        assert counts["streamed_chunks"] > counts["streamed"]
    for digest, data in (await stored_blobs(root)).items():
        assert data is not None and Digest.of(data) == digest
    assert temp_files(root) == []


async def test_blob_deleted_or_replaced_while_streamed(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    big = 0  # 2.5 MiB: ten chunks
    assert len(blob_data(big)) > 4 * 256 * 1024
    async with workers(root, 3) as (writer, reader, other):
        await writer.call("put", ids=[big], how="stream")
        await reader.call("hold_read", n=big)
        assert (await other.call("delete", ids=[big]))["deleted"] == [True]
        assert (await other.call("missing", ids=[big]))["missing"] == [big]
        assert (await reader.call("finish_read"))["intact"] is True
        # A blob stored again while a reader streams the earlier copy.
        await writer.call("put", ids=[big], how="put")
        await reader.call("hold_read", n=big)
        await other.call("put", ids=[big], how="stream")
        assert (await reader.call("finish_read"))["intact"] is True
        assert (await reader.call("check", ids=[big]))["blobs"] == {str(big): "ok"}


async def test_startup_cleanup_spares_live_writers(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    DiskStore(root)  # creates the layout
    live, dead = 3, 4
    stale_foreign = root / "tmp" / f"{'a' * 64}.0123456789ab.42.00.tmp"
    fresh_foreign = root / "tmp" / f"{'b' * 64}.0123456789ab.42.01.tmp"
    async with workers(root, 2) as (writer, victim):
        # Other machines' uploads: one untouched for two hours, one in progress.
        stale_foreign.write_bytes(b"x")
        fresh_foreign.write_bytes(b"y")
        old = time.time() - 2 * 3600
        os.utime(stale_foreign, (old, old))
        await writer.call("begin", n=live)
        await victim.call("begin", n=dead)
        victim.kill()
        await victim.process.wait()
        assert len(temp_files(root)) == 4
        # A store starting on the directory (a replica restarting), in another process.
        async with workers(root, 1) as (restarted,):
            files = temp_files(root)
            assert fresh_foreign.name in files and stale_foreign.name not in files
            mine = [name for name in files if name.startswith(blob(live)[0].hash)]
            theirs = [name for name in files if name.startswith(blob(dead)[0].hash)]
            assert len(mine) == 1 and theirs == []  # the killed writer's file is gone
            await writer.call("finish", n=live)
            assert (await restarted.call("check", ids=[live, dead]))["blobs"] == {
                str(live): "ok", str(dead): "missing"}
    assert temp_files(root) == [fresh_foreign.name]
    assert await stored_blobs(root) == dict([blob(live)])


async def test_size_limited_stores_share_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    limit = 8_000  # eight 1000-byte blobs
    first_ids = list(range(1000, 1010))
    async with workers(root, 1, limit) as (first,):
        await first.call("put", ids=first_ids, how="batch")
        assert (await first.call("total"))["total"] == limit
        present = (await first.call("missing", ids=first_ids))["missing"]
        assert present == first_ids[:2]  # the least recently written went
        # Modification times a few minutes apart, in the order written (files written
        # within one clock tick of the kernel could otherwise share one).
        now = time.time()
        for age, n in enumerate(reversed(first_ids)):
            path = DiskStore(root).path(blob(n)[0])
            if path.exists():
                os.utime(path, (now - 60 - age, now - 60 - age))

        # A second process starts on the directory: it counts the first one's blobs.
        async with workers(root, 1, limit) as (second,):
            assert (await second.call("total"))["total"] == limit
            await second.call("put", ids=[2000, 2001, 2002], how="put")
            assert (await second.call("total"))["total"] == limit
            # It evicted the least recently used blobs, which the first process
            # still counts: reading or finding them missing is no error there.
            gone = (await first.call("missing", ids=first_ids))["missing"]
            assert gone == first_ids[:5]
            assert (await first.call("check", ids=first_ids))["blobs"] == {
                str(n): "missing" if n in gone else "ok" for n in first_ids}
            # Evicting a blob that another process deleted is no error either.
            await second.call("delete", ids=first_ids[5:7])
            await first.call("put", ids=[3000, 3001, 3002, 3003], how="stream")
            assert (await first.call("total"))["total"] == limit

            # After a rescan each process counts exactly what the directory holds,
            # and keeps it within the limit.
            for worker in (first, second):
                await worker.call("rescan")
            on_disk = sum(len(data or b"") for data in (await stored_blobs(root)).values())
            assert on_disk <= limit
            for worker in (first, second):
                assert (await worker.call("total"))["total"] == on_disk
            await first.call("put", ids=[3001, 3002, 3003, 3004], how="batch")  # one new
            await second.call("rescan")
            on_disk = sum(len(data or b"") for data in (await stored_blobs(root)).values())
            assert on_disk <= limit
            assert (await second.call("total"))["total"] == on_disk
            assert (await second.call("check", ids=[3001, 3002, 3003, 3004]))["blobs"] == {
                str(n): "ok" for n in (3001, 3002, 3003, 3004)}


@pytest.mark.parametrize("fsync", [False, True])
async def test_restart_after_concurrent_load_keeps_everything(tmp_path: Path,
                                                             fsync: bool) -> None:
    """Writers killed mid-way leave nothing partial; a restart sees every blob whole."""
    root = tmp_path / "cas"
    async with workers(root, 3, fsync=fsync) as writers:
        for index, worker in enumerate(writers):
            await worker.send("hammer_write", ids=IDS[:30], rounds=1, seed=100 + index)
        await writers[0].answer()
        for worker in writers[1:]:
            worker.kill()  # killed in the middle of their writes
            await worker.process.wait()
        assert (await writers[0].call("check", ids=IDS[:30]))["blobs"] == {
            str(n): "ok" for n in IDS[:30]}
    store = DiskStore(root, fsync=fsync)
    await store.start()  # removes the killed writers' temporary files
    assert temp_files(root) == []
    blobs = [b async for b in store.scan()]
    assert {b.digest for b in blobs} == {blob(n)[0] for n in IDS[:30]}
    for stored in blobs:
        data = await store.get(stored.digest)
        assert data is not None and Digest.of(data) == stored.digest
    await store.close()


# -- one process: a streamed write cut short -----------------------------------------------


async def test_cancelled_streamed_write_is_discarded(tmp_path: Path) -> None:
    """A chunk large enough to be written by an I/O thread, cancelled mid-way: the
    upload cannot be committed, and aborting it removes its temporary file once
    the thread is done with it."""
    root = tmp_path / "cas"
    store = DiskStore(root)
    cas = Cas(store)
    digest, data = blob(0)  # 2.5 MiB in one chunk
    writer = await cas.begin_write(digest)
    task = asyncio.create_task(writer.write(data))
    await wait_for(lambda: len(temp_files(root)) == 1, what="the temporary file")
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    with pytest.raises(Unavailable):
        await writer.commit()  # refused (and aborted): the bytes written are unknown
    await wait_for(lambda: temp_files(root) == [], what="the temporary file's removal")
    assert await store.get(digest) is None
    # The store goes on working normally.
    await cas.put(digest, data)
    assert await cas.get(digest) == data
    await store.close()


# -- the periodic rescan of a shared directory ----------------------------------------------


async def test_periodic_rescan_counts_other_processes_blobs(tmp_path: Path) -> None:
    root = tmp_path / "cas"
    config = parse_config({"instances": {"": {"cas": {
        "type": "disk", "path": str(root), "max-size": 5000, "rescan-interval": 0.05}}}})
    cas_ref = config.instances[""].cas
    assert cas_ref is not None
    store = StoreFactory(config).build(cas_ref)
    assert isinstance(store, SizeLimitedStore) and store.rescan_interval == 0.05
    await store.start()
    try:
        await store.put(*blob(1000))
        async with workers(root, 1) as (other,):
            # Another process stores six 1000-byte blobs: the shared directory now
            # holds 7000 bytes, more than the limit of 5000.
            await other.call("put", ids=list(range(1001, 1007)), how="batch")
            await wait_for(lambda: store.total_bytes == 5000, timeout=10,
                           what="the rescan to count the other process's blobs and evict")
        left = [b async for b in DiskStore(root).scan()]
        assert sum(b.stored_size for b in left) == 5000
    finally:
        await store.close()
