"""Secure by default: `buildfleet serve` on an address other machines can reach, with
no authentication, refuses to start (and says how to configure it) unless told
`--insecure`; on loopback it works with no setup.  `buildfleet bot` reaches a
secure grid with its own TLS and token options.  Refusals are audited without
flooding the log."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
import yaml
from authkit import Keys, channel
from conftest import StartServer
from procutil import ServeProcess, run_buildfleet

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.auth.audit import Audit
from buildfleet.config import ConfigError


def test_a_reachable_server_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    done = run_buildfleet("serve", "--listen", "0.0.0.0:0", "--data-dir", str(tmp_path / "d"),
                          cwd=tmp_path, timeout=60)
    assert done.returncode != 0
    message = done.stderr
    assert "refusing to serve 0.0.0.0:0 without authentication" in message
    assert "--insecure" in message and "auth" in message
    assert "Traceback" not in message


def test_insecure_on_purpose_and_loopback_start(tmp_path: Path) -> None:
    for listen, extra in (("0.0.0.0:0", ["--insecure"]), ("127.0.0.1:0", [])):
        server = ServeProcess.start(tmp_path / listen.replace(":", "_"), listen=(listen,),
                                    data_dir=tmp_path / f"data-{len(extra)}",
                                    extra_args=extra)
        try:
            assert server.addresses
        finally:
            server.kill()


async def test_a_configured_grid_may_listen_everywhere(start_server: StartServer,
                                                       tmp_path: Path) -> None:
    keys = Keys(tmp_path / "keys")
    grid = await start_server({"listen": ["0.0.0.0:0"], "tls": keys.tls(),
                               "auth": keys.auth()})
    token = keys.token("alice", "read")
    async with channel(grid.address, keys, token=token) as ch:
        await re_grpc.CapabilitiesStub(ch).GetCapabilities(re_pb2.GetCapabilitiesRequest())
    with pytest.raises(ConfigError, match="refusing to serve"):
        await start_server({"listen": ["0.0.0.0:0"]})


async def test_the_bot_runs_actions_on_a_secure_grid(start_server: StartServer,
                                                     tmp_path: Path) -> None:
    from botkit import Client

    keys = Keys(tmp_path / "keys")
    grid = await start_server({"tls": keys.tls(client_ca=True), "auth": keys.auth()})
    bot_token = keys.root / "bot.token"
    bot_token.write_text(keys.token("bot-1", "bot") + "\n")
    client_cert = keys.client("bot-1")
    client_cert.write(keys.root / "bot.pem", keys.root / "bot.key")
    args = ["bot", "--server", f"grpcs://localhost:{grid.address.rsplit(':', 1)[1]}",
            "--tls-ca", str(keys.root / "ca.pem"), "--client-cert", str(keys.root / "bot.pem"),
            "--client-key", str(keys.root / "bot.key"), "--token-file", str(bot_token),
            "--work-dir", str(tmp_path / "bot"), "--poll-timeout", "5"]
    from procutil import buildfleet_command

    process = await asyncio.create_subprocess_exec(
        *buildfleet_command(*args), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE)
    try:
        token = keys.token("alice", "execute")
        async with channel(grid.address, keys, token=token,
                           client=keys.client("alice")) as ch:
            client = Client(ch)
            response = await asyncio.wait_for(
                client.result(client.execute(await client.action("echo", "secured"))), 60)
            assert response.status.code == 0 and response.result.exit_code == 0
    finally:
        process.terminate()
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert b"Traceback" not in stderr, stderr.decode()


def test_bad_bot_credentials_are_named(tmp_path: Path) -> None:
    done = run_buildfleet("bot", "--server", "grpcs://localhost:1", "--token-file",
                          str(tmp_path / "nope"), cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "--token-file" in done.stderr
    (tmp_path / "cert.pem").write_text("x")
    done = run_buildfleet("bot", "--server", "grpcs://localhost:1", "--client-cert",
                          str(tmp_path / "cert.pem"), cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "--client-key" in done.stderr


def test_refusals_are_logged_once_per_window(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    audit = Audit(window=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="buildfleet.audit"):
        for _ in range(1000):
            audit.refused("principal 'bob'", "needs read", "/x/Y", "ipv4:1.2.3.4:5")
        audit.refused("principal 'eve'", "needs read", "/x/Y", "ipv4:1.2.3.4:6")
        now[0] = 61
        audit.refused("principal 'bob'", "needs read", "/x/Y", "ipv4:1.2.3.4:5")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert "999 more like it" in lines[2]


def test_config_names_unreadable_auth_files(tmp_path: Path) -> None:
    config = tmp_path / "grid.yaml"
    config.write_text(yaml.safe_dump({"auth": {"tokens-file": str(tmp_path / "missing.yaml")}}))
    done = run_buildfleet("serve", "--config", str(config), "--data-dir", str(tmp_path / "d"),
                          "--listen", "127.0.0.1:0", cwd=tmp_path, timeout=60)
    assert done.returncode != 0 and "auth.tokens-file" in done.stderr, done.stderr
