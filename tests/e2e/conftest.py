"""Fixtures of the end-to-end suite: Bazel, a workspace, and a grid from `buildfleet up`.

- `bazel_binary`: Debian's `bazel-bootstrap` (Bazel 4.2.3).  When `bazel` is not on
  PATH the session installs it with ``apt-get update && apt-get install -y
  bazel-bootstrap`` (under a lock, so that parallel sessions do not race); it skips,
  saying why, only when apt-get itself is not there.
- `grid`: one `buildfleet up` process for the session, with two instances (``""``
  and ``ci/linux``), each with its own bots.
- `secure_grid`: `buildfleet up --secure` (TLS and bearer tokens), for the session;
  `tls_bazel` runs Bazel with the startup options that give it TLS (see
  `bazel_tls_options`).
- `bazel`: runs Bazel in the generated workspace with an output root of its own in a
  temporary directory (a 1 GiB JVM heap, idle shutdown after 5 minutes) and shuts the
  Bazel server down at the end.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from upprocess import UpProcess

from .workspace import Workspace, write_workspace

NAMED_INSTANCE = "ci/linux"
BOTS_PER_INSTANCE = 2
APT_TIMEOUT = 900.0
BAZEL_TIMEOUT = 600.0


# -- Bazel itself ---------------------------------------------------------------------

def _apt_install(package: str, installed: Callable[[], bool]) -> None:
    """Install a Debian package unless `installed()` already holds (under a lock, so that
    parallel sessions do not race); skip, saying why, when there is no apt-get."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        pytest.skip(f"{package} is not installed and apt-get is not available")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock_path = Path(tempfile.gettempdir()) / "buildfleet-e2e-apt.lock"
    with open(lock_path, "ab") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # one installing session at a time
        if installed():
            return
        for command in ([apt_get, "update", "-q"],
                        [apt_get, "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600",
                         package]):
            result = subprocess.run(command, capture_output=True, text=True, env=env,
                                    stdin=subprocess.DEVNULL, timeout=APT_TIMEOUT)
            if result.returncode != 0:
                pytest.fail(f"installing Bazel failed: {' '.join(command)} exited "
                            f"{result.returncode}\n{result.stdout[-4000:]}\n"
                            f"{result.stderr[-4000:]}")


@pytest.fixture(scope="session")
def bazel_binary() -> str:
    if shutil.which("bazel") is None:
        _apt_install("bazel-bootstrap", lambda: shutil.which("bazel") is not None)
    found = shutil.which("bazel")
    if found is None:
        pytest.fail("bazel-bootstrap is installed but `bazel` is not on PATH")
    return found


def _tcnative() -> Path | None:
    """Debian's netty-tcnative JNI library, if installed (any architecture)."""
    return next(iter(sorted(Path("/usr/lib").glob("*/jni/libnetty-tcnative.so"))), None)


@pytest.fixture(scope="session")
def bazel_tls_options(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Startup options that let Debian's Bazel open TLS connections.

    Its Netty has no JDK ALPN support, so gRPC over TLS needs netty-tcnative (OpenSSL):
    Debian's libnetty-tcnative-jni, under the file name Netty looks for (the library
    checks its own file name, so a copy, not a symlink) in a directory that
    java.library.path names."""
    _apt_install("libnetty-tcnative-jni", lambda: _tcnative() is not None)
    library = _tcnative()
    if library is None:
        pytest.fail("libnetty-tcnative-jni is installed but libnetty-tcnative.so is not "
                    "under /usr/lib/*/jni")
    directory = tmp_path_factory.mktemp("tcnative")
    shutil.copyfile(library, directory / "libnetty_tcnative.so")
    return [f"--host_jvm_args=-Djava.library.path={directory}"]


# -- the grid ------------------------------------------------------------------------

@pytest.fixture(scope="session")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    """`buildfleet up` with the instances "" and NAMED_INSTANCE, stopped at the end."""
    base = tmp_path_factory.mktemp("grid")
    config = base / "buildfleet.yaml"
    config.write_text(yaml.safe_dump({"instances": {"": {}, NAMED_INSTANCE: {}}}))
    with UpProcess.start(base, bots=BOTS_PER_INSTANCE, config=config) as up:
        yield up
        code = up.stop()
        assert code == 0, f"buildfleet up exited with {code}:\n{up.report()}"


@pytest.fixture(scope="session")
def secure_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    """`buildfleet up --secure` (TLS with its own CA, bearer tokens), instance "" only."""
    base = tmp_path_factory.mktemp("secure-grid")
    with UpProcess.start(base, bots=BOTS_PER_INSTANCE, extra_args=["--secure"]) as up:
        yield up
        code = up.stop()
        assert code == 0, f"buildfleet up --secure exited with {code}:\n{up.report()}"


# -- running Bazel -------------------------------------------------------------------

_PROCESSES = re.compile(r"^INFO: \d+ process(?:es)?: (?P<kinds>.*)\.$", re.MULTILINE)


@dataclass
class BazelRun:
    """One finished Bazel command."""

    args: list[str]
    returncode: int
    output: str  # stdout and stderr together, as a user sees them

    def processes(self) -> dict[str, int]:
        """The last "N processes: X internal, Y remote." line of the build, as a dict
        (kinds: internal, remote, remote cache hit, linux-sandbox, local, ...)."""
        matches = list(_PROCESSES.finditer(self.output))
        if not matches:
            return {}
        kinds: dict[str, int] = {}
        for part in matches[-1]["kinds"].split(", "):
            count, _, kind = part.partition(" ")
            kinds[kind] = kinds.get(kind, 0) + int(count)
        return kinds

    def describe(self) -> str:
        return f"bazel {' '.join(self.args)} exited {self.returncode}:\n{self.output[-12000:]}"


@dataclass
class Bazel:
    """Bazel in one workspace, with a private output root."""

    binary: str
    workspace: Workspace
    output_user_root: Path
    history: list[BazelRun] = field(default_factory=list)
    extra_startup_options: list[str] = field(default_factory=list)

    def startup_options(self) -> list[str]:
        return [f"--output_user_root={self.output_user_root}", "--nohome_rc",
                "--host_jvm_args=-Xmx1g", "--max_idle_secs=300",
                *self.extra_startup_options]

    def __call__(self, *args: str, timeout: float = BAZEL_TIMEOUT) -> BazelRun:
        command = [self.binary, *self.startup_options(), *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("BAZEL")}
        result = subprocess.run(command, cwd=self.workspace.root, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                timeout=timeout, env=env)
        run = BazelRun(list(args), result.returncode, result.stdout)
        self.history.append(run)
        return run

    def bin_path(self, relative: str) -> Path:
        return self.workspace.root / "bazel-bin" / relative

    def shutdown(self) -> None:
        subprocess.run([self.binary, *self.startup_options(), "shutdown"],
                       cwd=self.workspace.root, stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def bazel(bazel_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bazel]:
    base = tmp_path_factory.mktemp("bazel")
    runner = Bazel(bazel_binary, write_workspace(base / "src"), base / "output-root")
    try:
        yield runner
    finally:
        runner.shutdown()


@pytest.fixture(scope="module")
def tls_bazel(bazel_binary: str, bazel_tls_options: list[str],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bazel]:
    """Bazel in a workspace of its own, able to open TLS connections."""
    base = tmp_path_factory.mktemp("tls-bazel")
    runner = Bazel(bazel_binary, write_workspace(base / "src"), base / "output-root",
                   extra_startup_options=bazel_tls_options)
    try:
        yield runner
    finally:
        runner.shutdown()
