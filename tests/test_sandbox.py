"""Actions in the bubblewrap sandbox, tried as an attacker would: real `buildfleet bot`
processes running real commands that try to leave it.

Skipped, with the reason, where bubblewrap cannot run (outside CI: `.ci/run` installs
it and sets BUILDFLEET_REQUIRE_SANDBOX=1, which turns the skip into a failure).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from botprocess import WAIT, BotProcess, Remote, SpawnBot, grid_server, sessions_of, wait_for
from google.rpc import code_pb2
from sandboxkit import REQUIRED, require_sandbox, sandbox_problem

from buildfleet.worker.sandbox import SANDBOX_ROOT, SandboxConfig, SandboxUnusable, check_bwrap

pytestmark = pytest.mark.skipif(sandbox_problem() is not None and not REQUIRED,
                                reason=f"no sandbox here: {sandbox_problem()}")


@pytest.fixture(autouse=True)
def _sandbox() -> None:
    require_sandbox()  # in CI a sandbox that does not work fails every test here


ENV = {"PATH": "/usr/bin:/bin"}


def _existing(*paths: str) -> list[str]:
    return [path for path in paths if os.path.lexists(path)]


def processes_with(marker: str) -> list[int]:
    """Host pids of the `sleep NMARKER` processes (an argument that is digits ending in
    `marker`: not the shell or bwrap, whose script merely mentions them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as stream:
                cmdline = stream.read()
            with open(f"/proc/{entry}/stat") as stream:
                state = stream.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        arguments = cmdline.split(b"\0")
        if state not in ("Z", "X") and any(
                argument.isdigit() and argument.endswith(marker.encode())
                for argument in arguments):
            found.append(int(entry))
    return found


@pytest.fixture
async def sandboxed(start_server: Any, spawn_bot: SpawnBot) -> Any:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, sandbox="bwrap")
    await bot.registered()
    return server, bot, Remote(server.channel)


async def run_sh(remote: Remote, script: str, **options: Any) -> Any:
    digest = await remote.action("sh", "-c", script, env=options.pop("env", ENV),
                                 do_not_cache=True, **options)
    return await remote.run(digest)


async def stdout_of(remote: Remote, response: Any) -> str:
    return (await remote.blob(response.result.stdout_digest)).decode()


async def stderr_of(remote: Remote, response: Any) -> str:
    return (await remote.blob(response.result.stderr_digest)).decode()


# -- what actions get -------------------------------------------------------------------

async def test_outputs_exit_code_and_exact_environment_in_the_sandbox(sandboxed: Any) -> None:
    _, bot, remote = sandboxed
    digest = await remote.action(
        "sh", "-c", "pwd; echo oops >&2; mkdir -p out; echo data > out/f; "
        "echo top > ../top.txt; exit 3",
        working_directory="w", output_paths=["out", "../top.txt"], env=ENV,
        do_not_cache=True)
    response = await remote.run(digest)
    assert response.status.code == code_pb2.OK, response
    assert response.result.exit_code == 3
    assert await stdout_of(remote, response) == f"{SANDBOX_ROOT}/w\n"
    assert await stderr_of(remote, response) == "oops\n"
    assert [d.path for d in response.result.output_directories] == ["out"]
    assert [f.path for f in response.result.output_files] == ["../top.txt"]
    assert await remote.blob(response.result.output_files[0].digest) == b"top\n"
    assert "sandbox=bwrap" in bot.log()
    # exactly the Command's environment: nothing added by the sandbox (bubblewrap sets
    # PWD), and a PWD of the Command's own is kept
    for env in ({"PATH": "/usr/bin:/bin", "GREETING": "hello world"},
                {"PATH": "/usr/bin:/bin", "PWD": "/somewhere/else"}):
        printed = await remote.run(await remote.action("env", env=env, do_not_cache=True))
        lines = sorted((await stdout_of(remote, printed)).splitlines())
        assert lines == sorted(f"{name}={value}" for name, value in env.items())


async def test_a_missing_program_is_127_and_an_unrunnable_one_126(sandboxed: Any,
                                                                  tmp_path: Path) -> None:
    _, _, remote = sandboxed
    missing = await remote.run(await remote.action("no-such-program", env=ENV,
                                                   do_not_cache=True))
    assert missing.status.code == code_pb2.OK and missing.result.exit_code == 127
    assert "no-such-program" in await stderr_of(remote, missing)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "script").write_text("not executable\n")
    unrunnable = await remote.run(await remote.action("./script", inputs=inputs, env=ENV,
                                                      do_not_cache=True))
    assert unrunnable.result.exit_code == 126


async def test_writes_outside_the_input_root_are_refused(sandboxed: Any) -> None:
    _, _, remote = sandboxed
    marker = f"buildfleet-sandbox-{uuid.uuid4().hex}"
    script = "; ".join(f"(echo x > {target}) 2>/dev/null && echo wrote {target}"
                       for target in (f"/usr/{marker}", f"/etc/{marker}", f"/{marker}",
                                      f"/buildfleet/{marker}"))
    response = await run_sh(remote, f"{script}; echo private > /tmp/{marker}; "
                                    f"cat /tmp/{marker}")
    assert response.result.exit_code == 0
    assert await stdout_of(remote, response) == "private\n"  # not one "wrote"
    written = _existing(f"/usr/{marker}", f"/etc/{marker}", f"/{marker}", f"/tmp/{marker}")
    assert not written, f"written on the host: {written}"


async def test_the_bots_files_home_and_secrets_are_not_visible(start_server: Any,
                                                               spawn_bot: SpawnBot,
                                                               tmp_path: Path) -> None:
    """Even when the bot's directories lie under a path the sandbox shows (here the
    test's whole directory, made visible with --sandbox-path), they are masked."""
    server = await grid_server(start_server)
    home = tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("the bot's secret\n")
    token = tmp_path / "bot.token"
    token.write_text("not-for-actions\n")
    work = tmp_path / "bot-work"
    (tmp_path / "visible.txt").write_text("shared\n")
    bot = spawn_bot(server.address, "--sandbox-path", str(tmp_path), work_dir=work,
                    sandbox="bwrap", env=dict(os.environ, HOME=str(home)))
    await bot.registered()
    remote = Remote(server.channel)
    # a first action fills the bot's input cache
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "input.txt").write_text("cached input\n")
    await remote.run(await remote.action("cat", "input.txt", inputs=inputs, env=ENV))
    assert any((work / "cache").rglob("*")), "the bot's cache is empty"
    probes = {
        "visible": tmp_path / "visible.txt",
        "home": home / "secret.txt",
        "work": work,
        "cache": work / "cache",
        "actions": work / "actions",
        "shadow": Path("/etc/shadow"),
        "ssh": Path("/etc/ssh"),
    }
    script = "; ".join(f"echo {name}: $(ls -A {path} 2>/dev/null | wc -l) "
                       f"$(cat {path} 2>/dev/null | wc -c)"
                       for name, path in probes.items())
    response = await run_sh(remote, script)
    seen = dict(line.split(": ") for line in (await stdout_of(remote, response)).splitlines())
    assert seen["visible"] == "1 7", seen  # the control: the shared path is visible
    for name in ("home", "work", "cache", "actions", "shadow", "ssh"):
        entries, size = seen[name].split()
        # nothing to read: gone, or an empty stand-in (a masked file, an empty directory)
        assert size == "0" and (entries == "0" or name in ("home", "shadow")), \
            f"{name} is visible in the sandbox: {seen}"


# -- network ----------------------------------------------------------------------------

@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server on 127.0.0.1 that records what each connection sends."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, received


def _bash() -> str:
    found = shutil.which("bash", path="/usr/bin:/bin")
    if found is None:
        pytest.skip("bash is needed for /dev/tcp")
    return found


async def test_no_network_unless_asked_for_and_allowed(start_server: Any, spawn_bot: SpawnBot,
                                                       listener: tuple[int, list[bytes]]
                                                       ) -> None:
    port, received = listener
    connect = f"echo hello > /dev/tcp/127.0.0.1/{port} && echo connected"
    server = await grid_server(start_server, **{"unmatched-timeout": 3})
    closed = spawn_bot(server.address, sandbox="bwrap", bot_id="closed")
    await closed.registered()
    remote = Remote(server.channel)
    digest = await remote.action(_bash(), "-c", connect, env=ENV, do_not_cache=True)
    response = await remote.run(digest)
    assert response.result.exit_code != 0
    assert "connected" not in await stdout_of(remote, response)
    assert received == []

    # network=on: no bot advertises it yet, so the action is unmatched ...
    wants = await remote.action(_bash(), "-c", connect, env=ENV, do_not_cache=True,
                                platform={"network": "on"})
    unmatched = await remote.run(wants, timeout=WAIT)
    assert unmatched.status.code == code_pb2.FAILED_PRECONDITION, unmatched
    assert "network" in unmatched.status.message
    assert received == []
    # ... until a bot that allows the network is there
    open_bot = spawn_bot(server.address, "--allow-network", sandbox="bwrap", bot_id="open")
    await open_bot.registered()
    allowed = await remote.run(wants, skip_cache_lookup=True)
    assert allowed.result.exit_code == 0, await stderr_of(remote, allowed)
    assert await stdout_of(remote, allowed) == "connected\n"
    await wait_for(lambda: received == [b"hello\n"], "the connection")
    assert "open" in allowed.result.execution_metadata.worker


# -- nothing outlives its action ---------------------------------------------------------

def _escapers(marker: str) -> str:
    """A script that leaves a setsid'd process and a double-forked one behind, each with
    `marker` in its command line, then waits forever."""
    return (f"setsid sleep 7{marker} & (sleep 8{marker} &) ; "
            f"echo started; exec sleep 9{marker}")


async def test_setsid_and_double_forked_children_die_at_the_timeout(sandboxed: Any) -> None:
    _, _, remote = sandboxed
    marker = str(uuid.uuid4().int % 10**9)
    digest = await remote.action("sh", "-c", _escapers(marker), env=ENV, timeout=3.0,
                                 do_not_cache=True)
    call = asyncio.ensure_future(remote.run(digest))
    await wait_for(lambda: len(processes_with(marker)) == 3, "the three processes to start")
    response = await call
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED, response
    await wait_for(lambda: not processes_with(marker), "every process of the action to die",
                   5)


async def test_setsid_and_double_forked_children_die_at_cancellation(sandboxed: Any) -> None:
    _, bot, remote = sandboxed
    marker = str(uuid.uuid4().int % 10**9)
    digest = await remote.action("sh", "-c", _escapers(marker), env=ENV, do_not_cache=True)
    call = remote.execute(digest)
    operation = await remote.client.first_operation(call)
    await wait_for(lambda: len(processes_with(marker)) == 3, "the three processes to start")
    await remote.cancel(operation.name)
    await wait_for(lambda: not processes_with(marker), "every process of the action to die",
                   10)
    call.cancel()
    await bot.wait_log("withdrawn")


async def test_processes_die_with_the_bot(sandboxed: Any) -> None:
    _, bot, remote = sandboxed
    marker = str(uuid.uuid4().int % 10**9)
    digest = await remote.action("sh", "-c", _escapers(marker), env=ENV, do_not_cache=True)
    call = remote.execute(digest)
    await remote.client.first_operation(call)
    await wait_for(lambda: len(processes_with(marker)) == 3, "the three processes to start")
    bot.kill()  # SIGKILL: no chance to clean up
    await wait_for(lambda: not processes_with(marker), "every process of the action to die",
                   10)
    call.cancel()


# -- choosing the sandbox -----------------------------------------------------------------

async def test_the_default_is_the_bwrap_sandbox(start_server: Any, spawn_bot: SpawnBot,
                                                tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = BotProcess(["--server", f"grpc://{server.address}", "--bot-id", "default",
                      "--work-dir", str(tmp_path / "default")], tmp_path / "default.log",
                     "default", tmp_path / "default")
    try:
        await bot.registered()
        session = await wait_for(lambda: sessions_of(server).get("default"), "the session")
        assert ("sandbox", "bwrap") in session.properties
        assert ("network", "on") not in session.properties
    finally:
        bot.kill()


def _fake_bwrap(directory: Path, script: str) -> dict[str, str]:
    directory.mkdir()
    fake = directory / "bwrap"
    fake.write_text(f"#!/bin/sh\n{script}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return dict(os.environ, PATH=f"{directory}:/usr/bin:/bin")


@pytest.mark.parametrize(("script", "expected"), [
    (None, "apt-get install bubblewrap"),
    ("echo 'bwrap: No permissions to creating new namespace, likely because the kernel "
     "does not allow non-privileged user namespaces.' >&2; exit 1",
     "kernel.unprivileged_userns_clone"),
])
async def test_an_unusable_sandbox_stops_the_bot_saying_how_to_fix_it(
        start_server: Any, spawn_bot: SpawnBot, tmp_path: Path, script: str | None,
        expected: str) -> None:
    server = await grid_server(start_server)
    env = (dict(os.environ, PATH=str(tmp_path / "empty")) if script is None
           else _fake_bwrap(tmp_path / "fake", script))
    bot = spawn_bot(server.address, sandbox="bwrap", env=env)
    assert await bot.exit_code() != 0
    log = bot.log()
    assert expected in log and "--sandbox none" in log, log


def test_the_sandbox_check_runs_a_real_command(tmp_path: Path) -> None:
    """A bwrap that answers but runs nothing is not taken for a working sandbox."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    with pytest.raises(SandboxUnusable, match="cannot run a sandboxed command"):
        check_bwrap(SandboxConfig(bwrap=str(fake)))


# -- whole-system actions (--sandbox chroot) -----------------------------------------------

def minimal_system(root: Path, programs: dict[str, str]) -> None:
    """A tiny system under `root`: the host's `programs` (path inside -> host path) with
    the shared libraries they load (from ldd)."""
    import subprocess

    for inside, host in programs.items():
        target = root / inside.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(host), target)
        libraries = subprocess.run(["ldd", host], capture_output=True, text=True).stdout
        for line in libraries.splitlines():
            path = line.split("=>")[-1].split("(")[0].strip()
            if path.startswith("/"):
                copy = root / path.lstrip("/")
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(os.path.realpath(path), copy)


async def test_chroot_runs_the_input_root_as_the_whole_system(start_server: Any,
                                                              spawn_bot: SpawnBot,
                                                              tmp_path: Path) -> None:
    """As BuildStream's actions: a system image as the input root, `sh` from it, a deep
    working directory, and outputs named from there up to the install root."""
    if shutil.which("ldd") is None:
        pytest.skip("ldd is needed to copy a shell and its libraries")
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, sandbox="chroot")
    await bot.registered()
    remote = Remote(server.channel)
    system = tmp_path / "system"
    minimal_system(system, {"/bin/sh": "/bin/sh", "/bin/mkdir": "/bin/mkdir",
                            "/usr/bin/env": "/usr/bin/env"})
    (system / "etc").mkdir()
    (system / "etc" / "os-release").write_text("ID=buildfleet-test\n")
    digest = await remote.action(
        "/bin/sh", "-c",
        'mkdir -p ../../../install; read id < /etc/os-release; echo "$id" > ../../../install/os; '
        "echo / /* > ../../../install/listing; echo $(pwd) > ../../../install/pwd; "
        "echo tmp > /tmp/t && echo written > ../../../install/tmp",
        inputs=system, working_directory="build/deep/dir",
        output_paths=["../../../install"], env={"PATH": "/bin:/usr/bin"}, do_not_cache=True)
    response = await remote.run(digest)
    assert response.status.code == code_pb2.OK, response
    assert response.result.exit_code == 0, await stderr_of(remote, response)
    (install,) = response.result.output_directories
    assert install.path == "../../../install"
    tree = await remote.tree(install.tree_digest)
    files = {f.name: await remote.blob(f.digest) for f in tree.root.files}
    assert files["os"] == b"ID=buildfleet-test\n"  # its own /etc, not the host's
    listing = files["listing"].decode().split()
    assert "/usr" in listing and "/bin" in listing and "/build" in listing
    assert "/home" not in listing and "/root" not in listing  # nothing of the host
    assert files["pwd"] == b"/build/deep/dir\n"
    assert files["tmp"] == b"written\n"
    assert "sandbox=chroot" in bot.log()


# -- limits --------------------------------------------------------------------------------

async def limited_bot(start_server: Any, spawn_bot: SpawnBot, *options: str
                      ) -> tuple[Any, Remote]:
    """A sandboxed bot started with `options`, that has cgroups for its actions (the
    test is skipped where it cannot: resource limits do not say which was hit)."""
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, *options, sandbox="bwrap")
    await bot.registered()
    if "enforced by cgroups" not in bot.log():
        if REQUIRED:
            pytest.fail(f"the bot has no cgroups for its actions:\n{bot.log()}")
        pytest.skip("no cgroups for actions here: resource limits do not say which was hit")
    return bot, Remote(server.channel)


async def check_hit(remote: Remote, response: Any, limit: str) -> None:
    """The action failed for its limit, saying which, with its result."""
    assert response.status.code == code_pb2.RESOURCE_EXHAUSTED, response
    assert limit in response.status.message, response.status.message
    assert "survived" not in await stdout_of(remote, response)


EAT_MEMORY = 'x=$(head -c 300000000 /dev/zero | tr "\\0" a); echo survived ${#x}'
FORK_MANY = "for i in $(seq 60); do sleep 30 & done; wait; echo survived"


@pytest.mark.parametrize("source", ["bot option", "platform property"])
async def test_an_action_over_its_memory_limit_fails_saying_so(start_server: Any,
                                                               spawn_bot: SpawnBot,
                                                               source: str) -> None:
    options = ["--memory-limit", "64MiB"] if source == "bot option" else []
    bot, remote = await limited_bot(start_server, spawn_bot, *options)
    platform = {"memory": "64MiB"} if source == "platform property" else None
    # the hint `memory` does not keep the action from matching the bot
    await check_hit(remote, await run_sh(remote, EAT_MEMORY, platform=platform),
                    "memory limit of 64 MiB")
    assert len(bot.lease_lines()) == 1  # the action's own doing: not retried
    # a smaller action on the same bot is fine
    fine = await run_sh(remote, "x=$(head -c 1000000 /dev/zero | tr '\\0' a); echo ${#x}",
                        platform=platform)
    assert fine.status.code == code_pb2.OK and fine.result.exit_code == 0


async def test_an_action_over_its_process_limit_fails_saying_so(start_server: Any,
                                                                spawn_bot: SpawnBot) -> None:
    bot, remote = await limited_bot(start_server, spawn_bot, "--pids-limit", "64")
    response = await run_sh(remote, FORK_MANY, platform={"pids": "20"})
    await check_hit(remote, response, "limit of 20 processes")
    assert response.result.exit_code != 0
    assert len(bot.lease_lines()) == 1


async def test_an_action_cannot_raise_the_bots_limit(start_server: Any,
                                                     spawn_bot: SpawnBot) -> None:
    _, remote = await limited_bot(start_server, spawn_bot, "--memory-limit", "64MiB")
    await check_hit(remote, await run_sh(remote, EAT_MEMORY, platform={"memory": "8GiB"}),
                    "memory limit of 64 MiB")


async def test_a_malformed_limit_is_invalid_argument(sandboxed: Any) -> None:
    _, _, remote = sandboxed
    response = await run_sh(remote, "true", platform={"memory": "lots"})
    assert response.status.code == code_pb2.INVALID_ARGUMENT, response
    assert "memory" in response.status.message
