"""Each kind of credentials the server accepts, valid and not: bearer tokens from the
tokens file (re-read when it changes), JSON Web Tokens (JWKS or a shared secret;
expired, for another audience, badly signed, of an unknown key), and the verified
client certificate of mutual TLS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from authkit import Keys, channel
from botkit import wait_for
from conftest import RunningServer, StartServer
from cryptography.hazmat.primitives.asymmetric import rsa

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc


async def status(keys: Keys, grid: RunningServer, **presented: Any) -> tuple[str, str]:
    """What GetCapabilities answers to these credentials: ("OK", "") or (code, details)."""
    async with channel(grid.address, keys, **presented) as ch:
        try:
            await re_grpc.CapabilitiesStub(ch).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name=""), timeout=5)
            return "OK", ""
        except grpc.aio.AioRpcError as error:
            return error.code().name, error.details() or ""


@pytest.fixture
async def secured(start_server: StartServer, tmp_path: Path) -> tuple[Keys, RunningServer]:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls(), "auth": keys.auth()})
    return keys, grid


async def test_without_credentials_the_server_says_what_it_accepts(
        secured: tuple[Keys, RunningServer]) -> None:
    keys, grid = secured
    code, details = await status(keys, grid)
    assert code == "UNAUTHENTICATED"
    assert "no credentials" in details and "bearer token" in details
    code, details = await status(keys, grid, token="no-such-token")
    assert (code, "not known to this server" in details) == ("UNAUTHENTICATED", True)


async def test_a_token_of_the_file_authenticates_and_the_file_is_reread(
        secured: tuple[Keys, RunningServer]) -> None:
    keys, grid = secured
    token = keys.token("alice", "read")
    assert await status(keys, grid, token=token) == ("OK", "")
    # Added and revoked in the running server's file, without a restart.
    later = keys.token("bob", "read")

    async def accepted() -> bool:
        return (await status(keys, grid, token=later))[0] == "OK"

    await wait_for(accepted, 10, "the new token to be accepted")
    keys.revoke(token)

    async def revoked() -> bool:
        return (await status(keys, grid, token=token))[0] == "UNAUTHENTICATED"

    await wait_for(revoked, 10, "the revoked token to be refused")
    # A file that no longer parses keeps what it said before.
    (keys.root / "tokens.yaml").write_text("tokens: [this is not: a token entry")
    assert await status(keys, grid, token=later) == ("OK", "")


async def test_json_web_tokens(secured: tuple[Keys, RunningServer]) -> None:
    keys, grid = secured
    assert await status(keys, grid, token=keys.jwt("carol", "read")) == ("OK", "")
    cases = {
        "expired": keys.jwt("carol", "read", lifetime=-3600),
        "another audience": keys.jwt("carol", "read", audience="someone-else"),
        "another issuer": keys.jwt("carol", "read", issuer="https://evil.example"),
        "signature does not verify": keys.jwt(
            "carol", "read", key=rsa.generate_private_key(public_exponent=65537,
                                                          key_size=2048)),
        "no key 'key-9'": keys.jwt("carol", "read", kid="key-9"),
    }
    for reason, token in cases.items():
        code, details = await status(keys, grid, token=token)
        assert code == "UNAUTHENTICATED", (reason, code, details)
        assert reason in details, (reason, details)
    # A valid token whose roles give nothing here is authenticated, then refused.
    code, details = await status(keys, grid, token=keys.jwt("carol", "bot:ci/*"))
    assert code == "PERMISSION_DENIED" and "'carol'" in details


async def test_json_web_tokens_with_a_shared_secret(start_server: StartServer,
                                                    tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls(), "auth": keys.auth(jwt_source="secret")})
    assert await status(keys, grid, token=keys.jwt("dan", "read", algorithm="HS256")) == (
        "OK", "")
    # An RS256 token is not accepted by a server that expects HS256.
    code, _ = await status(keys, grid, token=keys.jwt("dan", "read"))
    assert code == "UNAUTHENTICATED"


async def test_a_client_certificate_names_the_principal(start_server: StartServer,
                                                        tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({
        "tls": keys.tls(client_ca=True),
        "auth": keys.auth(certificates={"bot-*": ["bot"], "admin-*": ["admin"]})})
    bot = keys.client("bot-7")
    assert await status(keys, grid, client=bot) == ("OK", "")  # GetCapabilities: bots may
    async with channel(grid.address, keys, client=bot) as ch:
        session = await bots_pb2_grpc.BotsStub(ch).CreateBotSession(
            bots_pb2.CreateBotSessionRequest(bot_session=bots_pb2.BotSession(bot_id="b7")))
        assert session.name
    # A certificate of the right CA whose name has no grants: authenticated, refused.
    code, details = await status(keys, grid, client=keys.client("mallory"))
    assert code == "PERMISSION_DENIED" and "'mallory'" in details
    # A token works on the same server too (mutual TLS plus a bearer token).
    token = keys.token("erin", "read")
    assert await status(keys, grid, client=keys.client("mallory"), token=token) == ("OK", "")
