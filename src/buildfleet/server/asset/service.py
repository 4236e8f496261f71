"""The Remote Asset API (build.bazel.remote.asset.v1): the Fetch and Push services.

Push associates URIs and qualifiers with content already in the CAS; Fetch finds
it again, or (FetchBlob) downloads it: see `buildfleet.server.asset.fetcher` for
how a request is resolved, `qualifiers` for the qualifiers understood and
`buildfleet.storage.assets` for how assets are kept.  Errors in the request are
gRPC errors (INVALID_ARGUMENT...); a fetch that could not be completed for
reasons outside the server (the origin said 404, a checksum did not match, the
timeout passed) is an OK call whose response carries that `status`, as the API
asks.

With authentication on, Fetch needs the `read` role on the instance and Push
`cache-write` (pushing vouches for content, as writing the action cache does).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from buildfleet._proto.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.config import AssetsConfig
from buildfleet.digest import Digest, check_digest_function
from buildfleet.errors import InvalidArgument
from buildfleet.server.asset.fetcher import AssetFetcher, Fetched, FetchRequest
from buildfleet.server.asset.qualifiers import RequestQualifiers, parse_qualifiers
from buildfleet.server.instance import Instances
from buildfleet.server.rpc import add_service, rpc
from buildfleet.storage.action_cache import digest_proto
from buildfleet.storage.assets import Asset, AssetKind

_SHA256 = re_pb2.DigestFunction.SHA256


class _Named(Protocol):
    @property
    def uris(self) -> Sequence[str]: ...

    @property
    def qualifiers(self) -> Sequence[ra_pb2.Qualifier]: ...


def _qualifiers(request: _Named, extra: Sequence[str]) -> RequestQualifiers:
    uris = list(request.uris)
    if not uris:
        raise InvalidArgument("uris: at least one URI is required")
    for index, uri in enumerate(uris):
        if not uri:
            raise InvalidArgument(f"uris[{index}] is empty")
    return parse_qualifiers(((q.name, q.value) for q in request.qualifiers), len(uris),
                            extra=extra)


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _answer(response: ra_pb2.FetchBlobResponse | ra_pb2.FetchDirectoryResponse,
            fetched: Fetched, digest_field: str) -> None:
    """Fill a Fetch response: its status, and what was found (the qualifiers it
    satisfies, never the request headers; until when; the content's digest)."""
    response.status.code = fetched.code.value[0]
    response.status.message = fetched.message
    response.uri = fetched.uri
    asset = fetched.asset
    if asset is None:
        return
    response.digest_function = _SHA256
    response.qualifiers.extend(ra_pb2.Qualifier(name=n, value=v) for n, v in asset.qualifiers
                               if not n.startswith("buildfleet."))
    if asset.expire_at is not None:
        response.expires_at.CopyFrom(_timestamp(asset.expire_at))
    getattr(response, digest_field).CopyFrom(digest_proto(asset.digest))


class FetchService(ra_grpc.FetchServicer):
    """build.bazel.remote.asset.v1.Fetch."""

    FULL_NAME = "build.bazel.remote.asset.v1.Fetch"

    def __init__(self, instances: Instances, config: AssetsConfig,
                 fetcher: AssetFetcher) -> None:
        self.instances = instances
        self.config = config
        self.fetcher = fetcher

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, ra_pb2.DESCRIPTOR.services_by_name["Fetch"])

    async def close(self) -> None:
        await self.fetcher.close()

    async def _fetch(self, request: ra_pb2.FetchBlobRequest | ra_pb2.FetchDirectoryRequest,
                     kind: AssetKind) -> Fetched:
        instance = self.instances.get(request.instance_name)
        check_digest_function(request.digest_function)
        qualifiers = _qualifiers(request, self.config.extra_qualifiers)
        timeout = None
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout < 0:
                raise InvalidArgument("timeout is negative")
        oldest = _seconds(request.oldest_content_accepted) \
            if request.HasField("oldest_content_accepted") else None
        return await self.fetcher.fetch(
            FetchRequest(instance.name, kind, list(request.uris), qualifiers, timeout, oldest),
            instance.cas, instance.assets)

    @rpc
    async def FetchBlob(self, request: ra_pb2.FetchBlobRequest,  # noqa: N802
                        context: grpc.aio.ServicerContext) -> ra_pb2.FetchBlobResponse:
        response = ra_pb2.FetchBlobResponse()
        _answer(response, await self._fetch(request, AssetKind.BLOB), "blob_digest")
        return response

    @rpc
    async def FetchDirectory(self, request: ra_pb2.FetchDirectoryRequest,  # noqa: N802
                             context: grpc.aio.ServicerContext
                             ) -> ra_pb2.FetchDirectoryResponse:
        response = ra_pb2.FetchDirectoryResponse()
        _answer(response, await self._fetch(request, AssetKind.DIRECTORY),
                "root_directory_digest")
        return response


class PushService(ra_grpc.PushServicer):
    """build.bazel.remote.asset.v1.Push."""

    FULL_NAME = "build.bazel.remote.asset.v1.Push"

    def __init__(self, instances: Instances, config: AssetsConfig) -> None:
        self.instances = instances
        self.config = config

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, ra_pb2.DESCRIPTOR.services_by_name["Push"])

    async def _push(self, request: ra_pb2.PushBlobRequest | ra_pb2.PushDirectoryRequest,
                    kind: AssetKind, digest_message: re_pb2.Digest, field: str) -> None:
        instance = self.instances.get(request.instance_name)
        check_digest_function(request.digest_function)
        qualifiers = _qualifiers(request, self.config.extra_qualifiers)
        if qualifiers.has_credentials:
            raise InvalidArgument("request headers (http_header..., bazel.auth_headers) are "
                                  "for downloads; a pushed asset cannot carry them")
        if not request.HasField(field):
            raise InvalidArgument(f"{field} is required")
        digest = Digest.from_proto(digest_message, field)
        expire_at = _seconds(request.expire_at) if request.HasField("expire_at") else None
        references_blobs = tuple(Digest.from_protos(request.references_blobs,
                                                    "references_blobs"))
        references_directories = tuple(Digest.from_protos(request.references_directories,
                                                          "references_directories"))
        now = time.time()
        if expire_at is not None and expire_at <= now:
            # an expiry in the past withdraws the association
            for uri in request.uris:
                await instance.assets.forget(kind, uri, qualifiers.name)
            return
        await instance.assets.remember([
            Asset(kind, uri, qualifiers.name, digest, created=now, expire_at=expire_at,
                  references_blobs=references_blobs,
                  references_directories=references_directories)
            for uri in dict.fromkeys(request.uris)])

    @rpc
    async def PushBlob(self, request: ra_pb2.PushBlobRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> ra_pb2.PushBlobResponse:
        await self._push(request, AssetKind.BLOB, request.blob_digest, "blob_digest")
        return ra_pb2.PushBlobResponse()

    @rpc
    async def PushDirectory(self, request: ra_pb2.PushDirectoryRequest,  # noqa: N802
                            context: grpc.aio.ServicerContext) -> ra_pb2.PushDirectoryResponse:
        await self._push(request, AssetKind.DIRECTORY, request.root_directory_digest,
                         "root_directory_digest")
        return ra_pb2.PushDirectoryResponse()
