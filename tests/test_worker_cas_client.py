"""The asyncio CAS client (buildfleet.client.cas) and the bot's local cache, against a
real server: batching within max_batch_total_size, ByteStream above it, trees."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import grpc
import pytest

from buildfleet.client.cas import CasClient, LocalTree, MissingBlobs, build_tree
from buildfleet.digest import Digest
from buildfleet.worker.cache import LocalCache

KiB = 1024
BATCH = 64 * KiB  # the smallest max-batch-total-size a server accepts
SMALL_BATCH_CONFIG = {"instances": {"": {"max-batch-total-size": BATCH}}}


def blob(seed: int, size: int) -> bytes:
    pattern = seed.to_bytes(4, "big") * (size // 4 + 1)
    return pattern[:size]


@pytest.fixture
async def cas(start_server) -> CasClient:  # type: ignore[no-untyped-def]
    server = await start_server(SMALL_BATCH_CONFIG)
    return CasClient(server.channel)


async def test_batch_limit_comes_from_capabilities(cas: CasClient) -> None:
    assert await cas.batch_limit() == BATCH


async def test_small_and_large_blobs_round_trip(cas: CasClient, tmp_path: Path) -> None:
    sizes = [0, 1, 100, 30 * KiB, BATCH - 1, BATCH, 3 * BATCH + 7, 2 * 1024 * KiB + 3]
    blobs = {Digest.of(blob(i, n)): blob(i, n) for i, n in enumerate(sizes)}
    big_file = tmp_path / "big"
    big_file.write_bytes(blob(99, 5 * BATCH))
    file_digest = Digest.of(big_file.read_bytes())
    sources: dict[Digest, bytes | Path] = dict(blobs)
    sources[file_digest] = big_file

    sent = await cas.upload(sources)
    assert sent == len(sources) - 1  # the empty blob is always present
    assert await cas.find_missing(sources) == set()
    assert await cas.upload(sources) == 0  # nothing missing any more

    read = await cas.read_blobs(list(blobs) + [file_digest])
    assert read[file_digest] == big_file.read_bytes()
    assert all(read[d] == data for d, data in blobs.items())

    paths = {d: tmp_path / f"out-{d.hash[:8]}" for d in read}
    await cas.download(read, paths.__getitem__)
    assert all(paths[d].read_bytes() == read[d] for d in read)


async def test_a_small_upload_is_sent_without_asking_what_is_missing(
        cas: CasClient, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[int] = []
    find_missing = cas.find_missing

    async def counting(digests):  # type: ignore[no-untyped-def]
        digests = list(digests)
        asked.append(len(digests))
        return await find_missing(digests)

    monkeypatch.setattr(cas, "find_missing", counting)
    small = {Digest.of(blob(i, 100)): blob(i, 100) for i in range(20)}
    small[Digest.of(b"")] = b""
    assert await cas.upload(small) == 20  # one BatchUpdateBlobs, no question first
    assert asked == []
    assert await cas.read_blobs(list(small)) == small
    assert await cas.upload(small) == 20  # sent again: cheaper than the round trip

    large = {Digest.of(blob(i, 30 * KiB)): blob(i, 30 * KiB) for i in range(4)}
    assert await cas.upload(large) == 4  # more than one batch: asks first
    assert asked == [4]
    assert await cas.upload(large) == 0
    assert await cas.read_blobs(list(large)) == large


async def test_missing_blobs_are_named(cas: CasClient, tmp_path: Path) -> None:
    present = await cas.upload_blob(b"here")
    absent_small = Digest.of(b"absent")
    absent_large = Digest.of(blob(7, 2 * BATCH))
    with pytest.raises(MissingBlobs) as raised:
        await cas.read_blobs([present, absent_small, absent_large])
    assert raised.value.digests == sorted([absent_small, absent_large])
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(MissingBlobs):
        await cas.download([absent_large], lambda d: tmp_path / "x")
    with pytest.raises(MissingBlobs):
        await cas.get_tree(Digest.of(b"no such directory"))


def _make_tree(base: Path, width: int) -> None:
    for i in range(width):
        deep = base / f"d{i}" / "x" / "y"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(blob(i, 10 + i))
        (base / f"d{i}" / "same").write_bytes(b"shared content")
    (base / "tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (base / "tool").chmod(0o755)
    os.symlink("d0/x/y/f", base / "link")
    (base / "empty").mkdir()


async def test_upload_directory_and_get_tree(cas: CasClient, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    _make_tree(source, 120)  # several GetTree pages
    tree = await cas.upload_directory(source)
    fetched = await cas.get_tree(tree.root_digest)
    assert set(fetched) == set(tree.directories)
    root = fetched[tree.root_digest]
    assert [f.name for f in root.files] == ["tool"] and root.files[0].is_executable
    assert [(s.name, s.target) for s in root.symlinks] == [("link", "d0/x/y/f")]
    assert [d.name for d in root.directories][:3] == ["d0", "d1", "d10"]  # sorted by name


def test_build_tree_is_topologically_sorted_and_deduplicated(tmp_path: Path) -> None:
    base = tmp_path / "t"
    (base / "a" / "same").mkdir(parents=True)
    (base / "b" / "same").mkdir(parents=True)
    (base / "a" / "same" / "f").write_bytes(b"1")
    (base / "b" / "same" / "f").write_bytes(b"1")
    os.mkfifo(base / "fifo")  # left out
    tree: LocalTree = build_tree(base)
    message = tree.tree()
    assert [d.name for d in message.root.directories] == ["a", "b"]
    # a and b are identical, so are both "same": 2 distinct children.
    assert len(message.children) == 2
    digests = [Digest.of(c.SerializeToString(deterministic=True)) for c in message.children]
    parent_of_same = message.children[0]
    assert Digest(parent_of_same.directories[0].digest.hash,
                  parent_of_same.directories[0].digest.size_bytes) == digests[1]
    assert not message.root.files


# -- the local cache ----------------------------------------------------------------------


async def test_cache_downloads_once_then_hits(cas: CasClient, tmp_path: Path) -> None:
    contents = [blob(i, 1000 * (i + 1)) for i in range(4)] + [blob(50, 3 * BATCH)]
    digests = [await cas.upload_blob(c) for c in contents]
    cache = LocalCache(tmp_path / "cache", 10 * 1024 * KiB)
    cache.open()
    keys = [(d, False) for d in digests] + [(digests[0], True)]

    first = await cache.ensure(keys, cas)
    cache.release(first)
    assert (first.hits, first.misses) == (0, 6)  # per file asked for, both variants
    assert first.bytes_downloaded == sum(len(c) for c in contents)
    second = await cache.ensure(keys, cas)
    cache.release(second)
    assert (second.hits, second.misses) == (6, 0) and second.bytes_downloaded == 0
    assert cache.stats.hits == 6 and cache.stats.misses == 6
    plain = cache.path((digests[0], False))
    executable = cache.path((digests[0], True))
    assert stat.S_IMODE(plain.stat().st_mode) == 0o444
    assert stat.S_IMODE(executable.stat().st_mode) == 0o555
    assert executable.read_bytes() == contents[0]

    # Linking gives the same inode; a fresh cache object finds the files again.
    cache.link((digests[1], False), tmp_path / "linked")
    assert (tmp_path / "linked").stat().st_ino == cache.path((digests[1], False)).stat().st_ino
    again = LocalCache(tmp_path / "cache", 10 * 1024 * KiB)
    again.open()
    assert len(again) == 6
    fetched = await again.ensure(keys, cas)
    assert fetched.misses == 0


async def test_cache_concurrent_requests_share_one_download(cas: CasClient,
                                                            tmp_path: Path) -> None:
    digest = await cas.upload_blob(blob(3, 5 * BATCH))
    cache = LocalCache(tmp_path / "cache", 10 * 1024 * KiB)
    cache.open()
    fetches = await asyncio.gather(*(cache.ensure([(digest, False)], cas) for _ in range(5)))
    assert cache.stats.bytes_downloaded == digest.size_bytes
    assert sum(f.misses for f in fetches) == 1 and sum(f.hits for f in fetches) == 4


async def test_cache_evicts_least_recently_used(cas: CasClient, tmp_path: Path) -> None:
    digests = [await cas.upload_blob(blob(i, 1000)) for i in range(5)]
    cache = LocalCache(tmp_path / "cache", 3500)
    cache.open()
    for digest in digests[:3]:
        cache.release(await cache.ensure([(digest, False)], cas))
    cache.release(await cache.ensure([(digests[0], False)], cas))  # used again: now newest
    cache.release(await cache.ensure([(digests[3], False)], cas))  # evicts digests[1]
    assert {k[0] for k in cache.keys()} == {digests[0], digests[2], digests[3]}
    assert cache.size <= 3500 and cache.stats.evictions == 1
    # Pinned entries survive even when the bound is exceeded, until released.
    pinned = await cache.ensure([(d, False) for d in digests], cas)
    assert len(cache) == 5
    cache.release(pinned)
    assert cache.size <= 3500


async def test_cache_refetches_a_modified_entry(cas: CasClient, tmp_path: Path) -> None:
    digest = await cas.upload_blob(b"original bytes")
    cache = LocalCache(tmp_path / "cache", 1024 * KiB)
    cache.open()
    cache.release(await cache.ensure([(digest, False)], cas))
    linked = tmp_path / "input"
    cache.link((digest, False), linked)
    linked.chmod(0o644)  # an action (as root, or after chmod) writes to its input
    linked.write_bytes(b"tampered bytes")
    fetch = await cache.ensure([(digest, False)], cas)
    assert fetch.misses == 1 and cache.stats.invalidated == 1
    assert cache.path((digest, False)).read_bytes() == b"original bytes"
