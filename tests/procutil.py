"""Run `buildfleet serve` as a real process for tests that need one.

`ServeProcess.start(...)` launches ``python -m buildfleet serve`` with its stderr in
a file, waits (bounded) until the server has logged ``listening on HOST:PORT`` for
every ``--listen`` address, and returns a handle with the resolved addresses.  Use
it as a context manager: a process still running at the end is killed.

Also here: `find_python(3, 12)`, which locates an interpreter of at least a given
version for tests that drive clients needing a newer Python than the project's.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

_LISTENING = re.compile(r"listening on (?P<address>\S+:\d+)\s*$", re.MULTILINE)

DEFAULT_READY_TIMEOUT = 30.0


class ServeError(AssertionError):
    """The server process did not come up (or did not go down) as expected."""


def buildfleet_command(*args: str) -> list[str]:
    """The command line that runs the `buildfleet` console script with `args`."""
    return [sys.executable, "-m", "buildfleet", *args]


def run_buildfleet(*args: str, cwd: Path,
                   timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `buildfleet ARGS` to completion, capturing its output as text."""
    return subprocess.run(buildfleet_command(*args), cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env=_child_env())


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class ChildProcess:
    """A process a test started: signals, bounded waits, and SIGKILL on exit."""

    NAME = "child process"
    STOP_TIMEOUT = 30.0
    error: type[AssertionError] = AssertionError

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process

    def details(self) -> str:
        """What the process wrote, for failure messages."""
        return ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def send_signal(self, signum: int) -> None:
        if self.running():
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait (bounded) for the process to exit; its exit code."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self.error(f"{self.NAME} (pid {self.pid}) still running after "
                             f"{timeout:g} s:\n{self.details()}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float | None = None) -> int:
        """Send `signum` and wait for the exit code."""
        self.send_signal(signum)
        return self.wait(self.STOP_TIMEOUT if timeout is None else timeout)

    def kill(self) -> None:
        """SIGKILL the process if it is still running, and reap it."""
        if self.running():
            self.process.kill()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.kill()


class ServeProcess(ChildProcess):
    """A `buildfleet serve` process and where it listens."""

    NAME = "buildfleet serve"
    error = ServeError

    def __init__(self, process: subprocess.Popen[bytes], stderr_path: Path,
                 listen: Sequence[str]) -> None:
        super().__init__(process)
        self.stderr_path = stderr_path
        self.listen = list(listen)
        self.addresses: list[str] = []

    # -- starting ---------------------------------------------------------------

    @classmethod
    def spawn(cls, workdir: Path, *, data_dir: Path | None = None,
              listen: Sequence[str] = ("127.0.0.1:0",), config: Path | None = None,
              extra_args: Sequence[str] = ()) -> ServeProcess:
        """Launch the process without waiting for it to be ready."""
        workdir.mkdir(parents=True, exist_ok=True)
        args = ["serve"]
        for address in listen:
            args += ["--listen", address]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        if config is not None:
            args += ["--config", str(config)]
        args += list(extra_args)
        stderr_path = _fresh_path(workdir, "serve", ".stderr")
        with open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(buildfleet_command(*args), cwd=workdir,
                                       stdin=subprocess.DEVNULL, stdout=stderr,
                                       stderr=subprocess.STDOUT, env=_child_env())
        return cls(process, stderr_path, listen)

    @classmethod
    def start(cls, workdir: Path, *, data_dir: Path | None = None,
              listen: Sequence[str] = ("127.0.0.1:0",), config: Path | None = None,
              extra_args: Sequence[str] = (),
              timeout: float = DEFAULT_READY_TIMEOUT) -> ServeProcess:
        """Launch the process and wait until it serves every listen address."""
        server = cls.spawn(workdir, data_dir=data_dir, listen=listen, config=config,
                           extra_args=extra_args)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.kill()
            raise
        return server

    def wait_ready(self, timeout: float = DEFAULT_READY_TIMEOUT) -> list[str]:
        """Wait until one ``listening on`` line per listen address has been logged."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            found = _LISTENING.findall(self.output())
            if len(found) >= len(self.listen):
                self.addresses = found[:len(self.listen)]
                return self.addresses
            if self.process.poll() is not None:
                raise ServeError(f"buildfleet serve exited with {self.process.returncode} "
                                 f"before listening:\n{self.output()}")
            if time.monotonic() > deadline:
                raise ServeError(f"buildfleet serve did not log 'listening on' within "
                                 f"{timeout:.0f} s:\n{self.output()}")
            time.sleep(delay)
            delay = min(delay * 2, 0.2)

    # -- observing --------------------------------------------------------------

    @property
    def address(self) -> str:
        """The first listen address, port resolved (HOST:PORT)."""
        if not self.addresses:
            raise ServeError("the server is not ready (no 'listening on' line seen)")
        return self.addresses[0]

    def output(self) -> str:
        """Everything the process wrote to stderr and stdout so far."""
        try:
            return self.stderr_path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    details = output


def _fresh_path(directory: Path, stem: str, suffix: str) -> Path:
    for index in range(1000):
        path = directory / f"{stem}-{index}{suffix}"
        if not path.exists():
            return path
    raise ServeError(f"too many {stem} files in {directory}")


# -- locating another Python ---------------------------------------------------------

def python_version(executable: str | Path) -> tuple[int, int] | None:
    """(major, minor) of the interpreter at `executable`, None when it does not run."""
    try:
        result = subprocess.run(
            [str(executable), "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    try:
        major, minor = (int(part) for part in result.stdout.split())
    except ValueError:
        return None
    return major, minor


def find_python(major: int, minor: int) -> str | None:
    """The newest Python interpreter of version >= major.minor; None if there is none.

    Looks at the running interpreter, ``pythonX.Y`` on PATH and pyenv's versions.
    """
    if sys.version_info[:2] >= (major, minor):
        return sys.executable
    candidates: list[str] = []
    for newer in range(minor + 6, minor - 1, -1):
        found = shutil.which(f"python{major}.{newer}")
        if found:
            candidates.append(found)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    pattern = str(pyenv_root / "versions" / f"{major}.*" / "bin" / f"python{major}")
    candidates += glob.glob(pattern)
    best: tuple[tuple[int, int], str] | None = None
    for candidate in dict.fromkeys(candidates):
        version = python_version(candidate)
        if version is not None and version >= (major, minor) and (best is None
                                                                  or version > best[0]):
            best = (version, candidate)
    return None if best is None else best[1]
