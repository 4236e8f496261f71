"""`buildfleet up` as a user runs it: a real process with real bots.

It prints the endpoint and the Bazel flags once its bots are registered, runs
actions on them, restarts a bot that dies, and stops cleanly (bots drained first,
exit 0, no process left behind), even when it is killed itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import grpc
import pytest
import yaml
from botkit import Client, stdout_is
from procutil import run_buildfleet
from sandboxkit import REQUIRED, sandbox_problem
from upprocess import UpProcess, alive, wait_until

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.worker.config import machine_properties

OS_FAMILY = dict(machine_properties())["OSFamily"]


async def _execute(address: str, *arguments: str, instance: str = "") -> re_pb2.ExecuteResponse:
    """Run a command through Execute (uncached); its response."""
    async with grpc.aio.insecure_channel(address) as channel:
        client = Client(channel, instance)
        digest = await client.action(*arguments, platform=[("OSFamily", OS_FAMILY)],
                                     do_not_cache=True)
        return await client.result(client.execute(digest))


def test_up_prints_flags_runs_actions_and_stops_cleanly(tmp_path: Path) -> None:
    # unsandboxed, so that the action can show the test when it is running (a file)
    with UpProcess.start(tmp_path, bots=2, extra_args=["--sandbox", "none"]) as up:
        flags = up.bazel_flags()
        assert f"--remote_executor=grpc://{up.endpoint}" in flags, up.stdout()
        assert f"--remote_default_exec_properties=OSFamily={OS_FAMILY}" in flags, up.stdout()
        assert "build --remote_executor=" in up.stdout()  # the .bazelrc form
        bots = up.bot_pids()
        assert len(bots) == 2, up.report()

        response = asyncio.run(_execute(up.endpoint, "sh", "-c", "echo hello from $0", "bot"))
        assert response.status.code == 0, response
        assert response.result.exit_code == 0, response
        assert stdout_is(response.result, b"hello from bot\n"), response.result
        assert "-bot" in response.result.execution_metadata.worker

        # SIGTERM while an action runs: the bots drain it (the client gets its
        # result), then everything stops, exit 0, no process left.
        marker = tmp_path / "running"

        async def run_through_stop() -> re_pb2.ExecuteResponse:
            task = asyncio.create_task(_execute(
                up.endpoint, "sh", "-c", f"touch {marker}; sleep 1; echo drained"))
            for _ in range(3000):  # the command runs on a bot (at most 30 s)
                if marker.exists() or task.done():
                    break
                await asyncio.sleep(0.01)
            assert marker.exists(), up.report()
            up.send_signal(signal.SIGTERM)
            return await asyncio.wait_for(task, 60)

        response = asyncio.run(run_through_stop())
        assert response.status.code == 0, (response, up.report())
        assert response.result.exit_code == 0, response
        assert stdout_is(response.result, b"drained\n"), response.result
        assert up.wait(60) == 0, up.report()
        assert not any(alive(pid) for pid in bots), up.report()
        assert "stopped" in up.stderr()


def test_ctrl_c_stops_the_grid(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group."""
    with UpProcess.start(tmp_path, bots=2, new_session=True) as up:
        bots = up.bot_pids()
        assert len(bots) == 2, up.report()
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(60) == 0, up.report()
        assert not any(alive(pid) for pid in bots), up.report()
        # The bots were stopped by `up` (one signal each: a clean drain, exit 0).
        assert "SIGTERM again" not in up.bot_logs(), up.bot_logs()
        assert "exited with" not in up.stderr(), up.stderr()


def test_a_bot_that_dies_is_restarted(tmp_path: Path) -> None:
    with UpProcess.start(tmp_path, bots=1) as up:
        (first,) = up.bot_pids()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(up.bot_pids() - {first}) == 1, 30, "a new bot process")
        wait_until(lambda: "restarting it in" in up.stderr(), 10, "the restart being logged")
        assert "was killed by SIGKILL" in up.stderr()
        # The new bot took over (same bot id: it replaced the dead one's session).
        response = asyncio.run(_execute(up.endpoint, "echo", "still working"))
        assert response.result.exit_code == 0, (response, up.report())
        assert up.stop() == 0, up.report()


def test_no_bot_outlives_a_killed_up(tmp_path: Path) -> None:
    with UpProcess.start(tmp_path, bots=2) as up:
        bots = up.bot_pids()
        assert len(bots) == 2, up.report()
        up.process.kill()
        up.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in bots), 30,
                   "the bots of a SIGKILLed `up` exiting")


def test_named_instances_get_their_own_bots_and_flags(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"instances": {
        "": {}, "ci/linux": {}, "cache-only": {"scheduler": {"enabled": False}}}}))
    with UpProcess.start(tmp_path, bots=1, config=config) as up:
        assert len(up.bot_pids()) == 2, up.report()
        flags = up.bazel_flags("ci/linux")
        assert "--remote_instance_name=ci/linux" in flags
        with pytest.raises(AssertionError):
            up.bazel_flags("cache-only")
        response = asyncio.run(_execute(up.endpoint, "echo", "named", instance="ci/linux"))
        assert response.result.exit_code == 0, (response, up.report())
        assert "ci-linux-bot0" in response.result.execution_metadata.worker
        assert up.stop() == 0, up.report()


def test_bad_instance_option_is_refused(tmp_path: Path) -> None:
    up = UpProcess.spawn(tmp_path, bots=1, extra_args=["--instance", "nope"])
    with up:
        assert up.wait(30) != 0
        assert "no such instance" in up.stderr()


def test_up_secure_makes_credentials_once_and_serves_only_with_them(tmp_path: Path) -> None:
    import stat

    from authkit import channel_with

    data = tmp_path / "data"
    with UpProcess.start(tmp_path / "first", bots=1, data_dir=data,
                         extra_args=["--secure"]) as up:
        assert "buildfleet is up: grpcs://" in up.stdout(), up.report()
        flags = up.bazel_flags()
        assert f"--remote_executor=grpcs://{up.endpoint}" in flags, flags
        ca = next(f.split("=", 1)[1] for f in flags if f.startswith("--tls_certificate="))
        header = next(f for f in flags if f.startswith("--remote_header="))
        token = header.split("Bearer ", 1)[1]
        secure = data / "secure"
        for private in ("ca.key", "server.key", "bot.token", "client.token", "admin.token",
                        "tokens.yaml"):
            assert stat.S_IMODE((secure / private).stat().st_mode) == 0o600, private

        ca_pem = Path(ca).read_bytes()

        async def run(presented: str | None, endpoint: str) -> re_pb2.ExecuteResponse:
            async with channel_with(endpoint, ca_pem, presented) as ch:
                client = Client(ch)
                digest = await client.action("echo", "secure", do_not_cache=True,
                                             platform=[("OSFamily", OS_FAMILY)])
                return await client.result(client.execute(digest))

        response = asyncio.run(run(token, up.endpoint))
        assert response.status.code == 0 and response.result.exit_code == 0, response
        page = re.search(r"^the fleet's page: (https://127\.0\.0\.1:\d+/) \(log in with the "
                         r"admin token in (\S+)\)$", up.stdout(), re.MULTILINE)
        assert page is not None, up.stdout()
        assert asyncio.run(_page_after_login(page.group(1), ca,
                                                 Path(page.group(2)).read_text().strip())) == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            asyncio.run(run(None, up.endpoint))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        first_ca = ca_pem
    # A token added by hand to the grid's tokens file.
    added = run_buildfleet("auth", "token", "--principal", "carol", "--grant", "execute",
                           "--tokens-file", str(data / "secure" / "tokens.yaml"),
                           cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    # A second start reuses what the first made, and keeps the added token.
    with UpProcess.start(tmp_path / "second", bots=1, data_dir=data,
                         extra_args=["--secure"]) as again:
        assert (data / "secure" / "ca.pem").read_bytes() == first_ca
        assert any(token in flag for flag in again.bazel_flags())
        response = asyncio.run(run(added.stdout.strip(), again.endpoint))
        assert response.status.code == 0 and response.result.exit_code == 0, response


def test_up_runs_actions_in_the_sandbox_when_it_works(tmp_path: Path) -> None:
    from buildfleet.worker.sandbox import SANDBOX_ROOT

    sandboxed = sandbox_problem() is None
    assert sandboxed or not REQUIRED, sandbox_problem()
    with UpProcess.start(tmp_path, bots=1) as up:
        response = asyncio.run(_execute(up.endpoint, "pwd"))
        assert response.result.exit_code == 0, response
        in_sandbox = stdout_is(response.result, f"{SANDBOX_ROOT}\n".encode())
        assert in_sandbox == sandboxed, up.report()
        if not sandboxed:
            assert "unsandboxed" in up.report()


async def _page_after_login(url: str, ca: str, token: str) -> int:
    """Log in to the page of a secure grid with the admin token: how many bots the
    overview shows (after a redirect to the login page without it)."""
    import ssl

    import aiohttp

    trust = ssl.create_default_context(cafile=ca)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(url, ssl=trust, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"].startswith(
                "/login"), response.status
        async with session.post(url + "login", ssl=trust, data={
                "token": token, "next": "/"}) as response:
            html = await response.text()
            assert response.status == 200, html
        found = re.search(r'<span class="figure bots">(\d+)</span>', html)
        assert found is not None, html
        return int(found.group(1))


def test_up_serves_metrics_and_prints_where(tmp_path: Path) -> None:
    import urllib.request

    with UpProcess.start(tmp_path, bots=2, extra_args=["--sandbox", "none"]) as up:
        match = re.search(r"^metrics: (http://127\.0\.0\.1:\d+/metrics)$", up.stdout(),
                          re.MULTILINE)
        assert match is not None, up.stdout()
        hint = re.search(r"^the fleet: buildfleet (bots list --server grpc://\S+)", up.stdout(),
                         re.MULTILINE)
        assert hint is not None, up.stdout()
        listed = run_buildfleet(*hint.group(1).split(), "--json", cwd=tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert len(json.loads(listed.stdout)["bots"]) == 2

        def connected() -> bool:
            with urllib.request.urlopen(match.group(1), timeout=10) as response:  # noqa: S310
                text = response.read().decode()
            return 'buildfleet_bots_connected{instance=""} 2.0' in text

        wait_until(connected, 20, "both bots in the metrics")
        page = re.search(r"^the fleet's page: (http://127\.0\.0\.1:\d+/)$", up.stdout(),
                         re.MULTILINE)
        assert page is not None, up.stdout()
        with urllib.request.urlopen(page.group(1), timeout=10) as response:  # noqa: S310
            assert '<span class="figure bots">2</span>' in response.read().decode()
