"""A replica whose CAS is a secure remote (TLS and a bearer token): it verifies the
remote by the configured CA, presents its token on every call, and a replica with
the wrong credentials is refused with a status that names the remote, never INTERNAL,
while what the remote stores stays intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from authkit import Keys, channel
from conftest import RunningServer, StartServer

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.config import ConfigError
from buildfleet.digest import Digest

CAS_ONLY = {"scheduler": {"enabled": False}}


async def front(start_server: StartServer, root: Path, remote: RunningServer,
                **credentials: Any) -> RunningServer:
    storage = {"type": "remote", "address": remote.address, "timeout": 10, **credentials}
    return await start_server({"instances": {"": {**CAS_ONLY, "cas": storage}}},
                              data_dir=root)


def batch(data: bytes) -> re_pb2.BatchUpdateBlobsRequest:
    digest = Digest.of(data)
    return re_pb2.BatchUpdateBlobsRequest(requests=[re_pb2.BatchUpdateBlobsRequest.Request(
        digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes), data=data)])


@pytest.fixture
async def secure_remote(start_server: StartServer, tmp_path: Path
                        ) -> tuple[Keys, RunningServer]:
    """A secure CAS-only server; the tokens `replica` (execute) and `reader` (read) are
    known to it from the start, in files of those names under tmp_path."""
    keys = Keys(tmp_path / "keys")
    (tmp_path / "replica.token").write_text(keys.token("replica", "execute") + "\n")
    (tmp_path / "reader.token").write_text(keys.token("reader", "read"))
    remote = await start_server({"tls": keys.tls(), "auth": keys.auth(),
                                 "instances": {"": CAS_ONLY}}, data_dir=tmp_path / "remote")
    return keys, remote


async def test_a_replica_stores_through_a_secure_remote_with_its_token(
        start_server: StartServer, tmp_path: Path,
        secure_remote: tuple[Keys, RunningServer]) -> None:
    keys, remote = secure_remote
    replica = await front(start_server, tmp_path / "replica", remote,
                          **{"tls-ca": str(keys.root / "ca.pem"),
                             "token-file": str(tmp_path / "replica.token")})
    data = b"stored through the replica"
    response = await replica.cas.BatchUpdateBlobs(batch(data), timeout=10)
    assert [r.status.code for r in response.responses] == [0]
    # The blob is on the remote, for anyone the remote lets read.
    reader = (tmp_path / "reader.token").read_text()
    async with channel(remote.address, keys, token=reader) as ch:
        read = await re_grpc.ContentAddressableStorageStub(ch).BatchReadBlobs(
            re_pb2.BatchReadBlobsRequest(digests=[batch(data).requests[0].digest]), timeout=10)
    assert [r.data for r in read.responses] == [data]


async def test_a_replica_without_a_token_or_with_too_few_roles_is_refused_by_the_remote(
        start_server: StartServer, tmp_path: Path,
        secure_remote: tuple[Keys, RunningServer]) -> None:
    keys, remote = secure_remote
    anonymous = await front(start_server, tmp_path / "anonymous", remote,
                            **{"tls-ca": str(keys.root / "ca.pem")})
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await anonymous.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[batch(b"x").requests[0].digest]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert remote.address in (refused.value.details() or "")
    assert "UNAUTHENTICATED" in (refused.value.details() or "") or \
        "credentials" in (refused.value.details() or "")

    reader = await front(start_server, tmp_path / "reader", remote,
                         **{"tls-ca": str(keys.root / "ca.pem"),
                            "token-file": str(tmp_path / "reader.token")})
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await reader.cas.BatchUpdateBlobs(batch(b"not for readers"), timeout=10)
    assert denied.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert remote.address in (denied.value.details() or "")


async def test_a_remote_that_the_ca_does_not_vouch_for_is_unavailable_not_trusted(
        start_server: StartServer, tmp_path: Path,
        secure_remote: tuple[Keys, RunningServer]) -> None:
    keys, remote = secure_remote
    other = Keys(tmp_path / "other-keys")  # another CA: the remote's certificate fails
    replica = await front(start_server, tmp_path / "replica", remote,
                          **{"tls-ca": str(other.root / "ca.pem"),
                             "token-file": str(tmp_path / "replica.token")})
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await replica.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[batch(b"x").requests[0].digest]), timeout=15)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert remote.address in (failed.value.details() or "")


async def test_credentials_of_a_remote_are_checked_at_start_up(
        start_server: StartServer, tmp_path: Path,
        secure_remote: tuple[Keys, RunningServer]) -> None:
    _, remote = secure_remote
    with pytest.raises(ConfigError, match="token-file .*no such file"):
        await front(start_server, tmp_path / "replica", remote,
                    **{"token-file": str(tmp_path / "missing.token")})
    with pytest.raises(ConfigError, match="client-cert and client-key go together"):
        await front(start_server, tmp_path / "replica2", remote,
                    **{"client-cert": str(tmp_path / "c.pem")})
