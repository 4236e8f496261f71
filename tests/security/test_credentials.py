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


async def test_the_token_command_adds_a_token_a_running_server_accepts(
        start_server: StartServer, tmp_path: Path) -> None:
    from procutil import run_buildfleet

    keys = Keys(tmp_path / "keys")
    old = keys.token("grace", "read")
    grid = await start_server({"tls": keys.tls(), "auth": keys.auth()})
    done = run_buildfleet("auth", "token", "--principal", "frank", "--grant", "read",
                          "--tokens-file", str(keys.root / "tokens.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()

    async def accepted() -> bool:
        return await status(keys, grid, token=token) == ("OK", "")

    await wait_for(accepted, 10, "the new token to be accepted")
    assert (keys.root / "tokens.yaml").stat().st_mode & 0o077 == 0
    # The token already in the file still works: the command only adds.
    assert await status(keys, grid, token=old) == ("OK", "")


def test_the_token_command_keeps_the_file_and_leaves_a_broken_one_alone(
        tmp_path: Path) -> None:
    from procutil import run_buildfleet

    from buildfleet.auth.tokens import parse

    tokens = tmp_path / "tokens.yaml"
    first = run_buildfleet("auth", "token", "--principal", "a", "--grant", "execute:ci/*",
                           "--tokens-file", str(tokens), cwd=tmp_path)
    second = run_buildfleet("auth", "token", "--principal", "b", "--grant", "bot",
                            "--tokens-file", str(tokens), cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, (first.stderr, second.stderr)
    table = parse(tokens.read_bytes())
    assert sorted(p.name for p in table.values()) == ["a", "b"]
    tokens.write_text("tokens: [{sha256: nope, principal: x}]\n")
    broken = tokens.read_bytes()
    refused = run_buildfleet("auth", "token", "--principal", "c", "--tokens-file",
                             str(tokens), cwd=tmp_path)
    assert refused.returncode != 0 and "not changed" in refused.stderr, refused.stderr
    assert tokens.read_bytes() == broken
    bad_role = run_buildfleet("auth", "token", "--principal", "c", "--grant", "root",
                              cwd=tmp_path)
    assert bad_role.returncode != 0 and "must be one of" in bad_role.stderr
