"""The Remote Asset API: Push then Fetch, downloads from an HTTP origin, and the limits
and checks that keep a hostile origin or client from storing what it should not."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import botkit
import grpc
import pytest
from aiohttp import web
from conftest import RunningServer, StartServer, proto_digest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.server.asset.service import FetchService

OK = grpc.StatusCode.OK.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
ABORTED = grpc.StatusCode.ABORTED.value[0]
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
ARCHIVE = b"an archive's bytes " * 1000


def sri(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}-{base64.b64encode(hashlib.new(algorithm, data).digest()).decode()}"


@dataclass
class Origin:
    """An HTTP server the grid downloads from, counting what it is asked."""

    url: str
    hits: dict[str, int] = field(default_factory=dict)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def count(self, path: str) -> int:
        return self.hits.get(path, 0)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    state = Origin("")

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        state.hits[path] = state.hits.get(path, 0) + 1
        state.headers[path] = dict(request.headers)
        if path.startswith("/files/"):
            return web.Response(body=ARCHIVE + path.encode())
        if path == "/large":
            return web.Response(body=b"x" * 300_000)
        if path == "/endless":  # no Content-Length, more than the limit
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(100):
                await response.write(b"y" * 10_000)
            return response
        if path == "/slow":
            await asyncio.wait_for(state.release.wait(), 60)
            return web.Response(body=b"late but whole")
        if path == "/private":
            if request.headers.get("Authorization") != "Bearer secret":
                return web.Response(status=401)
            return web.Response(body=b"for the key holder only")
        if path == "/loop":
            raise web.HTTPFound("/loop")
        if path == "/hop":
            raise web.HTTPFound(request.query["to"])
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}"
    yield state
    state.release.set()
    await runner.cleanup()


def fetch_stub(server: RunningServer) -> ra_grpc.FetchStub:
    return ra_grpc.FetchStub(server.channel)


def push_stub(server: RunningServer) -> ra_grpc.PushStub:
    return ra_grpc.PushStub(server.channel)


async def fetch_blob(server: RunningServer, *uris: str, timeout: float | None = None,
                     quals: list[ra_pb2.Qualifier] | None = None,
                     oldest: float | None = None, instance: str = ""
                     ) -> ra_pb2.FetchBlobResponse:
    request = ra_pb2.FetchBlobRequest(instance_name=instance, uris=uris,
                                      qualifiers=quals or [])
    if timeout is not None:
        request.timeout.CopyFrom(Duration(seconds=int(timeout),
                                          nanos=int(timeout % 1 * 1e9)))
    if oldest is not None:
        request.oldest_content_accepted.FromNanoseconds(int(oldest * 1e9))
    return await fetch_stub(server).FetchBlob(request)


async def read_blob(server: RunningServer, digest: re_pb2.Digest) -> bytes | None:
    response = await server.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    answer = response.responses[0]
    return answer.data if answer.status.code == OK else None


async def missing(server: RunningServer, digest: re_pb2.Digest) -> bool:
    response = await server.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[digest]))
    return len(response.missing_blob_digests) == 1


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            for detail in status_pb2.Status.FromString(value).details:
                found = error_details_pb2.BadRequest()
                if detail.Unpack(found):
                    return found
    raise AssertionError(f"no BadRequest detail in {error!r}")


def future(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds) * 1e9))
    return stamp


# -- Push, then Fetch -------------------------------------------------------------------

async def test_a_pushed_blob_is_fetched_by_any_of_its_uris_with_the_same_qualifiers(
        grid: RunningServer) -> None:
    digest = await grid.upload(b"pushed content")
    quals = [ra_pb2.Qualifier(name="vcs.commit", value="abc123"),
             ra_pb2.Qualifier(name="resource_type", value="application/x-tar")]
    await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(
        uris=["urn:example:one", "urn:example:two"], qualifiers=quals, blob_digest=digest,
        expire_at=future(3600)))

    for uri in ("urn:example:one", "urn:example:two"):
        # qualifiers may come in any order
        found = await fetch_blob(grid, "urn:example:missing", uri, quals=quals[::-1])
        assert found.status.code == OK, found
        assert found.uri == uri and found.blob_digest == digest
        assert {(q.name, q.value) for q in found.qualifiers} == \
            {("vcs.commit", "abc123"), ("resource_type", "application/x-tar")}
        assert found.HasField("expires_at")
        assert await read_blob(grid, found.blob_digest) == b"pushed content"

    # other qualifiers (or none, or a subset) name other assets
    for other in ([], quals[:1], [ra_pb2.Qualifier(name="vcs.commit", value="def456"),
                                  quals[1]]):
        answer = await fetch_blob(grid, "urn:example:one", quals=other)
        assert answer.status.code == NOT_FOUND, answer
        assert not answer.HasField("blob_digest")


async def test_a_pushed_directory_round_trips_and_is_served_only_while_complete(
        grid: RunningServer) -> None:
    file = await grid.upload(b"int main() { return 0; }\n")
    sub = re_pb2.Directory(files=[re_pb2.FileNode(name="main.c", digest=file)])
    sub_digest = await grid.upload(sub.SerializeToString())
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="src", digest=sub_digest)])
    root_digest = await grid.upload(root.SerializeToString())
    quals = [ra_pb2.Qualifier(name="vcs.branch", value="main")]
    await push_stub(grid).PushDirectory(ra_pb2.PushDirectoryRequest(
        uris=["https://git.example/repo.git"], qualifiers=quals,
        root_directory_digest=root_digest))

    request = ra_pb2.FetchDirectoryRequest(uris=["https://git.example/repo.git"],
                                           qualifiers=quals)
    found = await fetch_stub(grid).FetchDirectory(request)
    assert found.status.code == OK and found.root_directory_digest == root_digest
    tree = [d async for d in grid.cas.GetTree(
        re_pb2.GetTreeRequest(root_digest=root_digest))]
    assert [f.name for d in tree for dd in d.directories for f in dd.files] == ["main.c"]

    # a file deep in the tree leaves the CAS: the asset is no longer served
    assert await grid.server.instances.get("").cas.store.delete(
        Digest(file.hash, file.size_bytes))
    gone = await fetch_stub(grid).FetchDirectory(request)
    assert gone.status.code == NOT_FOUND, gone


async def test_push_refuses_content_that_is_not_in_the_cas(grid: RunningServer) -> None:
    absent = proto_digest(b"never uploaded")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(uris=["urn:x"],
                                                              blob_digest=absent))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert absent.hash in (refused.value.details() or "")
    present = await grid.upload(b"here")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(
            uris=["urn:x"], blob_digest=present, references_blobs=[absent]))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await fetch_blob(grid, "urn:x")).status.code == NOT_FOUND


async def test_expire_at_is_honoured_and_a_past_one_withdraws_the_asset(
        grid: RunningServer) -> None:
    digest = await grid.upload(b"short-lived")
    await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(
        uris=["urn:short"], blob_digest=digest, expire_at=future(3600)))
    found = await fetch_blob(grid, "urn:short")
    assert found.status.code == OK
    assert abs(found.expires_at.ToSeconds() - future(3600).ToSeconds()) < 60
    await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(
        uris=["urn:short"], blob_digest=digest, expire_at=future(-1)))
    assert (await fetch_blob(grid, "urn:short")).status.code == NOT_FOUND


async def test_oldest_content_accepted_refuses_older_pushes(grid: RunningServer) -> None:
    digest = await grid.upload(b"old")
    await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(uris=["urn:old"], blob_digest=digest))
    assert (await fetch_blob(grid, "urn:old", oldest=time.time() - 3600)).status.code == OK
    newer = await fetch_blob(grid, "urn:old", oldest=time.time() + 1)
    assert newer.status.code == NOT_FOUND


# -- bad requests ------------------------------------------------------------------------

async def test_unsupported_qualifiers_are_invalid_argument_naming_them(
        grid: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch_blob(grid, "https://example.invalid/a.tar.gz", quals=[
            ra_pb2.Qualifier(name="checksum.sri", value=sri(b"a")),
            ra_pb2.Qualifier(name="git.depth", value="1"),
            ra_pb2.Qualifier(name="x-unknown", value="")])
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'git.depth'" in (refused.value.details() or "")
    violations = bad_request(refused.value).field_violations
    assert [(v.field, v.description) for v in violations] == [
        ("qualifiers.name", '"git.depth" not supported'),
        ("qualifiers.name", '"x-unknown" not supported')]
    digest = await grid.upload(b"y")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await push_stub(grid).PushBlob(ra_pb2.PushBlobRequest(
            uris=["urn:y"], blob_digest=digest,
            qualifiers=[ra_pb2.Qualifier(name="x-unknown", value="1")]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(("uris", "quals", "words"), [
    ([], [], "at least one URI"),
    (["urn:a", ""], [], "uris[1] is empty"),
    (["urn:a"], [ra_pb2.Qualifier(name="vcs.commit", value="1"),
                 ra_pb2.Qualifier(name="vcs.commit", value="2")], "more than once"),
    (["urn:a"], [ra_pb2.Qualifier(name="checksum.sri", value="sha256-not base64!")],
     "checksum.sri"),
    (["urn:a"], [ra_pb2.Qualifier(name="checksum.sri", value="md5-AAAA")], "names no hash"),
    (["urn:a"], [ra_pb2.Qualifier(name="http_header_url:3:Authorization", value="x")],
     "INDEX below 1"),
    (["urn:a"], [ra_pb2.Qualifier(name="bazel.auth_headers", value="[1, 2]")],
     "bazel.auth_headers"),
])
async def test_malformed_fetch_requests_are_invalid_argument(
        grid: RunningServer, uris: list[str], quals: list[ra_pb2.Qualifier],
        words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch_blob(grid, *uris, quals=quals)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (refused.value.details() or ""), refused.value.details()


async def test_an_unknown_instance_is_invalid_argument(grid: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch_blob(grid, "urn:a", instance="nowhere")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- downloads ---------------------------------------------------------------------------

async def test_fetch_blob_downloads_once_then_answers_from_the_cas(
        grid: RunningServer, origin: Origin) -> None:
    uri = f"{origin.url}/files/lib-1.0.tar.gz"
    expected = ARCHIVE + b"/files/lib-1.0.tar.gz"
    quals = [ra_pb2.Qualifier(name="checksum.sri", value=sri(expected)),
             ra_pb2.Qualifier(name="bazel.canonical_id", value="lib-1.0")]
    first = await fetch_blob(grid, f"{origin.url}/gone.tar.gz", uri, quals=quals)
    assert first.status.code == OK, first
    assert first.uri == uri and first.blob_digest == proto_digest(expected)
    assert await read_blob(grid, first.blob_digest) == expected
    assert origin.count("/gone.tar.gz") == 1 and origin.count("/files/lib-1.0.tar.gz") == 1

    again = await fetch_blob(grid, uri, quals=quals)
    assert again.status.code == OK and again.blob_digest == first.blob_digest
    assert origin.count("/files/lib-1.0.tar.gz") == 1  # no second download
    # a newer copy is asked for: downloaded again
    fresh = await fetch_blob(grid, uri, quals=quals, oldest=time.time() + 1)
    assert fresh.status.code == OK
    assert origin.count("/files/lib-1.0.tar.gz") == 2


async def test_a_wrong_checksum_fails_and_stores_nothing(
        grid: RunningServer, origin: Origin) -> None:
    uri = f"{origin.url}/files/tampered.tar.gz"
    served = ARCHIVE + b"/files/tampered.tar.gz"
    for algorithm in ("sha256", "sha512"):
        wrong = sri(b"what the client expected", algorithm)
        answer = await fetch_blob(
            grid, uri, quals=[ra_pb2.Qualifier(name="checksum.sri", value=wrong)])
        assert answer.status.code == ABORTED, answer
        assert "checksum.sri mismatch" in answer.status.message and wrong in \
            answer.status.message
        assert answer.uri == uri and not answer.HasField("blob_digest")
    assert await missing(grid, proto_digest(served))
    # nor is anything remembered under the URI
    assert origin.count("/files/tampered.tar.gz") == 2
    right = await fetch_blob(
        grid, uri, quals=[ra_pb2.Qualifier(name="checksum.sri", value=sri(served, "sha384"))])
    assert right.status.code == OK and right.blob_digest == proto_digest(served)


async def test_concurrent_fetches_of_one_uri_share_one_download(
        grid: RunningServer, origin: Origin) -> None:
    uri = f"{origin.url}/slow"
    fetcher = next(s for s in grid.server.services if isinstance(s, FetchService)).fetcher
    calls = [asyncio.ensure_future(fetch_blob(grid, uri)) for _ in range(5)]
    # all five wait on the one download before the origin answers it
    await botkit.wait_for(lambda: fetcher.joined == 4, 10, "four calls joining the download")
    assert origin.count("/slow") == 1
    origin.release.set()
    answers = await asyncio.gather(*calls)
    assert {a.status.code for a in answers} == {OK}
    assert len({a.blob_digest.hash for a in answers}) == 1
    assert origin.count("/slow") == 1


async def test_a_download_past_its_timeout_is_deadline_exceeded(
        grid: RunningServer, origin: Origin) -> None:
    answer = await fetch_blob(grid, f"{origin.url}/slow", timeout=0.5)
    assert answer.status.code == DEADLINE_EXCEEDED, answer
    assert answer.uri == f"{origin.url}/slow"


async def test_downloads_are_bounded_in_size(start_server: StartServer, origin: Origin
                                             ) -> None:
    server = await start_server({"assets": {"max-download-size": "100KB"}})
    for path in ("/large", "/endless"):
        answer = await fetch_blob(server, f"{origin.url}{path}")
        assert answer.status.code == RESOURCE_EXHAUSTED, answer
        assert "100000 bytes" in answer.status.message
    small = await fetch_blob(server, f"{origin.url}/files/small")
    assert small.status.code == OK


async def test_redirects_are_limited_and_checked_against_the_allowed_prefixes(
        start_server: StartServer, origin: Origin) -> None:
    server = await start_server({"assets": {"allow-uris": [f"{origin.url}/files/",
                                                           f"{origin.url}/hop",
                                                           f"{origin.url}/loop"],
                                            "max-redirects": 3}})
    looping = await fetch_blob(server, f"{origin.url}/loop")
    assert looping.status.code == ABORTED and "more than 3 redirects" in looping.status.message
    assert origin.count("/loop") == 4
    escaping = await fetch_blob(server, f"{origin.url}/hop?to=/private")
    assert escaping.status.code == PERMISSION_DENIED, escaping
    assert origin.count("/private") == 0
    followed = await fetch_blob(server, f"{origin.url}/hop?to=/files/x")
    assert followed.status.code == OK
    outside = await fetch_blob(server, f"{origin.url}/private")
    assert outside.status.code == PERMISSION_DENIED and origin.count("/private") == 0


async def test_link_local_addresses_are_never_downloaded_from(
        grid: RunningServer, origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
    for uri in (metadata, "http://[::ffff:169.254.169.254]/", "http://[fe80::1]/",
                f"{origin.url}/hop?to={metadata}"):
        answer = await fetch_blob(grid, uri, timeout=5)
        assert answer.status.code == PERMISSION_DENIED, (uri, answer)
    # nor from a host name that resolves to one
    from aiohttp.resolver import ThreadedResolver

    async def resolve(self: object, host: str, port: int = 0, family: int = 0) -> list[dict]:
        return [{"hostname": host, "host": "169.254.169.254", "port": port, "family": 2,
                 "proto": 0, "flags": 0}]

    monkeypatch.setattr(ThreadedResolver, "resolve", resolve)
    answer = await fetch_blob(grid, "http://metadata.example.internal/", timeout=5)
    assert answer.status.code == PERMISSION_DENIED, answer
    assert "link-local" in answer.status.message


async def test_downloading_can_be_turned_off(start_server: StartServer, origin: Origin
                                             ) -> None:
    server = await start_server({"assets": {"download": False}})
    answer = await fetch_blob(server, f"{origin.url}/files/a")
    assert answer.status.code == NOT_FOUND and "downloading is off" in answer.status.message
    assert origin.hits == {}
    digest = await server.upload(b"pushed")  # pushed assets are still served
    await push_stub(server).PushBlob(ra_pb2.PushBlobRequest(uris=[f"{origin.url}/files/a"],
                                                            blob_digest=digest))
    assert (await fetch_blob(server, f"{origin.url}/files/a")).blob_digest == digest


async def test_credentials_reach_the_origin_only_and_gate_what_was_downloaded_with_them(
        grid: RunningServer, origin: Origin) -> None:
    uri = f"{origin.url}/private"
    header = [ra_pb2.Qualifier(name="http_header:Authorization", value="Bearer secret")]
    refused = await fetch_blob(grid, uri)
    assert refused.status.code == PERMISSION_DENIED
    found = await fetch_blob(grid, uri, quals=header)
    assert found.status.code == OK, found
    assert await read_blob(grid, found.blob_digest) == b"for the key holder only"
    assert all("secret" not in q.value for q in found.qualifiers)  # never echoed
    # without the credentials (or with others), the remembered copy is not handed out
    hits = origin.count("/private")
    assert (await fetch_blob(grid, uri)).status.code == PERMISSION_DENIED
    other = [ra_pb2.Qualifier(name="http_header:Authorization", value="Bearer guess")]
    assert (await fetch_blob(grid, uri, quals=other)).status.code == PERMISSION_DENIED
    assert origin.count("/private") == hits + 2
    # the same credentials again: from the CAS
    assert (await fetch_blob(grid, uri, quals=header)).status.code == OK
    assert origin.count("/private") == hits + 2
    # Bazel's older JSON form, and no credentials passed on to another host
    bazel_style = [ra_pb2.Qualifier(name="bazel.auth_headers",
                                    value=f'{{"{origin.url}/hop?to=http://localhost:'
                                          f'{origin.url.rsplit(":", 1)[1]}/files/h": '
                                          '{"Authorization": "Bearer secret"}}')]
    hopped = await fetch_blob(
        grid, f"{origin.url}/hop?to=http://localhost:{origin.url.rsplit(':', 1)[1]}/files/h",
        quals=bazel_style)
    assert hopped.status.code == OK, hopped
    assert origin.headers["/hop"].get("Authorization") == "Bearer secret"
    assert "Authorization" not in origin.headers["/files/h"]


async def test_fetch_directory_does_not_download(grid: RunningServer, origin: Origin) -> None:
    answer = await fetch_stub(grid).FetchDirectory(ra_pb2.FetchDirectoryRequest(
        uris=[f"{origin.url}/files/tree.tar.gz"]))
    assert answer.status.code == NOT_FOUND and "pushed" in answer.status.message
    assert origin.hits == {}


async def test_assets_survive_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    first = await start_server(data_dir=tmp_path / "kept")
    digest = await first.upload(b"kept across restarts")
    await push_stub(first).PushBlob(ra_pb2.PushBlobRequest(uris=["urn:kept"],
                                                           blob_digest=digest))
    await first.server.stop(0)
    second = await start_server(data_dir=tmp_path / "kept")
    assert (await fetch_blob(second, "urn:kept")).blob_digest == digest


async def test_the_api_can_be_turned_off(start_server: StartServer) -> None:
    server = await start_server({"assets": {"enabled": False}})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await fetch_blob(server, "urn:anything")
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
