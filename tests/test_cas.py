"""The ContentAddressableStorage service, driven through real gRPC."""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import grpc
import pytest
import zstandard
from conftest import RunningServer, StartServer, proto_digest
from google.rpc import code_pb2
from s3kit import each_store_grid  # noqa: F401 - the `grid` of this module's tests

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import EMPTY_DIGEST, Digest
from buildfleet.storage.read_cache import ReadCachingStore

MiB = 1024 * 1024
UpdateRequest = re_pb2.BatchUpdateBlobsRequest.Request
BAD_DIGESTS = {
    "bad hex": re_pb2.Digest(hash="z" * 64, size_bytes=1),
    "wrong length": re_pb2.Digest(hash="a" * 63, size_bytes=1),
    "uppercase": re_pb2.Digest(hash="A" * 64, size_bytes=1),
    "negative size": re_pb2.Digest(hash="a" * 64, size_bytes=-1),
}


async def remove_behind_the_servers_back(grid: RunningServer, digest: Digest) -> None:
    """Delete a blob from every layer of the instance's storage (a read cache keeps
    a good copy when asked to delete through it: it deletes only corrupted ones)."""
    store = grid.server.instances.get("").cas.store
    layers = [store.backend, store.cache] if isinstance(store, ReadCachingStore) else [store]
    deleted = [await layer.delete(digest) for layer in layers]
    assert any(deleted), f"{digest} was not stored"


def key(digest: re_pb2.Digest) -> tuple[str, int]:
    return digest.hash, digest.size_bytes


async def find_missing(server: RunningServer, digests: list[re_pb2.Digest],
                       instance: str = "") -> list[tuple[str, int]]:
    response = await server.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, blob_digests=digests))
    return [key(d) for d in response.missing_blob_digests]


async def update(server: RunningServer, entries: list[UpdateRequest],
                 instance: str = "") -> list[tuple[int, str]]:
    response = await server.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, requests=entries))
    assert [key(r.digest) for r in response.responses] == [key(e.digest) for e in entries]
    return [(r.status.code, r.status.message) for r in response.responses]


async def read(server: RunningServer, digests: list[re_pb2.Digest], instance: str = "",
               compressors: list[re_pb2.Compressor.Value] | None = None
               ) -> re_pb2.BatchReadBlobsResponse:
    return await server.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name=instance, digests=digests, acceptable_compressors=compressors or []))


# -- FindMissingBlobs ---------------------------------------------------------


async def test_find_missing_blobs(grid: RunningServer) -> None:
    present = await grid.upload(b"present")
    absent = proto_digest(b"absent")
    other = proto_digest(b"other absent")
    empty = proto_digest(b"")
    missing = await find_missing(grid, [absent, present, absent, empty, other, present])
    assert missing == [key(absent), key(other)]
    assert await find_missing(grid, []) == []


@pytest.mark.parametrize("kind", sorted(BAD_DIGESTS))
async def test_find_missing_refuses_malformed_digest(grid: RunningServer, kind: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await find_missing(grid, [proto_digest(b"x"), BAD_DIGESTS[kind]])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blob_digests[1]" in (caught.value.details() or "")


async def test_unsupported_digest_function(grid: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[proto_digest(b"x")], digest_function=re_pb2.DigestFunction.SHA1))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "digest_function" in (caught.value.details() or "")


async def test_unknown_instance(grid: RunningServer) -> None:
    calls = [
        grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(instance_name="nope")),
        grid.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name="nope")),
        grid.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(instance_name="nope")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'nope'" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_tree_pages(grid, proto_digest(b""), instance="nope")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- BatchUpdateBlobs / BatchReadBlobs ----------------------------------------


async def test_batch_update_then_read_round_trip(grid: RunningServer) -> None:
    blobs = [b"alpha", b"beta" * 1000, b"", bytes(range(256)) * 40]
    statuses = await update(grid, [UpdateRequest(digest=proto_digest(b), data=b)
                                   for b in blobs])
    assert [code for code, _ in statuses] == [code_pb2.OK] * len(blobs)
    assert await find_missing(grid, [proto_digest(b) for b in blobs]) == []

    missing = proto_digest(b"never uploaded")
    digests = [proto_digest(b) for b in blobs] + [missing, proto_digest(b"alpha")]
    response = await read(grid, digests)
    assert [key(r.digest) for r in response.responses] == [key(d) for d in digests]
    for entry, data in zip(response.responses, [*blobs, None, b"alpha"], strict=True):
        if data is None:
            assert entry.status.code == code_pb2.NOT_FOUND
            assert missing.hash in entry.status.message
        else:
            assert entry.status.code == code_pb2.OK
            assert entry.compressor == re_pb2.Compressor.IDENTITY
            assert entry.data == data


async def test_batch_update_mismatches_are_per_blob(grid: RunningServer) -> None:
    good = b"good blob"
    wrong_hash = proto_digest(b"something else")
    wrong_hash.size_bytes = len(b"payload")
    wrong_size = proto_digest(b"payload")
    wrong_size.size_bytes += 1
    entries = [
        UpdateRequest(digest=wrong_hash, data=b"payload"),
        UpdateRequest(digest=proto_digest(good), data=good),
        UpdateRequest(digest=wrong_size, data=b"payload"),
    ]
    statuses = await update(grid, entries)
    assert [code for code, _ in statuses] == [
        code_pb2.INVALID_ARGUMENT, code_pb2.OK, code_pb2.INVALID_ARGUMENT]
    assert "hashes to" in statuses[0][1]
    assert "bytes" in statuses[2][1]
    assert await find_missing(grid, [wrong_hash, proto_digest(good), wrong_size]) == [
        key(wrong_hash), key(wrong_size)]


async def test_batch_update_malformed_digests_are_per_blob(grid: RunningServer) -> None:
    entries = [UpdateRequest(digest=d, data=b"x") for d in BAD_DIGESTS.values()]
    entries.insert(2, UpdateRequest(digest=proto_digest(b"ok"), data=b"ok"))
    statuses = await update(grid, entries)
    assert [code for code, _ in statuses] == [
        code_pb2.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT, code_pb2.OK,
        code_pb2.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT]
    assert "requests[0]" in statuses[0][1]
    assert "requests[4]" in statuses[4][1]


async def test_batch_read_malformed_digests_are_per_blob(grid: RunningServer) -> None:
    present = await grid.upload(b"here")
    response = await read(grid, [BAD_DIGESTS["uppercase"], present,
                                 BAD_DIGESTS["negative size"]])
    codes = [r.status.code for r in response.responses]
    assert codes == [code_pb2.INVALID_ARGUMENT, code_pb2.OK, code_pb2.INVALID_ARGUMENT]
    assert "digests[2]" in response.responses[2].status.message
    assert response.responses[1].data == b"here"


async def test_oversized_batches_are_refused(grid: RunningServer) -> None:
    limit = 4 * MiB  # the default max_batch_total_size
    first = b"a" * (limit // 2)
    second = b"b" * (limit // 2 + 1)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await update(grid, [UpdateRequest(digest=proto_digest(first), data=first),
                            UpdateRequest(digest=proto_digest(second), data=second)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details() or ""
    assert str(limit + 1) in details and str(limit) in details
    assert await find_missing(grid, [proto_digest(first)]) == [key(proto_digest(first))]

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read(grid, [proto_digest(first), proto_digest(second)])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(limit + 1) in (caught.value.details() or "")

    # Exactly at the limit is fine.
    exact = b"c" * limit
    assert await update(grid, [UpdateRequest(digest=proto_digest(exact), data=exact)]) == [
        (code_pb2.OK, "")]


async def test_storage_full_is_per_blob_resource_exhausted(start_server: StartServer) -> None:
    server = await start_server({"instances": {"": {
        "cas": {"type": "memory", "max-size": "100KiB"}}}})
    big = b"B" * (150 * 1024)
    small = b"small"
    statuses = await update(server, [UpdateRequest(digest=proto_digest(big), data=big),
                                     UpdateRequest(digest=proto_digest(small), data=small)])
    assert [code for code, _ in statuses] == [code_pb2.RESOURCE_EXHAUSTED, code_pb2.OK]
    assert await find_missing(server, [proto_digest(big), proto_digest(small)]) == [
        key(proto_digest(big))]


# -- compression --------------------------------------------------------------


async def test_zstd_upload_and_read(grid: RunningServer) -> None:
    data = b"compressible line of text\n" * 4000
    packed = zstandard.ZstdCompressor().compress(data)
    tiny = b"tiny"
    statuses = await update(grid, [
        UpdateRequest(digest=proto_digest(data), data=packed,
                      compressor=re_pb2.Compressor.ZSTD),
        UpdateRequest(digest=proto_digest(tiny), data=zstandard.ZstdCompressor().compress(tiny),
                      compressor=re_pb2.Compressor.ZSTD),
    ])
    assert statuses == [(code_pb2.OK, ""), (code_pb2.OK, "")]

    plain = await read(grid, [proto_digest(data)])
    assert plain.responses[0].compressor == re_pb2.Compressor.IDENTITY
    assert plain.responses[0].data == data

    compressed = await read(grid, [proto_digest(data), proto_digest(tiny)],
                            compressors=[re_pb2.Compressor.ZSTD])
    big_entry, tiny_entry = compressed.responses
    assert big_entry.status.code == code_pb2.OK
    assert big_entry.compressor == re_pb2.Compressor.ZSTD
    assert len(big_entry.data) < len(data)
    assert zstandard.ZstdDecompressor().decompress(big_entry.data) == data
    assert tiny_entry.compressor == re_pb2.Compressor.IDENTITY
    assert tiny_entry.data == tiny


async def test_zstd_bad_uploads_are_refused(grid: RunningServer) -> None:
    data = b"payload " * 100
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 * MiB))
    wrong = zstandard.ZstdCompressor().compress(data + b"!")
    statuses = await update(grid, [
        UpdateRequest(digest=proto_digest(data), data=b"not zstd at all",
                      compressor=re_pb2.Compressor.ZSTD),
        UpdateRequest(digest=proto_digest(data), data=bomb, compressor=re_pb2.Compressor.ZSTD),
        UpdateRequest(digest=proto_digest(data), data=wrong, compressor=re_pb2.Compressor.ZSTD),
        UpdateRequest(digest=proto_digest(data), data=data,
                      compressor=re_pb2.Compressor.DEFLATE),
    ])
    assert [code for code, _ in statuses] == [code_pb2.INVALID_ARGUMENT] * 4
    assert "zstd" in statuses[0][1]
    assert "more than" in statuses[1][1]
    assert "DEFLATE" in statuses[3][1]
    assert await find_missing(grid, [proto_digest(data)]) == [key(proto_digest(data))]


# -- instances and persistence ------------------------------------------------


async def test_instances_have_separate_storage(start_server: StartServer) -> None:
    server = await start_server({"instances": {"": {}, "other": {}}})
    digest = await server.upload(b"only in the default instance")
    assert await find_missing(server, [digest]) == []
    assert await find_missing(server, [digest], instance="other") == [key(digest)]
    response = await read(server, [digest], instance="other")
    assert response.responses[0].status.code == code_pb2.NOT_FOUND
    await server.upload(b"only in the default instance", instance="other")
    assert await find_missing(server, [digest], instance="other") == []


async def test_restart_keeps_disk_blobs(start_server: StartServer) -> None:
    first = await start_server()
    digest = await first.upload(b"survives a restart")
    await first.channel.close()
    await first.server.stop(0)
    second = await start_server(data_dir=first.data_dir)
    assert await find_missing(second, [digest]) == []
    response = await read(second, [digest])
    assert response.responses[0].data == b"survives a restart"


async def test_memory_instance_evicts_least_recently_used(start_server: StartServer) -> None:
    server = await start_server({"instances": {"": {
        "cas": {"type": "memory", "max-size": "1MiB"}}}})
    blobs = [bytes([n]) * (300 * 1024) for n in range(4)]
    a, b, c, d = (proto_digest(x) for x in blobs)
    for data in blobs[:3]:
        await server.upload(data)
    assert await find_missing(server, [a]) == []  # a is now the most recently used
    await server.upload(blobs[3])  # 1200 KiB > 1 MiB: the least recently used goes
    assert await find_missing(server, [a, b, c, d]) == [key(b)]


# -- GetTree ------------------------------------------------------------------


def directory(name: str, children: Sequence[tuple[str, re_pb2.Digest]] = ()
              ) -> re_pb2.Directory:
    return re_pb2.Directory(
        files=[re_pb2.FileNode(name=f"{name}.txt", digest=proto_digest(name.encode()))],
        directories=[re_pb2.DirectoryNode(name=n, digest=d) for n, d in children])


class Tree:
    """Directories built bottom-up, with their depth from the root."""

    def __init__(self) -> None:
        self.blobs: dict[tuple[str, int], bytes] = {}
        self.depth: dict[tuple[str, int], int] = {}

    def add(self, message: re_pb2.Directory) -> re_pb2.Digest:
        data = message.SerializeToString()
        digest = proto_digest(data)
        self.blobs[key(digest)] = data
        return digest

    async def upload(self, server: RunningServer,
                     skip: AbstractSet[tuple[str, int]] = frozenset()) -> None:
        entries = [UpdateRequest(digest=re_pb2.Digest(hash=h, size_bytes=s), data=data)
                   for (h, s), data in self.blobs.items() if (h, s) not in skip]
        for start in range(0, len(entries), 500):
            statuses = await update(server, entries[start:start + 500])
            assert {code for code, _ in statuses} == {code_pb2.OK}


def build_big_tree() -> tuple[Tree, re_pb2.Digest, dict[tuple[str, int], int]]:
    """1 + 10 + 100 + 1000 distinct directories, plus one shared subtree used twice."""
    tree = Tree()
    depth: dict[tuple[str, int], int] = {}
    shared = tree.add(directory("shared"))
    level: list[re_pb2.Digest] = []
    for i in range(10):
        middles = []
        for j in range(10):
            leaves = [tree.add(directory(f"leaf-{i}-{j}-{k}")) for k in range(10)]
            for leaf in leaves:
                depth[key(leaf)] = 3
            extra = [("shared", shared)] if (i, j) in ((0, 0), (9, 9)) else []
            middle = tree.add(directory(f"mid-{i}-{j}", [
                *((f"l{k}", leaf) for k, leaf in enumerate(leaves)), *extra]))
            depth[key(middle)] = 2
            middles.append(middle)
        top = tree.add(directory(f"top-{i}", [(f"m{j}", m) for j, m in enumerate(middles)]))
        depth[key(top)] = 1
        level.append(top)
    root = tree.add(directory("root", [(f"t{i}", t) for i, t in enumerate(level)]))
    depth[key(root)] = 0
    depth[key(shared)] = 3
    return tree, root, depth


async def get_tree_pages(server: RunningServer, root: re_pb2.Digest, page_size: int = 0,
                         token: str = "", instance: str = "") -> list[re_pb2.GetTreeResponse]:
    call = server.cas.GetTree(re_pb2.GetTreeRequest(
        instance_name=instance, root_digest=root, page_size=page_size, page_token=token))
    return [page async for page in call]


async def first_page(server: RunningServer, root: re_pb2.Digest, page_size: int,
                     token: str = "") -> re_pb2.GetTreeResponse:
    """Only the first response of a GetTree call; the rest of the call is cancelled."""
    call = server.cas.GetTree(re_pb2.GetTreeRequest(
        root_digest=root, page_size=page_size, page_token=token))
    page = await call.read()
    call.cancel()
    assert isinstance(page, re_pb2.GetTreeResponse)
    return page


def keys_of(directories: list[re_pb2.Directory]) -> list[tuple[str, int]]:
    return [key(proto_digest(d.SerializeToString())) for d in directories]


async def test_get_tree_pages_across_separate_calls(grid: RunningServer) -> None:
    tree, root, depth = build_big_tree()
    assert len(depth) == 1112
    await tree.upload(grid)

    seen: list[tuple[str, int]] = []
    token = ""
    calls = 0
    while True:
        page = await first_page(grid, root, page_size=97, token=token)
        calls += 1
        assert 0 < len(page.directories) <= 97
        seen += keys_of(list(page.directories))
        token = page.next_page_token
        if not token:
            break
        assert calls < 100
    assert calls == -(-1112 // 97)
    assert len(seen) == len(set(seen)) == 1112
    assert set(seen) == set(depth)
    assert seen[0] == key(root)
    depths = [depth[k] for k in seen]
    assert depths == sorted(depths)  # breadth first


async def test_get_tree_streams_all_pages_in_one_call(grid: RunningServer) -> None:
    tree, root, depth = build_big_tree()
    await tree.upload(grid)
    pages = await get_tree_pages(grid, root, page_size=300)
    assert [len(p.directories) for p in pages] == [300, 300, 300, 212]
    assert [bool(p.next_page_token) for p in pages] == [True, True, True, False]
    seen = [k for p in pages for k in keys_of(list(p.directories))]
    assert sorted(seen) == sorted(depth)

    # Resuming from the second page's token gives exactly the remaining directories.
    rest = await get_tree_pages(grid, root, page_size=300, token=pages[1].next_page_token)
    assert [k for p in rest for k in keys_of(list(p.directories))] == seen[600:]

    # Without a page size the server picks one; the walk is the same.
    default_pages = await get_tree_pages(grid, root)
    assert [k for p in default_pages for k in keys_of(list(p.directories))] == seen
    assert default_pages[-1].next_page_token == ""


async def test_get_tree_leaves_out_missing_subtrees(grid: RunningServer) -> None:
    tree = Tree()
    a1 = tree.add(directory("a1"))
    a = tree.add(directory("a", [("a1", a1)]))
    b1 = tree.add(directory("b1"))
    b = tree.add(directory("b", [("b1", b1)]))
    c = tree.add(directory("c"))
    junk = b"\xff\xff\xff\xff"
    corrupt = proto_digest(junk)
    tree.blobs[key(corrupt)] = junk
    root = tree.add(directory("root", [("a", a), ("b", b), ("c", c), ("x", corrupt),
                                       ("again", a)]))
    await tree.upload(grid, skip={key(b)})
    pages = await get_tree_pages(grid, root)
    assert len(pages) == 1
    assert keys_of(list(pages[0].directories)) == [key(root), key(a), key(c), key(a1)]


async def test_get_tree_of_empty_directory(grid: RunningServer) -> None:
    empty = re_pb2.Digest(hash=EMPTY_DIGEST.hash, size_bytes=0)
    (page,) = await get_tree_pages(grid, empty)
    assert list(page.directories) == [re_pb2.Directory()]
    assert page.next_page_token == ""


async def test_get_tree_errors(grid: RunningServer) -> None:
    tree, root, _ = build_big_tree()
    await tree.upload(grid)
    token = (await first_page(grid, root, page_size=10)).next_page_token
    assert token

    async def code_of(root_digest: re_pb2.Digest, page_token: str = "",
                      page_size: int = 0) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await get_tree_pages(grid, root_digest, page_size, page_token)
        return caught.value.code()

    assert await code_of(proto_digest(b"no such directory")) == grpc.StatusCode.NOT_FOUND
    junk = await grid.upload(b"\xff\xff\xff\xff")
    assert await code_of(junk) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(BAD_DIGESTS["uppercase"]) == grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(root, page_size=-1) == grpc.StatusCode.INVALID_ARGUMENT
    for bogus in ["garbage!!", "bm90IGEgdG9rZW4", token[:-3], token + "AAAA", "\u00e9t\u00e9"]:
        assert await code_of(root, bogus) == grpc.StatusCode.INVALID_ARGUMENT, bogus
    # A token only works for the root it was issued for.
    other_root = proto_digest(directory("other").SerializeToString())
    await grid.upload(directory("other").SerializeToString())
    assert await code_of(other_root, token) == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_tree_token_refused_after_tree_changed(grid: RunningServer) -> None:
    tree = Tree()
    leaves = [tree.add(directory(f"leaf{n}")) for n in range(4)]
    root = tree.add(directory("root", [(f"l{n}", d) for n, d in enumerate(leaves)]))
    await tree.upload(grid)
    page = await first_page(grid, root, page_size=2)
    assert keys_of(list(page.directories)) == [key(root), key(leaves[0])]
    # The first directory of the next page disappears from storage.
    await remove_behind_the_servers_back(grid, Digest.from_proto(leaves[1]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_tree_pages(grid, root, 2, page.next_page_token)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in (caught.value.details() or "")


# -- chunking -----------------------------------------------------------------


async def test_split_and_splice_are_unimplemented(grid: RunningServer) -> None:
    digest = await grid.upload(b"whole blob")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grid.cas.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=digest))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "chunking" in (caught.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grid.cas.SpliceBlob(re_pb2.SpliceBlobRequest(blob_digest=digest,
                                                           chunk_digests=[digest]))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
