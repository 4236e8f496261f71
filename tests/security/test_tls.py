"""TLS on the listeners: server TLS, mutual TLS, certificates rotated without a restart,
and files that cannot be used stopping start-up with a message naming the key.
Real certificates, made in the test; real gRPC on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from authkit import Keys, channel
from botkit import wait_for
from conftest import StartServer

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.auth.pki import issue, new_ca
from buildfleet.config import ConfigError


async def capabilities(ch: grpc.aio.Channel, timeout: float = 5) -> re_pb2.ServerCapabilities:
    return await re_grpc.CapabilitiesStub(ch).GetCapabilities(
        re_pb2.GetCapabilitiesRequest(instance_name=""), timeout=timeout)


async def refused(ch: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await capabilities(ch, timeout=3)
    return caught.value.code()


async def test_tls_serves_a_client_that_trusts_the_ca_and_no_plaintext_one(
        start_server: StartServer, tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls()})
    async with channel(grid.address, keys) as secure:
        assert (await capabilities(secure)).execution_capabilities.exec_enabled
    assert await refused(grid.channel) == grpc.StatusCode.UNAVAILABLE  # plaintext
    async with channel(grid.address, keys, ca_pem=new_ca().cert_pem) as untrusting:
        assert await refused(untrusting) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_certificate_from_the_client_ca(
        start_server: StartServer, tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls(client_ca=True)})
    async with channel(grid.address, keys, client=keys.client("alice")) as signed:
        await capabilities(signed)
    async with channel(grid.address, keys) as anonymous:
        assert await refused(anonymous) == grpc.StatusCode.UNAVAILABLE
    async with channel(grid.address, keys, client=issue(new_ca(), "mallory")) as stranger:
        assert await refused(stranger) == grpc.StatusCode.UNAVAILABLE


async def test_a_rotated_certificate_is_used_without_a_restart(
        start_server: StartServer, tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls()})
    async with channel(grid.address, keys) as before:
        await capabilities(before)
    replacement_ca = new_ca("the next CA")
    issue(replacement_ca, "buildfleet server", server_names=["localhost", "127.0.0.1"]).write(
        keys.root / "server.pem", keys.root / "server.key")

    async def new_certificate_served() -> bool:
        async with channel(grid.address, keys, ca_pem=replacement_ca.cert_pem) as after:
            try:
                await capabilities(after, timeout=2)
                return True
            except grpc.aio.AioRpcError:
                return False

    await wait_for(new_certificate_served, 20, "the rotated certificate to be served")
    async with channel(grid.address, keys) as old_trust:
        assert await refused(old_trust) == grpc.StatusCode.UNAVAILABLE


async def test_a_key_that_does_not_match_or_a_missing_file_stops_start_up(
        start_server: StartServer, tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    other = issue(keys.ca, "someone else", server_names=["localhost"])
    (keys.root / "other.key").write_bytes(other.key_pem)
    mismatched = {**keys.tls(), "key": str(keys.root / "other.key")}
    with pytest.raises(ConfigError, match=r"\.key: .*other\.key does not belong to the "
                                          r"certificate"):
        await start_server({"tls": mismatched})
    with pytest.raises(ConfigError, match=r"\.cert: cannot read .*missing\.pem"):
        await start_server({"tls": {**keys.tls(), "cert": str(keys.root / "missing.pem")}})
    shutil.copy(keys.root / "jwks.json", keys.root / "not-a-key.pem")
    with pytest.raises(ConfigError, match=r"\.key: .*not-a-key\.pem is not an unencrypted PEM"):
        await start_server({"tls": {**keys.tls(), "key": str(keys.root / "not-a-key.pem")}})
