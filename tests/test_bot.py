"""`buildfleet bot` as operators run it: real bot processes against a real server.

Each test starts a server (in-process through the `start_server` fixture, or as a
`buildfleet serve` process when it must be killed and restarted), one or more
``python -m buildfleet bot`` processes, and runs real commands through the
Execution service.  Waits are bounded polls on observable conditions (files the
commands write, the bot's log, the server's session table), never bare sleeps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from botkit import Client
from botprocess import (
    SERVER_CONFIG,
    WAIT,
    BotProcess,
    Remote,
    SpawnBot,
    grid_server,
    pid_alive,
    read_pid,
    sessions_of,
    wait_for,
)
from google.rpc import code_pb2
from procutil import ServeProcess

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.devtools.remoteworkers.v1test2 import bots_pb2, bots_pb2_grpc
from buildfleet.client.cas import proto_digest
from buildfleet.digest import Digest
from buildfleet.scheduler.model import BotStatus
from buildfleet.worker.config import machine_properties


def status_of(server: Any, bot_id: str) -> BotStatus | None:
    """The status of the bot's live session, as the server has it now."""
    session = sessions_of(server).get(bot_id)
    return None if session is None else session.status


def check_metadata(result: re_pb2.ActionResult, bot_id: str) -> None:
    metadata = result.execution_metadata
    assert metadata.worker == bot_id
    order = ["queued_timestamp", "worker_start_timestamp", "input_fetch_start_timestamp",
             "input_fetch_completed_timestamp", "execution_start_timestamp",
             "execution_completed_timestamp", "output_upload_start_timestamp",
             "output_upload_completed_timestamp", "worker_completed_timestamp"]
    stamps = []
    for name in order:
        assert metadata.HasField(name), name  # type: ignore[arg-type]
        stamps.append(getattr(metadata, name).ToNanoseconds())
    assert stamps == sorted(stamps), list(zip(order, stamps, strict=True))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- registration ---------------------------------------------------------------------

async def test_bot_registers_with_properties_capacity_and_device(start_server: Any,
                                                                 spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--concurrency", "3", "--property", "pool=big",
                    "--property", "OSFamily=linux")
    await bot.registered()
    session = await wait_for(lambda: sessions_of(server).get(bot.bot_id), "the session")
    expected = {("pool", "big"), ("OSFamily", "linux"), ("sandbox", "none"),
                *[(k, v) for k, v in machine_properties() if k == "ISA"]}
    assert set(session.properties) == expected
    assert session.capacity == 3
    assert session.status == BotStatus.OK
    from buildfleet._proto.google.devtools.remoteworkers.v1test2 import worker_pb2
    worker = worker_pb2.Worker()
    worker.ParseFromString(session.worker)
    assert [d.handle for d in worker.devices] == [bot.bot_id]
    assert {(p.key, p.value) for p in worker.devices[0].properties} == expected
    assert {(c.key, c.value) for c in worker.configs} == {("capacity", "3")}


async def test_default_bot_id_and_properties(start_server: Any, spawn_bot: SpawnBot,
                                             tmp_path: Path) -> None:
    server = await grid_server(start_server)
    env_bot = BotProcess(["--server", f"grpc://{server.address}", "--work-dir",
                          str(tmp_path / "defaults"), "--sandbox", "none"],
                         tmp_path / "defaults.log", "", tmp_path)
    try:
        await env_bot.registered()
        session = await wait_for(lambda: next(iter(sessions_of(server).values()), None),
                                 "the session")
        assert session.bot_id.startswith(socket.gethostname() + "-")
        assert set(session.properties) == {*machine_properties(), ("sandbox", "none")}
        assert ("OSFamily", "linux") in session.properties
    finally:
        env_bot.kill()


async def test_unknown_instance_stops_the_bot(start_server: Any, spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--instance", "no-such-instance")
    assert await bot.exit_code() != 0
    assert "no-such-instance" in bot.log()


# -- running commands -------------------------------------------------------------------

def make_inputs(base: Path) -> Path:
    """An input tree several directories deep with an executable and symlinks."""
    root = base / "inputs"
    tool_dir = root / "src" / "lib" / "tools"
    tool_dir.mkdir(parents=True)
    (tool_dir / "gen.sh").write_text(
        "#!/bin/sh\nset -e\nmkdir -p out/dir/nested\n"
        "cat src/lib/data.txt > out/file.txt\n"
        "echo nested > out/dir/nested/n.txt\n"
        "cp src/lib/tools/gen.sh out/dir/exe.sh\n"
        "ln -s nested/n.txt out/dir/rel-link\n"
        "ln -s ../src/lib/data.txt out/link\n"
        "echo generated\n")
    (tool_dir / "gen.sh").chmod(0o755)
    (root / "src" / "lib" / "data.txt").write_text("the data\n")
    (root / "src" / "lib" / "plain.txt").write_text("not executable\n")
    os.symlink("lib/data.txt", root / "src" / "data-link")
    os.symlink("src/lib/tools", root / "tools-link")
    (root / "empty-dir").mkdir()
    return root


async def test_deep_inputs_executables_symlinks_and_output_paths(
        start_server: Any, spawn_bot: SpawnBot, tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address)
    remote = Remote(server.channel)
    script = (
        "set -e; test -x src/lib/tools/gen.sh; test ! -x src/lib/plain.txt; "
        "test -L src/data-link; test \"$(cat src/data-link)\" = 'the data'; "
        "test -x tools-link/gen.sh; test -d empty-dir; test -d out; "
        "src/lib/tools/gen.sh")
    digest = await remote.action(
        "sh", "-c", script, inputs=make_inputs(tmp_path),
        output_paths=["out/file.txt", "out/dir", "out/link", "out/absent"])
    response = await remote.run(digest)
    assert response.status.code == 0, response
    result = response.result
    assert result.exit_code == 0, await remote.blob(result.stderr_digest)
    assert await remote.blob(result.stdout_digest) == b"generated\n"
    assert [f.path for f in result.output_files] == ["out/file.txt"]
    assert await remote.blob(result.output_files[0].digest) == b"the data\n"
    assert [(s.path, s.target) for s in result.output_symlinks] == [
        ("out/link", "../src/lib/data.txt")]
    assert not result.output_file_symlinks and not result.output_directory_symlinks
    (directory,) = result.output_directories
    assert directory.path == "out/dir" and directory.is_topologically_sorted
    tree = await remote.tree(directory.tree_digest)
    assert [(f.name, f.is_executable) for f in tree.root.files] == [("exe.sh", True)]
    assert [(s.name, s.target) for s in tree.root.symlinks] == [("rel-link", "nested/n.txt")]
    assert [d.name for d in tree.root.directories] == ["nested"]
    (nested,) = tree.children
    assert await remote.blob(nested.files[0].digest) == b"nested\n"
    check_metadata(result, bot.bot_id)
    (line,) = bot.lease_lines()
    assert Digest.of(b"").hash not in line and str(digest) in line and "exit code 0" in line
    # The action's directory goes (right after the report); nothing else is left.
    await wait_for(lambda: not any((bot.work_dir / "actions").iterdir()),
                   "the action's directory to be removed")


async def test_legacy_output_fields_working_directory_and_environment(
        start_server: Any, spawn_bot: SpawnBot, tmp_path: Path) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address)
    remote = Remote(server.channel)
    inputs = tmp_path / "in"
    (inputs / "work" / "sub").mkdir(parents=True)
    (inputs / "work" / "sub" / "x").write_text("x")
    # No mkdir in the command: the bot creates the parents of declared outputs.
    script = ("set -e; pwd > gen/pwd.txt; printf %s \"$GREETING\" > gen/a.txt; "
              "ln -s a.txt gen/sym; mkdir -p gendir/deep; echo d > gendir/deep/f; "
              "ln -s gendir dlink; test -z \"$HOME\"")
    digest = await remote.action(
        "/bin/sh", "-c", script, inputs=inputs, working_directory="work/sub",
        output_files=["gen/a.txt", "gen/sym", "gen/pwd.txt", "gen/never"],
        output_directories=["gendir", "dlink", "nested/absent"],
        env={"GREETING": "hello there", "PATH": "/usr/bin:/bin"})
    response = await remote.run(digest)
    result = response.result
    assert result.exit_code == 0, await remote.blob(result.stderr_digest)
    assert [f.path for f in result.output_files] == ["gen/a.txt", "gen/pwd.txt"]
    assert await remote.blob(result.output_files[0].digest) == b"hello there"
    pwd = (await remote.blob(result.output_files[1].digest)).decode().strip()
    assert pwd.endswith("/root/work/sub")
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("gen/sym", "a.txt")]
    assert [(s.path, s.target) for s in result.output_directory_symlinks] == [
        ("dlink", "gendir")]
    assert not result.output_symlinks
    assert [d.path for d in result.output_directories] == ["gendir"]
    tree = await remote.tree(result.output_directories[0].tree_digest)
    assert [d.name for d in tree.root.directories] == ["deep"]


async def test_output_directory_format_directory_only(start_server: Any, spawn_bot: SpawnBot
                                                      ) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address)
    remote = Remote(server.channel)
    digest = await remote.action("sh", "-c", "mkdir -p d/e && echo 1 > d/e/f",
                                 output_paths=["d"], output_directory_format=2)
    result = (await remote.run(digest)).result
    (directory,) = result.output_directories
    assert directory.HasField("tree_digest") and directory.HasField("root_directory_digest")
    root = re_pb2.Directory()
    root.ParseFromString(await remote.blob(directory.root_directory_digest))
    assert [d.name for d in root.directories] == ["e"]


async def test_nonzero_exit_is_completed_with_the_exit_code_and_not_cached(
        start_server: Any, spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address)
    remote = Remote(server.channel)
    digest = await remote.action("sh", "-c", "echo oops >&2; exit 7")
    response = await remote.run(digest)
    assert response.status.code == 0
    assert response.result.exit_code == 7
    assert await remote.blob(response.result.stderr_digest) == b"oops\n"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await server.action_cache.GetActionResult(
            re_pb2.GetActionResultRequest(action_digest=proto_digest(digest)))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    # A command that cannot be started at all is reported as a shell would: 127.
    missing = await remote.action("/no/such/program")
    response = await remote.run(missing)
    assert response.status.code == 0 and response.result.exit_code == 127
    assert b"/no/such/program" in await remote.blob(response.result.stderr_digest)


async def test_timeout_kills_the_whole_process_group(start_server: Any, spawn_bot: SpawnBot,
                                                     tmp_path: Path) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address)
    remote = Remote(server.channel)
    pid_file = tmp_path / "grandchild.pid"
    digest = await remote.action(
        "sh", "-c", f"echo partial; sleep 1000 & echo $! > {pid_file}; wait", timeout=1.0,
        do_not_cache=True)
    response = await remote.run(digest)
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED, response
    assert "timeout" in response.status.message
    assert await remote.blob(response.result.stdout_digest) == b"partial\n"
    assert response.result.exit_code == 128 + signal.SIGKILL
    grandchild = read_pid(pid_file)
    assert grandchild is not None
    await wait_for(lambda: not pid_alive(grandchild), "the grandchild to be killed", 5)


async def test_cancellation_kills_the_running_command(start_server: Any, spawn_bot: SpawnBot,
                                                      tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address)
    remote = Remote(server.channel)
    child_file, grandchild_file = tmp_path / "child.pid", tmp_path / "grandchild.pid"
    digest = await remote.action(
        "sh", "-c", f"echo $$ > {child_file}; sleep 1000 & echo $! > {grandchild_file}; wait",
        do_not_cache=True)
    call = remote.execute(digest)
    operation = await remote.client.first_operation(call)
    child = await wait_for(lambda: read_pid(child_file), "the command to start")
    grandchild = await wait_for(lambda: read_pid(grandchild_file), "the grandchild to start")
    await remote.cancel(operation.name)
    await wait_for(lambda: not pid_alive(child) and not pid_alive(grandchild),
                   "the command to be killed", 10)
    call.cancel()
    await bot.wait_log("withdrawn")
    # The bot is free again and runs the next action.
    response = await remote.run(await remote.action("echo", "next"))
    assert response.result.exit_code == 0


async def test_concurrency_four_runs_four_actions_at_once(start_server: Any,
                                                          spawn_bot: SpawnBot,
                                                          tmp_path: Path) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address, "--concurrency", "4")
    remote = Remote(server.channel)
    markers = tmp_path / "markers"
    markers.mkdir()
    # Each action announces itself, then waits (bounded) until all four have started:
    # they can only all succeed if they ran at the same time.
    script = (f"touch {markers}/$ID; i=0; while [ $(ls {markers} | wc -l) -lt 4 ]; do "
              "i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done")
    digests = [await remote.action("sh", "-c", script,
                                   env={"ID": str(n), "PATH": os.environ["PATH"]})
               for n in range(4)]
    responses = await asyncio.gather(*(remote.run(d) for d in digests))
    assert [r.result.exit_code for r in responses] == [0, 0, 0, 0]
    metadata = [r.result.execution_metadata for r in responses]
    latest_start = max(m.execution_start_timestamp.ToNanoseconds() for m in metadata)
    earliest_end = min(m.execution_completed_timestamp.ToNanoseconds() for m in metadata)
    assert latest_start < earliest_end


async def test_local_cache_is_hit_on_the_second_run(start_server: Any, spawn_bot: SpawnBot,
                                                    tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address)
    remote = Remote(server.channel)
    inputs = tmp_path / "cached-inputs"
    (inputs / "a" / "b").mkdir(parents=True)
    for index in range(5):
        (inputs / "a" / "b" / f"f{index}").write_bytes(os.urandom(1000 + index))
    (inputs / "big").write_bytes(os.urandom(5 * 1024 * 1024))  # above the batch limit
    digest = await remote.action("sh", "-c", "cat a/b/f* big | wc -c", inputs=inputs)
    first = await remote.run(digest)
    second = await remote.run(digest, skip_cache_lookup=True)
    assert first.result.exit_code == 0 and second.result.exit_code == 0
    assert await remote.blob(second.result.stdout_digest) == \
        await remote.blob(first.result.stdout_digest)
    lines = await bot.wait_log(r" lease .* action ", 2)
    assert "cache hits 0, misses 6" in lines[0]
    assert "cache hits 6, misses 0, 0 bytes downloaded" in lines[1]


async def test_missing_input_is_failed_precondition(start_server: Any, spawn_bot: SpawnBot
                                                    ) -> None:
    server = await grid_server(start_server)
    spawn_bot(server.address)
    remote = Remote(server.channel)
    absent = Digest.of(b"never uploaded")
    directory = re_pb2.Directory()
    directory.files.add(name="gone.txt", digest=proto_digest(absent))
    root = await remote.cas.upload_message(directory)
    digest = await remote.action("cat", "gone.txt", root_digest=root)
    response = await remote.run(digest)
    assert response.status.code == code_pb2.FAILED_PRECONDITION, response
    assert absent.hash in response.status.message


async def test_pending_leases_with_digest_payloads(start_server: Any, spawn_bot: SpawnBot
                                                   ) -> None:
    server = await grid_server(start_server, **{"lease-offer": "pending"})
    spawn_bot(server.address)
    remote = Remote(server.channel)
    response = await remote.run(await remote.action("sh", "-c", "echo pending-ok"))
    assert response.result.exit_code == 0
    assert await remote.blob(response.result.stdout_digest) == b"pending-ok\n"


# -- unsafe trees ------------------------------------------------------------------------

async def test_unsafe_input_trees_and_outputs_are_refused(start_server: Any,
                                                          spawn_bot: SpawnBot,
                                                          tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address)
    remote = Remote(server.channel)
    content = await remote.cas.upload_blob(b"x")
    empty = await remote.cas.upload_message(re_pb2.Directory())
    marker = tmp_path / "ran"

    def directory(files: Iterable[str] = (), dirs: Iterable[str] = (),
                  links: dict[str, str] | None = None) -> re_pb2.Directory:
        message = re_pb2.Directory()
        for name in files:
            message.files.add(name=name, digest=proto_digest(content))
        for name in dirs:
            message.directories.add(name=name, digest=proto_digest(empty))
        for name, target in (links or {}).items():
            message.symlinks.add(name=name, target=target)
        return message

    cases = {
        "slash": directory(files=["a/b"]),
        "dot": directory(files=["."]),
        "dotdot": directory(dirs=[".."]),
        "empty": directory(files=[""]),
        "absolute": directory(files=["/etc/passwd"]),
        "duplicate": directory(files=["x"], dirs=["x"]),
        "absolute-link": directory(links={"l": "/etc/passwd"}),
        "escaping-link": directory(links={"l": "../../outside"}),
    }
    for case, root in cases.items():
        root_digest = await remote.cas.upload_message(root)
        digest = await remote.action("sh", "-c", f"touch {marker}", root_digest=root_digest,
                                     salt=case.encode())
        response = await remote.run(digest)
        assert response.status.code == code_pb2.INVALID_ARGUMENT, (case, response)
        assert "input tree" in response.status.message, case
    for outputs in ({"output_paths": ["../escape"]}, {"output_files": ["/abs/file"]},
                    {"output_directories": ["a/../../up"]}):
        digest = await remote.action("sh", "-c", f"touch {marker}", **outputs)  # type: ignore[arg-type]
        response = await remote.run(digest)
        assert response.status.code == code_pb2.INVALID_ARGUMENT, (outputs, response)
    assert not marker.exists()
    await wait_for(lambda: not any((bot.work_dir / "actions").iterdir()),
                   "the actions' directories to be removed")


# -- sessions: restarts, lost sessions, stopping --------------------------------------------

async def test_server_restart_while_running_delivers_the_result(spawn_bot: SpawnBot,
                                                                tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = tmp_path / "server.yaml"
    import yaml
    config.write_text(yaml.safe_dump(SERVER_CONFIG))
    listen = [f"127.0.0.1:{port}"]
    server = ServeProcess.start(tmp_path / "srv", data_dir=data, listen=listen, config=config)
    try:
        bot = spawn_bot(server.address)
        await bot.registered()
        go, started, finished = tmp_path / "go", tmp_path / "started", tmp_path / "finished"
        channel = grpc.aio.insecure_channel(server.address)
        remote = Remote(channel)
        digest = await remote.action(
            "sh", "-c", f"touch {started}; while [ ! -f {go} ]; do sleep 0.02; done; "
            f"echo survived; touch {finished}")
        call = remote.execute(digest)
        operation = await remote.client.first_operation(call)
        await wait_for(started.exists, "the command to start")
        server.process.kill()  # SIGKILL: no goodbye to anyone
        server.wait(10)
        call.cancel()
        go.touch()
        await wait_for(finished.exists, "the command to finish")  # while the server is down
        await bot.wait_log("UpdateBotSession failed")
        await bot.wait_log("uploading outputs: CAS unreachable")
        server = ServeProcess.start(tmp_path / "srv", data_dir=data, listen=listen,
                                    config=config)
        await channel.close()
        channel = grpc.aio.insecure_channel(server.address)
        remote = Remote(channel)
        response = await remote.wait_execution(operation.name)
        assert response.status.code == 0, response
        assert response.result.exit_code == 0
        assert await remote.blob(response.result.stdout_digest) == b"survived\n"
        assert response.result.execution_metadata.worker == bot.bot_id
        # Same session, same bot: the next action runs as usual.
        response = await remote.run(await remote.action("echo", "after"))
        assert response.result.exit_code == 0
        assert "registering again" not in bot.log()
        await channel.close()
    finally:
        server.kill()


async def test_bot_registers_again_when_its_session_is_closed(start_server: Any,
                                                              spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address)
    await bot.registered()
    first = await wait_for(lambda: sessions_of(server).get(bot.bot_id), "the session")
    # Another registration under the same bot id closes the bot's session on the server.
    stub = bots_pb2_grpc.BotsStub(server.channel)
    await stub.CreateBotSession(bots_pb2.CreateBotSessionRequest(
        bot_session=bots_pb2.BotSession(bot_id=bot.bot_id)))
    await bot.wait_log("registering again")
    await bot.wait_log("registered as session", 2)
    session = await wait_for(lambda: sessions_of(server).get(bot.bot_id), "a new session")
    assert session.name != first.name
    remote = Remote(server.channel)
    response = await remote.run(await remote.action("echo", "again"))
    assert response.result.exit_code == 0


async def test_sigterm_lets_the_running_action_finish(start_server: Any, spawn_bot: SpawnBot,
                                                      tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--drain-timeout", "30")
    remote = Remote(server.channel)
    go, started = tmp_path / "go", tmp_path / "started"
    digest = await remote.action(
        "sh", "-c", f"touch {started}; while [ ! -f {go} ]; do sleep 0.02; done; echo drained")
    call = remote.execute(digest)
    await wait_for(started.exists, "the command to start")
    bot.signal(signal.SIGTERM)
    await bot.wait_log("finishing running actions")
    await wait_for(lambda: sessions_of(server).get(bot.bot_id), "the session")
    await wait_for(lambda: getattr(sessions_of(server).get(bot.bot_id), "status", None)
                   == BotStatus.BOT_TERMINATING, "BOT_TERMINATING")
    # A new action is not given to a terminating bot.
    queued = remote.execute(await remote.action("echo", "later"))
    assert bot.process.poll() is None
    go.touch()
    response = await asyncio.wait_for(remote.client.result(call), WAIT)
    assert response.result.exit_code == 0
    assert await remote.blob(response.result.stdout_digest) == b"drained\n"
    assert await bot.exit_code() == 0
    assert not sessions_of(server)  # the server closed the session
    queued.cancel()


async def test_drain_timeout_kills_the_action_and_it_runs_elsewhere(
        start_server: Any, spawn_bot: SpawnBot, tmp_path: Path) -> None:
    server = await grid_server(start_server)
    first = spawn_bot(server.address, "--drain-timeout", "0.5")
    remote = Remote(server.channel)
    pid_file, second_run = tmp_path / "sleeper.pid", tmp_path / "second"
    digest = await remote.action(
        "sh", "-c", f"if [ -f {second_run} ]; then echo second; exit 0; fi; "
        f"sleep 1000 & echo $! > {pid_file}; wait")
    call = remote.execute(digest)
    sleeper = await wait_for(lambda: read_pid(pid_file), "the command to start")
    first.signal(signal.SIGTERM)
    assert await first.exit_code() == 0
    assert not pid_alive(sleeper)
    assert "killing it" in first.log()
    second_run.touch()
    second = spawn_bot(server.address)
    response = await asyncio.wait_for(remote.client.result(call), WAIT)
    assert response.result.exit_code == 0
    assert response.result.execution_metadata.worker == second.bot_id
    assert await remote.blob(response.result.stdout_digest) == b"second\n"


async def test_second_signal_stops_at_once(start_server: Any, spawn_bot: SpawnBot,
                                           tmp_path: Path) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--drain-timeout", "600")
    remote = Remote(server.channel)
    pid_file = tmp_path / "sleeper.pid"
    call = remote.execute(await remote.action(
        "sh", "-c", f"sleep 1000 & echo $! > {pid_file}; wait", do_not_cache=True))
    sleeper = await wait_for(lambda: read_pid(pid_file), "the command to start")
    bot.signal(signal.SIGTERM)
    await bot.wait_log("finishing running actions")
    bot.signal(signal.SIGINT)
    assert await bot.exit_code(10) == 1
    assert not pid_alive(sleeper)
    call.cancel()


# -- health --------------------------------------------------------------------------------

async def test_unhealthy_while_the_work_dir_is_unusable(start_server: Any,
                                                        spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--health-interval", "0.1")
    await bot.registered()
    await wait_for(lambda: sessions_of(server).get(bot.bot_id), "the session")
    actions = bot.work_dir / "actions"

    def replace_by_file() -> bool:
        # The bot's probe file may be there for an instant, and the bot recreates the
        # directory when it is missing: retry until a plain file holds the place.
        try:
            if actions.is_dir():
                actions.rmdir()
            actions.write_text("a file where the bot's directory should be")
        except OSError:
            return False
        return actions.is_file()

    await wait_for(replace_by_file, "the work dir replaced by a file")
    await wait_for(lambda: status_of(server, bot.bot_id) == BotStatus.UNHEALTHY, "UNHEALTHY")
    remote = Remote(server.channel)
    call = remote.execute(await remote.action("echo", "healthy"))
    operation = await remote.client.first_operation(call)
    assert Client.metadata(operation).stage == re_pb2.ExecutionStage.QUEUED
    actions.unlink()
    await wait_for(lambda: status_of(server, bot.bot_id) == BotStatus.OK, "OK again")
    response = await asyncio.wait_for(remote.client.result(call), WAIT)
    assert response.result.exit_code == 0


async def test_unhealthy_below_the_free_space_floor(start_server: Any,
                                                    spawn_bot: SpawnBot) -> None:
    server = await grid_server(start_server)
    bot = spawn_bot(server.address, "--min-free-space", "1000PiB")
    await bot.wait_log("unhealthy: only")
    await wait_for(lambda: sessions_of(server).get(bot.bot_id), "the session")
    await wait_for(lambda: status_of(server, bot.bot_id) == BotStatus.UNHEALTHY, "UNHEALTHY")


async def test_two_bots_cannot_share_a_work_dir(start_server: Any, spawn_bot: SpawnBot,
                                                tmp_path: Path) -> None:
    server = await grid_server(start_server)
    first = spawn_bot(server.address, work_dir=tmp_path / "shared")
    await first.registered()
    second = spawn_bot(server.address, work_dir=tmp_path / "shared")
    assert await second.exit_code() != 0
    assert "in use by another bot" in second.log()
    assert first.process.poll() is None
